"""Issue 26's measures: gsrv's `transport = "http"` beside the CGI hosts people use, in one
interleaved run (each round: every server in turn), each on 127.0.0.1 and a port it binds:

- lighttpd mod_cgi (server.stream-request-body = 2, and its default 0), nginx + fcgiwrap,
  Apache mod_cgid (mpm_event), each from Debian's packages with a config of this script's;
- a one-line CGI `sh` script under `ab -c 20` (a connection per request): requests/s;
- the same script printing its Content-Length, with keep-alive (`h2load --h1 -c 20`): requests/s;
- a 1 GiB PUT (curl -T, Content-Length) into a CGI running `cat > /dev/null`: MB/s, the
  server's memory growth (PSS of its own processes, peak during the upload over before) and
  what it wrote to disk (its processes' write_bytes);
- gsrv alone: 1,000 idle keep-alive connections, its RSS growth per connection.

Usage: python bench/cgi_hosts.py [--rounds 3] [--out bench/results/cgi_hosts.md] [--skip-put]
Only processes this script started are ended (by PID); temp files are under one temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import psutil
import servers

HELLO = "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho hello\n"
SIZED = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\nContent-Length: 6\\r\\n\\r\\nhello\\n'\n"
SINK = "#!/bin/sh\ncat > /dev/null\nprintf 'Content-Type: text/plain\\r\\n\\r\\ndone\\n'\n"
GiB = 1 << 30
MODULES = "/usr/lib/apache2/modules"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def www(tmp: str) -> str:
    root = os.path.join(tmp, "www")
    os.makedirs(root, exist_ok=True)
    os.chmod(tmp, 0o755)
    for name, text in (("hello.sh", HELLO), ("sized.sh", SIZED), ("sink.sh", SINK)):
        path = os.path.join(root, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return root


def gsrv(tmp: str, port: int) -> subprocess.Popen[bytes]:
    """Three services on ports of their own (port is the peers': gsrv logs what it bound)."""
    root = www(tmp)
    config = os.path.join(tmp, "gsrv.toml")
    with open(config, "w") as f:
        f.write('[server]\nkill_grace = "1s"\ndrain_timeout = "1s"\n')
        for name in ("hello", "sized", "sink"):
            f.write(f'[services.{name}]\nlisten = "127.0.0.1:0"\ncommand = ["{root}/{name}.sh"]\n'
                    f'transport = "http"\nmax_sessions = 1100\nhttp = {{ path = "/{name}.sh" }}\n')  # fmt: skip
    log = open(os.path.join(tmp, "gsrv.log"), "w")  # noqa: SIM115 (the server's for its life)
    return subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", config], stderr=log, stdin=subprocess.DEVNULL)


def lighttpd(stream: int) -> Callable[[str, int], subprocess.Popen[bytes]]:
    def start(tmp: str, port: int) -> subprocess.Popen[bytes]:
        root, up = www(tmp), os.path.join(tmp, "uploads")
        os.makedirs(up, exist_ok=True)
        config = os.path.join(tmp, "lighttpd.conf")
        with open(config, "w") as f:
            f.write(f'server.document-root = "{root}"\nserver.bind = "127.0.0.1"\nserver.port = {port}\n'
                    f'server.modules = ("mod_cgi")\ncgi.assign = (".sh" => "")\n'
                    f'server.stream-request-body = {stream}\nserver.upload-dirs = ("{up}")\n'
                    f'server.max-request-size = 2097152\nserver.max-keep-alive-requests = 1000\n'
                    f'server.errorlog = "{tmp}/lighttpd.err"\nserver.max-connections = 2048\n')  # fmt: skip
        return subprocess.Popen(["lighttpd", "-D", "-f", config], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return start


def nginx(tmp: str, port: int) -> subprocess.Popen[bytes]:
    root, sock = www(tmp), os.path.join(tmp, "fcgi.sock")
    fcgi = subprocess.Popen(["fcgiwrap", "-c", "4", "-s", f"unix:{sock}"], stdin=subprocess.DEVNULL)
    config = os.path.join(tmp, "nginx.conf")
    temp = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"))
    with open(config, "w") as f:
        f.write(f"daemon off;\nuser root;\nworker_processes 2;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx.err;\n"
                f"events {{ worker_connections 4096; }}\nhttp {{ access_log off; {temp} client_max_body_size 0;\n"
                f"  keepalive_requests 1000;\n  server {{ listen 127.0.0.1:{port}; location / {{\n"
                f"    include /etc/nginx/fastcgi_params; fastcgi_param SCRIPT_FILENAME {root}$fastcgi_script_name;\n"
                f"    fastcgi_pass unix:{sock}; }} }} }}\n")  # fmt: skip
    proc = subprocess.Popen(["nginx", "-c", config, "-p", tmp], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.fcgi = fcgi  # type: ignore[attr-defined]
    return proc


def apache(tmp: str, port: int) -> subprocess.Popen[bytes]:
    root = www(tmp)
    config = os.path.join(tmp, "apache.conf")
    modules = ("mpm_event", "authz_core", "cgid", "alias")
    with open(config, "w") as f:
        f.write("".join(f"LoadModule {m}_module {MODULES}/mod_{m}.so\n" for m in modules))
        f.write(f"ServerName localhost\nListen 127.0.0.1:{port}\nPidFile {tmp}/apache.pid\nErrorLog {tmp}/apache.err\n"
                f"DefaultRuntimeDir {tmp}\nScriptSock {tmp}/cgid.sock\nUser nobody\nGroup nogroup\n"
                f"DocumentRoot {root}\nScriptAlias / {root}/\n<Directory {root}>\n  Require all granted\n</Directory>\n"
                f"KeepAlive On\nMaxKeepAliveRequests 1000\nLimitRequestBody 0\n")  # fmt: skip
    return subprocess.Popen(["apache2", "-f", config, "-DFOREGROUND"], stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


PEERS: dict[str, tuple[Callable[[str, int], subprocess.Popen[bytes]], str]] = {
    "gsrv": (gsrv, "python3"),
    "lighttpd (stream 2)": (lighttpd(2), "lighttpd"),
    "lighttpd (default)": (lighttpd(0), "lighttpd"),
    "nginx + fcgiwrap": (nginx, "nginx"),
    "apache mod_cgid": (apache, "apache2"),
}


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def gsrv_address(tmp: str, name: str) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with open(os.path.join(tmp, "gsrv.log")) as f:
            found = re.search(rf"event=listening service={name} address=\S+:(\d+)", f.read())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"gsrv's {name} did not listen")


def ab(port: int, path: str, count: int) -> dict[str, float]:
    run = subprocess.run(["ab", "-q", "-n", str(count), "-c", "20", "-s", "30", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    rate = re.search(r"Requests per second:\s+([\d.]+)", run.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", run.stdout)
    if not rate or not failed:
        raise RuntimeError(f"ab failed: {(run.stderr or run.stdout)[-300:]}")
    return {"req/s": float(rate.group(1)), "failed": float(failed.group(1))}


def h2load(port: int, path: str, count: int) -> dict[str, float]:
    run = subprocess.run(["h2load", "--h1", "-n", str(count), "-c", "20", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", run.stdout)
    ok = re.search(r"(\d+) succeeded", run.stdout)
    if not rate or not ok:
        raise RuntimeError(f"h2load failed: {run.stdout[-300:]}")
    return {"req/s": float(rate.group(1)), "failed": float(count - int(ok.group(1)))}


def put(port: int, path: str, body: str, pid: int) -> dict[str, float]:
    """curl -T of the 1 GiB file; the server's PSS growth and disk writes while it ran."""
    procs = servers.server_processes(pid)
    written = sum(_written(p) for p in procs)
    before = servers.server_memory(pid)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], servers.server_memory(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    run = subprocess.run(["curl", "-sS", "-T", body, "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=600)  # fmt: skip
    seconds = time.monotonic() - started
    done.set()
    watcher.join()
    if run.stdout != "200":
        raise RuntimeError(f"PUT failed: {run.stdout} {run.stderr[-300:]}")
    procs = servers.server_processes(pid) or procs
    return {"MB/s": GiB / seconds / 1e6, "mem_MiB": (peak[0] - before) / 2**20,
            "disk_MiB": (sum(_written(p) for p in procs) - written) / 2**20}  # fmt: skip


def _written(p: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return int(p.io_counters().write_bytes)
    return 0


def _whole(reply: bytes) -> bool:
    """A whole response: its head, then Content-Length's bytes (gsrv sends one for a short
    output) or a chunked body's last chunk."""
    head, found, body = reply.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return len(body) >= int(length.group(1)) if length else body.endswith(b"0\r\n\r\n")


def idle_keepalive(port: int, pid: int, count: int = 1000) -> dict[str, float]:
    """count connections, one request each, then held idle: gsrv's RSS growth per connection."""
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    held = []
    request = f"GET /hello.sh HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request)
        reply = b""
        while not _whole(reply):
            data = sock.recv(4096)
            if not data:
                raise RuntimeError("a kept-alive connection closed")
            reply += data
        held.append(sock)
    time.sleep(1)
    grown = proc.memory_info().rss - before
    for sock in held:
        sock.close()
    return {"bytes/conn": grown / count}


Results = dict[tuple[str, str], list[dict[str, float]]]


def measure(results: Results, name: str, ports: dict[str, int], pid: int, body: str | None, first: bool) -> None:
    results[("ab -c 20, a connection each", name)].append(ab(ports["hello"], "/hello.sh", 2000))
    results[("h2load --h1 -c 20, keep-alive", name)].append(h2load(ports["sized"], "/sized.sh", 4000))
    if body is not None:
        results[("1 GiB PUT into cat > /dev/null", name)].append(put(ports["sink"], "/sink.sh", body, pid))
    if name == "gsrv" and first:
        results[("1,000 idle keep-alive connections", name)].append(idle_keepalive(ports["hello"], pid))


def run(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    body = os.path.join(tempfile.gettempdir(), f"gsrv-bench-put-{os.getpid()}")
    if not args.skip_put:
        with open(body, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(block)
    try:
        for n in range(args.rounds):
            for name, (start, needs) in PEERS.items():
                if not shutil.which(needs):
                    continue
                with tempfile.TemporaryDirectory(prefix="gsrv-http-bench-") as tmp:
                    port = free_port()
                    proc = start(tmp, port)
                    try:
                        if name == "gsrv":
                            ports = {p: gsrv_address(tmp, p) for p in ("hello", "sized", "sink")}
                        else:
                            wait_port(port)
                            ports = dict.fromkeys(("hello", "sized", "sink"), port)
                        measure(results, name, ports, proc.pid, body if not args.skip_put else None, n == 0)
                    finally:
                        fcgi = getattr(proc, "fcgi", None)
                        servers.stop(proc)
                        if fcgi is not None:
                            servers.stop(fcgi)
                print(f"round {n + 1}: {name} done", file=sys.stderr)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(body)
    return results


def report(results: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    lines = ["| measure | server | median | runs | ratio gsrv / this |", "|---|---|---|---|---|"]
    for (title, name), runs in results.items():
        for key in runs[0]:
            values = [r[key] for r in runs]
            med = statistics.median(values)
            ours = results.get((title, "gsrv"))
            ratio = ""
            if ours and name != "gsrv" and key in ("req/s", "MB/s") and med:
                ratio = f"{statistics.median(r[key] for r in ours) / med:.2f}×"
            shown = ", ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {title}: {key} | {name} | {med:.1f} | {shown} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-put", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    table = report(run(args))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# bench/cgi_hosts.py, {time.strftime('%Y-%m-%d')}, {args.rounds} rounds\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

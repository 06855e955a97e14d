"""transport = "http" with real gsrv and real clients (curl, wrk, Python requests, raw sockets):
bodies of any size both ways in bounded memory, CGI heads, failures that never look complete,
keep-alive, and the requests refused before any child."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from conftest import ROOT, py_child, service_with, tls_files, wait_until

MiB = 1024 * 1024
GiB = 1024 * MiB
HTTP = {"transport": "http"}


def http_service(name: str, command: list[str], http: dict[str, object] | None = None, **keys: object) -> str:
    return service_with(name, command, "http", http, **HTTP, **keys)


def cgi(body: str) -> list[str]:
    """A CGI child in Python: body is its code (sys and os imported, `out` its binary stdout)."""
    return py_child("import os, sys\nout = sys.stdout.buffer\n" + textwrap.dedent(body))


def url(server, name: str, path: str = "/") -> str:
    host, port = server.address(name)
    return f"http://{host}:{port}{path}"


def curl(*args: str, timeout: float = 60, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], input=data, capture_output=True, timeout=timeout)


def ask(server, name: str, raw: bytes, shut: bool = False, timeout: float = 20) -> bytes:
    """Send raw bytes, read until gsrv closes (single thread: a reset is seen as one)."""
    with server.connect(name, timeout=timeout) as sock:
        sock.sendall(raw)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return got + b"<reset>"
            if not data:
                return got
            got += data


def bodies_of(reply: bytes) -> list[bytes]:
    """Each whole response's body in a stream of them, framed by Content-Length or chunked
    (gsrv sends a short response whose output had ended with its length, else chunked)."""
    found, rest = [], reply
    while True:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return found
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head + b"\r\n")
        if length is not None:
            size = int(length.group(1))
            if len(rest) < size:
                return found
            found.append(rest[:size])
            rest = rest[size:]
            continue
        body = b""
        while True:
            line, sep, after = rest.partition(b"\r\n")
            if not sep:
                return found
            size = int(line.split(b";")[0], 16)
            if size == 0:
                if after.startswith(b"\r\n"):  # no trailers
                    rest = after[2:]
                    break
                _trailers, sep, rest = after.partition(b"\r\n\r\n")
                if not sep:
                    return found
                break
            if len(after) < size + 2:
                return found
            body, rest = body + after[:size], after[size + 2 :]
        found.append(body)


def one_response(sock: socket.socket) -> bytes:
    """Read until one whole response came (either framing)."""
    reply = b""
    while not bodies_of(reply):
        data = sock.recv(4096)
        assert data, reply
        reply += data
    return reply


def pattern_file(path: Path, size: int) -> str:
    """A file of size bytes that is not all one byte; its sha256."""
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for n in range(size // MiB):
            chunk = n.to_bytes(8, "big") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


class RssWatch:
    """The server's RSS sampled every 50 ms in a thread: its growth over the first sample."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.first = self.proc.memory_info().rss
        self.most = self.first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.most = max(self.most, self.proc.memory_info().rss)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most - self.first


@pytest.fixture
def big_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    path = tmp_path / "1gib"
    digest = pattern_file(path, GiB)
    try:
        yield path, digest
    finally:
        path.unlink()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_curl_uploads_1_gib_with_expect_and_chunked_exact_in_bounded_memory(gsrv, big_file) -> None:
    path, digest = big_file
    server = gsrv(http_service("sum", ["sha256sum"], {"output": "body", "content_type": "text/plain"}))
    written = server.ps.io_counters().write_bytes
    rss = RssWatch(server.proc.pid)
    with_length = curl("-v", "-H", "Expect: 100-continue", "-T", str(path), url(server, "sum"), timeout=120)
    assert with_length.returncode == 0, with_length.stderr[-2000:]
    assert with_length.stdout.split()[0].decode() == digest
    assert b"HTTP/1.1 100 Continue" in with_length.stderr
    chunked = curl("-H", "Transfer-Encoding: chunked", "-T", "-", url(server, "sum"), timeout=120,
                   data=path.read_bytes())  # fmt: skip
    assert chunked.returncode == 0, chunked.stderr[-2000:]
    assert chunked.stdout.split()[0].decode() == digest
    assert rss.growth() < 16 * MiB
    assert server.ps.io_counters().write_bytes - written < MiB  # nothing of the bodies went to disk
    lines = [line for line in server.lines if "event=session_end service=sum " in line]
    assert len(lines) == 2 and all(f"bytes_in={GiB} " in line and "status=200" in line for line in lines), lines


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_curl_downloads_1_gib_at_20_mb_s_with_rss_flat(gsrv) -> None:
    server = gsrv(http_service("zero", ["head", "-c", str(GiB), "/dev/zero"], {"output": "body"}))
    rss = RssWatch(server.proc.pid)
    got = curl("--limit-rate", "20M", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", url(server, "zero"),
               timeout=100)  # fmt: skip
    assert got.returncode == 0 and got.stdout == f"{GiB} 200".encode(), got
    assert rss.growth() < 16 * MiB
    line = server.wait_log(r"event=session_end service=zero ")
    assert "reason=eof" in line and f"bytes_out={GiB} " in line, line


@pytest.mark.timeout(60)
def test_an_upload_cut_short_stops_the_child_before_it_sees_an_eof(gsrv, tmp_path: Path) -> None:
    marker = tmp_path / "whole"
    child = cgi(f"""
        n = len(sys.stdin.buffer.read())
        open({str(marker)!r}, "w").write(str(n))  # only a body taken as whole gets here
    """)
    server = gsrv(http_service("up", child))
    host = b"Host: 127.0.0.1\r\n"
    cut = [
        b"PUT / HTTP/1.1\r\n" + host + b"Content-Length: 1000000\r\n\r\n" + b"x" * 300000,
        b"PUT / HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"y" * 4096 + b"\r\n",
        b"PUT / HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n" + b"zz\r\nbad framing\r\n",
    ]
    for n, raw in enumerate(cut, 1):
        ask(server, "up", raw, shut=True)
        wait_until(lambda n=n: server.count_log(r"event=session_end service=up .*reason=client_reset") == n, 20,
                   f"{n} client_reset lines")  # fmt: skip
    time.sleep(0.5)
    assert not marker.exists(), marker.read_text()
    assert not server.children()


@pytest.mark.timeout(60)
def test_a_cgi_status_and_location_reach_curl(gsrv) -> None:
    server = gsrv(
        http_service("missing", cgi("out.write(b'Status: 404 Nope\\r\\nContent-Type: text/plain\\r\\n\\r\\ngone\\n')"))
        + http_service("moved", cgi("out.write(b'Location: http://example.invalid/there\\n\\n')"))
    )  # fmt: skip
    got = curl("-i", url(server, "missing", "/x"))
    assert got.stdout.startswith(b"HTTP/1.1 404 Nope\r\n") and got.stdout.endswith(b"\r\n\r\ngone\n"), got.stdout
    moved = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", url(server, "moved"))
    assert moved.stdout == b"302 http://example.invalid/there", moved


@pytest.mark.timeout(60)
def test_a_child_killed_mid_response_never_looks_complete(gsrv) -> None:
    killed = """
        import signal
        out.write(b"Content-Type: application/octet-stream\\r\\n{length}\\r\\n" + b"a" * 3000000)
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """
    server = gsrv(http_service("chunked", cgi(killed.format(length="")))
                  + http_service("sized", cgi(killed.format(length="Content-Length: 5000000\\r\\n"))))  # fmt: skip
    for name in ("chunked", "sized"):
        got = curl("-o", "/dev/null", url(server, name))
        assert got.returncode in (18, 56), (name, got)
        assert "signal=KILL" in server.wait_log(rf"event=session_end service={name} ")


@pytest.mark.timeout(60)
def test_exit_3_before_any_output_is_a_502_with_the_exit(gsrv) -> None:
    server = gsrv(http_service("fails", cgi("sys.exit(3)")))
    got = curl("-i", url(server, "fails"))
    assert got.stdout.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), got.stdout
    assert b"\r\nGsrv-Exit: 3\r\n" in got.stdout and b"exited 3" in got.stdout
    line = server.wait_log(r"event=session_end service=fails ")
    assert "status=502" in line and "exit=3" in line


@pytest.mark.timeout(60)
def test_a_child_that_wrote_its_whole_content_length_then_exits_1_is_a_reset(gsrv) -> None:
    child = cgi("""
        import time
        out.write(b"Content-Type: text/plain\\r\\nContent-Length: 5\\r\\n\\r\\nhello")
        out.flush()
        time.sleep(0.3)
        sys.exit(1)
    """)
    server = gsrv(http_service("late", child))
    reply = ask(server, "late", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert reply.endswith(b"\r\n\r\nhell<reset>"), reply  # its last byte waited for the exit, then a reset
    assert curl(url(server, "late")).returncode in (18, 56)
    assert "exit=1" in server.wait_log(r"event=session_end service=late ")


@pytest.mark.timeout(60)
def test_a_script_that_writes_1_mib_before_reading_its_1_mib_body_completes(gsrv, tmp_path: Path) -> None:
    child = cgi("""
        import hashlib
        out.write(b"Content-Type: application/octet-stream\\r\\n\\r\\n" + b"w" * (1 << 20))
        out.flush()
        out.write(hashlib.sha256(sys.stdin.buffer.read()).hexdigest().encode())
    """)
    server = gsrv(http_service("wbr", child))
    body = tmp_path / "body"
    digest = pattern_file(body, MiB)
    got = curl("-T", str(body), url(server, "wbr"), timeout=30)
    assert got.returncode == 0, got.stderr
    assert got.stdout == b"w" * MiB + digest.encode()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_keep_alive_1000_requests_on_one_connection_one_child_each_all_reaped(gsrv) -> None:
    child = ["printf", "Content-Type: text/plain\\r\\nContent-Length: 3\\r\\n\\r\\nhi\\n"]  # a quick child: 1000 run
    server = gsrv(http_service("hi", child))
    run = subprocess.run(["h2load", "--h1", "-n", "1000", "-c", "1", url(server, "hi")], capture_output=True,
                         timeout=90)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert b"1000 succeeded, 0 failed" in run.stdout, run.stdout
    wait_until(lambda: server.count_log(r"event=session_end service=hi ") >= 1000, 30, "1000 session_end lines")
    lines = [line for line in server.lines if "event=session_end service=hi " in line]
    first = re.search(r"session=(\S+)", lines[0])
    assert first is not None and "conn=" not in lines[0]
    assert sum(f"conn={first.group(1)} " in line for line in lines) == 999
    assert all("status=200" in line and "exit=0" in line for line in lines)
    wait_until(lambda: not server.children(), 10, "every child reaped")


@pytest.mark.timeout(60)
def test_pipelined_requests_are_answered_in_order_and_http_1_0_closes(gsrv) -> None:
    server = gsrv(http_service("echo", cgi("out.write(b'Content-Type: text/plain\\r\\n\\r\\n' "
                                           "+ os.environ['QUERY_STRING'].encode())")))  # fmt: skip
    head = b"GET /?%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /?3 HTTP/1.1\r\nHost: x.localhost\r\nConnection: close\r\n\r\n"
    reply = ask(server, "echo", head % 1 + head % 2 + last)
    assert bodies_of(reply) == [b"1", b"2", b"3"], reply
    assert reply.count(b"Connection: close") == 1
    old = ask(server, "echo", b"GET /?old HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    assert old.startswith(b"HTTP/1.0 200 OK\r\n") and old.endswith(b"\r\n\r\nold"), old
    assert b"Connection: close" in old and b"chunked" not in old


SMUGGLING = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400, "smuggling"),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "smuggling",
    ),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n", 400, "smuggling"),
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400, "smuggling"),
    (b"GET / HTTP/1.1\r\nHost: a\rX: 1\r\n\r\n", 400, "smuggling"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * (17 * 1024) + b"\r\n\r\n", 431, "head_too_large"),
    (b"GET /" + b"p" * (9 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "not_implemented"),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405, "method_not_allowed"),
    (b"DELETE /up HTTP/1.1\r\nHost: a\r\n\r\n", 405, "method_not_allowed"),
    (b"GET /upload HTTP/1.1\r\nHost: a\r\n\r\n", 404, "not_found"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 404, "not_found"),
    (b"GET /up/a/%2e%2e/b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    (b"GET /up/a%00b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    (b"GET /up HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403, "host_denied"),
    (b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413, "body_too_large"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
    (b"GET /up HTTP/9.9\r\nHost: a\r\n\r\n", 505, "version_not_supported"),
    (b"GET /up HTTP/3.0\r\nHost: a\r\n\r\n", 505, "version_not_supported"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "version_not_supported"),  # the HTTP/2 preface
    (b"GET /up HTTP/1.1\r\nHost: a\r\nX-A: a\x07b\r\n\r\n", 400, "bad_request"),
    (b"GET /up HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400, "bad_request"),
    (b"GET /up HTTP/1.1\r\nHost: evil.example@a\r\n\r\n", 400, "bad_request"),
    (b"GET /up HTTP/1.1\r\nHost: a/evil\r\n\r\n", 400, "bad_request"),
]


@pytest.mark.timeout(60)
def test_every_smuggling_form_and_refusal_gets_its_status_and_starts_no_child(gsrv) -> None:
    server = gsrv(http_service("up", ["cat"], {"path": "/up", "methods": ["GET", "POST", "PUT"], "max_body": 1000,
                                                "hosts": ["a"]}))  # fmt: skip
    for n, (raw, status, reason) in enumerate(SMUGGLING, 1):
        reply = ask(server, "up", raw)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (raw[:80], reply[:200])
        assert b"Connection: close" in reply and b"bytearray" not in reply and b"\x00" not in reply
        wait_until(lambda n=n: server.count_log(r"event=session_end service=up ") == n, 10, f"line {n}")
        line = [line for line in server.lines if "event=session_end service=up " in line][-1]
        assert f"reason={reason} " in line and "bytes_in=0" in line, line
    assert not any("exit=" in line or "cgroup=" in line for line in server.lines)  # no child ever started


@pytest.mark.timeout(60)
def test_the_status_line_says_http_1_1_or_1_0_never_the_requests_version(gsrv) -> None:
    server = gsrv(
        http_service("up", cgi('out.write(b"Content-Type: text/plain\\n\\n" + os.environ["SERVER_PROTOCOL"].encode())'))
    )
    assert ask(server, "up", b"GET / HTTP/1.5\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200 OK\r\n"
    )
    assert ask(server, "up", b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").startswith(b"HTTP/1.0 200 OK\r\n")
    assert ask(server, "up", b"GET / HTTP/1.0\r\nX-A: \x01\r\n\r\n").startswith(b"HTTP/1.0 400 Bad Request\r\n")


@pytest.mark.timeout(90)
def test_a_short_response_whose_output_ended_goes_with_its_length_unless_trailers_are_asked(gsrv) -> None:
    server = gsrv(http_service("up", ["sh", "-c", "printf 'Content-Type: text/plain\\n\\nhello'"]))
    heads = [ask(server, "up", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") for _ in range(20)]
    framed = [(b"\r\nContent-Length: 5\r\n" in h, b"\r\nTransfer-Encoding: chunked\r\n" in h) for h in heads]
    assert all(length != chunked for length, chunked in framed), heads  # one framing each, never both
    assert any(length for length, _ in framed), heads  # whole at the first read (most are; a race may miss one)
    assert all(
        h.endswith(b"hello") or h.endswith(b"0\r\nGsrv-Exit: 0\r\n\r\n") or h.endswith(b"0\r\n\r\n") for h in heads
    )
    for _ in range(5):  # a client that asked for the exit as a trailer gets it: chunked, always
        reply = ask(server, "up", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nTE: trailers\r\nConnection: close\r\n\r\n")
        assert b"\r\nTransfer-Encoding: chunked\r\n" in reply and reply.endswith(b"0\r\nGsrv-Exit: 0\r\n\r\n")
    ten = [ask(server, "up", b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n") for _ in range(10)]
    assert any(b"\r\nContent-Length: 5\r\n" in h for h in ten) and all(h.endswith(b"hello") for h in ten)


@pytest.mark.timeout(60)
def test_a_chunked_body_that_ends_in_a_bare_lf_runs_no_request_hidden_after_it(gsrv, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    child = cgi(
        f'open("{marker}", "a").write("x"); sys.stdin.buffer.read(); out.write(b"Content-Type: text/plain\\n\\nok")'
    )
    server = gsrv(http_service("up", child))
    for ending in (b"0\r\n\n", b"0\r\nX: 1\n\r\n", b"1;a\rb\r\nx\r\n0\r\n\r\n"):
        reply = ask(server, "up", b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"1\r\nx\r\n" + ending + b"GET /second HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # fmt: skip
        assert reply.count(b"HTTP/1.1 ") <= 1 and b"ok" not in reply, reply
    wait_until(lambda: server.count_log(r"event=session_end service=up ") >= 3, 10, "three ends")
    assert (marker.read_text() if marker.exists() else "").count("x") <= 3  # never the hidden request's child


@pytest.mark.timeout(60)
def test_a_slowloris_head_gets_408_at_handshake_timeout(gsrv) -> None:
    server = gsrv(http_service("slow", ["cat"], {"handshake_timeout": "1s"}))
    with server.connect("slow", timeout=20) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        reply = b""
        while data := sock.recv(4096):
            reply += data
            sock.sendall(b"a") if time.monotonic() - started < 0.9 else None
        took = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply
    assert took > 0.9  # not before handshake_timeout (the line below says which timer it was)
    assert "reason=head_timeout" in server.wait_log(r"event=session_end service=slow ")


@pytest.mark.timeout(60)
def test_cgi_environment_reaches_the_child(gsrv) -> None:
    child = cgi("""
        names = ["GATEWAY_INTERFACE", "SERVER_PROTOCOL", "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
                 "REQUEST_URI", "CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_X_TOKEN", "HTTP_PROXY", "HTTP_AUTHORIZATION",
                 "REMOTE_ADDR", "SERVER_NAME"]
        out.write(b"Content-Type: text/plain\\n\\n")
        out.write("".join(f"{n}={os.environ.get(n, '-')}\\n" for n in names).encode())
        out.write(b"body=" + sys.stdin.buffer.read())
    """)
    server = gsrv(http_service("env", child, {"path": "/app"}))
    got = requests.post(url(server, "env", "/app/a%20b/c?x=1&y=2"), data=iter([b"part1,", b"part2"]),
                        headers={"X-Token": "t", "Proxy": "http://evil", "Authorization": "Basic x",
                                 "Content-Type": "text/csv"}, timeout=20)  # fmt: skip
    assert got.status_code == 200
    env = dict(line.split("=", 1) for line in got.text.splitlines())
    assert env == {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_METHOD": "POST", "SCRIPT_NAME": "/app",
        "PATH_INFO": "/a b/c", "QUERY_STRING": "x=1&y=2", "REQUEST_URI": "/app/a%20b/c?x=1&y=2",
        "CONTENT_TYPE": "text/csv", "CONTENT_LENGTH": "-", "HTTP_X_TOKEN": "t", "HTTP_PROXY": "-",
        "HTTP_AUTHORIZATION": "-", "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "127.0.0.1", "body": "part1,part2",
    }  # fmt: skip


@pytest.mark.timeout(60)
def test_head_gets_no_body_and_a_drain_closes_a_connection_between_requests(gsrv) -> None:
    server = gsrv(http_service("hi", cgi("out.write(b'Content-Type: text/plain\\r\\n\\r\\nhello')")))
    head = ask(server, "hi", b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
    with server.connect("hi", timeout=20) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert bodies_of(one_response(sock)) == [b"hello"]
        wait_until(lambda: not server.children(), 10, "the child reaped")
        server.signal(15)
        assert sock.recv(4096) == b""  # a FIN at once: no request was in progress
    assert server.wait(20) == 0


@pytest.mark.timeout(60)
def test_a_kept_alive_connections_next_request_waits_for_a_slot_unread_not_refused(gsrv) -> None:
    child = cgi("""
        import time
        if os.environ["PATH_INFO"] == "/slow":
            time.sleep(2)
        out.write(b"Content-Type: text/plain\\r\\n\\r\\n" + os.environ["PATH_INFO"].encode())
    """)
    server = gsrv(http_service("one", child, max_sessions=1))
    request = b"GET /%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def answered(sock: socket.socket) -> bytes:
        return bodies_of(one_response(sock))[0]

    with server.connect("one") as kept, server.connect("one") as slow:
        kept.sendall(request % b"first")
        assert answered(kept) == b"/first"
        server.wait_log(r"event=session_end service=one .*path=/first")
        slow.sendall(request % b"slow")
        wait_until(server.children, 10, "the slow request's child, holding the one slot")
        kept.sendall(request % b"second")
        second = answered(kept)
        assert answered(slow) == b"/slow"
    assert second == b"/second"
    wait_until(lambda: server.count_log(r"event=session_end service=one ") == 3, 10, "three session_end lines")
    lines = [line for line in server.lines if "event=session_end service=one " in line]
    assert [re.search(r"path=(\S+)", line).group(1) for line in lines] == ["/first", "/slow", "/second"]  # type: ignore[union-attr]
    assert all("status=200" in line for line in lines)


@pytest.mark.timeout(60)
def test_a_chunked_body_over_max_body_is_413_and_stops_the_child(gsrv) -> None:
    server = gsrv(http_service("capped", cgi("sys.stdin.buffer.read(); out.write(b'Content-Type: a/b\\n\\ndone')"),
                               {"max_body": 1000}))  # fmt: skip
    raw = (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"z" * 512 + b"\r\n"
    )
    reply = ask(server, "capped", raw * 1 + (b"200\r\n" + b"z" * 512 + b"\r\n") * 2 + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 "), reply
    line = server.wait_log(r"event=session_end service=capped ")
    assert "reason=body_too_large" in line and "status=413" in line and "signal=TERM" in line, line


@pytest.mark.timeout(60)
def test_shipped_http_demos_answer_as_the_readme_says(gsrv) -> None:
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    demos = "".join(re.findall(r"^\[services\.(?:sha256-http|cgi)(?:\.http)?\].*\n(?:(?!\[).*\n)*", text, re.M))
    server = gsrv(re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', demos))
    readme = ROOT / "README.md"
    got = curl("-T", str(readme), url(server, "sha256-http"))
    assert got.returncode == 0 and got.stdout.split()[0].decode() == hashlib.sha256(readme.read_bytes()).hexdigest()
    with subprocess.Popen(["curl", "-sS", "-N", url(server, "cgi", "/cgi/hello?x=1")], stdout=subprocess.PIPE) as lines:
        assert lines.stdout is not None
        first = lines.stdout.readline()
        assert first == b"hello 127.0.0.1: GET /cgi/hello query 'x=1'\n", first
        assert server.count_log(r"event=session_end service=cgi ") == 0  # streamed: the child is still at work
        assert lines.stdout.readline() == b"step 1 of 3\n"  # as it is written, a second later
        rest = lines.stdout.read()
        assert lines.wait(10) == 0
    assert rest == b"step 2 of 3\nstep 3 of 3\ndone (the body you sent: 0 bytes)\n", rest


@pytest.mark.timeout(60)
def test_nph_passes_the_childs_whole_response_and_a_silent_failure_is_a_502(gsrv) -> None:
    teapot = cgi('out.write(b"HTTP/1.1 418 I\'m a teapot\\r\\nContent-Length: 3\\r\\n\\r\\ntea")')
    server = gsrv(http_service("teapot", teapot, {"output": "nph"})
                  + http_service("silent", cgi("sys.exit(4)"), {"output": "nph"}))  # fmt: skip
    got = curl("-i", url(server, "teapot"))
    assert got.returncode == 0 and got.stdout == b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 3\r\n\r\ntea", got
    assert "status=418" in server.wait_log(r"event=session_end service=teapot ")
    silent = curl("-i", url(server, "silent"))
    assert silent.stdout.startswith(b"HTTP/1.1 502 ") and b"Gsrv-Exit: 4" in silent.stdout, silent.stdout


@pytest.mark.timeout(90)
def test_https_is_tls_plus_http_uploads_and_keeps_alive(gsrv, tmp_path: Path) -> None:
    _, tls = tls_files(tmp_path)
    child = cgi("out.write(b'Content-Type: text/plain\\n\\n' + os.environ.get('HTTPS', '-').encode() + b' '"
                " + str(len(sys.stdin.buffer.read())).encode())")  # fmt: skip
    server = gsrv(http_service("secure", child, tls=tls))
    body = tmp_path / "body"
    pattern_file(body, 32 * MiB)
    secure = url(server, "secure").replace("http://", "https://")
    got = curl("--cacert", str(tmp_path / "ca.pem"), "-T", str(body), secure, "-T", str(body), secure, timeout=60)
    assert got.returncode == 0 and got.stdout == f"on {32 * MiB}".encode() * 2, got
    wait_until(lambda: server.count_log(r"event=session_end service=secure ") == 2, 10, "two requests")
    second = [line for line in server.lines if "event=session_end service=secure " in line][1]
    assert "conn=" in second and "tls=TLSv1.3" in second and f"bytes_in={32 * MiB} " in second, second
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with context.wrap_socket(server.connect("secure"), server_hostname="127.0.0.1") as sock:
        request = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6000\r\n\r\n" + b"a" * 6000
        sock.sendall(request + request)  # the second is read past the first's body: it waits in TLS's buffers
        reply = b""
        while reply.count(b"on 6000") < 2:
            data = sock.recv(65536)
            assert data, reply
            reply += data


@pytest.mark.timeout(60)
def test_the_exit_as_a_trailer_and_the_client_a_proxy_header_names(gsrv) -> None:
    child = cgi("out.write(b'Content-Type: text/plain\\n\\n' + os.environ['REMOTE_ADDR'].encode())")
    server = gsrv(http_service("proxied", child, proxy_protocol="v1", proxy_trusted=["127.0.0.1/32"]))
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nTE: trailers\r\nConnection: close\r\n\r\n"
    reply = ask(server, "proxied", b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n" + head)
    assert b"\r\nTrailer: Gsrv-Exit\r\n" in reply and reply.endswith(
        b"\r\n\r\nb\r\n203.0.113.7\r\n0\r\nGsrv-Exit: 0\r\n\r\n"
    ), reply
    assert "peer=203.0.113.7:4242" in server.wait_log(r"event=session_end service=proxied ")

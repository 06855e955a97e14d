"""Bad config files: `gsrv check` names the file, table and key, expected and got, and exits 2."""

from __future__ import annotations

import signal
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import PY, ROOT

from gsrv.config.units import format_size

PIPE_MAX = format_size(int(Path("/proc/sys/fs/pipe-max-size").read_text()))
NR_OPEN = int(Path("/proc/sys/fs/nr_open").read_text())
SVC = '[services.up]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n'

CASES = {
    "unknown_key": (
        SVC + "max_sesions = 3\n",
        '[services.up] has unknown key "max_sesions" (did you mean "max_sessions"?)',
    ),
    "unknown_table": ("[sever]\n" + SVC, "[sever] is not a known table (did you mean [server]?)"),
    "wrong_type": (
        SVC + 'max_sessions = "100"\n',
        '[services.up] max_sessions must be an integer >= 1 (got "100", a string)',
    ),
    "bad_size": (
        SVC + 'chunk_size = "64 kilobytes"\n',
        '[services.up] chunk_size must be a size: bytes as an integer or a string like "64KiB" '
        '(units B, KiB, MiB, GiB, KB, MB, GB) (got "64 kilobytes", a string)',
    ),
    "size_out_of_range": (
        SVC + 'chunk_size = "2MiB"\n',
        '[services.up] chunk_size must be between 4KiB and 1MiB (got "2MiB", a string)',
    ),
    "bad_relay": (
        SVC + 'relay = "fast"\n',
        '[services.up] relay must be one of "auto", "splice", "copy", "socket" (got "fast", a string)',
    ),
    "pty_with_splice": (
        SVC + 'pty = true\nrelay = "splice"\n',
        '[services.up] relay is "splice", which needs pipes: with pty = true gsrv copies to and from the terminal '
        '(use relay = "auto" or "copy")',
    ),
    "pty_with_socket_handoff": (
        SVC + 'pty = true\nrelay = "socket"\n',
        '[services.up] relay is "socket", which gives the child the connection itself: with pty = true gsrv copies '
        'to and from the terminal (use relay = "auto" or "copy")',
    ),
    "pty_with_pipe_size": (
        SVC + 'pty = true\npipe_size = "256KiB"\n',
        "[services.up] pipe_size sizes the stdin and stdout pipes, which a pty replaces (remove the key)",
    ),
    "websocket_with_reject_banner": (
        SVC + 'transport = "websocket"\nreject_banner = "busy"\n',
        '[services.up] reject_banner cannot be combined with transport = "websocket": its raw text would reach the '
        "client in place of an HTTP answer",
    ),
    "websocket_with_socket_handoff": (
        SVC + 'transport = "websocket"\nrelay = "socket"\n',
        '[services.up] relay is "socket", which cannot go with transport = "websocket": gsrv frames the bytes itself '
        '(use relay = "auto" or "copy")',
    ),
    "websocket_table_without_transport": (
        SVC + 'websocket = { path = "/ws" }\n',
        '[services.up] websocket applies only with transport = "websocket" (this service\'s transport is "tcp")',
    ),
    "stderr_websocket_without_transport": (
        SVC + 'stderr = "websocket"\n',
        '[services.up] stderr is "websocket", which needs transport = "websocket"',
    ),
    "websocket_bad_path": (
        SVC + 'transport = "websocket"\nwebsocket = { path = "ws" }\n',
        '[services.up.websocket] path must be a URL path like "/" or "/ws" (got "ws", a string)',
    ),
    "websocket_unknown_key": (
        SVC + 'transport = "websocket"\nwebsocket = { pth = "/" }\n',
        '[services.up.websocket] has unknown key "pth" (did you mean "path"?)',
    ),
    "websocket_passes_no_proxy_header": (
        SVC + 'transport = "websocket"\nwebsocket = { headers = ["Proxy"] }\n',
        '[services.up.websocket] headers cannot pass "Proxy" to the child (HTTP_PROXY would steer the child\'s own '
        "HTTP clients)",
    ),
    "websocket_bad_origin": (
        SVC + 'transport = "websocket"\nwebsocket = { origins = ["example.com"] }\n',
        '[services.up.websocket] origins must list origins like "https://example.com" or "http://host:8080", or "*" '
        '(got "example.com")',
    ),
    "websocket_pty_in_text_mode": (
        SVC + 'transport = "websocket"\npty = true\nwebsocket = { messages = "text" }\n',
        '[services.up.websocket] messages is "text", which waits for whole lines: with pty = true a prompt ends '
        'without a newline and would never arrive (use "binary", the default with a pty)',
    ),
    "websocket_max_message_in_binary_mode": (
        SVC + 'transport = "websocket"\nwebsocket = { messages = "binary", max_message = "4KiB" }\n',
        '[services.up.websocket] max_message bounds a text line; with messages = "binary" output goes out as it '
        "comes (remove the key)",
    ),
    "websocket_bad_host": (
        SVC + 'transport = "websocket"\nwebsocket = { hosts = ["app.example:8080"] }\n',
        '[services.up.websocket] hosts must list host names like "app.example" (no port), or "*" (got '
        '"app.example:8080")',
    ),
    "pty_not_a_flag": (SVC + 'pty = "yes"\n', '[services.up] pty must be true or false (got "yes", a string)'),
    "socket_handoff_with_pipe_size": (
        SVC + 'relay = "socket"\npipe_size = "256KiB"\n',
        '[services.up] pipe_size sizes the pipe relays\' pipes and buffers: with relay = "socket" the child reads '
        "and writes the connection itself (remove the key)",
    ),
    "socket_handoff_with_chunk_size": (
        SVC + 'relay = "socket"\nchunk_size = "16KiB"\n',
        '[services.up] chunk_size sizes the pipe relays\' pipes and buffers: with relay = "socket" the child reads '
        "and writes the connection itself (remove the key)",
    ),
    "socket_handoff_idle_timeout_on_a_unix_socket": (
        '[services.up]\nlisten = "unix:/tmp/gsrv-test-idle.sock"\ncommand = ["cat"]\nrelay = "socket"\n'
        'idle_timeout = "10s"\n',
        '[services.up] idle_timeout with relay = "socket" needs TCP_INFO\'s last-activity times, which a unix '
        "socket does not have (use session_timeout)",
    ),
    "pipe_size_past_the_kernel_ceiling": (  # the ceiling is fs.pipe-max-size (1MiB by default)
        SVC + 'pipe_size = "2GiB"\n',
        f"[services.up] pipe_size must be 0 (the kernel's default) or between 4KiB and {PIPE_MAX} "
        '(fs.pipe-max-size) (got "2GiB", a string)',
    ),
    "bad_cidr": (
        SVC + 'deny = ["10.0.0.0/33"]\n',
        '[services.up] deny must list addresses or CIDR blocks like "10.0.0.0/8" (got "10.0.0.0/33")',
    ),
    "proxy_without_trusted": (
        SVC + 'proxy_protocol = "v2"\n',
        '[services.up] proxy_trusted is required with proxy_protocol: the proxies\' addresses, like ["10.0.0.5/32"]',
    ),
    "proxy_on_a_unix_socket": (
        '[services.up]\nlisten = "unix:/tmp/gsrv-test-proxy.sock"\ncommand = ["cat"]\n'
        'proxy_protocol = "v1"\nproxy_trusted = ["127.0.0.1"]\n',
        '[services.up] proxy_protocol needs a TCP listen address (listen = "unix:/tmp/gsrv-test-proxy.sock" here): '
        "a unix socket's peer has no address to trust",
    ),
    "access_on_proxy_without_proxy": (
        SVC + 'access_on = "proxy"\n',
        '[services.up] access_on is "proxy" but proxy_protocol is "off": there is no PROXY header to read',
    ),
    "tls_cert_missing": (
        SVC + 'tls = { cert = "/nonexistent/server.pem", key = "/nonexistent/server.key" }\n',
        '[services.up.tls] cert "/nonexistent/server.pem" cannot be read: No such file or directory',
    ),
    "tls_unknown_key": (
        SVC + 'tls = { cert = "a.pem", key = "a.key", ca = "ca.pem" }\n',
        '[services.up.tls] has unknown key "ca" (known keys: cert, key, client_ca, handshake_timeout)',
    ),
    "banner_with_tls": (
        SVC + 'reject_banner = "busy"\ntls = { cert = "a.pem", key = "a.key" }\n',
        "[services.up] reject_banner cannot be combined with tls: the banner would reach the client before the "
        "handshake",
    ),
    "unknown_user": (
        SVC + 'user = "no-such-user-here"\n',
        '[services.up] user "no-such-user-here" does not exist on this machine',
    ),
    "rlimit_unknown": (
        SVC + "rlimits = { files = 10 }\n",
        '[services.up.rlimits] has unknown key "files" (did you mean "nofile"?)',
    ),
    "rlimit_cpu_fraction": (
        SVC + 'rlimits = { cpu = "1.5s" }\n',
        '[services.up.rlimits] cpu must be whole seconds, at least "1s" (got "1.5s", a string)',
    ),
    "bad_umask": (
        SVC + 'umask = "0999"\n',
        '[services.up] umask must be permission bits like "0027" (got "0999", a string)',
    ),
    "bad_rate": (
        SVC + 'rate_per_ip = "5/s"\n',
        '[services.up] rate_per_ip must be sessions per second as a number >= 0, like 5 or 0.5 (got "5/s", a string)',
    ),
    "bad_duration": (
        "[server]\ndrain_timeout = 30\n" + SVC,
        '[server] drain_timeout must be a duration: a string like "30s" (units ms, s, m, h) (got 30, an integer)',
    ),
    "zero_duration": (
        '[server]\nkill_grace = "0s"\n' + SVC,
        '[server] kill_grace must be greater than 0, like "2s" (got "0s", a string)',
    ),
    "empty_command": (
        '[services.up]\nlisten = "127.0.0.1:0"\ncommand = []\n',
        "[services.up] command must be a non-empty array of non-empty strings (got [], an array)",
    ),
    "shell_string_command": (
        '[services.up]\nlisten = "127.0.0.1:0"\ncommand = "cat -n"\n',
        '[services.up] command must be a non-empty array of non-empty strings (got "cat -n", a string)',
    ),
    "not_on_path": (
        '[services.up]\nlisten = "127.0.0.1:0"\ncommand = ["no-such-program-gsrv"]\n',
        '[services.up] command[0] "no-such-program-gsrv" was not found on PATH (/usr/bin:/bin)',
    ),
    "duplicate_address": (
        '[services.a]\nlisten = "127.0.0.1:7001"\ncommand = ["cat"]\n'
        '[services.b]\nlisten = "0.0.0.0:7001"\ncommand = ["cat"]\n',
        "[services.b] listen 0.0.0.0:7001 collides with 127.0.0.1:7001 of [services.a]",
    ),
    "bad_address": (
        '[services.up]\nlisten = "localhost:70001"\ncommand = ["cat"]\n',
        '[services.up] listen must be "host:port" or "[v6]:port" with an IP address and a port 0-65535, '
        '"unix:/path", "fd:N" (an inherited listening socket) or "systemd:NAME" (got "localhost:70001", a string)',
    ),
    "bad_toml": (
        '[services.up]\nlisten = "127.0.0.1:0\ncommand = ["cat"]\n',
        "is not valid TOML: Illegal character '\\n' (at line 2, column 22)",
    ),
    "bad_choice": (
        SVC + 'stderr = "file"\n',
        '[services.up] stderr must be one of "log", "discard", "stdout", "websocket" (got "file", a string)',
    ),
    "missing_listen": (
        '[services.up]\ncommand = ["cat"]\n',
        '[services.up] listen is required (for example listen = "127.0.0.1:7001")',
    ),
    "no_services": (
        '[server]\nlog_level = "info"\n',
        "[services] must define at least one service, like [services.echo]",
    ),
    "env_not_strings": (
        SVC + "env = { A = 1 }\n",
        '[services.up] env must be a table of strings, like { NAME = "value" } (got A = 1, an integer)',
    ),
    "missing_cwd": (
        SVC + 'cwd = "/no/such/dir"\n',
        '[services.up] cwd must be an existing directory (got "/no/such/dir", a string)',
    ),
    "deep_nesting": (
        SVC + "x = " + "[" * 2000 + "]" * 2000 + "\n",
        "nests arrays or tables too deeply for gsrv to read",
    ),
    "env_value_with_nul": (
        SVC + 'env = { A = "a\\u0000b" }\n',
        "[services.up.env] A holds a NUL character (\\u0000): no file name, argument or variable can",
    ),
    "argument_with_nul": (
        '[services.up]\nlisten = "127.0.0.1:0"\ncommand = ["cat", "a\\u0000"]\n',
        "[services.up.command] 1 holds a NUL character (\\u0000): no file name, argument or variable can",
    ),
    "env_name_with_equals": (
        SVC + 'env = { "A=B" = "x" }\n',
        '[services.up] env names must be non-empty and without "=" (got "A=B", a string)',
    ),
    "rlimit_past_any_limit": (
        SVC + "rlimits = { nofile = 1180591620717411303424 }\n",
        f"[services.up.rlimits] nofile must be at most {NR_OPEN} (this host's fs.nr_open) "
        "(got 1180591620717411303424, an integer)",
    ),
    "rlimit_size_past_any_limit": (
        SVC + 'rlimits = { fsize = "99999999999GiB" }\n',
        "[services.up.rlimits] fsize must be at most 9223372036854775807 (a limit's largest) "
        '(got "99999999999GiB", a string)',
    ),
    "queue_max_without_queue_timeout": (
        SVC + "queue_max = 8\n",
        '[services.up] queue_max applies only with queue_timeout (how long a client is held, like "5s")',
    ),
    "busy_banner_with_http": (
        SVC + 'transport = "http"\nqueue_timeout = "1s"\nbusy_banner = "busy"\n',
        '[services.up] busy_banner cannot go with transport = "http": a busy HTTP client gets 503 with Retry-After',
    ),
    "bad_log_level": (
        '[server]\nlog_level = "loud"\n' + SVC,
        '[server] log_level must be one of "debug", "info", "warning", "error" (got "loud", a string)',
    ),
}


def _check(path: Path, command: str = "check") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "gsrv", command, "-c", str(path)],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_is_named_precisely(tmp_path: Path, name: str) -> None:
    text, message = CASES[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    result = _check(path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"Error: {path}: {message}\n"


@pytest.mark.timeout(60)
def test_serve_refuses_a_bad_config_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CASES["unknown_key"][0])
    result = _check(path, "serve")
    assert result.returncode == 2
    assert result.stderr == f"Error: {path}: {CASES['unknown_key'][1]}\n"


@pytest.mark.timeout(60)
def test_unreadable_file_and_bad_usage_exit_2(tmp_path: Path) -> None:
    missing = _check(tmp_path / "absent.toml")
    assert missing.returncode == 2
    assert missing.stderr == f"Error: {tmp_path / 'absent.toml'}: cannot be read: No such file or directory\n"
    usage = subprocess.run([PY, "-m", "gsrv", "bogus"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2
    assert usage.stderr.endswith("For help, use gsrv -h\n")


@pytest.mark.timeout(60)
def test_shipped_config_passes_check() -> None:
    result = subprocess.run(
        [PY, "-m", "gsrv", "check", "-c", "conf/gsrv.toml"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    shipped = len(tomllib.loads((ROOT / "conf" / "gsrv.toml").read_text())["services"])
    assert result.stdout.splitlines()[0] == f"conf/gsrv.toml: ok, {shipped} service(s)"
    assert "relay=socket (the child holds the connection)" in result.stdout  # the whoami demo
    assert "relay=copy (pty) pty=true" in result.stdout  # the python demo
    stop = "server: drain_announce=off drain_timeout=30s upgrade_wait=10s kill_grace=2s (a stop takes at most 41s: "
    assert stop in result.stdout, result.stdout


@pytest.mark.timeout(60)
def test_a_reload_too_deep_to_read_keeps_the_running_config_and_signals_still_work(gsrv) -> None:
    server = gsrv(SVC)
    with server.config.open("a") as f:
        f.write("x = " + "[" * 2000 + "]" * 2000 + "\n")
    server.signal(signal.SIGHUP)
    assert "too deeply" in server.wait_log(r"event=reload_failed")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0

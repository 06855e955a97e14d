"""The child's whole environment, per transport, pinned: what a TCP, a WebSocket and an HTTP
child get for the same tricky request (a path with UTF-8, a byte that is not, a space; a query;
headers passed and held back). A change of these is a decision with its own test (the
hostile-input issue owns them), never a side effect of moving code."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import py_child, service_toml, service_with
from websockets.sync.client import connect

# The child prints its environment as JSON, less what comes from gsrv's own (pass_env).
OWN = "{k: v for k, v in os.environ.items() if k not in ('PATH', 'LANG', 'LC_ALL', 'TZ')}"
DUMP = f"import json, os, sys; sys.stdout.write(json.dumps({OWN}, sort_keys=True))"
HTTP_DUMP = f"import json, os, sys; sys.stdout.write('Content-Type: application/json\\n\\n' + json.dumps({OWN}))"
TARGET = "/app/caf%C3%A9/%FF%20x?q=%41&r"
VARIES = ("GSRV_SESSION", "TCPREMOTEPORT", "TCPLOCALPORT", "REMOTE_PORT", "SERVER_PORT")


def pinned(env: dict[str, str], port: int) -> dict[str, str]:
    """What varies from run to run, named: the session id, the ports (the listener's as LOCAL)."""
    return {k: ("LOCAL" if v == str(port) else "ANY") if k in VARIES else v for k, v in env.items()}


@pytest.fixture
def server(gsrv):
    return gsrv(
        service_toml("tcp", py_child(DUMP))
        + service_with(
            "ws",
            py_child(DUMP),
            "websocket",
            {"path": "/app", "headers": ["User-Agent", "X-Token"]},
            transport="websocket",
        )  # fmt: skip
        + service_with(
            "http", py_child(HTTP_DUMP), "http", {"path": "/app", "hosts": ["example.test"]}, transport="http"
        )  # fmt: skip
    )


@pytest.mark.timeout(60)
def test_a_tcp_child_gets_ucspis_names(server) -> None:
    host, port = server.address("tcp")
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.shutdown(socket.SHUT_WR)
        got = b"".join(iter(lambda: sock.recv(65536), b""))
    assert pinned(json.loads(got), port) == {
        "GSRV_SERVICE": "tcp", "GSRV_SESSION": "ANY", "PROTO": "TCP", "TCPLOCALIP": "127.0.0.1",
        "TCPLOCALPORT": "LOCAL", "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": "ANY",
    }  # fmt: skip


@pytest.mark.timeout(60)
def test_a_websocket_child_gets_the_request_by_cgis_names_and_only_the_headers_named(server) -> None:
    host, port = server.address("ws")
    headers = {"X-Token": "t", "Proxy": "p", "Authorization": "Basic eDp5"}
    with connect(f"ws://{host}:{port}{TARGET}", user_agent_header="probe/1", additional_headers=headers,
                 open_timeout=20) as ws:  # fmt: skip
        got = ws.recv(timeout=20)
    assert pinned(json.loads(got), port) == {
        "GSRV_SERVICE": "ws", "GSRV_SESSION": "ANY", "PROTO": "TCP", "TCPLOCALIP": "127.0.0.1",
        "TCPLOCALPORT": "LOCAL", "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": "ANY",
        "REQUEST_METHOD": "GET", "REQUEST_URI": TARGET, "PATH_INFO": "/café/\udcff x", "QUERY_STRING": "q=%41&r",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "ANY", "HTTP_USER_AGENT": "probe/1", "HTTP_X_TOKEN": "t",
    }  # fmt: skip


@pytest.mark.timeout(60)
def test_an_http_child_gets_rfc_3875s_variables(server) -> None:
    host, port = server.address("http")
    request = (f"GET {TARGET} HTTP/1.1\r\nHost: example.test:8080\r\nUser-Agent: probe/1\r\nX-Token: t\r\n"
               "Proxy: p\r\nAuthorization: Basic eDp5\r\nX-Token: u\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.sendall(request.encode())
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    if b"Transfer-Encoding: chunked" in head:
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    assert pinned(json.loads(body), port) == {
        "GSRV_SERVICE": "http", "GSRV_SESSION": "ANY", "PROTO": "TCP", "TCPLOCALIP": "127.0.0.1",
        "TCPLOCALPORT": "LOCAL", "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": "ANY",
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_SOFTWARE": "gsrv",
        "SERVER_NAME": "example.test", "SERVER_PORT": "LOCAL", "REQUEST_METHOD": "GET", "SCRIPT_NAME": "/app",
        "PATH_INFO": "/café/\udcff x", "QUERY_STRING": "q=%41&r", "REQUEST_URI": TARGET,
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "ANY", "HTTP_USER_AGENT": "probe/1", "HTTP_X_TOKEN": "t, u",
        "HTTP_HOST": "example.test:8080",
    }  # fmt: skip

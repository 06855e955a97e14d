"""The copy primitive in-process, over real pipes, in a gevent loop (no server, no children)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import struct
import time

import gevent
import pytest

from gsrv.relay import pump

pytestmark = pytest.mark.timeout(60)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def test_copy_is_exact_and_ends_at_source_eof() -> None:
    data = hashlib.shake_256(b"pump").digest(3 * 1024 * 1024 + 17)
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()
    meter = pump.Meter()

    def feed() -> None:
        pump.Fd(src_w, pump.WRITE).write_all(data)
        os.close(src_w)

    def drain() -> bytes:
        out, reader = [], pump.Fd(dst_r, pump.READ)
        while chunk := reader.read(7000):  # odd sizes: the copy must not depend on them
            out.append(chunk)
        return b"".join(out)

    feeder, drainer = gevent.spawn(feed), gevent.spawn(drain)
    with gevent.Timeout(30, "the copy did not finish in 30s"):
        end = pump.copy(src_r, dst_w, 65536, meter, sink_is_pipe=True)
        os.close(dst_w)
        received = drainer.get()
        feeder.get()
    assert end is pump.End.SOURCE_EOF
    assert received == data and meter.total == len(data)
    os.close(src_r)
    os.close(dst_r)


def test_a_pump_whose_sink_stalls_holds_no_chunk() -> None:
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()
    chunk = 16384
    buffers = pump.pool(chunk)
    meter = pump.Meter()
    copier = gevent.spawn(pump.copy, src_r, dst_w, chunk, meter, True)
    blocked = 0
    for _ in range(200):  # fill the sink pipe (nobody reads it), then the source pipe
        try:
            os.write(src_w, b"x" * 65536)
            blocked = 0
        except BlockingIOError:
            blocked += 1
            if blocked == 5:
                break
        gevent.sleep(0.02)
    assert blocked == 5, "the source pipe never filled up"
    gevent.sleep(0.1)
    assert not copier.dead and not meter.holding
    assert pump.queued(dst_r) == meter.total  # all the pump read sits in the sink pipe
    assert len(buffers._free) >= 1  # its buffer went back to the pool while it waits
    copier.kill()
    for fd in (src_r, src_w, dst_r, dst_w):
        os.close(fd)


def test_copy_reports_a_closed_sink() -> None:
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()
    os.close(dst_r)  # the reader is gone: writes fail with EPIPE
    os.write(src_w, b"hello")
    with gevent.Timeout(10, "copy did not notice the closed sink"):
        assert pump.copy(src_r, dst_w, 65536, pump.Meter(), sink_is_pipe=True) is pump.End.SINK_CLOSED
    for fd in (src_r, src_w, dst_w):
        os.close(fd)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of real TCP sockets on 127.0.0.1, both non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    for s in (client, accepted):
        s.setblocking(False)
    return client, accepted


def _feed(sock_or_fd: socket.socket | int, data: bytes) -> None:
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    pump.Fd(fd, pump.WRITE).write_all(data)
    if isinstance(sock_or_fd, int):
        os.close(fd)
    else:
        sock_or_fd.shutdown(socket.SHUT_WR)


def _drain(fd: int) -> bytes:
    out, reader = [], pump.Fd(fd, pump.READ)
    while chunk := reader.read(7000):
        out.append(chunk)
    reader.close()
    return b"".join(out)


@pytest.mark.parametrize("direction", ["socket to pipe", "pipe to socket"])
def test_splice_is_exact_both_ways_and_ends_at_source_eof(direction: str) -> None:
    data = hashlib.shake_256(b"splice").digest(5 * 1024 * 1024 + 3)
    client, server = _tcp_pair()
    pipe_r, pipe_w = _pipe()
    meter = pump.Meter()
    with gevent.Timeout(30, "the splice did not finish in 30s"):
        if direction == "socket to pipe":
            feeder, drainer = gevent.spawn(_feed, client, data), gevent.spawn(_drain, pipe_r)
            end = pump.splice(server.fileno(), pipe_w, meter, source_is_socket=True)
            os.close(pipe_w)
        else:
            feeder, drainer = gevent.spawn(_feed, pipe_w, data), gevent.spawn(_drain, client.fileno())
            end = pump.splice(pipe_r, server.fileno(), meter, source_is_socket=False)
            server.shutdown(socket.SHUT_WR)
        received = drainer.get()
        feeder.get()
    assert end is pump.End.SOURCE_EOF
    assert received == data and meter.total == len(data)
    for fd in (pipe_r, pipe_w) if direction == "socket to pipe" else (pipe_r,):
        with contextlib.suppress(OSError):
            os.close(fd)
    client.close()
    server.close()


def test_splice_into_a_stalled_pipe_waits_and_loses_nothing() -> None:
    client, server = _tcp_pair()
    pipe_r, pipe_w = _pipe()
    meter = pump.Meter()
    splicer = gevent.spawn(pump.splice, server.fileno(), pipe_w, meter, True)
    sent = bytearray()
    block = hashlib.shake_256(b"stall").digest(65536)
    for _ in range(400):  # nobody reads the pipe: the pipe fills, then the socket's buffers
        try:
            sent += block[: client.send(block)]
        except BlockingIOError:
            break
        gevent.sleep(0.005)
    else:
        raise AssertionError("the client's send buffer never filled up")
    gevent.sleep(0.2)
    assert not splicer.dead  # waiting on the full pipe, with bytes left in the socket
    assert pump.queued(pipe_r) == meter.total and pump.queued(server.fileno()) > 0
    gevent.spawn(_feed, client, b"")  # client EOF once everything is through
    with gevent.Timeout(30, "the stalled splice did not resume"):
        received = _drain_until(pipe_r, len(sent))
        assert splicer.get() is pump.End.SOURCE_EOF
    assert received == bytes(sent) and meter.blocked > 0
    for fd in (pipe_r, pipe_w):
        os.close(fd)
    client.close()
    server.close()


def _drain_until(fd: int, size: int) -> bytes:
    out, reader = bytearray(), pump.Fd(fd, pump.READ)
    while len(out) < size:
        out += reader.read(65536)
    reader.close()
    return bytes(out)


def test_splice_reports_which_side_failed() -> None:
    # the child closed its stdin: the sink is gone
    client, server = _tcp_pair()
    pipe_r, pipe_w = _pipe()
    os.close(pipe_r)
    client.send(b"hello")
    with gevent.Timeout(10, "splice did not notice the closed pipe"):
        assert pump.splice(server.fileno(), pipe_w, pump.Meter(), True) is pump.End.SINK_CLOSED
    os.close(pipe_w)
    # ... unless the client had sent all it will: then its input ended (as the copy path says)
    quiet, server2 = _tcp_pair()
    quiet.shutdown(socket.SHUT_WR)
    pipe_r, pipe_w = _pipe()
    os.close(pipe_r)
    with gevent.Timeout(10, "splice did not notice the closed pipe"):
        assert pump.splice(server2.fileno(), pipe_w, pump.Meter(), True) is pump.End.SOURCE_EOF
    for s in (quiet, server2):
        s.close()
    os.close(pipe_w)
    # the client reset: as the source it is an error, as the sink it is closed
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    pipe_r, pipe_w = _pipe()
    with gevent.Timeout(10, "splice did not notice the reset"):
        assert pump.splice(server.fileno(), pipe_w, pump.Meter(), True) is pump.End.SOURCE_ERROR
        os.write(pipe_w, b"reply")
        assert pump.splice(pipe_r, server.fileno(), pump.Meter(), False) is pump.End.SINK_CLOSED
    for fd in (pipe_r, pipe_w):
        os.close(fd)
    server.close()


@pytest.mark.parametrize("path", ["splice", "copy"])
def test_a_pump_whose_data_is_always_ready_still_yields(path: str) -> None:
    # Source and sink pipes of 1 MiB, the source holding 960 KiB and the sink empty: the pump
    # never waits, so only its own yields (every yield_every bytes) let another greenlet run.
    size, every = 1024 * 1024 - 64 * 1024, 64 * 1024
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()
    for fd in (src_w, dst_w):
        assert fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1024 * 1024) >= size
    data = hashlib.shake_256(b"fair").digest(size)
    assert pump.Fd(src_w, pump.WRITE).write_all(data) == 0.0  # it all fits: no wait
    os.close(src_w)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0)) for _ in range(1000)])
    meter = pump.Meter(yield_every=every)
    with gevent.Timeout(10, "the pump did not finish"):
        if path == "splice":
            end = pump.splice(src_r, dst_w, meter, source_is_socket=False)
        else:
            end = pump.copy(src_r, dst_w, 16384, meter, sink_is_pipe=True)
    ran_meanwhile = len(ticks)
    ticker.kill()
    assert end is pump.End.SOURCE_EOF and meter.total == size
    assert ran_meanwhile >= size // every - 2, f"another greenlet ran {ran_meanwhile} times while {size} B moved"
    assert os.read(dst_r, size + 1) == data
    for fd in (src_r, dst_r, dst_w):
        os.close(fd)


def test_splice_at_source_eof_into_a_full_sink_waits_without_spinning() -> None:
    # splice(2) reports the source's end only once the sink has room; until then the pump
    # must sleep on the sink, not spin between a readable (ended) source and EAGAIN.
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()
    os.write(src_w, b"last")
    os.close(src_w)  # the source ends after 4 bytes
    while True:  # fill the sink
        try:
            os.write(dst_w, b"x" * 65536)
        except BlockingIOError:
            break
    meter = pump.Meter()
    splicer = gevent.spawn(pump.splice, src_r, dst_w, meter, False)
    cpu = time.process_time()
    gevent.sleep(0.5)
    used = time.process_time() - cpu
    assert not splicer.dead and used < 0.25, f"the waiting pump used {used:.2f} s of CPU in 0.5 s"
    with gevent.Timeout(10, "the pump did not see the end once the sink had room"):
        pump.Fd(dst_r, pump.READ).read(1 << 20)  # make room
        assert splicer.get() is pump.End.SOURCE_EOF
    assert meter.total == 4
    for fd in (src_r, dst_r, dst_w):
        os.close(fd)

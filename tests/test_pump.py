"""The copy primitive in-process, over real pipes, in a gevent loop (no server, no children)."""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest

from gsrv import pump

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

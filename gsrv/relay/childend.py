"""The child's end of a relay: its pipes, or the master side of a pseudo-terminal (`pty = true`).

A child end gives the relay a sink for the client's bytes and a source of the child's output,
and says what the client's end of input becomes: a closed stdin on pipes; on a terminal the
EOF character in canonical mode, and in raw mode (which has no EOF) a hangup after eof_grace
unless the child exits first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import struct
import termios

from gsrv.loop import WRITE
from gsrv.relay.child import Child
from gsrv.relay.pump import Fd, FdSink, FdSource, PipeSink, Sink, Source
from gsrv.relay.stdio import Stdio

_VDISABLE = b"\0"  # a c_cc slot holding this is switched off


class Pipes:
    """stdin and stdout pipes: the client's EOF closes stdin, and the child reads EOF."""

    name = "copy"
    __slots__ = ()
    hung_up = False

    def stdio(self, stderr: str) -> Stdio:
        return Stdio.pipes(stderr)

    def sink(self, child: Child) -> Sink:
        return PipeSink(child.stdin)

    def source(self, child: Child, chunk: int) -> Source:
        return FdSource(child.stdout, chunk)

    def end_input(self, child: Child) -> None:
        child.close_stdin()

    def stopped_reading(self, child: Child) -> None:
        """The child stopped reading: what the client still sends has nowhere to go."""
        child.close_stdin()

    def resize(self, child: Child, columns: int, rows: int) -> None:
        """Pipes have no size."""

    def nudge(self, child: Child) -> None:
        """Nothing to redraw."""

    def type(self, child: Child, data: bytes) -> None:
        """Watchers need a terminal (share = ... needs pty = true)."""


class PtyEnd:
    """The master side of the session's pty, one fd both ways (the copy path: splice needs a
    pipe). Its settings are the child's: tcgetattr on the master reads the slave's."""

    name = "pty"
    __slots__ = ("eof_grace", "hung_up", "_sink", "carried")

    def __init__(self, eof_grace: float) -> None:
        self.eof_grace = eof_grace
        self.hung_up = False  # gsrv hung up the terminal: the client's input ended in raw mode
        self._sink: PtySink | None = None
        self.carried = b""  # the last byte written, as an upgrade's previous code left it

    @property
    def last(self) -> bytes:
        """The last byte written to the terminal (whether a line is open: its EOF's business)."""
        return self._sink.last if self._sink is not None else self.carried

    def stdio(self, stderr: str) -> Stdio:
        """A new pty: its slave is the child's stdin and stdout (stderr too with "stdout")."""
        return Stdio.pty(stderr)

    def sink(self, child: Child) -> Sink:
        self._sink = PtySink(child.pty_master)
        self._sink.last = self.carried
        return self._sink

    def source(self, child: Child, chunk: int) -> Source:
        return PtySource(child.pty_master, chunk)

    def end_input(self, child: Child) -> None:
        """The client's EOF: the EOF character if the terminal is canonical, else wait up to
        eof_grace for the child to exit, and hang up if it does not."""
        try:
            attrs = termios.tcgetattr(child.pty_master)
        except (OSError, termios.error):  # the child's side is gone: nothing to tell it
            return
        eof = eof_input(attrs, self.last)
        if eof:
            fd = Fd(child.pty_master, WRITE)
            try:
                fd.write_all(eof)
            except OSError:
                pass  # the child closed the terminal meanwhile: it has ended anyway
            finally:
                fd.close()
        elif not child.exited.wait(self.eof_grace):
            self.hung_up = child.hang_up()

    def stopped_reading(self, child: Child) -> None:
        """Writing the master failed (EIO: no process holds the slave): the child has gone."""

    def resize(self, child: Child, columns: int, rows: int) -> None:
        """The terminal's new size; the kernel sends its foreground group SIGWINCH."""
        if child.pty_master >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(child.pty_master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def nudge(self, child: Child) -> None:
        """A full-screen program redraws (a new watcher): a row less, then the size again."""
        if child.pty_master >= 0:
            with contextlib.suppress(OSError):
                rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(child.pty_master, termios.TIOCGWINSZ, bytes(8)))
                if rows > 1:
                    self.resize(child, columns, rows - 1)
                    self.resize(child, columns, rows)

    def type(self, child: Child, data: bytes) -> None:
        """A watcher's typing (share = "read-write"), beside the driver's input."""
        fd = Fd(child.pty_master, WRITE)
        try:
            fd.write_all(data)
        except OSError:
            pass  # the child closed the terminal: the session ends anyway
        finally:
            fd.close()


def eof_input(attrs: list[object], last: bytes) -> bytes:
    """What ends a terminal's input: its EOF character if it is canonical (twice after a
    partial line: the first only hands over that line), or nothing: raw mode has no EOF."""
    lflag, cc = attrs[3], attrs[6]
    assert isinstance(lflag, int) and isinstance(cc, list)
    eof = cc[termios.VEOF]
    assert isinstance(eof, bytes)
    if not lflag & termios.ICANON or eof == _VDISABLE:
        return b""
    iflag = attrs[0]
    assert isinstance(iflag, int)
    ends = {b"\n", cc[termios.VEOL], cc[termios.VEOL2], eof} - {_VDISABLE}
    if iflag & termios.ICRNL and not iflag & termios.IGNCR:
        ends.add(b"\r")
    return eof if not last or last in ends else eof + eof


class PtySink(FdSink):
    """The master written whole (the kernel takes a few KiB, then EAGAIN: backpressure);
    remembers the last byte, so the EOF character knows whether a line is open."""

    __slots__ = ("last",)

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.last = b""

    def write(self, data: memoryview | bytes) -> float:
        waited = self.write_all(data)
        if data:
            self.last = bytes(data[-1:])
        return waited


class PtySource(FdSource):
    """The master read: EIO once the last process holding the slave closed it is its end."""

    __slots__ = ()

    def read(self, limit: int) -> memoryview:
        try:
            return super().read(limit)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            self.done()
            return memoryview(b"")

"""Child stderr turned into log lines: each line capped at 4 KiB, at most 100 lines/s a session.

Pure and socket-free: fed bytes and a clock, it returns the lines to log and counts the drops,
and says how long the reader should pause when a child writes faster than the budget.
"""

from __future__ import annotations

LINE_CAP = 4096
LINES_PER_S = 100


class StderrLines:
    """Splits a byte stream into capped lines under a per-second budget (a token bucket)."""

    def __init__(self, cap: int = LINE_CAP, rate: int = LINES_PER_S) -> None:
        self.cap, self.rate = cap, rate
        self._partial = bytearray()
        self._skipping = False  # inside a line already cut at the cap
        self._tokens = float(rate)
        self._last = 0.0
        self.dropped = 0

    def feed(self, data: bytes, now: float) -> list[str]:
        lines: list[bytes] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                room = self.cap - len(self._partial)
                self._partial += piece[:room]
                if len(piece) > room:
                    lines.append(bytes(self._partial) + b" [cut]")
                    self._partial.clear()
                    self._skipping = True
            if end < 0:
                break
            if not self._skipping:
                lines.append(bytes(self._partial))
            self._partial.clear()
            self._skipping = False
            start = end + 1
        return self._admit(lines, now)

    def pause(self) -> float:
        """Seconds until the budget has a line again: 0 while within it. The reader sleeps
        that long, so a child flooding stderr is slowed by its full pipe instead of costing
        gsrv a CPU to read and drop what it writes."""
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def finish(self, now: float) -> list[str]:
        """The unterminated last line at EOF, if any."""
        rest = [bytes(self._partial)] if self._partial else []
        self._partial.clear()
        return self._admit(rest, now)

    def _admit(self, lines: list[bytes], now: float) -> list[str]:
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        kept = []
        for line in lines:
            if self._tokens >= 1:
                self._tokens -= 1
                kept.append(line.decode("utf-8", "replace"))
            else:
                self.dropped += 1
        return kept

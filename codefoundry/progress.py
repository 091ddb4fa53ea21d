"""A small progress reporter: rate and ETA on one line, throttled, TTY-aware.

On a terminal it redraws one line; in logs (no TTY) it prints a line every few seconds,
so long jobs stay readable in CI output and nohup files alike.
"""

from __future__ import annotations

import os
import sys
import time


def silence_tqdm() -> None:
    """Turn off tqdm bars in this process and its children. tqdm reads ``TQDM_DISABLE`` once, when
    it is imported, so command entry points call this before importing datatrove, whose MinHash
    stages draw per-task bars (the pipeline prints one line per stage instead)."""
    os.environ.setdefault("TQDM_DISABLE", "1")


def format_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, desc: str, total: float | None = None, unit: str = "it", interval: float | None = None,
                 stream=None, enabled: bool = True) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.enabled = enabled
        self.done = 0.0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: float = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit(extra)

    def _emit(self, extra: str = "", final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [self.desc]
        parts.append(f"{self.done:,.0f}/{self.total:,.0f} {self.unit}" if self.total else f"{self.done:,.0f} {self.unit}")
        parts.append(f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s")
        if self.total and rate > 0 and not final:
            parts.append(f"ETA {format_seconds((self.total - self.done) / rate)}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if extra:
            parts.append(extra)
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, extra: str = "") -> float:
        """Print the final line; return elapsed seconds."""
        if self.enabled:
            self._emit(extra, final=True)
        return time.perf_counter() - self.start

"""Progress: a bar (tqdm) on a terminal, otherwise one log line every `interval` seconds.
Both show rows done / total, errors, output tokens/s (over the last ~30 s) and the ETA."""
from __future__ import annotations

import collections
import sys
import time
from typing import Callable, TextIO


def fmt_duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    def __init__(self, *, total: Callable[[], int | None] | int | None = None, mode: str = "auto",
                 interval: float = 10.0, label: str = "batch", stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.interval = interval
        self.label = label
        self._total = total
        self.t0 = time.monotonic()
        self._last_log = self.t0
        self._last_draw = 0.0
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self.done = self.errors = self.skipped = self.out_tokens = 0
        self._bar = None
        if mode == "bar":
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, unit="row", desc=label, file=self.stream, dynamic_ncols=True,
                                 smoothing=0.1)
            except ImportError:
                self.mode = "log"

    @property
    def total(self) -> int | None:
        t = self._total() if callable(self._total) else self._total
        return t

    def rates(self) -> tuple[float, float]:
        """(rows/s, output tokens/s) over the recent window."""
        if len(self._samples) < 2:
            el = time.monotonic() - self.t0
            return (self.done / el, self.out_tokens / el) if el > 0 else (0.0, 0.0)
        t0, r0, k0 = self._samples[0]
        t1, r1, k1 = self._samples[-1]
        dt = max(t1 - t0, 1e-9)
        return (r1 - r0) / dt, (k1 - k0) / dt

    def update(self, done: int, errors: int, skipped: int, out_tokens: int, *, force: bool = False) -> None:
        now = time.monotonic()
        self.done, self.errors, self.skipped, self.out_tokens = done, errors, skipped, out_tokens
        if not force and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        self._samples.append((now, done, out_tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > 30.0:
            self._samples.popleft()
        if self.mode == "bar" and self._bar is not None:
            total = self.total
            if total is not None and self._bar.total != total:
                self._bar.total = total
            self._bar.n = done + skipped
            _, tps = self.rates()
            self._bar.set_postfix_str(f"{tps:,.0f} tok/s, {errors} err" + (f", {skipped} skipped" if skipped else ""),
                                      refresh=False)
            self._bar.refresh()
        elif self.mode == "log" and (force or now - self._last_log >= self.interval):
            self._last_log = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        total = self.total
        n = self.done + self.skipped
        rps, tps = self.rates()
        eta = (total - n) / rps if total is not None and rps > 0 else None
        of = f"/{total}" if total is not None else ""
        pct = f" ({100.0 * n / total:.1f}%)" if total else ""
        extra = f", {self.skipped} skipped" if self.skipped else ""
        return (f"{self.label}: {n}{of} rows{pct}, {self.errors} errors{extra} | {tps:,.1f} output tok/s | "
                f"{rps:,.2f} rows/s | elapsed {fmt_duration(time.monotonic() - self.t0)} | ETA {fmt_duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.n = self.done + self.skipped
            self._bar.refresh()
            self._bar.close()
            self._bar = None

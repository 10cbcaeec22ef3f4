"""What a run shows while it works: one progress line of its own, and Ray kept quiet unless asked.

The progress line counts the items whose rows the driver has received, against the job's planned total
(pipeline/plan.py), with the rate and an ETA:

    120/2000 items (6%)  3.1 items/s  ETA 10m06s

On a terminal it is one line rewritten in place; otherwise (a log file, a CI job) a plain line every
`LOG_INTERVAL` seconds, and at the end. Without a known total it shows the count and the rate only; the total
may arrive after the start (a job counts its input's shards on a thread beside the run, pipeline/job.py).

Ray's own output is the rest of what a run prints: Ray Data's progress bars and its 12-line status block every
10 s, Ray's INFO lines, and a warning that token authentication is on, on every local start. `quiet_ray` keeps
Ray's console output to warnings and errors (its log files under the Ray session folder keep everything) and
turns Ray Data's progress off; at log level INFO or DEBUG (`-v`, `--log-level`) Ray prints as it always did.
The token-authentication warning is only ever a note that Ray chose its secure default (a local instance has
token auth on unless `RAY_AUTH_MODE=disabled`); it is silenced, the setting left as Ray chose it. (Setting
`RAY_AUTH_MODE=token` ourselves would say the same thing, but Ray caches its configuration at import, and a
driver that sets it afterwards cannot reach the instance it starts.)
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOG_INTERVAL = 30.0   # seconds between progress lines when the output is not a terminal
TTY_INTERVAL = 0.5    # ... and between redraws on a terminal
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # its one warning: token auth is on


class ProgressLine:
    """Counts items and draws the line (see the module docstring). `update` is cheap: it draws at most once
    per interval. `total` may be set at any time, from any thread (None: not known yet)."""

    def __init__(self, total: int | None, *, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (TTY_INTERVAL if self.tty else LOG_INTERVAL)
        self._clock = clock
        self.done = 0
        self._start = self._now()
        self._drawn_at: float | None = None
        self._drawn_done: int | None = None
        self._width = 0

    def _now(self) -> float:
        return self._clock()

    def start(self) -> None:
        self._draw()

    def update(self, items: int) -> None:
        self.done += items
        if self._drawn_at is None or self._now() - self._drawn_at >= self.interval:
            self._draw()

    def close(self) -> None:
        """Draw the final line, unless the last one drawn says the same (and end it, on a terminal)."""
        if self._drawn_done != self.done:
            self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def format(self) -> str:
        elapsed = max(self._now() - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.done} items  {rate:.2f} items/s  {_duration(elapsed)} elapsed"
        total = max(self.total, self.done)
        percent = 100 * self.done // total if total else 100
        text = f"{self.done}/{total} items ({percent}%)  {rate:.2f} items/s"
        if self.done < total:
            text += f"  ETA {_duration((total - self.done) / rate)}" if rate > 0 else "  ETA ?"
        return text + f"  {_duration(elapsed)} elapsed"

    def _draw(self) -> None:
        self._drawn_at, self._drawn_done = self._now(), self.done
        text = self.format()
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def quiet_ray(log_level: str) -> None:
    """Set Ray's console output for this driver (see the module docstring); call before `ray.init`."""
    import ray.data

    verbose = logging.getLevelName(log_level.upper()) <= logging.INFO
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if verbose:
        return
    level = max(logging.WARNING, logging.getLevelName(log_level.upper()))
    logging.getLogger("ray").setLevel(level)
    logging.getLogger(_AUTH_LOGGER).setLevel(max(level, logging.ERROR))
    # Ray Data logs to its own file too: only the console handler is turned down.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)
    # its notes about progress bars being off, now that they are off on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)

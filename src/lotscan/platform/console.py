"""What a person sees on the console: progress, stage lines, where Ray's logs went.

Light on purpose (standard library only at import; tqdm is imported when a bar
is drawn): the CLI imports it before arguments are parsed.

* :class:`Progress` — ``Progress(total, unit, desc)`` with ``update(n)``: on a
  terminal a tqdm bar with rate and ETA; otherwise (a log file, a CI job, a
  Kubernetes pod) one plain line every ``every_s`` seconds and a last line at
  ``close()``, never a carriage return or a colour code. With ``budget_s`` (a
  training time budget) the ETA is the sooner of "at this rate" and "when the
  budget ends", and the line says which.
* :func:`echo` prints a line without breaking an active bar (Ray's forwarded
  worker lines go through it).
* :func:`verbose` / :func:`set_verbose` — the ``--verbose`` switch, kept in the
  environment variable ``LOTSCAN_VERBOSE`` so Ray workers and every
  ``ensure_ray`` call see the same setting.
* :func:`use_colour` — colour only on a terminal, never with ``NO_COLOR`` set
  (https://no-color.org) or ``TERM=dumb``.
* :func:`log_path` — the file Ray's own logs go to when not verbose.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from typing import IO, Any

VERBOSE_ENV = "LOTSCAN_VERBOSE"
LOG_DIR_ENV = "LOTSCAN_LOG_DIR"

PLAIN_EVERY_S = 10.0
"""Seconds between plain progress lines when the output is not a terminal.
Chosen: often enough to see a job is alive in ``kubectl logs``, rare enough
that a one-hour job writes a few hundred lines, not thousands."""

_active: list[Progress] = []
_lock = threading.RLock()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def use_colour(stream: IO[str] | None = None) -> bool:
    """Colour codes only on a terminal, and not with ``NO_COLOR`` or ``TERM=dumb``."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


def log_path(name: str = "ray") -> str:
    """A new file for Ray's own logs of this process:
    ``$LOTSCAN_LOG_DIR`` (default ``<tmp>/lotscan-logs``) ``/<name>-<time>-<pid>.log``."""
    folder = os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "lotscan-logs")
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(folder, f"{name}-{stamp}-{os.getpid()}.log")


def echo(line: str, stream: IO[str] | None = None) -> None:
    """Print ``line``; an active progress bar is cleared and redrawn around it."""
    stream = stream or sys.stdout
    with _lock:
        bars = [p for p in _active if p._bar is not None]
        if bars:
            from tqdm import tqdm

            tqdm.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of a job stage: ``update(n)`` as work finishes, ``close()`` at the end.

    ``total`` may be ``None`` (unknown); ``unit`` names one item (``img``,
    ``step``); ``desc`` starts every line (e.g. ``[lotscan score] scoring``).
    ``budget_s``: a wall-clock budget that ends the work early (training's
    time budget): the ETA is the sooner of the rate's and the budget's.
    ``stream`` defaults to stdout; ``tty`` forces the bar on or off (default:
    whether ``stream`` is a terminal). ``clock`` is for tests.
    """

    def __init__(self, total: int | None, unit: str = "it", desc: str = "",
                 every_s: float = PLAIN_EVERY_S, budget_s: float | None = None,
                 stream: IO[str] | None = None, tty: bool | None = None,
                 clock: Any = time.monotonic):
        self.total = None if total is None else max(int(total), 0)
        self.unit, self.desc = unit, desc
        self.every_s = float(every_s)
        self.budget_s = budget_s
        self.stream = stream or sys.stdout
        self._clock = clock
        self.start = clock()
        self.n = 0
        self._last_line = self.start
        self._closed = False
        self._bar = None
        if is_terminal(self.stream) if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=unit, desc=desc, file=self.stream,
                             dynamic_ncols=True, leave=True, colour=None,
                             bar_format=None if budget_s is None else
                             "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
            if budget_s is not None:
                self._bar.set_postfix_str(self._eta_text(), refresh=False)
        with _lock:
            _active.append(self)

    # ------------------------------------------------------------------ numbers

    def elapsed(self) -> float:
        return max(self._clock() - self.start, 0.0)

    def rate(self) -> float | None:
        elapsed = self.elapsed()
        return self.n / elapsed if elapsed > 0 and self.n > 0 else None

    def eta(self) -> tuple[float | None, str]:
        """``(seconds left, why)``: why is ``"rate"`` or ``"budget"`` (``""`` if unknown)."""
        by_rate = None
        rate = self.rate()
        if self.total is not None and rate:
            by_rate = max(self.total - self.n, 0) / rate
        by_budget = None if self.budget_s is None else max(self.budget_s - self.elapsed(), 0.0)
        if by_budget is not None and (by_rate is None or by_budget < by_rate):
            return by_budget, "budget"
        return by_rate, "rate" if by_rate is not None else ""

    def _eta_text(self) -> str:
        left, why = self.eta()
        text = f"ETA {format_duration(left)}"
        return text + " (time budget)" if why == "budget" else text

    def line(self) -> str:
        """The plain progress line (what a non-terminal sees), e.g.
        ``[lotscan score] scoring: 120/500 img (24%), 3.1 img/s, elapsed 39s, ETA 2m03s``."""
        if self.total is not None:
            pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
            parts = [f"{self.n}/{self.total} {self.unit}{pct}"]
        else:
            parts = [f"{self.n} {self.unit}"]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self._closed:
            parts.append(f"in {format_duration(self.elapsed())}")
        else:
            parts.append(f"elapsed {format_duration(self.elapsed())}")
            if self.total is not None or self.budget_s is not None:
                parts.append(self._eta_text())
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    # ------------------------------------------------------------------ updates

    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.n += int(n)
        if self._bar is not None:
            if self.budget_s is not None:
                self._bar.set_postfix_str(self._eta_text(), refresh=False)
            self._bar.update(int(n))
            return
        now = self._clock()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """The last line (a finished bar, or the plain summary line); idempotent."""
        if self._closed:
            return
        self._closed = True
        with _lock:
            if self in _active:
                _active.remove(self)
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Starting or joining Ray, where Ray's own logs go, and device choice.

Unless verbose (``--verbose``, i.e. ``LOTSCAN_VERBOSE=1``), Ray's own output
goes to one log file (:func:`lotscan.platform.console.log_path`) and the
console shows lotscan's lines only:

* Python warnings raised in Ray's modules go to the file;
* the driver's Ray loggers (``ray``, ``ray.data``, ``ray.train``, ``ray.tune``,
  ``ray.serve``) write to the file instead of the console, errors included
  (the job's own error handling reports what went wrong);
* Ray Data's progress bars are off (the job draws its own,
  :class:`~lotscan.platform.console.Progress`), and so are its
  "Starting execution of Dataset ..." lines, which Ray Train repeats for every
  epoch of every training dataset;
* output forwarded from workers (tasks, actors, Train workers) is written to
  the file; lines that carry lotscan's ``[lotscan `` tag are also printed,
  once (Ray Train sends a worker's print through both stdout and stderr) and
  without Ray's coloured ``(pid=...)`` prefix. This uses Ray's log-forwarding
  hook (``ray._private.ray_logging.global_worker_stdstream_dispatcher``); if a
  Ray version lacks it, worker output goes to the log file only.

When verbose, Ray prints as it always does, without colour codes when stdout
is not a terminal. What cannot be filtered from Python: lines the C++ core
of the driver process writes to stderr itself (e.g. ``E core_worker.cc``
notices when an actor pool starts).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings

import ray

from lotscan.platform import console

_FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air")
"""Driver-side loggers whose console handlers move to the log file when not verbose."""

LOTSCAN_TAG = "[lotscan "
"""Worker lines containing this are shown on the console (training progress, skips)."""

DEDUP_WINDOW_S = 5.0
"""The same line from the same worker within this many seconds is printed once."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_state: dict = {"log_path": None, "handler": None}


def ray_log_file() -> str | None:
    """The file Ray's logs go to in this process (``None`` when verbose or Ray not started here)."""
    return _state["log_path"]


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _quiet_driver_loggers(handler: logging.Handler) -> None:
    """Move the console handlers of Ray's loggers to ``handler`` (a file)."""
    from ray import data  # noqa: F401  (configures the ray.data logger; before we move it)

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        if handler not in logger.handlers:
            logger.addHandler(handler)


class WorkerLineFilter:
    """Handler for Ray's forwarded worker output: everything to ``file``, lines
    tagged ``[lotscan `` also to the console, deduplicated within a window."""

    def __init__(self, file, clock=time.monotonic):
        self.file = file
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, data: dict) -> None:
        who = str(data.get("actor_name") or data.get("task_name") or "")
        pid = str(data.get("pid", ""))
        for raw in data.get("lines", []):
            line = _ANSI.sub("", str(raw))
            with self._lock:
                try:
                    self.file.write(f"({who} pid={pid}) {line}\n")
                    self.file.flush()
                except (OSError, ValueError):
                    pass
                if LOTSCAN_TAG not in line:
                    continue
                text = line[line.index(LOTSCAN_TAG):]
                now = self._clock()
                key = (pid, text)
                if now - self._seen.get(key, -1e18) < DEDUP_WINDOW_S:
                    continue
                self._seen[key] = now
                if len(self._seen) > 1000:
                    self._seen = {k: t for k, t in self._seen.items() if now - t < DEDUP_WINDOW_S}
            console.echo(text)


def _route_ray_warnings(path: str) -> None:
    """Python warnings raised inside Ray's own modules go to the log file (a
    deprecation notice of Ray's is not the operator's business); others print."""
    if getattr(warnings.showwarning, "_lotscan", False):
        return
    original = warnings.showwarning
    marker = f"{os.sep}ray{os.sep}"

    def show(message, category, filename, lineno, file=None, line=None):
        if marker in str(filename):
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(warnings.formatwarning(message, category, filename, lineno, line))
            except OSError:
                pass
            return
        original(message, category, filename, lineno, file, line)

    show._lotscan = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def _route_worker_output(path: str) -> bool:
    """Replace Ray's worker-output printer with :class:`WorkerLineFilter`."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handler = WorkerLineFilter(open(path, "a", encoding="utf-8"))  # noqa: SIM115 (process lifetime)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("lotscan_worker_lines", handler)
    _state["handler"] = handler
    return True


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory: int | None = None,
               include_dashboard: bool | None = None,
               verbose: bool | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a new local Ray.

    "Else" means a Ray of this process's own, even when another local Ray is
    running: lotscan never attaches to a cluster it was not pointed at.

    A local Ray gets the storage credentials of this process in its workers'
    environment, so a laptop run against a local S3 endpoint just works. Its
    dashboard is on by default: Ray Train's state queries need it (without it
    Ray Train logs a warning every second while training).

    ``verbose`` (default: :func:`lotscan.platform.console.verbose`) keeps Ray's
    own output on the console; otherwise it goes to a log file whose path is
    printed once (see the module docstring).
    """
    if ray.is_initialized():
        return
    verbose = console.verbose() if verbose is None else verbose
    if not console.use_colour():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's (pid=...) prefixes, verbose mode
    file_handler = None
    if not verbose:
        path = console.log_path("ray")
        file_handler = _file_handler(path)
        _quiet_driver_loggers(file_handler)
        _route_ray_warnings(path)
        _state["log_path"] = path
        print(f"[lotscan] Ray's logs: {path} (--verbose shows them here)", flush=True)
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"include_dashboard": include_dashboard, "logging_level": logging.WARNING,
                    "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        # address="local": a new Ray of our own, never a stray local one that
        # ray.init() would otherwise find through /tmp/ray/ray_current_cluster.
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 runtime_env={"env_vars": env} if env else None, **kwargs)
    if file_handler is not None:
        _quiet_driver_loggers(file_handler)  # ray.init may have added console handlers
        _route_worker_output(_state["log_path"])
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0

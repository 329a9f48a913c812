"""One writer at a time on a scoring output: a lease with conditional creates.

Two runs on one output (a retried nightly job beside a live one, two people
scoring the same lot) would both write the same images. The output's lease
makes the second one wait or stop before it writes anything:

- generations ``_lotscan/lease/gen-<n>.json`` are created with an exclusive
  create (``O_EXCL`` locally, ``If-None-Match: *`` on S3), so of two runs
  racing for generation ``n`` exactly one wins;
- the holder rewrites ``gen-<n>.heartbeat`` every ``ttl / 4`` seconds and
  writes ``gen-<n>.released`` when it ends (also on errors);
- a generation whose heartbeat is older than the TTL (its run was killed) may
  be taken over by creating generation ``n + 1``; on the same host a holder
  whose process is gone is taken over at once;
- a holder that finds a newer generation (it was paused past its TTL and
  someone took over) stops its run: :meth:`OutputLease.check` raises.

Nothing here trusts clocks across machines beyond the TTL (default 120 s, far
above any clock skew a cluster tolerates).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from lotscan.config import StorageConfig
from lotscan.platform.storage import (
    StorageConflict,
    StorageError,
    create_exclusive,
    join,
    list_files,
    read_bytes,
    remove,
    write_bytes,
)

_GEN = re.compile(r"gen-(\d{9})\.json$")


class LeaseError(RuntimeError):
    """The output is held by another live run (the message says which)."""


@dataclass
class Holder:
    generation: int
    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    released: bool


def _now() -> float:
    return time.time()


class OutputLease:
    """``with OutputLease(out_uri, storage, run_id, ttl_s, wait_s):`` holds the
    output for the block."""

    def __init__(self, out_uri: str, storage: StorageConfig, run_id: str | None = None,
                 ttl_s: float = 120.0, wait_s: float = 0.0):
        self.folder = join(out_uri, "_lotscan", "lease")
        self.out_uri = out_uri
        self.storage = storage
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # --- reading the state ------------------------------------------------------------
    def _uri(self, generation: int, suffix: str) -> str:
        return join(self.folder, f"gen-{generation:09d}{suffix}")

    def _generations(self) -> list[int]:
        gens = []
        for uri in list_files(self.folder, self.storage):
            match = _GEN.search(uri)
            if match:
                gens.append(int(match.group(1)))
        return sorted(gens)

    def _holder(self, generation: int) -> Holder:
        info = json.loads(read_bytes(self._uri(generation, ".json"), self.storage))
        heartbeat = float(info["started_at"])
        try:
            heartbeat = float(json.loads(read_bytes(self._uri(generation, ".heartbeat"),
                                                    self.storage))["at"])
        except StorageError:
            pass
        released = False
        try:
            read_bytes(self._uri(generation, ".released"), self.storage)
            released = True
        except StorageError:
            pass
        return Holder(generation, info["run_id"], info["host"], int(info["pid"]),
                      float(info["started_at"]), heartbeat, released)

    def _is_free(self, holder: Holder) -> bool:
        if holder.released or _now() - holder.heartbeat_at > self.ttl_s:
            return True
        if holder.host == socket.gethostname() and holder.pid != os.getpid():
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return True  # its process is gone: it was killed
            except PermissionError:
                return False
        return False

    # --- acquiring ---------------------------------------------------------------------
    def acquire(self) -> OutputLease:
        deadline = _now() + self.wait_s
        while True:
            gens = self._generations()
            current = gens[-1] if gens else 0
            holder = self._holder(current) if current else None
            if holder is None or self._is_free(holder):
                record = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                          "started_at": _now()}
                try:
                    create_exclusive(self._uri(current + 1, ".json"),
                                     json.dumps(record).encode(), self.storage)
                except StorageConflict:
                    pass  # another run won this generation: look again
                else:
                    self.generation = current + 1
                    self._heartbeat()
                    self._clean(current)
                    self._thread = threading.Thread(target=self._beat, daemon=True,
                                                    name="lotscan-lease")
                    self._thread.start()
                    return self
            elif _now() >= deadline:
                age = _now() - holder.heartbeat_at
                raise LeaseError(
                    f"{self.out_uri}: another run is writing here (run {holder.run_id} on "
                    f"{holder.host}, pid {holder.pid}, last seen {age:.0f}s ago); wait for it "
                    f"to finish, or let its lease expire ({self.ttl_s:.0f}s after its last "
                    f"heartbeat) — or set score.lease_wait_s to wait")
            time.sleep(min(5.0, max(0.2, self.ttl_s / 20)))

    def _clean(self, previous: int) -> None:
        """Remove generations older than the one just replaced."""
        for gen in self._generations():
            if gen < previous:
                for suffix in (".json", ".heartbeat", ".released"):
                    try:
                        remove(self._uri(gen, suffix), self.storage)
                    except StorageError:
                        pass

    def _heartbeat(self) -> None:
        write_bytes(self._uri(self.generation, ".heartbeat"),
                    json.dumps({"at": _now(), "run_id": self.run_id}).encode(), self.storage)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                newer = [g for g in self._generations() if g > self.generation]
                if newer:
                    self.lost = (f"{self.out_uri}: the lease was taken over by generation "
                                 f"{newer[-1]} (this run was silent for longer than "
                                 f"{self.ttl_s:.0f}s)")
                    return
                self._heartbeat()
            except StorageError:
                continue  # retried at the next beat; the TTL covers a few missed ones

    def check(self) -> None:
        """Raise if this run lost its lease (call between pipeline steps)."""
        if self.lost:
            raise LeaseError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is not None and not self.lost:
            try:
                write_bytes(self._uri(self.generation, ".released"),
                            json.dumps({"at": _now(), "run_id": self.run_id}).encode(),
                            self.storage)
            except StorageError:
                pass  # it expires by itself
        self.generation = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

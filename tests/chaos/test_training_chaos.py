"""Chaos: a Ray Train worker SIGKILLed mid-stage is replaced and the stage
finishes in the same command, from its latest checkpoint, at the right step."""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import pytest

from conftest import TINY_MODEL
from lotscan.config import load_config
from lotscan.platform.bundles import open_bundle
from lotscan.platform.training import train_bundle

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_STEPS = 60


def _descendants(root: int) -> list[int]:
    """Processes below ``root`` (this test process started the local Ray, so its
    workers are among them, and nobody else's are)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _train_workers() -> list[int]:
    return [p for p in _descendants(os.getpid()) if "RayTrainWorker" in _cmdline(p)]


def _checkpoint_steps(out: str) -> list[int]:
    steps = []
    for path in glob.glob(os.path.join(out, "checkpoints", "*", "checkpoint_*", "state.json")):
        try:
            with open(path) as f:
                steps.append(int(json.load(f)["step"]))
        except (OSError, ValueError, KeyError):
            pass  # being written, or removed (num_to_keep)
    return steps


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's worker processes in /proc")
def test_a_killed_worker_is_replaced_and_the_stage_finishes(ray_local, demo_root, tmp_path):
    out = str(tmp_path / "dta")
    cfg = load_config(overrides=TINY_MODEL + [
        "method=dta", "train.num_workers=2", "train.cpus_per_worker=0.5",
        f"train.max_steps={MAX_STEPS}", "train.checkpoint_every_steps=4",
        "train.log_every_steps=10", "train.max_failures=2"])
    killed: dict = {}
    done = threading.Event()

    def kill_one_worker_mid_stage() -> None:
        deadline = time.time() + 600
        while not done.is_set() and time.time() < deadline:
            workers = _train_workers()
            steps = _checkpoint_steps(out)
            # A checkpoint of step 12 on disk: Ray Train has registered the one of
            # step 4 (a report is uploaded, then queued; a worker reaches the next
            # one only after the controller took the last from the queue).
            if steps and max(steps) >= 12 and len(workers) >= 2:
                killed["step"] = max(steps)
                killed["pid"] = workers[-1]
                killed["cmdline"] = _cmdline(workers[-1])
                os.kill(workers[-1], signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker_mid_stage, daemon=True)
    killer.start()
    lines: list[str] = []
    try:
        result = train_bundle(cfg, demo_root, out, categories=["weave"], log=lines.append)
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "no worker was killed: the stage ended before its checkpoint of step 12"
    assert killed["step"] < MAX_STEPS
    stage = result["training"]["stages"]["denoiser"]
    assert stage["steps"] == MAX_STEPS  # finished, in this same command
    assert stage["restarts"] >= 1, (killed, lines)  # ... by a restarted worker group
    assert stage["resumed_from_step"] == 0  # not by a re-run
    assert stage["steps_this_attempt"] <= MAX_STEPS - 4  # resumed from step 4 or later
    assert not os.path.exists(f"/proc/{killed['pid']}") or "RayTrainWorker" not in _cmdline(killed["pid"])
    bundle = open_bundle(out, cfg.storage)
    assert bundle.training["stages"]["denoiser"]["steps"] == MAX_STEPS

"""ensure_ray starts a Ray of its own unless pointed at one (a stray local Ray,
left by another job, must not be joined: CI once failed exactly so)."""
import os
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OURS = """
import ray
from lotscan.platform.runtime import ensure_ray
ensure_ray(num_cpus=1, object_store_memory=80 * 2**20, include_dashboard=False, verbose=True)
print("GCS", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


CURRENT = "/tmp/ray/ray_current_cluster"  # what a bare ray.init() joins


def test_a_stray_local_ray_is_not_joined():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # --block: the head lives as long as this process, and dies with it (no
    # `ray stop`, which would also stop the test session's own Ray).
    stray = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port=0", "--num-cpus=1",
                              f"--object-store-memory={80 * 2**20}", "--include-dashboard=false",
                              "--disable-usage-stats"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    address = None
    try:
        address = _wait_for_head(stray)
        proc = subprocess.run([sys.executable, "-c", OURS], capture_output=True, text=True,
                              env=env, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ours = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("GCS ")]
        assert ours and ours[0] != address
    finally:
        stray.terminate()
        stray.wait(timeout=60)
        if os.path.exists(CURRENT) and open(CURRENT).read().strip() == address:
            os.remove(CURRENT)  # ray stop would remove it; terminate does not


def _wait_for_head(proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start --head exited"
        if os.path.exists(CURRENT):
            with open(CURRENT) as f:
                address = f.read().strip()
            if address:
                time.sleep(2.0)  # the head answers a moment after it writes its address
                return address
        time.sleep(0.5)
    raise AssertionError("ray start --head wrote no address")

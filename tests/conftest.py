"""Shared pytest fixtures.

- ``s3_server`` (session): a local moto S3 server; yields its endpoint URL.
- ``s3_storage``: a fresh, uniquely named bucket on it; yields
  ``(StorageConfig, "s3://bucket")``.
- ``demo_root`` (session): a tiny procedural MVTec-layout dataset on disk.
- ``upload_tree``: the function :func:`upload_tree` (copy a local tree into storage).
"""

from __future__ import annotations

import os
import uuid

import pytest

from lotscan.config import StorageConfig
from lotscan.platform import storage as st

# ------------------------------------------------------------------ helpers


def upload_tree(local_dir: str, s3_uri: str, storage: StorageConfig) -> str:
    """Copy every file under ``local_dir`` to ``s3_uri`` (same relative paths);
    return ``s3_uri``."""
    for dirpath, _, filenames in os.walk(local_dir):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                st.write_bytes(st.join(s3_uri, rel), f.read(), storage)
    return s3_uri


# ------------------------------------------------------------ object storage


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free local port, with dummy AWS credentials in
    the environment for the whole session. Yields ``http://127.0.0.1:PORT``."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_storage(s3_server):
    """``(StorageConfig(endpoint_url=...), "s3://<fresh bucket>")``."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield StorageConfig(endpoint_url=s3_server), f"s3://{bucket}"


@pytest.fixture(name="upload_tree")
def upload_tree_fixture():
    """The :func:`upload_tree` helper, for tests that cannot import conftest."""
    return upload_tree


# -------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """A tiny demo dataset: categories weave and speckle, 32 px, 8 train,
    3 test good and 3 defective (2 scratch, 1 blob) images per category."""
    from lotscan.platform.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_dataset(str(root), categories=("weave", "speckle"), image_size=32,
                             n_train=8, n_test_good=3, n_test_defect=3, seed=0)


# --------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One small local Ray for the whole session (started after the S3 server,
    so its workers inherit the test credentials)."""
    import ray

    from lotscan.platform.runtime import ensure_ray

    ensure_ray(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


TINY_MODEL = [
    "data.image_size=32",
    "denoiser.block_out_channels=[16, 32]",
    "train.batch_size=4",
    "train.log_every_steps=2",
    "train.checkpoint_every_steps=2",
    "dta.num_levels=3",
    "dta.max_noise_level=100",
    "recon.ddim_steps=2",
    "score.batch_size=4",
    "score.smoothing_kernel=3",
    "score.image_score_pool=3",
    "data.calibration_fraction=0.25",
]
"""Overrides for a model small enough to train and score in seconds on 2 CPUs."""

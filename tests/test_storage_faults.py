"""Storage under faults: transient errors are retried, permanent ones are not,
and what still fails says which it was."""

from __future__ import annotations

import errno

import pytest

from chaos.faultproxy import FaultProxy
from lotscan.config import StorageConfig
from lotscan.platform import storage as st


class _ClientError(Exception):
    def __init__(self, code: str, status: int):
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize("err,transient", [
    (_ClientError("SlowDown", 503), True),
    (_ClientError("InternalError", 500), True),
    (_ClientError("RequestTimeout", 400), True),
    (_ClientError("AccessDenied", 403), False),
    (_ClientError("NoSuchKey", 404), False),
    (OSError(errno.EREMOTEIO, "Internal Server Error"), True),
    (OSError(errno.EBUSY, "Please reduce your request rate"), True),
    (ConnectionResetError(104, "reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (FileNotFoundError("gone"), False),
    (PermissionError("denied"), False),
    (ValueError("bad"), False),
    (st.StorageError("x: could not be read", transient=True), True),
    (st.StorageError("x: 20 bytes is over the limit of 10"), False),
])
def test_transient_classification(err, transient):
    assert st.is_transient(err) is transient


def test_cause_chain_is_followed():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert st.is_transient(outer)


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []
    cfg = StorageConfig(retry_attempts=4, retry_backoff_s=0.0)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert st.with_retries("read", "s3://b/k", cfg, flaky) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        st.with_retries("read", "s3://b/k", cfg, missing)
    assert len(calls) == 1


def test_what_still_fails_is_marked_transient(tmp_path, s3_server):  # credentials from s3_server
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1, retry_attempts=2,
                        retry_backoff_s=0.0, connect_timeout_s=0.5)
    with pytest.raises(st.StorageError) as info:
        st.read_bytes("s3://nobody/x.png", cfg)
    assert info.value.transient and "s3://nobody/x.png" in str(info.value)
    with pytest.raises(st.StorageError) as info:
        st.read_bytes(str(tmp_path / "missing.png"), StorageConfig())
    assert not info.value.transient


def test_every_verb_survives_an_unreliable_store(s3_server):
    rate = 0.3
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"faults-{int(rate * 100)}"
    client.create_bucket(Bucket=bucket)
    with FaultProxy(s3_server, rate=rate, seed=1) as proxy:
        cfg = StorageConfig(endpoint_url=proxy.url, retry_backoff_s=0.01)
        for i in range(20):
            st.write_bytes(f"s3://{bucket}/obj/{i:02d}.bin", bytes([i]) * (100 + i), cfg)
        listed = st.list_files(f"s3://{bucket}/obj", cfg)
        assert len(listed) == 20
        for i, uri in enumerate(listed):
            assert st.read_bytes(uri, cfg) == bytes([i]) * (100 + i)
            assert st.exists(uri, cfg)
        st.create_exclusive(f"s3://{bucket}/lease.json", b"1", cfg)
        with pytest.raises(st.StorageConflict):
            st.create_exclusive(f"s3://{bucket}/lease.json", b"2", cfg)
        st.remove(f"s3://{bucket}/obj/00.bin", cfg)
        assert not st.exists(f"s3://{bucket}/obj/00.bin", cfg)
    faults = sum(v for k, v in proxy.counts.items() if k != "forwarded")
    assert faults >= 5, proxy.counts  # the faults really happened

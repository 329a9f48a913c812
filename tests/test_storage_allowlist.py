"""Bucket allow-list: a URI outside storage.allowed_buckets / LOTSCAN_ALLOWED_BUCKETS
is refused before any request, with an error naming it."""

from __future__ import annotations

import pytest

from lotscan.config import ConfigError, StorageConfig, load_config
from lotscan.platform import storage as st


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LOTSCAN_ALLOWED_BUCKETS", raising=False)
    # Any request that got through would go nowhere: no real endpoint is reachable.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


def test_no_list_allows_any_bucket():
    fs, path = st.filesystem("s3://anything/x/y.png", StorageConfig())
    assert path == "anything/x/y.png" and "s3" in fs.protocol


@pytest.mark.parametrize("call", [
    lambda uri, s: st.read_bytes(uri, s),
    lambda uri, s: st.write_bytes(uri, b"x", s),
    lambda uri, s: st.exists(uri, s),
    lambda uri, s: st.list_files(uri, s),
    lambda uri, s: st.remove(uri, s),
], ids=["read", "write", "exists", "list", "remove"])
def test_config_list_refuses_other_buckets_for_every_verb(call):
    storage = StorageConfig(allowed_buckets=["lots", "models"])
    with pytest.raises(st.StorageError) as caught:
        call("s3://evil-bucket/lots/a.png", storage)
    text = str(caught.value)
    assert "s3://evil-bucket/lots/a.png" in text and "'evil-bucket' is not in the allowed" in text
    assert "lots, models" in text


def test_allowed_bucket_passes_and_prefix_tricks_do_not():
    storage = StorageConfig(allowed_buckets=["lots"])
    assert st.filesystem("s3://lots/2026-11-22/a.png", storage)[1] == "lots/2026-11-22/a.png"
    for uri in ("s3://lots-evil/a.png", "s3://lotsa/a.png", "s3://evil/lots/a.png", "s3://lots.evil/x"):
        with pytest.raises(st.StorageError, match="is not in the allowed buckets"):
            st.filesystem(uri, storage)


def test_environment_list_applies_and_both_lists_intersect(monkeypatch):
    monkeypatch.setenv("LOTSCAN_ALLOWED_BUCKETS", " lots , scores ,")
    assert st.filesystem("s3://scores/x", StorageConfig())[1] == "scores/x"
    with pytest.raises(st.StorageError, match="'models' is not in the allowed buckets"):
        st.filesystem("s3://models/line3/dta", StorageConfig())
    # A command line cannot widen what the pod's environment allows.
    both = StorageConfig(allowed_buckets=["models", "scores"])
    assert st.filesystem("s3://scores/x", both)[1] == "scores/x"
    for uri in ("s3://models/m", "s3://lots/l"):
        with pytest.raises(st.StorageError, match="is not in the allowed buckets"):
            st.filesystem(uri, both)


def test_local_paths_are_not_affected(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTSCAN_ALLOWED_BUCKETS", "lots")
    st.write_bytes(str(tmp_path / "a.bin"), b"abc", StorageConfig())
    assert st.read_bytes(str(tmp_path / "a.bin"), StorageConfig()) == b"abc"


@pytest.mark.parametrize("bad", ["s3://lots", "lots/prefix", "UPPER", "ab", "-lots", "a" * 64])
def test_bad_allow_list_entries_are_config_errors(bad):
    with pytest.raises(ConfigError, match="storage.allowed_buckets"):
        load_config(overrides=[f"storage.allowed_buckets=[{bad!r}]"])


def test_allow_list_from_the_command_line():
    cfg = load_config(overrides=["storage.allowed_buckets=[lots, models, scores]"])
    assert cfg.storage.allowed_buckets == ["lots", "models", "scores"]

"""Tampered model bundles are refused, name the bundle and the file, and never run code.

Each case edits a good bundle the way an attacker with write access to the
models bucket, or a corrupted copy, would. Where the case is about a deeper
check than the checksums, the edit is "resealed": checksums and model id are
recomputed, so only the check under test can catch it.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lotscan.config import load_config
from lotscan.models.bundle import (
    MAX_MANIFEST_BYTES,
    Bundle,
    BundleError,
    bundle_files,
    content_model_id,
    load_bundle,
)
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration
from lotscan.platform.bundles import open_bundle, read_bundle_manifest

TINY = ["data.image_size=16", "denoiser.block_out_channels=[8, 16]", "dta.num_levels=3"]
WEIGHTS = "denoiser.safetensors"


class _Payload:
    """Unpickling this creates the file ``path``: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _make_files(training: dict | None = None, threshold: float = 0.7) -> dict[str, bytes]:
    torch.manual_seed(0)
    method = build_method(load_config(overrides=TINY))
    calibration = Calibration({"trend_x": [0.1, 0.5], "trend_u": [0.0, 2.0]}, threshold, 0.01, 4,
                              {"min": 0.1, "median": 0.3, "max": 0.9, "mean": 0.35})
    return bundle_files(Bundle(method, calibration, training=training or {"steps": 3}))


@pytest.fixture(scope="module")
def good_files() -> dict[str, bytes]:
    return _make_files()


def _write(folder: Path, files: dict[str, bytes]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return str(folder)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "bundle.json").read_text())


def _reseal(folder: Path, manifest: dict) -> None:
    """Recompute every checksum and the model id, as an attacker who rewrites
    the whole bundle would, then write the manifest."""
    for entry in manifest.get("networks", {}).values():
        path = folder / str(entry.get("file", ""))
        if "sha256" in entry and path.is_file() and path.parent == folder:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["model_id"] = content_model_id(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest))


def _weights_with(folder: Path, value: float) -> None:
    state = load_safetensors((folder / WEIGHTS).read_bytes())
    first = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[first] = state[first].clone()
    state[first].view(-1)[0] = value
    (folder / WEIGHTS).write_bytes(save_safetensors(state))


# ---------------------------------------------------------------- the tampering kinds
# Each takes (bundle folder, marker path) and edits the bundle; the marker is a
# file that exists only if something was unpickled.

def flipped_byte(folder: Path, marker: str) -> None:
    blob = bytearray((folder / WEIGHTS).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(blob))


def pickle_as_safetensors(folder: Path, marker: str) -> None:
    (folder / WEIGHTS).write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    _reseal(folder, _manifest(folder))


def pickle_as_safetensors_unsealed(folder: Path, marker: str) -> None:
    (folder / WEIGHTS).write_bytes(pickle.dumps({"weight": _Payload(marker)}))


def torch_zip_as_safetensors(folder: Path, marker: str) -> None:
    buffer = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buffer)  # a torch.load-able zip with a pickle inside
    (folder / WEIGHTS).write_bytes(buffer.getvalue())
    _reseal(folder, _manifest(folder))


def safetensors_header_pointing_at_pickle(folder: Path, marker: str) -> None:
    # A safetensors-shaped file whose "tensor data" is a pickle: still only bytes.
    payload = pickle.dumps(_Payload(marker))
    header = json.dumps({"weight": {"dtype": "U8", "shape": [len(payload)],
                                    "data_offsets": [0, len(payload)]}}).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + payload)
    _reseal(folder, _manifest(folder))


def dotdot_network_name(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    entry = manifest["networks"].pop("denoiser")
    entry["file"] = "../../denoiser.safetensors"
    manifest["networks"]["../../denoiser"] = entry
    _reseal(folder, manifest)


def dotdot_file_name(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["networks"]["denoiser"]["file"] = "../outside/denoiser.safetensors"
    _reseal(folder, manifest)


def absolute_file_name(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["networks"]["denoiser"]["file"] = "/etc/passwd"
    _reseal(folder, manifest)


def extra_network(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["networks"]["extra"] = dict(manifest["networks"]["denoiser"], file="extra.safetensors")
    (folder / "extra.safetensors").write_bytes((folder / WEIGHTS).read_bytes())
    _reseal(folder, manifest)


def unknown_method(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["method"] = "evil"
    manifest["config"]["method"] = "evil"
    _reseal(folder, manifest)


def removed_checksum(folder: Path, marker: str) -> None:
    flipped_byte(folder, marker)  # tampered weights, and the checksum that would catch them removed
    manifest = _manifest(folder)
    del manifest["networks"]["denoiser"]["sha256"]
    (folder / "bundle.json").write_text(json.dumps(manifest))


def empty_checksum(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["networks"]["denoiser"]["sha256"] = ""
    (folder / "bundle.json").write_text(json.dumps(manifest))


def nan_weights(folder: Path, marker: str) -> None:
    _weights_with(folder, float("nan"))
    _reseal(folder, _manifest(folder))


def inf_weights(folder: Path, marker: str) -> None:
    _weights_with(folder, float("inf"))
    _reseal(folder, _manifest(folder))


def nan_threshold(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["threshold"] = float("nan")
    (folder / "bundle.json").write_text(json.dumps(manifest))  # Python writes the literal NaN


def overflowing_threshold(folder: Path, marker: str) -> None:
    text = (folder / "bundle.json").read_text()
    manifest = _manifest(folder)
    old = json.dumps(manifest["calibration"]["threshold"])
    text = text.replace(f'"threshold": {old}', '"threshold": 1e999')  # parses to inf
    (folder / "bundle.json").write_text(text)


def negative_threshold(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["threshold"] = -1.0  # would flag every image
    _reseal(folder, manifest)


def inverted_range(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["signal_ranges"]["trend_x"] = [0.5, 0.1]
    _reseal(folder, manifest)


def negative_range(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["signal_ranges"]["trend_u"] = [-3.0, 2.0]
    _reseal(folder, manifest)


def infinite_range(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["signal_ranges"]["trend_u"] = [0.0, float("inf")]
    (folder / "bundle.json").write_text(json.dumps(manifest))


def missing_signal_range(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    del manifest["calibration"]["signal_ranges"]["trend_u"]
    _reseal(folder, manifest)


def unknown_calibration_field(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["__class__"] = "os.system"
    _reseal(folder, manifest)


def edited_threshold_unsealed(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["calibration"]["threshold"] = 99.0  # flags nothing, id not recomputed
    (folder / "bundle.json").write_text(json.dumps(manifest))


def foreign_model_id(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["model_id"] = "dta-0000000000000000"  # pretend to be another (trusted) model
    (folder / "bundle.json").write_text(json.dumps(manifest))


def not_json(folder: Path, marker: str) -> None:
    (folder / "bundle.json").write_bytes(b"\x80\x04\x95" + pickle.dumps(_Payload(marker)))


def huge_manifest(folder: Path, marker: str) -> None:
    text = (folder / "bundle.json").read_text()
    (folder / "bundle.json").write_text(text + " " * (MAX_MANIFEST_BYTES + 1))


def deeply_nested_manifest(folder: Path, marker: str) -> None:
    (folder / "bundle.json").write_text("[" * 200_000 + "]" * 200_000)


def duplicate_keys(folder: Path, marker: str) -> None:
    text = (folder / "bundle.json").read_text()
    (folder / "bundle.json").write_text(text.replace('"format": 2', '"format": 2, "format": 2', 1))


def old_format(folder: Path, marker: str) -> None:
    manifest = _manifest(folder)
    manifest["format"] = 1
    (folder / "bundle.json").write_text(json.dumps(manifest))


def missing_weights(folder: Path, marker: str) -> None:
    (folder / WEIGHTS).unlink()


CASES: list[tuple[Callable[[Path, str], None], str, str]] = [
    # (tampering, file the error must name, what the error must say)
    (flipped_byte, WEIGHTS, "does not match the checksum"),
    (pickle_as_safetensors, WEIGHTS, "not a valid safetensors file"),
    (pickle_as_safetensors_unsealed, WEIGHTS, "does not match the checksum"),
    (torch_zip_as_safetensors, WEIGHTS, "not a valid safetensors file"),
    (safetensors_header_pointing_at_pickle, WEIGHTS, "does not fit the denoiser"),
    (dotdot_network_name, "bundle.json", "not a plain name"),
    (dotdot_file_name, "bundle.json", "must be stored as denoiser.safetensors"),
    (absolute_file_name, "bundle.json", "must be stored as denoiser.safetensors"),
    (extra_network, "bundle.json", "needs networks"),
    (unknown_method, "bundle.json", "unknown method 'evil'"),
    (removed_checksum, "bundle.json", "no valid sha256"),
    (empty_checksum, "bundle.json", "no valid sha256"),
    (nan_weights, WEIGHTS, "non-finite weights"),
    (inf_weights, WEIGHTS, "non-finite weights"),
    (nan_threshold, "bundle.json", "NaN is not allowed"),
    (overflowing_threshold, "bundle.json", "out of range"),
    (negative_threshold, "bundle.json", "threshold must be a finite number >= 0"),
    (inverted_range, "bundle.json", "0 <= low <= high"),
    (negative_range, "bundle.json", "0 <= low <= high"),
    (infinite_range, "bundle.json", "Infinity is not allowed"),
    (missing_signal_range, "bundle.json", "must have exactly the signals"),
    (unknown_calibration_field, "bundle.json", "unknown or missing fields"),
    (edited_threshold_unsealed, "bundle.json", "does not match the content"),
    (foreign_model_id, "bundle.json", "does not match the content"),
    (not_json, "bundle.json", "not valid JSON"),
    (huge_manifest, "bundle.json", "over the limit"),
    (deeply_nested_manifest, "bundle.json", "not valid JSON"),
    (duplicate_keys, "bundle.json", "duplicate key 'format'"),
    (old_format, "bundle.json", "unsupported bundle format 1"),
    (missing_weights, WEIGHTS, "missing"),
]


def test_the_payload_is_live(tmp_path):
    """The marker check below can fail: unpickling the payload does create it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


@pytest.mark.parametrize("tamper, file, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_tampered_bundle_is_refused_and_runs_nothing(tamper, file, message, good_files, tmp_path,
                                                     monkeypatch):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called on a bundle")

    monkeypatch.setattr(torch, "load", no_torch_load)
    folder = tmp_path / "bundle"
    where = _write(folder, good_files)
    marker = tmp_path / "code-ran"
    tamper(folder, str(marker))
    with pytest.raises(BundleError) as caught:
        open_bundle(where, load_config().storage)
    text = str(caught.value)
    assert message in text
    assert where in text and file in text, text
    assert not marker.exists(), "something was unpickled"
    assert not (tmp_path / "outside").exists()


def test_refused_before_any_file_outside_is_read(good_files, tmp_path):
    """Path tricks are refused from the manifest alone: the loader asks for no
    file but bundle.json."""
    folder = tmp_path / "b"
    _write(folder, good_files)
    dotdot_file_name(folder, "")
    asked: list[str] = []

    def read(name: str) -> bytes:
        asked.append(name)
        return (folder / name).read_bytes()

    with pytest.raises(BundleError, match="must be stored as"):
        load_bundle(read, "memory")
    assert asked == ["bundle.json"]


def test_read_bundle_manifest_verifies_without_weights(good_files, tmp_path):
    folder = tmp_path / "b"
    where = _write(folder, good_files)
    (folder / WEIGHTS).unlink()  # not needed to read the manifest
    manifest = read_bundle_manifest(where, load_config().storage)
    assert manifest["model_id"] == json.loads(good_files["bundle.json"])["model_id"]
    edited_threshold_unsealed(folder, "")
    with pytest.raises(BundleError, match="does not match the content"):
        read_bundle_manifest(where, load_config().storage)


def test_model_id_is_the_content(good_files, tmp_path):
    original = json.loads(good_files["bundle.json"])["model_id"]
    assert original.startswith("dta-") and len(original) == len("dta-") + 16
    # Same networks, config and calibration: the same model, whatever the training notes.
    again = _make_files(training={"steps": 3, "note": "rebuilt"})
    assert json.loads(again["bundle.json"])["model_id"] == original
    assert again[WEIGHTS] == good_files[WEIGHTS]
    # Another threshold: another model.
    other = _make_files(threshold=0.8)
    assert json.loads(other["bundle.json"])["model_id"] != original
    # Changed weights, resealed by whoever changed them, load as a different model.
    folder = tmp_path / "b"
    where = _write(folder, good_files)
    _weights_with(folder, 0.123)
    _reseal(folder, _manifest(folder))
    loaded = open_bundle(where, load_config().storage)
    assert loaded.model_id != original
    assert loaded.model_id == _manifest(folder)["model_id"]
    # A stored config field is covered too (here an operational one).
    manifest = json.loads(good_files["bundle.json"])
    manifest["config"]["score"]["batch_size"] += 1
    assert content_model_id(manifest) != original
    # ... but the ignored storage section is not: a bundle never decides storage.
    manifest = json.loads(good_files["bundle.json"])
    manifest["config"]["storage"]["endpoint_url"] = "http://elsewhere"
    assert content_model_id(manifest) == original


def test_good_bundle_loads_with_its_verified_manifest(good_files, tmp_path):
    where = _write(tmp_path / "b", good_files)
    bundle = open_bundle(where, load_config().storage)
    assert bundle.model_id == json.loads(good_files["bundle.json"])["model_id"]
    assert bundle.manifest["networks"]["denoiser"]["sha256"] == hashlib.sha256(
        good_files[WEIGHTS]).hexdigest()


def test_non_finite_bundle_is_never_written():
    torch.manual_seed(0)
    method = build_method(load_config(overrides=TINY))
    calibration = Calibration({"trend_x": [0.1, 0.5], "trend_u": [0.0, 2.0]}, 0.7, 0.01, 4)
    with torch.no_grad():
        next(method.networks["denoiser"].parameters()).view(-1)[0] = float("nan")
    with pytest.raises(BundleError, match="refusing to write network denoiser: non-finite"):
        bundle_files(Bundle(method, calibration))
    torch.manual_seed(0)
    method = build_method(load_config(overrides=TINY))
    bad = Calibration({"trend_x": [0.1, 0.5], "trend_u": [0.0, 2.0]}, float("nan"), 0.01, 4)
    with pytest.raises(BundleError, match="threshold must be a finite number"):
        bundle_files(Bundle(method, bad))

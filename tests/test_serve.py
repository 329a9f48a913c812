"""The online scoring endpoint: input checks and auth without Ray, then the Serve
app on a local Ray over real HTTP on 127.0.0.1 (same score as the batch job,
bad inputs, auth, health, batching under concurrent load, back-pressure)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
from glob import glob
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from lotscan.config import ConfigError, load_config
from lotscan.jobs.cli import main
from lotscan.models.bundle import Bundle, BundleError
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate
from lotscan.platform.bundles import open_bundle, save_bundle
from lotscan.platform.images import content_seed, decode_image
from lotscan.platform.serving import (
    ApiError,
    LotscanModel,
    bundle_manifest,
    decode_upload,
    effective_config,
    parse_multipart,
    resolve_token,
    sniff_unsupported,
)

TOKEN_ENV = "LOTSCAN_TEST_SERVE_TOKEN"
TOKEN = "test-token-6b1d0c2f9a8e4f77"


# ------------------------------------------------------------------ helpers


def make_bundle(demo_root: str, out: str, method: str) -> str:
    """A tiny untrained bundle, calibrated on the demo's normal images (no Ray Train)."""
    cfg = load_config(overrides=TINY_MODEL + [f"method={method}"])
    torch.manual_seed(0)
    net = build_method(cfg)
    paths = sorted(glob(os.path.join(demo_root, "weave", "train", "good", "*.png")))
    images = np.stack([decode_image(Path(p).read_bytes(), cfg.data.image_size, p,
                                    cfg.data.max_image_pixels) for p in paths])
    calibration = calibrate(Scorer(net, None, "cpu"), [(images, [content_seed(i) for i in images])])
    save_bundle(Bundle(net, calibration, training={"note": "untrained test model"}), out, cfg.storage)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def batch_job_scores(model_uri: str, overrides: dict, paths: list[str], out_uri: str) -> dict:
    """Scores (and heatmaps) of ``paths`` through the batch job's own stages:
    DecodeBatch then ScoreBatch, called directly (no Ray Data needed)."""
    from lotscan.platform.decode import DecodeBatch
    from lotscan.platform.lot_scoring import ScoreBatch, read_heatmap

    scorer = ScoreBatch(model_uri, overrides, out_uri)
    n = len(paths)
    rows = {
        "uri": np.array(paths, dtype=object),
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "lot_id": np.array(["L"] * n, dtype=object),
        "category": np.array(["weave"] * n, dtype=object),
        "label": np.zeros(n, dtype=np.int64),
        "defect_type": np.array([""] * n, dtype=object),
        "mask_uri": np.array([""] * n, dtype=object),
    }
    out = scorer(DecodeBatch(scorer.storage, scorer.cfg.data)(rows))
    assert list(out["error"]) == [""] * n
    return {p: (float(out["score"][i]), read_heatmap(out["heatmap_uri"][i], scorer.storage))
            for i, p in enumerate(paths)}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "code", "message"}, body
    assert body["error"]["status"] == response.status_code
    return body["error"]


# ------------------------------------------------------- no Ray needed


def test_sniffing_and_multipart_parsing():
    assert sniff_unsupported(b"GIF89a....") == "GIF"
    assert sniff_unsupported(b"%PDF-1.7") == "PDF"
    assert sniff_unsupported(b"\x00\x00\x00\x18ftypheic....") == "HEIC"
    assert sniff_unsupported(b"  <svg xmlns='x'/>") == "SVG"
    assert sniff_unsupported(png_bytes(np.zeros((4, 4, 3), np.uint8))) is None

    payload = b"\x89PNG\r\n\x1a\n\r\n--notaboundary\r\nbinary\x00\xff"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + payload + b"\r\n--XyZ--\r\n")
    data, name, kind = parse_multipart(body, "multipart/form-data; boundary=XyZ")
    assert data == payload and "a.png" in name and kind == "image/png"
    with pytest.raises(ApiError) as err:
        parse_multipart(b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ--",
                        "multipart/form-data; boundary=XyZ")
    assert err.value.status == 400 and err.value.code == "invalid_request"
    with pytest.raises(ApiError):
        parse_multipart(body, "multipart/form-data")


def test_decode_upload_status_codes():
    cfg = load_config(overrides=["data.image_size=32", "data.max_image_pixels=10000"])
    good = png_bytes(np.full((40, 40, 3), 7, np.uint8))
    assert decode_upload(good, "x", cfg, 10**6).shape == (32, 32, 3)
    cases = [(b"", 400, "empty_body"), (b"not an image", 400, "undecodable_image"),
             (good[:60], 400, "undecodable_image"), (b"GIF89a" + bytes(40), 415, "unsupported_media_type"),
             (png_bytes(np.zeros((200, 200, 3), np.uint8)), 413, "image_too_large"),
             (good, 413, "payload_too_large")]
    for data, status, code in cases:
        limit = 50 if code == "payload_too_large" else 10**6
        with pytest.raises(ApiError) as err:
            decode_upload(data, "x", cfg, limit)
        assert (err.value.status, err.value.code) == (status, code), data[:20]


def test_token_from_env_or_file_never_from_config(tmp_path):
    serve_cfg = load_config().serve
    assert resolve_token(serve_cfg, environ={})[0] is None
    digest, source = resolve_token(serve_cfg, environ={"LOTSCAN_SERVE_TOKEN": "abc "})
    assert digest is not None and "abc" not in source and "LOTSCAN_SERVE_TOKEN" in source
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    file_cfg = load_config(overrides=[f"serve.auth_token_file={token_file}"]).serve
    assert resolve_token(file_cfg, environ={"LOTSCAN_SERVE_TOKEN": "abc"})[0] == \
        resolve_token(serve_cfg, environ={"LOTSCAN_SERVE_TOKEN": "from-file"})[0]
    with pytest.raises(ConfigError, match="auth_token_file"):
        resolve_token(load_config(overrides=[f"serve.auth_token_file={tmp_path}/missing"]).serve, {})
    with pytest.raises(ConfigError, match="require_auth"):
        resolve_token(load_config(overrides=["serve.require_auth=true"]).serve, environ={})


def test_serve_config_validation_and_bundle_rules(tmp_path, demo_root):
    with pytest.raises(ConfigError, match="serve.max_ongoing_requests"):
        load_config(overrides=["serve.max_batch_size=16", "serve.max_ongoing_requests=8"])
    with pytest.raises(ConfigError, match="serve.max_queued_requests"):
        load_config(overrides=["serve.max_queued_requests=0"])
    uri = make_bundle(demo_root, str(tmp_path / "b"), "recon")
    overrides = {"serve": {"max_batch_size": 4}, "data": {"max_image_pixels": 1000}}
    cfg = effective_config(bundle_manifest(uri, overrides), overrides)
    assert cfg.method == "recon" and cfg.data.image_size == 32 and cfg.serve.max_batch_size == 4
    with pytest.raises(BundleError, match="recon.noise_level"):
        bundle_manifest(uri, {"recon": {"noise_level": 7}})
    with pytest.raises(BundleError, match="no readable model bundle"):
        bundle_manifest(str(tmp_path / "missing"), {})
    with pytest.raises(SystemExit):
        main(["serve", "--help"])


def test_check_health_fails_when_the_model_cannot_score(tmp_path, demo_root):
    uri = make_bundle(demo_root, str(tmp_path / "b"), "recon")
    serve_cfg = load_config().serve.__dict__
    model = LotscanModel.func_or_class(uri, {}, serve_cfg, False)
    asyncio.run(model.check_health())  # fresh and scoring: healthy
    with torch.no_grad():
        for net in model.scorer.method.networks.values():
            for param in net.parameters():
                param.fill_(float("nan"))
    model._last_error = "RuntimeError: simulated failed batch"
    with pytest.raises(RuntimeError, match="non-finite"):
        asyncio.run(model.check_health())


# ------------------------------------------------- the app on a local Ray


@pytest.fixture(scope="module")
def served(ray_local, demo_root, tmp_path_factory):
    """Two apps on one Serve: ``/`` a DTA bundle, open, batching; ``/strict`` a
    recon bundle with a bearer token and a tiny queue (back-pressure)."""
    from ray import serve

    from lotscan.platform.serving import start_app

    root = tmp_path_factory.mktemp("serve")
    dta = make_bundle(demo_root, str(root / "dta"), "dta")
    recon = make_bundle(demo_root, str(root / "recon"), "recon")
    port = free_port()
    common = {"host": "127.0.0.1", "port": port, "num_cpus_per_replica": 0.5,
              "ingress_num_cpus": 0.25, "request_timeout_s": 60.0}
    main_overrides = {
        "serve": {**common, "max_batch_size": 8, "batch_wait_timeout_s": 0.1,
                  "max_ongoing_requests": 16, "max_queued_requests": 64,
                  "max_request_bytes": 256 * 1024, "auth_token_env": "LOTSCAN_TEST_UNSET_VARIABLE"},
        "data": {"max_image_pixels": 512 * 512},
    }
    strict_overrides = {
        "serve": {**common, "max_batch_size": 2, "batch_wait_timeout_s": 0.5,
                  "max_ongoing_requests": 2, "max_queued_requests": 1, "retry_after_s": 3,
                  "auth_token_env": TOKEN_ENV},
    }
    os.environ[TOKEN_ENV] = TOKEN
    try:
        url = start_app(dta, main_overrides, name="lotscan-test", route_prefix="/")
        strict_url = start_app(recon, strict_overrides, name="lotscan-strict", route_prefix="/strict")
    finally:
        del os.environ[TOKEN_ENV]  # replicas never needed it: they hold its digest
    try:
        yield {"url": url, "strict_url": strict_url, "dta": dta, "recon": recon,
               "main_overrides": main_overrides, "strict_overrides": strict_overrides,
               "out": str(root / "batch-out")}
    finally:
        serve.shutdown()


def _images(demo_root: str) -> list[str]:
    return sorted(glob(os.path.join(demo_root, "weave", "test", "*", "*.png")))


@pytest.mark.ray
@pytest.mark.slow
def test_same_score_as_the_batch_job(served, demo_root):
    paths = _images(demo_root)
    reference = batch_job_scores(served["dta"], served["main_overrides"], paths, served["out"] + "/dta")
    model_id = open_bundle(served["dta"], load_config().storage).model_id
    with httpx.Client(timeout=60) as client:
        for path in paths:
            data = Path(path).read_bytes()
            r = client.post(f"{served['url']}/v1/score?heatmap=true&overlay=true", content=data,
                            headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            body = r.json()
            score, heat = reference[path]
            assert body["score"] == pytest.approx(score, rel=1e-4, abs=1e-6), path
            assert body["decision"] == (score > body["threshold"])
            assert body["method"] == "dta" and body["model_id"] == model_id
            assert body["model_version"] and body["batch_size"] >= 1
            assert set(body["timing"]) == {"decode_ms", "queue_ms", "model_ms", "total_ms"}
            with Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))) as img:
                online = np.asarray(img, dtype=np.float64) / 65535.0 * body["heatmap_max"]
            assert online.shape == heat.shape
            expected = np.clip(heat, 0.0, body["heatmap_max"])
            assert np.abs(online - expected).max() <= body["heatmap_max"] / 65535.0 + 1e-4
            with Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))) as img:
                assert img.size == (256, 256) and img.mode == "RGB"
        # A multipart upload is the same image, the same score.
        r = client.post(f"{served['url']}/v1/score",
                        files={"file": ("part.png", Path(paths[0]).read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(reference[paths[0]][0], rel=1e-4, abs=1e-6)
        assert "heatmap_png" not in r.json() and "overlay_png" not in r.json()


@pytest.mark.ray
@pytest.mark.slow
def test_bad_input_gets_json_errors_never_500(served, demo_root):
    url = served["url"]
    good = Path(_images(demo_root)[0]).read_bytes()
    big = png_bytes(np.zeros((600, 600, 3), np.uint8))  # 360000 px > 512*512, a few KB
    gif = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif, format="GIF")
    cases = [
        ("empty body", {"content": b""}, 400, "empty_body"),
        ("garbage", {"content": b"definitely not an image"}, 400, "undecodable_image"),
        ("truncated png", {"content": good[: len(good) // 2]}, 400, "undecodable_image"),
        ("over bytes", {"content": os.urandom(300 * 1024)}, 413, "payload_too_large"),
        ("over pixels", {"content": big}, 413, "image_too_large"),
        ("text body", {"content": good, "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("gif", {"content": gif.getvalue(), "headers": {"Content-Type": "image/gif"}}, 415,
         "unsupported_media_type"),
        ("gif as octets", {"content": gif.getvalue()}, 415, "unsupported_media_type"),
        ("json part", {"files": {"file": ("x.json", b"{}", "application/json")}}, 415,
         "unsupported_media_type"),
        ("no file part", {"data": {"note": "hi"}, "files": {"other": ("a", b"", "text/plain"),
                                                             "more": ("b", b"", "text/plain")}},
         400, "invalid_request"),
        ("bad query", {"content": good, "params": {"heatmap": "maybe"}}, 400, "invalid_request"),
    ]
    with httpx.Client(timeout=60) as client:
        for label, kwargs, status, code in cases:
            kwargs = dict(kwargs)
            headers = kwargs.pop("headers", None)
            if "content" in kwargs and headers is None:
                headers = {"Content-Type": "application/octet-stream"}
            r = client.post(f"{url}/v1/score", headers=headers, **kwargs)
            assert r.status_code == status, (label, r.status_code, r.text)
            assert error_of(r)["code"] == code, label
        r = client.get(f"{url}/v1/nothing-here")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        r = client.get(f"{url}/v1/score")
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
        # Still healthy and scoring after all that.
        r = client.post(f"{url}/v1/score", content=good, headers={"Authorization": "Bearer x"})
        assert r.status_code == 200, r.text


@pytest.mark.ray
@pytest.mark.slow
def test_health_models_and_openapi(served):
    url = served["url"]
    with httpx.Client(timeout=60) as client:
        assert client.get(f"{url}/healthz").json() == {"status": "ok"}
        ready = client.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        info = client.get(f"{url}/v1/models")
        assert info.status_code == 200
        model = info.json()["models"][0]
        bundle = open_bundle(served["dta"], load_config().storage)
        assert model["model_id"] == bundle.model_id == ready.json()["model_id"]
        assert model["method"] == "dta" and model["image_size"] == 32
        assert model["threshold"] == pytest.approx(bundle.calibration.threshold)
        assert model["serving"]["max_batch_size"] == 8 and model["device"] == "cpu"
        spec = client.get(f"{url}/openapi.json").json()
        assert {"/v1/score", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
        body = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in body and "image/png" in body


@pytest.mark.ray
@pytest.mark.slow
def test_auth_on_strict_app(served, demo_root):
    url = served["strict_url"]
    path = _images(demo_root)[0]
    data = Path(path).read_bytes()
    with httpx.Client(timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": "Bearer"}):
            r = client.post(f"{url}/v1/score", content=data, headers=headers)
            assert r.status_code == 401, headers
            assert error_of(r)["code"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in r.text
        assert client.get(f"{url}/v1/models").status_code == 401
        assert client.get(f"{url}/healthz").status_code == 200  # probes stay open
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = client.post(f"{url}/v1/score", content=data, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["method"] == "recon"
        assert client.get(f"{url}/v1/models", headers=auth).status_code == 200
    reference = batch_job_scores(served["recon"], served["strict_overrides"], [path],
                                 served["out"] + "/recon")
    assert r.json()["score"] == pytest.approx(reference[path][0], rel=1e-4, abs=1e-6)


async def _load(url: str, bodies: list[bytes], total: int, concurrency: int,
                headers: dict | None = None) -> list[httpx.Response]:
    """``total`` requests from ``concurrency`` clients; stops by itself."""
    queue = list(range(total))
    responses: list[httpx.Response] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            responses.append(await client.post(url, content=bodies[i % len(bodies)],
                                               headers=headers or {}))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return responses


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_requests_are_batched(served, demo_root):
    paths = _images(demo_root) + sorted(glob(os.path.join(demo_root, "weave", "train", "good", "*.png")))[:2]
    bodies = [Path(p).read_bytes() for p in paths]
    responses = asyncio.run(_load(f"{served['url']}/v1/score", bodies, total=32, concurrency=8))
    assert len(responses) == 32
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    # Same image, same score, whatever batch it landed in.
    by_image: dict[str, list[float]] = {}
    for r in responses:
        by_image.setdefault(r.json()["image_sha256"], []).append(r.json()["score"])
    for scores in by_image.values():
        assert max(scores) - min(scores) <= 1e-4 * max(1.0, abs(scores[0]))
    stats = httpx.get(f"{served['url']}/v1/models", timeout=60).json()["models"][0]["stats"]
    assert stats["max_batch_size_seen"] > 1 and stats["images_scored"] >= 32


@pytest.mark.ray
@pytest.mark.slow
def test_back_pressure_is_503_with_retry_after(served, demo_root):
    url = f"{served['strict_url']}/v1/score"
    bodies = [Path(p).read_bytes() for p in _images(demo_root)]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    seen: list[httpx.Response] = []
    for _ in range(3):  # a bounded number of bursts; one is nearly always enough
        seen += asyncio.run(_load(url, bodies, total=24, concurrency=24, headers=auth))
        if any(r.status_code == 503 for r in seen):
            break
    codes = {r.status_code for r in seen}
    assert codes <= {200, 503}, codes
    assert 200 in codes and 503 in codes
    rejected = next(r for r in seen if r.status_code == 503)
    assert error_of(rejected)["code"] == "overloaded"
    assert rejected.headers["retry-after"] == "3"

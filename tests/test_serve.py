"""The online scoring endpoint: input checks and auth without Ray, then the Serve
app on a local Ray over real HTTP on 127.0.0.1 (same score as the batch job,
bad inputs, auth, health, batching under concurrent load, back-pressure)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import time
from glob import glob
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from starlette.requests import Request

from conftest import TINY_MODEL
from lotscan.config import ConfigError, load_config
from lotscan.jobs.cli import main
from lotscan.models.bundle import Bundle, BundleError
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate
from lotscan.platform.bundles import open_bundle, save_bundle
from lotscan.platform.images import content_seed, decode_image
from lotscan.platform.serve import model as model_module
from lotscan.platform.serve.ingress import ModelBreaker, model_unavailable
from lotscan.platform.serve.proxy import JsonProxyErrors, install_proxy_errors
from lotscan.platform.serving import (
    ApiError,
    ByteBudget,
    LotscanModel,
    UploadLimits,
    buffered_upload,
    bundle_manifest,
    decode_upload,
    effective_config,
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
    DecodeBatch then the scoring actor's ScoreImages, called directly (no Ray Data)."""
    from lotscan.platform.decode import DecodeBatch
    from lotscan.platform.scoring.units import ScoreImages

    scorer = ScoreImages(model_uri, overrides)
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
    out = scorer(DecodeBatch(scorer.cfg.storage, scorer.cfg.data)(rows))
    assert list(out["error"]) == [""] * n
    return {p: (float(out["score"][i]), np.asarray(out["heatmap"][i])) for i, p in enumerate(paths)}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "code", "message"}, body
    assert body["error"]["status"] == response.status_code
    return body["error"]


# ------------------------------------------------------- no Ray needed


def asgi_request(body: bytes, content_type: str, chunk: int = 65536,
                 declare_length: bool = True) -> Request:
    """A Starlette request whose body arrives in ``chunk``-byte messages."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    headers = [(b"content-type", content_type.encode("latin-1"))]
    if declare_length:
        headers.append((b"content-length", str(len(body)).encode()))

    async def receive() -> dict:
        if chunks:
            data = chunks.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/score", "query_string": b"",
             "headers": headers}
    return Request(scope, receive)


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XyZ") -> bytes:
    """A multipart body from (header block, payload) pairs."""
    out = b""
    for head, payload in parts:
        out += b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + payload + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


LIMITS = UploadLimits(max_bytes=4096, max_form_fields=2, max_form_field_bytes=100, retry_after_s=7)
MP = "multipart/form-data; boundary=XyZ"


def read_upload(request: Request, budget: ByteBudget | None = None,
                limits: UploadLimits = LIMITS) -> tuple[bytes, str]:
    budget = budget or ByteBudget(10**6)
    before = budget.used

    async def run() -> tuple[bytes, str]:
        async with buffered_upload(request, limits, budget) as upload:
            assert budget.used > before or not upload.data  # held while in use
            return upload.data, upload.name

    try:
        return asyncio.run(run())
    finally:
        assert budget.used == before  # every reservation is given back, whatever happened


def upload_error(request: Request, budget: ByteBudget | None = None,
                 limits: UploadLimits = LIMITS) -> tuple[int, str, str]:
    with pytest.raises(ApiError) as err:
        read_upload(request, budget, limits)
    return err.value.status, err.value.code, err.value.message


def test_sniffing():
    assert sniff_unsupported(b"GIF89a....") == "GIF"
    assert sniff_unsupported(b"%PDF-1.7") == "PDF"
    assert sniff_unsupported(b"\x00\x00\x00\x18ftypheic....") == "HEIC"
    assert sniff_unsupported(b"  <svg xmlns='x'/>") == "SVG"
    assert sniff_unsupported(png_bytes(np.zeros((4, 4, 3), np.uint8))) is None


def test_multipart_uploads_through_starlette():
    payload = b"\x89PNG\r\n\x1a\n\r\n--notaboundary\r\nbinary\x00\xff"
    file_head = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n' \
                b"Content-Type: image/png"
    note = (b'Content-Disposition: form-data; name="note"', b"hello")
    body = multipart([note, (file_head, payload)])
    for chunk in (7, 65536):  # boundaries split across messages or not
        data, name = read_upload(asgi_request(body, MP, chunk=chunk))
        assert data == payload and "a.png" in name
    # the only file part, whatever its name; 'image' is accepted too
    other = multipart([(b'Content-Disposition: form-data; name="upload"; filename="b.png"', b"x")])
    assert read_upload(asgi_request(other, MP))[0] == b"x"

    cases = {
        "no file part": multipart([note]),
        "two files": multipart([(file_head, b"1"), (file_head, b"2")]),
        "too many fields": multipart([note, note, note, (file_head, b"1")]),
        "field too big": multipart([(note[0], b"x" * 101), (file_head, b"1")]),
        "part without a name": multipart([(b"Content-Disposition: form-data", b"1")]),
        "huge part header": multipart([(b'Content-Disposition: form-data; name="file"; '
                                        b'filename="x.png"' + b"; a=b" * (546 * 1024 // 5),
                                        b"1")]),
        "many header lines": multipart([(file_head + b"\r\nX-A: 1" * 9, b"1")]),
        "unterminated": multipart([(file_head, b"1")])[:-9],
    }
    roomy = UploadLimits(max_bytes=2**20, max_form_fields=2, max_form_field_bytes=100,
                         retry_after_s=7)  # the 546 KiB header fits in the body limit
    for label, case in cases.items():
        status, code, message = upload_error(asgi_request(case, MP), limits=roomy)
        assert (status, code) == (400, "invalid_request"), (label, message)
        assert message.startswith("multipart body:"), (label, message)
    status, code, message = upload_error(asgi_request(body, "multipart/form-data"))
    assert (status, code) == (400, "invalid_request") and "boundary" in message.lower()
    # the huge header is refused for its size, by python-multipart's limit
    assert "header" in upload_error(asgi_request(cases["huge part header"], MP),
                                    limits=roomy)[2].lower()
    json_part = multipart([(b'Content-Disposition: form-data; name="file"; filename="x"\r\n'
                            b"Content-Type: application/json", b"{}")])
    assert upload_error(asgi_request(json_part, MP))[:2] == (415, "unsupported_media_type")


def test_body_limits_and_the_byte_budget():
    assert read_upload(asgi_request(b"x" * 4096, "image/png"))[0] == b"x" * 4096
    # over the limit: refused on the declared length, and while streaming without one
    for declare in (True, False):
        status, code, _ = upload_error(asgi_request(b"x" * 4097, "image/png",
                                                    declare_length=declare))
        assert (status, code) == (413, "payload_too_large")
    assert upload_error(asgi_request(b"x", "text/plain"))[:2] == (415, "unsupported_media_type")
    # the budget: what is held counts; over it is 503 with Retry-After, at once
    budget = ByteBudget(5000)
    assert budget.try_acquire(3000)
    for declare in (True, False):
        with pytest.raises(ApiError) as err:
            read_upload(asgi_request(b"x" * 2500, "image/png", chunk=500,
                                     declare_length=declare), budget)
        assert (err.value.status, err.value.code) == (503, "overloaded")
        assert err.value.headers["Retry-After"] == "7"
        assert budget.used == 3000  # the refused request took nothing with it
    assert read_upload(asgi_request(b"x" * 2000, "image/png", chunk=500), budget)
    budget.release(3000)
    # alone, a request may use more than the whole budget
    small = ByteBudget(1000)
    assert read_upload(asgi_request(b"x" * 4000, "image/png"), small)[0] == b"x" * 4000


def test_breaker_and_unavailable_errors():
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    assert model_unavailable(ActorDiedError())
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = ActorDiedError()
    assert model_unavailable(wrapped)
    assert not model_unavailable(ValueError("bad image shape"))
    assert not model_unavailable(BackPressureError(num_queued_requests=1, max_queued_requests=1))
    task_error = RayTaskError("score", "traceback", ValueError("boom"))
    assert not model_unavailable(task_error)

    breaker = ModelBreaker()
    assert breaker.admit() and breaker.admit()  # closed: everyone goes through
    breaker.lost_model()
    assert breaker.admit()  # the one trial
    assert not breaker.admit() and not breaker.admit()  # the others: 503 at once
    breaker.lost_model()  # the trial lost the model too
    assert breaker.admit() and not breaker.admit()
    breaker.finished_other()  # a trial timing out frees the slot, the breaker stays open
    assert breaker.admit() and not breaker.admit()
    breaker.succeeded()
    assert breaker.open_since is None and breaker.admit() and breaker.admit()


def test_breaker_releases_calls_waiting_for_a_lost_replica():
    from lotscan.platform.serve.ingress import ModelLost

    async def scenario() -> dict:
        breaker = ModelBreaker()
        loop = asyncio.get_running_loop()
        out = {}
        # waiting when the replica is lost, nothing succeeds: ModelLost after lost_wait
        stuck = loop.create_future()
        waiter = asyncio.ensure_future(breaker.wait(stuck, breaker.opened, 30.0, 0.2))
        await asyncio.sleep(0.05)
        breaker.lost_model()
        started = loop.time()
        with pytest.raises(ModelLost):
            await waiter
        out["released_after"] = loop.time() - started
        out["stuck_cancelled"] = stuck.cancelled()
        # a call started while open (the trial) is not woken by that opening
        trial = loop.create_future()
        trial_wait = asyncio.ensure_future(breaker.wait(trial, breaker.opened, 30.0, 0.2))
        await asyncio.sleep(0.3)
        assert not trial_wait.done()
        trial.set_result("scored")
        out["trial"] = await trial_wait
        breaker.succeeded()
        # waiting when lost, but a success comes within lost_wait: it waits on, answered
        slow = loop.create_future()
        slow_wait = asyncio.ensure_future(breaker.wait(slow, breaker.opened, 30.0, 0.5))
        await asyncio.sleep(0.05)
        breaker.lost_model()
        await asyncio.sleep(0.1)
        breaker.succeeded()
        await asyncio.sleep(0.6)  # past lost_wait: not released, the breaker closed again
        assert not slow_wait.done()
        slow.set_result("late but fine")
        out["slow"] = await slow_wait
        with pytest.raises(asyncio.TimeoutError):
            await breaker.wait(loop.create_future(), breaker.opened, 0.1, 0.1)
        # waiting in this ingress's queue while another found the death: the
        # controller's "no model replica running" (asked every lost_wait) releases it
        asks = []

        async def model_gone() -> bool:
            asks.append(loop.time())
            return len(asks) >= 3

        queued = loop.create_future()
        started = loop.time()
        with pytest.raises(ModelLost):
            await breaker.wait(queued, breaker.opened, 30.0, 0.1, model_gone)
        out["gone_after"] = loop.time() - started
        out["open_after_gone"] = breaker.open_since is not None
        return out

    out = asyncio.run(scenario())
    assert 0.15 <= out["released_after"] < 5.0 and out["stuck_cancelled"]
    assert out["trial"] == "scored" and out["slow"] == "late but fine"
    assert 0.25 <= out["gone_after"] < 5.0 and out["open_after_gone"]


def run_asgi(app, scope: dict | None = None) -> list[dict]:
    """Call an ASGI app once; return the messages it sent."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope or {"type": "http", "method": "POST", "path": "/v1/score"},
                    receive, send))
    return sent


def test_proxy_middleware_keeps_the_json_shape():
    import json as jsonlib

    def plain(status: int, text: bytes, headers=()):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain"), *headers]})
            await send({"type": "http.response.body", "body": text[:5], "more_body": True})
            await send({"type": "http.response.body", "body": text[5:]})
        return app

    def body_of(sent):
        start, *bodies = sent
        return start, jsonlib.loads(b"".join(m.get("body", b"") for m in bodies))

    start, body = body_of(run_asgi(JsonProxyErrors(plain(503, b"Too many queued requests",
                                                         [(b"retry-after", b"3")]))))
    assert start["status"] == 503 and body["error"]["code"] == "unavailable"
    assert body["error"]["message"] == "Too many queued requests"
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"3" and headers[b"content-type"] == b"application/json"
    start, body = body_of(run_asgi(JsonProxyErrors(plain(408, b"timed out"))))
    assert (start["status"], body["error"]["code"]) == (408, "timeout")

    async def silent(scope, receive, send):  # the proxy when the replica died mid-request
        return None

    start, body = body_of(run_asgi(JsonProxyErrors(silent)))
    assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == b"1"
    assert body["error"]["code"] == "unavailable" and body["error"]["status"] == 503

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"success"})

    assert run_asgi(JsonProxyErrors(ok))[1]["body"] == b"success"
    json_error = b'{"error": {"status": 413}}'

    async def app_json(scope, receive, send):
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json_error})

    assert run_asgi(JsonProxyErrors(app_json))[1]["body"] == json_error
    env: dict[str, str] = {}
    assert install_proxy_errors(env) and env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    assert not install_proxy_errors({"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "other:cb"})


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


def test_the_serve_config_file_is_a_valid_lotscan_config():
    import yaml

    path = Path(__file__).resolve().parents[1] / "infra" / "serve" / "serve-config.yaml"
    app = yaml.safe_load(path.read_text())["applications"][0]
    assert app["import_path"] == "lotscan.platform.serving:app_builder"
    assert set(app["args"]) <= {"model", "config", "overrides"}
    cfg = load_config(base=app["args"]["overrides"])  # names any unknown or invalid field
    assert cfg.serve.ingress_autoscaling and cfg.serve.ingress_min_replicas >= 2
    assert cfg.serve.require_auth


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


def test_category_reaches_a_scorer_that_takes_it(tmp_path, demo_root, monkeypatch):
    uri = make_bundle(demo_root, str(tmp_path / "b"), "recon")
    serve_cfg = load_config().serve.__dict__
    image = decode_image(Path(_images(demo_root)[0]).read_bytes(), 32, "x", 10**6)
    items = [model_module._Item(image, content_seed(image), False, 0.0, "weave"),
             model_module._Item(image, content_seed(image), False, 0.0, None)]
    plain = LotscanModel.func_or_class(uri, {}, serve_cfg, False)
    assert plain.takes_categories  # the Scorer applies per-category calibrations
    expected = plain._score_sync(items)[0].image_scores
    seen: list = []

    class SpyScorer(Scorer):
        def score(self, images, seeds, categories=None):
            seen.append(categories)
            return super().score(images, seeds, categories=categories)

    class LegacyScorer(Scorer):  # a scorer without categories: one calibration for all
        def score(self, images, seeds):
            return super().score(images, seeds)

    monkeypatch.setattr(model_module, "Scorer", SpyScorer)
    model = LotscanModel.func_or_class(uri, {}, serve_cfg, False)
    assert model.takes_categories and model.info()["categories_passed_to_scorer"]
    result = model._score_sync(items)[0]
    assert seen[-1] == ["weave", None]  # one entry per image of the batch, in order
    np.testing.assert_allclose(result.image_scores, expected, rtol=1e-5)

    monkeypatch.setattr(model_module, "Scorer", LegacyScorer)
    legacy = LotscanModel.func_or_class(uri, {}, serve_cfg, False)
    assert not legacy.takes_categories and not legacy.info()["categories_passed_to_scorer"]
    np.testing.assert_allclose(legacy._score_sync(items)[0].image_scores, expected, rtol=1e-5)


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
                  "max_request_bytes": 256 * 1024, "max_buffered_bytes": 256 * 1024,
                  "auth_token_env": "LOTSCAN_TEST_UNSET_VARIABLE"},
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
               "out": str(root / "batch-out"), "port": port}
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
    # The part header that held the hand-written parser's decode thread for seconds.
    huge_header = multipart([(b'Content-Disposition: form-data; name="file"; filename="x.png"'
                              + b"; a=b" * (150 * 1024 // 5), good)])
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
        ("bad category", {"content": good, "params": {"category": "../etc"}}, 400,
         "invalid_request"),
        ("two files", {"files": [("file", ("a.png", good, "image/png")),
                                 ("file", ("b.png", good, "image/png"))]}, 400, "invalid_request"),
        ("546 KiB part header", {"content": huge_header, "headers": {"Content-Type": MP}}, 400,
         "invalid_request"),
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
        # Still healthy and scoring after all that; a category is passed through.
        r = client.post(f"{url}/v1/score", content=good, headers={"Authorization": "Bearer x"},
                        params={"category": "weave"})
        assert r.status_code == 200, r.text
        assert r.json()["category"] == "weave"


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


@pytest.mark.ray
@pytest.mark.slow
def test_readyz_is_not_queued_behind_scoring(served, demo_root):
    """The strict app's model holds 2 requests and queues 1: under a burst every
    further model call is refused, but /readyz asks the controller and stays 200."""
    url = served["strict_url"]
    bodies = [Path(p).read_bytes() for p in _images(demo_root)]
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def burst_and_probe() -> tuple[list[httpx.Response], list[httpx.Response]]:
        load = asyncio.ensure_future(_load(f"{url}/v1/score", bodies, total=48, concurrency=24,
                                           headers=auth))
        probes = []
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.sleep(0.5)
            for _ in range(6):
                probes.append(await client.get(f"{url}/readyz"))
                probes.append(await client.get(f"{url}/healthz"))
                await asyncio.sleep(0.2)
        return await load, probes

    scored, probes = asyncio.run(burst_and_probe())
    assert 503 in {r.status_code for r in scored}  # the model queue was full meanwhile
    assert [r.status_code for r in probes] == [200] * len(probes), [r.text for r in probes]
    ready = [r.json() for r in probes if r.json()["status"] == "ready"]
    assert ready and all(r["replicas"] == 1 and r["model_id"] for r in ready)


def _send_headers(port: int, length: int, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/octet-stream\r\n"
                 b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + first)
    return sock


@pytest.mark.ray
@pytest.mark.slow
def test_byte_budget_refuses_bodies_over_it(served, demo_root):
    """serve.max_buffered_bytes is 256 KiB on the main app: while one slow client
    holds 200 KB of it, a second 200 KB body gets 503 with Retry-After; once the
    first finishes, the second goes through."""
    url, port = served["url"], served["port"]
    good = Path(_images(demo_root)[0]).read_bytes()
    size = 200 * 1024
    body = good + b"\0" * (size - len(good))  # a PNG with trailing bytes: still decodable
    slow = _send_headers(port, size, body[:1000])
    try:
        refused = None
        with httpx.Client(timeout=30) as client:
            for _ in range(20):  # until the slow request has reserved its bytes
                r = client.post(f"{url}/v1/score", content=body,
                                headers={"Content-Type": "application/octet-stream"})
                if r.status_code == 503:
                    refused = r
                    break
                assert r.status_code == 200, r.text
                time.sleep(0.25)
            assert refused is not None, "the byte budget never refused"
            assert error_of(refused)["code"] == "overloaded"
            assert "max_buffered_bytes" in error_of(refused)["message"]
            assert refused.headers["retry-after"] == "1"
            slow.sendall(body[1000:])
            answer = slow.recv(65536).decode("latin-1")
            assert answer.startswith("HTTP/1.1 200"), answer[:300]
            r = client.post(f"{url}/v1/score", content=body,
                            headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, r.text
    finally:
        slow.close()


def _scrape(port: int) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)
            if family.name.startswith("ray_lotscan_serve")}


def _total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.ray
@pytest.mark.slow
def test_metrics_reach_the_nodes_prometheus_endpoint(served):
    """Runs last in this file: the requests of the tests above are counted on the
    node's metrics export port (Ray reports every few seconds, so poll)."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 60
    while True:
        families = _scrape(port)
        requests = families.get("ray_lotscan_serve_requests", [])
        batches = families.get("ray_lotscan_serve_batch_size", [])
        ok = _total(requests, "ray_lotscan_serve_requests_total", route="/v1/score", status="200")
        batched = _total(batches, "ray_lotscan_serve_batch_size_count")
        if (ok >= 32 and batched >= 1 and "ray_lotscan_serve_errors" in families
                and "ray_lotscan_serve_buffered_bytes" in families) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert ok >= 32, sorted(families)  # test_concurrent_requests_are_batched alone sent 32
    assert _total(requests, "ray_lotscan_serve_requests_total", route="/v1/score", status="413") >= 2
    errors = families["ray_lotscan_serve_errors"]
    assert _total(errors, "ray_lotscan_serve_errors_total", code="undecodable_image") >= 2
    assert _total(errors, "ray_lotscan_serve_errors_total", code="overloaded") >= 1
    images = _total(families["ray_lotscan_serve_images"], "ray_lotscan_serve_images_total",
                    outcome="scored")
    # more images than model calls: batching happened (test_concurrent_requests_are_batched)
    assert images >= 32 and _total(batches, "ray_lotscan_serve_batch_size_sum") > batched
    latency = families["ray_lotscan_serve_request_seconds"]
    assert _total(latency, "ray_lotscan_serve_request_seconds_count", route="/v1/score") >= ok
    assert "ray_lotscan_serve_batch_queue_depth" in families
    assert "ray_lotscan_serve_ongoing_requests" in families

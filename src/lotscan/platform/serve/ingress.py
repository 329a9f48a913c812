"""The ``LotscanIngress`` deployment: the HTTP API (FastAPI) in front of the model.

Auth, body limits and the byte budget, image decode (one worker thread per
replica, off the event loop), then one call to the model per request. Bad
input is answered here and never reaches the model. ``/healthz`` and
``/readyz`` never go through the model's queue.
"""

# No ``from __future__ import annotations`` here: Serve rebuilds the FastAPI
# routes of a class ingress and needs real (not string) parameter annotations.
import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import lotscan
from lotscan.config import from_dict
from lotscan.platform.images import content_seed, decode_image
from lotscan.platform.report import overlay_png
from lotscan.platform.scoring.outputs import heatmap_bytes
from lotscan.platform.serve.auth import check_bearer
from lotscan.platform.serve.errors import (
    ERROR_RESPONSES,
    ApiError,
    ModelsResponse,
    ScoreResponse,
    StatusResponse,
    error_response,
    retry_after,
)
from lotscan.platform.serve.metrics import route_label, serve_metrics
from lotscan.platform.serve.model import MODEL_DEPLOYMENT
from lotscan.platform.serve.uploads import ByteBudget, UploadLimits, buffered_upload, decode_upload

logger = logging.getLogger("lotscan.serve")

API_VERSION = "v1"
INGRESS_DEPLOYMENT = "LotscanIngress"
READY_CACHE_S = 1.0
"""How long /readyz reuses the controller's answer: probes from several
kubelets and load balancers cost one controller call per second per replica."""
READY_TIMEOUT_S = 5.0
CATEGORY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


# ------------------------------------------------------------------ app

api = FastAPI(
    title="lotscan online scoring",
    version=lotscan.__version__,
    description=(
        "Scores single images of production lots with a trained lotscan bundle: the same "
        "decoder, scorer and calibration as the nightly batch job, so an image gets the same "
        "score here and in the nightly results.\n\n"
        "Errors are JSON `{\"error\": {\"status\", \"code\", \"message\"}}`; branch on `code`. "
        "A 503 always carries `Retry-After`. When a bearer token is configured, `/v1/*` needs "
        "`Authorization: Bearer <token>`; `/healthz`, `/readyz` and these docs stay open."
    ),
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    serve_metrics().errors.inc(tags={"code": exc.code})
    return error_response(exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    serve_metrics().errors.inc(tags={"code": code})
    return error_response(exc.status_code, code,
                          f"{request.method} {request.url.path}: {exc.detail}",
                          getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    serve_metrics().errors.inc(tags={"code": "invalid_request"})
    return error_response(400, "invalid_request", f"{request.url.path}: {problems[:500]}")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    serve_metrics().errors.inc(tags={"code": "internal_error"})
    return error_response(500, "internal_error", f"{request.url.path}: an unexpected server "
                                                 f"error ({type(exc).__name__}); see the logs")


class _RequestMetrics:
    """ASGI middleware: requests by route and status, latency, requests in flight."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.ongoing = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = serve_metrics()
        route = route_label(scope.get("path", ""))
        status = [500]  # what the client gets if the app raises past every handler

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        started = time.perf_counter()
        self.ongoing += 1
        metrics.ongoing.set(self.ongoing, tags={"deployment": "ingress"})
        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.ongoing -= 1
            metrics.ongoing.set(self.ongoing, tags={"deployment": "ingress"})
            metrics.requests.inc(tags={"route": route, "status": str(status[0])})
            metrics.latency.observe(time.perf_counter() - started, tags={"route": route})


api.add_middleware(_RequestMetrics)

_RAW_BODY = {"schema": {"type": "string", "format": "binary"}}
SCORE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image (PNG, JPEG, BMP, TIFF, WebP) as the raw body, or as the "
                       "multipart/form-data part `file`",
        "content": {
            **{kind: _RAW_BODY for kind in ("image/png", "image/jpeg", "image/bmp",
                                            "image/tiff", "image/webp",
                                            "application/octet-stream")},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def model_unavailable(err: BaseException) -> bool:
    """The model replica died, or none is there: retryable, never the input's fault.
    Checks the error and what it wraps (``RayTaskError.cause``, ``__cause__``)."""
    seen: BaseException | None = err
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return False


class ModelLost(Exception):
    """A call was waiting when another call lost the model replica, and no call
    succeeded within ``serve.replica_lost_wait_s``."""


class ModelBreaker:
    """After a model call fails because its replica died, let one request at a
    time through to the model (the trial) and answer the others 503 at once,
    until a call succeeds. Calls already waiting when the replica was lost get
    ``serve.replica_lost_wait_s`` more to be answered (by another replica) or
    for a call to succeed; then they too get 503. Without this, requests
    queued for a dead replica wait until Serve has noticed the death and
    started and loaded a replacement, up to ``serve.request_timeout_s``.
    With other healthy replicas the first trial is answered at once and the
    breaker closes. All calls come from the replica's event loop."""

    def __init__(self) -> None:
        self.open_since: float | None = None
        self.trial_in_flight = False
        self.opened = asyncio.Event()
        """Set when the breaker opens; a call keeps the event current when it
        started, so only the calls already waiting are woken."""
        self.closed = asyncio.Event()
        self.closed.set()

    def admit(self) -> bool:
        """True: go to the model (normally, or as the trial); False: answer 503."""
        if self.open_since is None:
            return True
        if self.trial_in_flight:
            return False
        self.trial_in_flight = True
        return True

    def succeeded(self) -> None:
        self.open_since = None
        self.trial_in_flight = False
        self.closed.set()

    def lost_model(self) -> None:
        self.trial_in_flight = False
        if self.open_since is None:
            self.open_since = time.monotonic()
            self.closed.clear()
            opened, self.opened = self.opened, asyncio.Event()
            opened.set()

    def finished_other(self) -> None:
        """A call that neither succeeded nor lost the model (timeout, back-pressure)."""
        self.trial_in_flight = False

    async def wait(self, response: Any, opened: asyncio.Event, timeout: float,
                   lost_wait: float,
                   model_gone: Callable[[], Awaitable[bool]] | None = None) -> Any:
        """The result of ``response`` (a Serve response), within ``timeout``
        (``asyncio.TimeoutError``). :class:`ModelLost` when the breaker opened
        (``opened``: the event current when the call started) and neither an
        answer nor a success came within ``lost_wait``; or when, after each
        ``lost_wait`` of waiting, ``model_gone()`` says no model replica is
        running (another ingress replica's calls found the death, not this one's:
        this one's calls only wait in the handle's queue), which opens the breaker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = asyncio.ensure_future(response)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                step = remaining if model_gone is None else min(remaining, lost_wait)
                signal = asyncio.ensure_future(opened.wait())
                done, _ = await asyncio.wait({task, signal}, timeout=step,
                                             return_when=asyncio.FIRST_COMPLETED)
                signal.cancel()
                if task in done:
                    return task.result()
                if signal not in done:  # a step of waiting went by
                    if model_gone is not None and await model_gone():
                        self.lost_model()
                        raise ModelLost
                    continue
                healthy = asyncio.ensure_future(self.closed.wait())
                done, _ = await asyncio.wait(
                    {task, healthy}, timeout=max(0.0, min(lost_wait, deadline - loop.time())),
                    return_when=asyncio.FIRST_COMPLETED)
                healthy.cancel()
                if task in done:
                    return task.result()
                if healthy not in done:
                    if loop.time() >= deadline:
                        raise asyncio.TimeoutError
                    raise ModelLost
                opened = self.opened  # closed again: wait on, woken by the next opening
        finally:
            if not task.done():
                task.cancel()
                cancel = getattr(response, "cancel", None)
                if cancel is not None:
                    cancel()


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class LotscanIngress:
    """HTTP front: auth, input checks and decode, then one model call per request."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any],
                 token_sha256: str | None, model_id: str = ""):
        self.model = model
        self.cfg = from_dict(config).validate()
        self.serve_cfg = s = self.cfg.serve
        self.token_sha256 = token_sha256
        self.model_id = model_id
        self.max_bytes = min(s.max_request_bytes, self.cfg.data.max_image_bytes)
        self.limits = UploadLimits(self.max_bytes, s.max_form_fields, s.max_form_field_bytes,
                                   s.retry_after_s)
        metrics = serve_metrics()
        self.budget = ByteBudget(s.max_buffered_bytes, on_change=metrics.buffered_bytes.set)
        self.breaker = ModelBreaker()
        self.retry = retry_after(s.retry_after_s)
        # One decode thread per ingress replica: off the event loop, and Pillow's
        # warning filters (decode_image uses catch_warnings) are process-global.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lotscan-decode")
        self._ready: tuple[float, int | None, str] | None = None
        self._ready_lock = asyncio.Lock()
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:  # outside a replica (unit use)
            self.app_name = ""

    # -- helpers

    def _decode(self, data: bytes, name: str,
                want_overlay: bool) -> tuple[np.ndarray, np.ndarray | None, str]:
        image = decode_upload(data, name, self.cfg, self.max_bytes)
        display = None
        if want_overlay:
            display = decode_image(data, max(256, self.cfg.data.image_size), name,
                                   self.cfg.data.max_image_pixels)
        return image, display, hashlib.sha256(data).hexdigest()

    async def _call_model(self, method: str, *args: Any) -> Any:
        if not self.breaker.admit():
            raise ApiError(503, "not_ready", "the model replica was lost and is being replaced; "
                                             "retry later", self.retry)
        opened = self.breaker.opened
        response = getattr(self.model, method).remote(*args)
        s = self.serve_cfg
        try:
            result = await self.breaker.wait(response, opened, s.request_timeout_s,
                                             s.replica_lost_wait_s, self._model_gone)
        except asyncio.TimeoutError as err:
            self.breaker.finished_other()
            raise ApiError(504, "timeout", f"not answered within {s.request_timeout_s} s "
                                           f"(serve.request_timeout_s)") from err
        except ModelLost as err:
            self.breaker.finished_other()
            raise ApiError(503, "not_ready", "the model replica was lost while this request "
                                             "waited; retry later", self.retry) from err
        except BackPressureError as err:
            self.breaker.finished_other()
            raise ApiError(503, "overloaded", "too many requests are waiting for the model; retry "
                                              "later", self.retry) from err
        except Exception as err:
            if model_unavailable(err):
                self.breaker.lost_model()
                logger.warning("model call %s: replica unavailable (%s)", method,
                               type(err).__name__)
                raise ApiError(503, "not_ready", "the model replica is unavailable (it died or "
                                                 "is being replaced); retry later",
                               self.retry) from err
            self.breaker.finished_other()
            raise
        self.breaker.succeeded()
        return result

    async def _model_gone(self) -> bool:
        """The controller says no model replica is running (and none is meant to
        be absent: with ``min_replicas: 0`` a request waits for a scale-up)."""
        if self.serve_cfg.autoscaling and self.serve_cfg.min_replicas == 0:
            return False
        running, _ = await self._running_model_replicas()
        return running == 0

    async def _running_model_replicas(self) -> tuple[int | None, str]:
        """(model replicas RUNNING or ``None`` when unknown, reason when not
        ready) from the Serve controller, cached for READY_CACHE_S. A RUNNING
        replica has loaded the bundle and scored the probe image in its
        constructor."""
        now = time.monotonic()
        if self._ready and now - self._ready[0] < READY_CACHE_S:
            return self._ready[1], self._ready[2]
        async with self._ready_lock:
            if self._ready and time.monotonic() - self._ready[0] < READY_CACHE_S:
                return self._ready[1], self._ready[2]
            running: int | None
            try:
                status = await asyncio.wait_for(asyncio.to_thread(serve.status),
                                                timeout=READY_TIMEOUT_S)
                app = status.applications.get(self.app_name)
                deployment = app.deployments.get(MODEL_DEPLOYMENT) if app else None
                if deployment is None:
                    running, reason = 0, f"deployment {MODEL_DEPLOYMENT} not found"
                else:
                    running = int(deployment.replica_states.get("RUNNING", 0))
                    reason = "" if running else (
                        f"no {MODEL_DEPLOYMENT} replica is running (deployment "
                        f"{deployment.status}: {deployment.message or 'starting'})")
            except Exception as err:  # controller unreachable or slow: unknown, not zero
                running, reason = None, f"the Serve controller did not answer ({type(err).__name__})"
            self._ready = (time.monotonic(), running, reason[:300])
            return running, reason

    # -- routes

    @api.post(f"/{API_VERSION}/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              openapi_extra=SCORE_REQUEST_BODY, response_model_exclude_none=True,
              summary="Score one image")
    async def score(
        self,
        request: Request,
        heatmap: bool = Query(False, description="include the anomaly map as a 16-bit PNG"),
        overlay: bool = Query(False, description="include the image with the anomaly map on top"),
        category: str | None = Query(
            None, pattern=CATEGORY_PATTERN,
            description="product category of the image (letters, digits, . _ -; up to 64), "
                        "passed to the scorer for a per-category calibration"),
    ) -> dict[str, Any]:
        """Decode one image exactly as the batch job does, score it with the loaded
        bundle and return the score, the decision and the threshold."""
        started = time.perf_counter()
        check_bearer(request.headers.get("authorization", ""), self.token_sha256)
        loop = asyncio.get_running_loop()
        async with buffered_upload(request, self.limits, self.budget) as upload:
            try:
                image, display, digest = await loop.run_in_executor(
                    self._decoder, self._decode, upload.data, upload.name, overlay)
            except ApiError:
                raise
            except Exception as err:  # whatever the input did to a parser, it is the input's fault
                raise ApiError(400, "undecodable_image",
                               f"{upload.name}: not a readable image ({type(err).__name__})") from err
        name = upload.name
        decode_ms = (time.perf_counter() - started) * 1000.0
        try:
            result = await self._call_model("score", image, content_seed(image),
                                            heatmap or overlay, category)
        except ApiError:
            raise
        except Exception as err:
            logger.error("scoring %s failed: %s", name, err)
            raise ApiError(500, "internal_error",
                           "the model failed to score this image; see the server logs") from err
        if not np.isfinite(result["score"]):
            raise ApiError(500, "non_finite_score", f"{name}: the model produced a non-finite score")
        out = {key: result[key] for key in ("score", "decision", "threshold", "method", "model_id",
                                            "model_version", "batch_size")}
        out["image_sha256"] = digest
        if category is not None:
            out["category"] = category
        heat = result.get("heatmap")
        if heatmap and heat is not None:
            png_max = self.cfg.score.heatmap_png_max
            out["heatmap_png"] = _b64(heatmap_bytes(heat, "png16", png_max))
            out["heatmap_max"] = png_max
        if overlay and heat is not None and display is not None:
            out["overlay_png"] = _b64(overlay_png(display, heat, vmax=max(2.0 * out["threshold"], 1e-6)))
        out["timing"] = {"decode_ms": round(decode_ms, 3), "queue_ms": round(result["queue_ms"], 3),
                         "model_ms": round(result["model_ms"], 3),
                         "total_ms": round((time.perf_counter() - started) * 1000.0, 3)}
        return out

    @api.get(f"/{API_VERSION}/models", response_model=ModelsResponse,
             responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]},
             summary="What is loaded")
    async def models(self, request: Request) -> dict[str, Any]:
        """Metadata of the loaded bundle and the answering replica's batch statistics."""
        check_bearer(request.headers.get("authorization", ""), self.token_sha256)
        info = await self._call_model("info")
        return {"api_version": API_VERSION, "models": [info]}

    @api.get("/healthz", response_model=StatusResponse, response_model_exclude_none=True,
             summary="Liveness of the HTTP front")
    async def healthz(self) -> dict[str, Any]:
        """200 while this ingress replica answers (the model is not consulted)."""
        return {"status": "ok"}

    @api.get("/readyz", response_model=StatusResponse, responses={503: ERROR_RESPONSES[503]},
             summary="Readiness: a model replica has loaded the bundle")
    async def readyz(self) -> Any:
        """200 when the Serve controller reports at least one model replica
        RUNNING (bundle loaded, probe scored), else 503 ``not_ready`` with
        Retry-After. Asks the controller (cached 1 s), never the model's queue."""
        running, reason = await self._running_model_replicas()
        if running:
            return {"status": "ready", "model_id": self.model_id, "replicas": running}
        return error_response(503, "not_ready", f"model not ready: {reason}", self.retry)

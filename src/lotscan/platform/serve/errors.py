"""The API's one error shape, ``{"error": {"status", "code", "message"}}``, and
the pydantic models of its responses (they make the OpenAPI description)."""

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"status", "code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": message}}


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one error shape of the API, so clients branch on ``code``, not on text."""
    return JSONResponse(status_code=status, headers=dict(headers or {}),
                        content=error_body(status, code, message))


def retry_after(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(int(seconds))}


class ErrorBody(BaseModel):
    status: int = Field(description="HTTP status, repeated")
    code: str = Field(description="stable machine-readable code, e.g. undecodable_image")
    message: str = Field(description="what is wrong, naming the input")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Timing(BaseModel):
    decode_ms: float = Field(description="body checks and image decode in the ingress")
    queue_ms: float = Field(description="wait in the model replica for a batch to start")
    model_ms: float = Field(description="scoring of the whole batch this image was in")
    total_ms: float = Field(description="from request arrival in the ingress to the response")


class ScoreResponse(BaseModel):
    score: float = Field(description="image anomaly score (max of the pooled anomaly map)")
    decision: bool = Field(description="true: anomalous (score > threshold)")
    threshold: float
    method: str
    model_id: str
    model_version: str = Field(description="lotscan version that wrote the bundle")
    image_sha256: str = Field(description="sha256 of the image bytes as received")
    batch_size: int = Field(description="images scored together in the model call")
    category: str | None = Field(None, description="the ?category= given, passed to the scorer")
    timing: Timing
    heatmap_png: str | None = Field(
        None, description="with ?heatmap=true: base64 16-bit grey PNG of the anomaly map at "
                          "the model's resolution; pixel value / 65535 * heatmap_max = score")
    heatmap_max: float | None = Field(None, description="score mapped to 65535 in heatmap_png")
    overlay_png: str | None = Field(
        None, description="with ?overlay=true: base64 RGB PNG, the image with the anomaly map "
                          "on top (as in the batch job's report)")


class ModelsResponse(BaseModel):
    api_version: str
    models: list[dict[str, Any]] = Field(
        description="loaded bundle: method, model_id, threshold, calibration, training record, "
                    "serving settings and the answering replica's batch statistics")


class StatusResponse(BaseModel):
    status: str
    model_id: str | None = None
    replicas: int | None = Field(None, description="/readyz: model replicas running (each has "
                                                   "loaded the bundle and scored a probe)")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse,
          "description": "empty body, undecodable image, bad request or multipart body "
                         "(codes: empty_body, undecodable_image, invalid_request)"},
    401: {"model": ErrorResponse, "description": "a bearer token is configured and the request's "
                                                 "is missing or wrong (code: unauthorized)"},
    413: {"model": ErrorResponse, "description": "body over serve.max_request_bytes / "
                                                 "data.max_image_bytes (payload_too_large) or image "
                                                 "over data.max_image_pixels (image_too_large)"},
    415: {"model": ErrorResponse, "description": "content type or image format not supported "
                                                 "(code: unsupported_media_type)"},
    503: {"model": ErrorResponse,
          "description": "back-pressure (overloaded: the model queue or the ingress byte budget "
                         "is full) or no model replica (not_ready); see the Retry-After header"},
    504: {"model": ErrorResponse, "description": "not scored within serve.request_timeout_s (timeout)"},
}

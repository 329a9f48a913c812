"""Online scoring on Ray Serve: one image in, its score and decision out.

The code lives in :mod:`lotscan.platform.serve` (one module per concern); this
module keeps the import path of the Serve config (``IMPORT_PATH``,
``lotscan.platform.serving:app_builder``) and the names other code and the
tests use. ``lotscan serve`` calls :func:`start_app`. See docs/serving.md.
"""

from lotscan.platform.serve.app import (
    APP_NAME,
    IMPORT_PATH,
    ServeApp,
    app_builder,
    build,
    build_app,
    bundle_manifest,
    effective_config,
    start_app,
)
from lotscan.platform.serve.auth import check_bearer, resolve_token
from lotscan.platform.serve.errors import ApiError, error_response
from lotscan.platform.serve.ingress import API_VERSION, LotscanIngress, ModelBreaker, api
from lotscan.platform.serve.model import LotscanModel
from lotscan.platform.serve.uploads import (
    ByteBudget,
    UploadLimits,
    buffered_upload,
    decode_upload,
    sniff_unsupported,
)

__all__ = [
    "API_VERSION", "APP_NAME", "IMPORT_PATH", "ApiError", "ByteBudget", "LotscanIngress",
    "LotscanModel", "ModelBreaker", "ServeApp", "UploadLimits", "api", "app_builder", "build",
    "build_app", "buffered_upload", "bundle_manifest", "check_bearer", "decode_upload",
    "effective_config", "error_response", "resolve_token", "sniff_unsupported", "start_app",
]

"""The bearer token: read where the application is built, compared by digest."""

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from lotscan.config import ConfigError, ServeConfig
from lotscan.platform.serve.errors import ApiError


def resolve_token(serve_cfg: ServeConfig,
                  environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(sha256 hex of the bearer token or ``None``, where it came from).

    Only the digest leaves this function: replicas compare digests and never
    hold or log the token. A configured file that cannot be read is an error,
    never a silent fall-back to an open API."""
    environ = os.environ if environ is None else environ
    token, source = "", ""
    if serve_cfg.auth_token_file:
        path = Path(serve_cfg.auth_token_file)
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"serve.auth_token_file {path}: cannot read the token "
                              f"({err.strerror or type(err).__name__})") from err
        if not token:
            raise ConfigError(f"serve.auth_token_file {path}: the file is empty")
        source = f"file {path}"
    elif serve_cfg.auth_token_env and environ.get(serve_cfg.auth_token_env, "").strip():
        token = environ[serve_cfg.auth_token_env].strip()
        source = f"environment variable {serve_cfg.auth_token_env}"
    if not token:
        if serve_cfg.require_auth:
            raise ConfigError(
                f"serve.require_auth is true but no token is set: put it in the environment "
                f"variable {serve_cfg.auth_token_env or '(serve.auth_token_env)'} or in "
                f"serve.auth_token_file")
        return None, "off (no token configured; the API is open)"
    return hashlib.sha256(token.encode()).hexdigest(), f"bearer token from {source}"


def check_bearer(authorization: str, token_sha256: str | None) -> None:
    """401 unless ``Authorization: Bearer <token>`` matches (constant-time digest compare)."""
    if token_sha256 is None:
        return
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    given = hashlib.sha256(token.encode()).hexdigest() if token else ""
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, token_sha256):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token "
                                            "(send Authorization: Bearer <token>)",
                       {"WWW-Authenticate": 'Bearer realm="lotscan"'})

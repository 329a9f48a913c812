"""Starting or joining Ray, and device choice."""

from __future__ import annotations

import logging
import os

import ray

_FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory: int | None = None,
               include_dashboard: bool | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local Ray.

    A local Ray gets the storage credentials of this process in its workers'
    environment, so a laptop run against a local S3 endpoint just works. Its
    dashboard is on by default: Ray Train's state queries need it (without it
    Ray Train logs a warning every second while training).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"include_dashboard": include_dashboard, "logging_level": logging.WARNING,
                    "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
             runtime_env={"env_vars": env} if env else None, **kwargs)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0

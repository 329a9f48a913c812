"""Online scoring on Ray Serve, one concern per module:

- :mod:`.errors`   the API's one error shape and its response models;
- :mod:`.uploads`  request bodies: size limits, the byte budget, multipart
                   (python-multipart through Starlette), image checks and decode;
- :mod:`.auth`     the bearer token;
- :mod:`.metrics`  Prometheus metrics through ``ray.util.metrics``;
- :mod:`.model`    the ``LotscanModel`` deployment (bundle, batching, scorer);
- :mod:`.ingress`  the ``LotscanIngress`` deployment (FastAPI routes);
- :mod:`.proxy`    JSON errors from Serve's HTTP proxy itself;
- :mod:`.app`      building the application from a bundle URI and the config.

``lotscan.platform.serving:app_builder`` stays the Serve import path.
"""

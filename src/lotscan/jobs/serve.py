"""``lotscan serve``: the online scoring endpoint (Ray Serve), run until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import time

from lotscan.jobs.common import add_config_args, overrides_from_args, positive_int

HELP = """\
Serve the bundle at BUNDLE_URI over HTTP: POST /v1/score with one image (raw body
or multipart part `file`) returns its score, decision and threshold, computed
with the same decoder, scorer and calibration as `lotscan score`. Also
GET /v1/models, /healthz, /readyz; OpenAPI docs at /docs. Runs until Ctrl-C.

Settings come from the `serve` section of the config (--config/--set): replicas
or autoscaling, GPUs per replica, batch size and wait, queue limits, request
size limits, bearer-token auth. Scoring settings follow the same rules as
`lotscan score` (operational fields only; the rest is fixed by the bundle).

Auth: put a long random token in the environment variable LOTSCAN_SERVE_TOKEN
(serve.auth_token_env) or a file (serve.auth_token_file); clients then send
`Authorization: Bearer <token>`. The token is never taken from the command line.

The bundle, the overrides and the token settings are checked before Ray starts;
Ray's own logs go to a file unless --verbose.

For a cluster, deploy infra/serve/serve-config.yaml with `serve deploy`.

examples:
  lotscan serve --model runs/brick-dta
  LOTSCAN_SERVE_TOKEN=$(cat token) lotscan serve --model s3://models/brick-dta \\
      --host 0.0.0.0 --port 8000 --set serve.max_batch_size=16 --set serve.num_replicas=2
  curl -s --data-binary @img.png -H 'Content-Type: image/png' http://127.0.0.1:8000/v1/score
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP (Ray Serve)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE_URI", help="trained model bundle")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=positive_int, help="HTTP port (default serve.port, 8000)")
    p.add_argument("--name", default="lotscan", help="Serve application name (default lotscan)")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lotscan.jobs.common import check_bundle

    extra = []
    if args.host:
        extra.append(f"serve.host={args.host}")
    if args.port is not None:
        extra.append(f"serve.port={args.port}")
    args.overrides = list(args.overrides) + extra
    overrides = overrides_from_args(args)
    cfg = check_bundle(args.model, overrides)

    from lotscan.platform.serving import resolve_token

    resolve_token(cfg.serve)  # an unreadable token file or require_auth without one fails here

    from ray import serve

    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.serving import start_app

    joined = bool(args.ray_address or os.environ.get("RAY_ADDRESS"))
    ensure_ray(args.ray_address)
    url = start_app(args.model, overrides, name=args.name)
    print(f"[lotscan serve] ready at {url}/v1/score  (docs {url}/docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("[lotscan serve] stopping", flush=True)
    finally:
        serve.delete(args.name)
        if not joined:  # our own local Ray: stop Serve too; never on a shared cluster
            serve.shutdown()
    return 0

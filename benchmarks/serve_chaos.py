"""Chaos figures for the online endpoint (docs/serving.md, "Faults").

One local Ray, one Serve app (a tiny untrained bundle unless ``--model``), HTTP
on 127.0.0.1 only; each phase is bounded in time and the script stops by itself:

  dos           the 546 KiB multipart part header of issue 10: time to refuse it
                over HTTP and in process, side by side with a normal request
                (and with the hand-written parser of ``--before REV``, if given)
  saturate      ``--clients`` clients for ``--seconds``: answers by status, 5xx,
                503s with Retry-After and the JSON shape, latency, and the time
                to the first 200 once the load stops
  kill-model    the model replica killed under load: time to the first 200 and
                to /readyz 200 again, answers in between
  kill-ingress  one of two ingress replicas killed under load: answers in between
                (JSON 503 from the proxy middleware for requests on the dead one)
  kill-proxy    Serve's HTTP proxy actor killed: how long connections fail
                (``--proxy-health-period`` sets RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S)

examples:
  python benchmarks/serve_chaos.py --tiny /tmp/lotscan-chaos --before 697898f
  python benchmarks/serve_chaos.py --tiny /tmp/lotscan-chaos --phase kill-proxy \\
      --proxy-health-period 2
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, request_bodies, tiny_bundle  # noqa: E402

PHASES = ("dos", "saturate", "kill-model", "kill-ingress", "kill-proxy")
APP = "lotscan-chaos-bench"
HUGE_HEADER_KIB = 546
RECOVERY_LIMIT_S = 120.0


def huge_header_body(image: bytes, kib: int = HUGE_HEADER_KIB) -> bytes:
    head = (b'Content-Disposition: form-data; name="file"; filename="x.png"'
            + b"; a=b" * (kib * 1024 // 5) + b"\r\nContent-Type: image/png")
    return b"--XyZ\r\n" + head + b"\r\n\r\n" + image + b"\r\n--XyZ--\r\n"


MULTIPART = "multipart/form-data; boundary=XyZ"


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000.0, 1)


async def hammer(url: str, bodies: list[bytes], clients: int, seconds: float,
                 during=None, until=None) -> list[dict[str, Any]]:
    """``clients`` loops posting images for ``seconds``, and then on while
    ``until(records)`` is false (at most RECOVERY_LIMIT_S more)."""
    import httpx

    records: list[dict[str, Any]] = []
    stop = time.monotonic() + seconds

    def going() -> bool:
        now = time.monotonic()
        if now < stop:
            return True
        return until is not None and not until(records) and now < stop + RECOVERY_LIMIT_S

    async def loop(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while going():
            i += 1
            rec: dict[str, Any] = {"start": time.monotonic()}
            try:
                r = await client.post(url, content=bodies[i % len(bodies)],
                                      headers={"Content-Type": "image/png"})
                rec.update(status=r.status_code, retry_after=r.headers.get("retry-after"),
                           json=r.headers.get("content-type", "").startswith("application/json"))
                if r.status_code != 200 and rec["json"]:
                    rec["code"] = r.json().get("error", {}).get("code")
            except httpx.HTTPError as err:
                rec.update(status=type(err).__name__)
            rec["end"] = time.monotonic()
            records.append(rec)
            if rec["status"] != 200:
                await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=90, limits=limits) as client:
        tasks = [loop(client, k) for k in range(clients)]
        if during is not None:
            tasks.append(during())
        await asyncio.gather(*tasks)
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    codes: dict[str, int] = {}
    for r in records:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
        if r.get("code"):
            codes[r["code"]] = codes.get(r["code"], 0) + 1
    refused = [r for r in records if r["status"] == 503]
    ok = [r["end"] - r["start"] for r in records if r["status"] == 200]
    return {
        "requests": len(records), "by_status": by_status, "codes": codes,
        "5xx_other_than_503": sum(1 for r in records if isinstance(r["status"], int)
                                  and r["status"] >= 500 and r["status"] != 503),
        "no_http_answer": sum(1 for r in records if not isinstance(r["status"], int)),
        "503_with_retry_after": sum(1 for r in refused if r.get("retry_after")),
        "errors_not_json": sum(1 for r in records if r["status"] != 200 and not r.get("json")),
        "ok_p50_ms": ms(ok, 0.5), "ok_p99_ms": ms(ok, 0.99),
    }


def first_ok_after(url: str, body: bytes, limit_s: float = 120.0) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            if httpx.post(url, content=body, headers={"Content-Type": "image/png"},
                          timeout=30).status_code == 200:
                return round(time.monotonic() - start, 2)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return float("nan")


def named(prefix: str) -> list[dict[str, str]]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def kill(actor: dict[str, str]) -> None:
    import ray

    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


# ------------------------------------------------------------------ phases


def phase_dos(base: str, bodies: list[bytes], before: str | None, repeats: int) -> dict[str, Any]:
    import httpx
    from starlette.requests import Request

    from lotscan.platform.serving import ApiError, ByteBudget, UploadLimits, buffered_upload

    body = huge_header_body(bodies[0])
    out: dict[str, Any] = {"part_header_kib": HUGE_HEADER_KIB, "body_bytes": len(body)}
    with httpx.Client(timeout=60) as client:
        refused, normal, statuses = [], [], set()
        for _ in range(repeats):
            t = time.perf_counter()
            r = client.post(f"{base}/v1/score", content=body, headers={"Content-Type": MULTIPART})
            refused.append(time.perf_counter() - t)
            statuses.add(r.status_code)
            t = time.perf_counter()
            client.post(f"{base}/v1/score", content=bodies[0], headers={"Content-Type": "image/png"})
            normal.append(time.perf_counter() - t)
    out.update(http_status=sorted(statuses), http_refuse_median_ms=ms(refused, 0.5),
               http_refuse_max_ms=ms(refused, 1.0), http_normal_score_median_ms=ms(normal, 0.5))

    async def in_process() -> float:
        chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]

        async def receive() -> dict:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                           "headers": [(b"content-type", MULTIPART.encode()),
                                       (b"content-length", str(len(body)).encode())]}, receive)
        t = time.perf_counter()
        try:
            async with buffered_upload(request, UploadLimits(16 << 20, 8, 65536, 1),
                                       ByteBudget(1 << 30)):
                pass
        except ApiError:
            pass
        return time.perf_counter() - t

    out["in_process_refuse_median_ms"] = ms([asyncio.run(in_process()) for _ in range(repeats)], 0.5)
    if before:
        source = subprocess.run(["git", "show", f"{before}:src/lotscan/platform/serving.py"],
                                check=True, capture_output=True).stdout
        with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("lotscan_serving_before", f.name)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)  # type: ignore[union-attr]
        for kib in (136, HUGE_HEADER_KIB):
            t = time.perf_counter()
            try:
                old.parse_multipart(huge_header_body(bodies[0], kib), MULTIPART)
            except Exception:
                pass
            out[f"before_{before}_parser_{kib}kib_s"] = round(time.perf_counter() - t, 3)
        os.unlink(f.name)
    return out


def phase_saturate(base: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    records = asyncio.run(hammer(f"{base}/v1/score", bodies, clients, seconds))
    out = summary(records)
    out["first_200_after_load_s"] = first_ok_after(f"{base}/v1/score", bodies[0])
    return out


def phase_kill(base: str, bodies: list[bytes], clients: int, seconds: float,
               deployment: str) -> dict[str, Any]:
    import httpx

    marks: dict[str, float] = {}

    async def kill_and_watch() -> None:
        await asyncio.sleep(min(5.0, seconds / 4))
        victims = named(f"SERVE_REPLICA::{APP}#{deployment}#")
        original = {a["name"] for a in victims}
        kill(victims[0])
        marks["killed"] = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as client:
            ready = False
            while (time.monotonic() - marks["killed"] < RECOVERY_LIMIT_S
                   and not ("replaced" in marks and ready
                            and ("unready" not in marks or "ready_again" in marks))):
                try:
                    ready = (await client.get(f"{base}/readyz")).status_code == 200
                except httpx.HTTPError:
                    ready = False
                if not ready:
                    marks.setdefault("unready", time.monotonic())
                elif "unready" in marks:
                    marks.setdefault("ready_again", time.monotonic())
                current = {a["name"] for a in named(f"SERVE_REPLICA::{APP}#{deployment}#")}
                if current - original:
                    marks.setdefault("replaced", time.monotonic())
                await asyncio.sleep(0.25)

    def recovered(records: list[dict[str, Any]]) -> bool:
        return "killed" in marks and sum(
            1 for r in records if r["status"] == 200 and r["start"] > marks["killed"]) >= 4

    records = asyncio.run(hammer(f"{base}/v1/score", bodies, clients, seconds, kill_and_watch,
                                 recovered))
    out = summary(records)
    t0 = marks["killed"]
    after = [r for r in records if r["start"] >= t0]
    in_flight = [r for r in records if r["start"] < t0 <= r["end"]]
    first_ok = min((r["end"] for r in after if r["status"] == 200), default=float("nan"))
    after_ok = [r for r in after if r["end"] < first_ok]
    out.update(
        in_flight_at_kill=summary(in_flight)["by_status"],
        sent_after_kill_until_first_200=summary(after_ok)["by_status"],
        kill_to_first_200_s=round(first_ok - t0, 2),
        kill_to_new_replica_actor_s=round(marks.get("replaced", float("nan")) - t0, 2),
        kill_to_readyz_503_s=round(marks.get("unready", float("nan")) - t0, 2),
        kill_to_readyz_200_again_s=round(marks.get("ready_again", float("nan")) - t0, 2),
        max_answer_s=round(max((r["end"] - r["start"] for r in records), default=0.0), 2),
    )
    return out


def phase_kill_proxy(base: str, seconds: float) -> dict[str, Any]:
    import httpx

    proxies = named("SERVE_PROXY_ACTOR")
    kill(proxies[0])
    killed = time.monotonic()
    failed_at = back_at = None
    failures: dict[str, int] = {}
    while time.monotonic() - killed < seconds:
        try:
            status = httpx.get(f"{base}/healthz", timeout=2).status_code
        except httpx.HTTPError as err:
            status = type(err).__name__
        if status != 200:
            failures[str(status)] = failures.get(str(status), 0) + 1
            failed_at = failed_at or time.monotonic()
        elif failed_at is not None:
            back_at = time.monotonic()
            break
        time.sleep(0.1)
    return {"proxy_health_check_period_s": float(os.environ.get(
                "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "10")),
            "kill_to_first_failure_s": round((failed_at or killed) - killed, 2),
            "connections_failing_s": round((back_at or time.monotonic()) - (failed_at or killed), 2),
            "recovered": back_at is not None, "failures": failures}


# -------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="BUNDLE_URI")
    source.add_argument("--tiny", metavar="DIR", help="build (or reuse) a tiny recon bundle here")
    parser.add_argument("--phase", action="append", choices=PHASES,
                        help="repeatable; default: all, kill-proxy last")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0, help="per load phase")
    parser.add_argument("--repeats", type=int, default=10, help="dos phase")
    parser.add_argument("--before", metavar="REV",
                        help="dos phase: also time the hand-written parser of this git revision")
    parser.add_argument("--proxy-health-period", type=float, default=None,
                        help="RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S for the local Ray")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.proxy_health_period:
        os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"] = str(args.proxy_health_period)

    from ray import serve

    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.serving import bundle_manifest, start_app

    model = args.model or tiny_bundle(args.tiny, "recon")
    image_size = int(bundle_manifest(model, {})["image_size"])
    bodies = request_bodies(image_size)
    ensure_ray(num_cpus=args.num_cpus, include_dashboard=False)
    port = free_port()
    overrides = {"serve": {
        "host": "127.0.0.1", "port": port, "num_cpus_per_replica": 0.5, "ingress_num_cpus": 0.1,
        "ingress_replicas": 2, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
        "max_ongoing_requests": 4, "max_queued_requests": 8, "retry_after_s": 1,
        "request_timeout_s": 30.0, "auth_token_env": ""}}
    base = start_app(model, overrides, name=APP, log=lambda _m: None)
    phases = args.phase or list(PHASES)
    results: dict[str, Any] = {}
    try:
        for phase in sorted(phases, key=PHASES.index):
            t = time.monotonic()
            if phase == "dos":
                results[phase] = phase_dos(base, bodies, args.before, args.repeats)
            elif phase == "saturate":
                results[phase] = phase_saturate(base, bodies, args.clients, args.seconds)
            elif phase == "kill-model":
                results[phase] = phase_kill(base, bodies, min(args.clients, 16), args.seconds,
                                            "LotscanModel")
            elif phase == "kill-ingress":
                results[phase] = phase_kill(base, bodies, min(args.clients, 16), args.seconds,
                                            "LotscanIngress")
            elif phase == "kill-proxy":
                results[phase] = phase_kill_proxy(base, max(60.0, args.seconds))
            results[phase]["phase_s"] = round(time.monotonic() - t, 1)
            print(json.dumps({"phase": phase, **results[phase]}), flush=True)
    finally:
        serve.shutdown()
    print(f"\nmodel {model}; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); "
          f"clients {args.clients}, {args.seconds:g} s per load phase; "
          f"{time.strftime('%Y-%m-%d')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

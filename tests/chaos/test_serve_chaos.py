"""Chaos on the online endpoint, 127.0.0.1 only, bounded in time: a zoo of bad
requests, saturation by 64 clients, a model replica and an ingress replica
killed under load. Nothing may answer 5xx other than a JSON 503 with
Retry-After, nothing may hang, and the endpoint answers normally right after.
Recovery times and the 30 s runs are measured by benchmarks/serve_chaos.py."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import time
import zlib
from glob import glob
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

# Imported before the session's Ray starts: it names lotscan's JSON-error middleware
# for Serve's HTTP proxy in this process's environment, which Ray's nodes inherit.
import lotscan.platform.serving  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "lotscan-chaos"
RETRY_AFTER = "2"


@pytest.fixture(scope="module")
def chaos(ray_local, demo_root, tmp_path_factory):
    from ray import serve

    from lotscan.platform.serving import start_app
    from test_serve import free_port, make_bundle

    root = tmp_path_factory.mktemp("chaos")
    bundle = make_bundle(demo_root, str(root / "recon"), "recon")
    port = free_port()
    overrides = {
        "serve": {"host": "127.0.0.1", "port": port, "num_cpus_per_replica": 0.5,
                  "ingress_num_cpus": 0.1, "ingress_replicas": 2, "max_batch_size": 4,
                  "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 4,
                  "max_queued_requests": 8, "retry_after_s": int(RETRY_AFTER),
                  "request_timeout_s": 30.0, "max_request_bytes": 1024 * 1024,
                  "auth_token_env": "LOTSCAN_TEST_UNSET_VARIABLE"},
        "data": {"max_image_pixels": 512 * 512},
    }
    url = start_app(bundle, overrides, name=APP, route_prefix="/", log=lambda _m: None)
    images = sorted(glob(os.path.join(demo_root, "weave", "test", "*", "*.png")))
    try:
        yield {"url": url, "port": port, "bodies": [Path(p).read_bytes() for p in images]}
    finally:
        serve.shutdown()


# ------------------------------------------------------------------ helpers


def png(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height with almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XyZ") -> bytes:
    out = b""
    for head, payload in parts:
        out += b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + payload + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def raw_http(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return whatever the server answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def assert_json_error(r: httpx.Response) -> dict:
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == r.status_code, body
    return body["error"]


async def hammer(url: str, bodies: list[bytes], clients: int, seconds: float,
                 during=None, until=None) -> list[tuple[float, int | str, httpx.Response | None]]:
    """``clients`` loops posting images for ``seconds`` (or until ``until(results)``,
    bounded by ``seconds``); ``during`` (a coroutine function) runs alongside.
    Returns (time, status or exception name, response)."""
    results: list[tuple[float, int | str, httpx.Response | None]] = []
    stop = time.monotonic() + seconds

    async def loop(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.monotonic() < stop and not (until and until(results)):
            i += 1
            try:
                r = await client.post(url, content=bodies[i % len(bodies)],
                                      headers={"Content-Type": "image/png"})
                results.append((time.monotonic(), r.status_code, r))
                if r.status_code == 503:
                    await asyncio.sleep(0.05)
            except httpx.HTTPError as err:
                results.append((time.monotonic(), type(err).__name__, None))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=40, limits=limits) as client:
        tasks = [loop(client, k) for k in range(clients)]
        if during is not None:
            tasks.append(during())
        await asyncio.gather(*tasks)
    return results


def check_answers(results, allowed_503: set[str]) -> dict[int | str, int]:
    counts: dict[int | str, int] = {}
    for _, status, r in results:
        counts[status] = counts.get(status, 0) + 1
        if status == 503:
            assert r.headers.get("retry-after") == RETRY_AFTER or r.headers.get("retry-after") == "1"
            assert assert_json_error(r)["code"] in allowed_503, r.text
    assert set(counts) <= {200, 503}, counts  # no 500, no timeout, no refused connection
    return counts


def kill_replica(deployment: str) -> str:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")]
    assert names, f"no {deployment} replica found"
    victim = names[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


# -------------------------------------------------------------------- tests


def test_bad_request_zoo_never_5xx(chaos):
    url, port = chaos["url"], chaos["port"]
    good = chaos["bodies"][0]
    file_head = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n' \
                b"Content-Type: image/png"
    note = b'Content-Disposition: form-data; name="note"'
    mp = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    octets = {"Content-Type": "application/octet-stream"}
    gif = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif, format="GIF")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(cmyk, format="JPEG")

    def chunked(data: bytes):
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    # (label, request kwargs, allowed statuses)
    zoo = [
        ("empty body", {"content": b"", "headers": octets}, {400}),
        ("garbage", {"content": b"not an image at all", "headers": octets}, {400}),
        ("truncated png", {"content": good[: len(good) // 2], "headers": octets}, {400}),
        ("declared over the limit", {"content": os.urandom(1100 * 1024), "headers": octets}, {413}),
        ("chunked over the limit", {"content": chunked(os.urandom(1100 * 1024)),
                                    "headers": octets}, {413}),
        ("over pixels", {"content": png(np.zeros((600, 600, 3), np.uint8)), "headers": octets},
         {413}),
        ("50000x50000 header", {"content": png_header_only(50000, 50000), "headers": octets}, {413}),
        ("text/plain", {"content": good, "headers": {"Content-Type": "text/plain"}}, {415}),
        ("gif", {"content": gif.getvalue(), "headers": octets}, {415}),
        ("pdf", {"content": b"%PDF-1.7\n%...", "headers": octets}, {415}),
        ("svg", {"content": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "headers": octets},
         {415}),
        ("heic", {"content": b"\0\0\0\x18ftypheic" + bytes(64), "headers": octets}, {415}),
        ("json part", {"content": multipart([(b'Content-Disposition: form-data; name="file"; '
                                              b'filename="x"\r\nContent-Type: application/json',
                                              b"{}")]), "headers": mp}, {415}),
        ("no file part", {"content": multipart([(note, b"hi")]), "headers": mp}, {400}),
        ("two files", {"content": multipart([(file_head, good), (file_head, good)]),
                       "headers": mp}, {400}),
        ("546 KiB part header", {"content": multipart([(
            b'Content-Disposition: form-data; name="file"; filename="x.png"'
            + b"; a=b" * (546 * 1024 // 5), good)]), "headers": mp}, {400}),
        ("9 header lines", {"content": multipart([(file_head + b"\r\nX-A: 1" * 9, good)]),
                            "headers": mp}, {400}),
        ("too many fields", {"content": multipart([(note, b"x")] * 9 + [(file_head, good)]),
                             "headers": mp}, {400}),
        ("field over 64 KiB", {"content": multipart([(note, b"x" * (65 * 1024)),
                                                     (file_head, good)]), "headers": mp}, {400}),
        ("no boundary", {"content": multipart([(file_head, good)]),
                         "headers": {"Content-Type": "multipart/form-data"}}, {400}),
        ("other boundary", {"content": multipart([(file_head, good)], b"Other"),
                            "headers": mp}, {400}),
        ("unterminated multipart", {"content": multipart([(file_head, good)])[:-9],
                                    "headers": mp}, {400}),
        ("bad query", {"content": good, "headers": octets, "params": {"heatmap": "maybe"}}, {400}),
        ("bad category", {"content": good, "headers": octets,
                          "params": {"category": "x" * 65}}, {400}),
        ("1x1 image", {"content": png(np.zeros((1, 1, 3), np.uint8)), "headers": octets}, {200}),
        ("16-bit grey", {"content": png(np.full((40, 40), 30000, np.uint16)), "headers": octets},
         {200, 400}),
        ("cmyk jpeg", {"content": cmyk.getvalue(), "headers": octets}, {200, 400}),
        ("non-utf8 filename", {"content": multipart([(b'Content-Disposition: form-data; '
                                                      b'name="file"; filename="\xff\xfe.png"',
                                                      good)]), "headers": mp}, {200, 400}),
    ]
    seen = {}
    with httpx.Client(timeout=30) as client:
        for label, kwargs, allowed in zoo:
            r = client.post(f"{url}/v1/score", **kwargs)
            seen[label] = r.status_code
            assert r.status_code in allowed, (label, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert_json_error(r)
        r = client.get(f"{url}/v1/nothing")
        assert r.status_code == 404 and assert_json_error(r)["code"] == "not_found"
        r = client.put(f"{url}/v1/score", content=good)
        assert r.status_code == 405 and assert_json_error(r)["code"] == "method_not_allowed"
    # Malformed framing is answered by uvicorn before any ASGI code: a plain-text
    # 400 (documented; Serve has no hook there). Still never a 5xx.
    framing = {
        "bad request line": b"NOT HTTP AT ALL\r\n\r\n",
        "bad content-length": b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "bad header bytes": b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\x00: 1\r\n\r\n",
    }
    for label, data in framing.items():
        answer = raw_http(port, data)
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.") else b""
        assert status == b"400", (label, answer[:200])
        assert b"application/json" not in answer.split(b"\r\n\r\n")[0].lower()  # uvicorn's text
        seen[label] = int(status)
    # A 200 KB header line: uvicorn (httptools) takes it; whatever it answers, not a 5xx.
    answer = raw_http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000
                      + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    seen["200 KB header line"] = int(answer.split(b" ", 2)[1])
    # A client that declares more than it sends, then goes away: no answer owed.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc")
    assert len(seen) >= 25
    assert max(seen.values()) < 500, seen
    r = httpx.post(f"{url}/v1/score", content=good, headers=octets, timeout=30)
    assert r.status_code == 200, r.text  # unharmed


def test_saturation_is_503_with_retry_after_then_answers(chaos):
    url = f"{chaos['url']}/v1/score"
    results = asyncio.run(hammer(url, chaos["bodies"], clients=64, seconds=6))
    counts = check_answers(results, {"overloaded"})
    assert counts.get(200, 0) > 0 and counts.get(503, 0) > 0, counts
    r = httpx.post(url, content=chaos["bodies"][0], headers={"Content-Type": "image/png"},
                   timeout=30)
    assert r.status_code == 200, r.text  # right after: answering normally


def test_model_replica_killed_under_load(chaos):
    url = f"{chaos['url']}/v1/score"
    killed: dict[str, float] = {}

    async def kill_after_a_while() -> None:
        await asyncio.sleep(2.0)
        killed["name"] = kill_replica("LotscanModel")
        killed["at"] = time.monotonic()

    def recovered(results) -> bool:  # a few answers after the kill: the new replica works
        return "at" in killed and sum(1 for t, s, _ in results
                                      if s == 200 and t > killed["at"] + 0.5) >= 4

    results = asyncio.run(hammer(url, chaos["bodies"], clients=12, seconds=90,
                                 during=kill_after_a_while, until=recovered))
    assert "at" in killed
    counts = check_answers(results, {"not_ready", "overloaded"})
    assert recovered(results), counts  # replaced within the bound
    lost = [r for _, s, r in results if s == 503 and r.json()["error"]["code"] == "not_ready"]
    assert lost, counts  # the requests in flight on the dead replica: 503, not 500
    # The controller marks the deployment healthy again a little after the new
    # replica answers: readiness follows within a few health-check periods.
    deadline = time.monotonic() + 30
    while True:
        ready = httpx.get(f"{chaos['url']}/readyz", timeout=10)
        if ready.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ready.status_code == 200 and ready.json()["replicas"] == 1, ready.text


def test_ingress_replica_killed_under_load(chaos):
    url = f"{chaos['url']}/v1/score"
    killed: dict[str, float] = {}

    async def kill_after_a_while() -> None:
        await asyncio.sleep(2.0)
        killed["name"] = kill_replica("LotscanIngress")
        killed["at"] = time.monotonic()

    results = asyncio.run(hammer(url, chaos["bodies"], clients=12, seconds=6,
                                 during=kill_after_a_while))
    assert "at" in killed
    # The proxy's answer for requests on the dead ingress: JSON 503 `unavailable`.
    counts = check_answers(results, {"unavailable", "overloaded", "not_ready"})
    codes = {r.json()["error"]["code"] for _, s, r in results if s == 503}
    assert counts.get(200, 0) > 0, (counts, codes)
    assert any(t > killed["at"] and s == 200 for t, s, _ in results), (counts, codes)

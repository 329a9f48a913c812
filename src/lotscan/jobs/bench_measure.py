"""The measurements of ``lotscan bench`` (imported by it once the arguments are
checked: this module imports torch)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lotscan.models.profiling import conv1x1_peak, count_flops, matmul_peak, reference_scores
from lotscan.models.scoring import Scorer

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
"""The CPU features that decide fp32 and bf16 speed, reported when present."""


def cpu_summary() -> dict[str, Any]:
    """Model name and the speed-relevant flags of this machine's CPU (Linux's
    /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count()}


class Measurement:
    """One bundle on one device: FLOPs, peaks, timed batches, the reference loop."""

    def __init__(self, bundle, device: str, images: int, batch_sizes: Sequence[int],
                 log: Callable[[str], None] = lambda _: None):
        self.bundle = bundle
        self.method = bundle.method
        self.calibration = bundle.calibration
        self.device = torch.device(device)
        self.images = int(images)
        self.batch_sizes = [int(b) for b in batch_sizes]
        self.log = log
        self.channels_last = bool(bundle.config.score.channels_last)
        size = bundle.config.data.image_size
        n_pool = max(self.images, max(self.batch_sizes))
        self.pool = np.random.default_rng(0).integers(0, 256, (n_pool, size, size, 3), dtype=np.uint8)
        self.seeds = list(range(n_pool))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flops_per_image(self, n: int = 2) -> float:
        n = min(n, len(self.pool))
        scorer = Scorer(self.method, self.calibration, self.device, precision="fp32")
        return count_flops(scorer.score, self.pool[:n], self.seeds[:n]) / n

    def peaks(self, seconds: float) -> dict[str, dict[str, float]]:
        if seconds <= 0:
            return {}
        out: dict[str, dict[str, float]] = {"matmul": {}, "conv1x1": {}}
        for precision in ("fp32", "bf16"):
            self.log(f"peak probe {precision} ({seconds:g} s each)")
            out["matmul"][precision] = round(matmul_peak(precision, seconds, self.device), 2)
            out["conv1x1"][precision] = round(conv1x1_peak(precision, seconds, self.device), 2)
        return out

    def scorer_run(self, precision: str, batch_size: int) -> tuple[Callable[[], np.ndarray], int]:
        """A warmed-up scorer at ``batch_size`` as a function that scores the
        timed images (indices 0..n-1 of the pool) and returns their scores."""
        scorer = Scorer(self.method, self.calibration, self.device, precision=precision)
        bs = batch_size
        scorer.score(self.pool[:bs], self.seeds[:bs])  # warm-up
        n_batches = max(1, self.images // bs)

        def call() -> np.ndarray:
            return np.concatenate([scorer.score(self.pool[i * bs:(i + 1) * bs],
                                                self.seeds[i * bs:(i + 1) * bs]).image_scores
                                   for i in range(n_batches)])

        self.channels_last = scorer.channels_last
        return call, n_batches * bs

    def reference_run(self) -> tuple[Callable[[], np.ndarray], int]:
        n = min(self.images, len(self.pool))
        reference_scores(self.method, self.calibration, self.pool[:1], self.seeds[:1], self.device)

        def call() -> np.ndarray:
            return reference_scores(self.method, self.calibration, self.pool[:n], self.seeds[:n],
                                    self.device).image_scores

        return call, n

    def timed(self, call: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
        self.sync()
        start = time.perf_counter()
        scores = call()
        self.sync()
        return time.perf_counter() - start, scores

    def report(self, precisions: Sequence[str], reference: bool, peak_seconds: float,
               repeats: int = 1) -> dict[str, Any]:
        """Every measurement ``repeats`` times, in interleaved rounds (each round
        times every configuration once), keeping each one's fastest: other load
        on the machine then slows every configuration alike, and the best of a
        few rounds is the one least disturbed."""
        cfg = self.bundle.config
        self.log("counting FLOPs")
        flops = self.flops_per_image()
        peaks = self.peaks(peak_seconds)
        matmul = peaks.get("matmul", {})

        runs: dict[tuple[str, int], tuple[Callable[[], np.ndarray], int]] = {}
        for precision in dict.fromkeys(precisions):
            for bs in self.batch_sizes:
                self.log(f"warm-up {precision}, batch {bs}")
                runs[(precision, bs)] = self.scorer_run(precision, bs)
        if reference:
            self.log("warm-up reference loop")
            runs[("reference", 1)] = self.reference_run()
        best: dict[tuple[str, int], float] = {}
        scores: dict[tuple[str, int], np.ndarray] = {}
        for r in range(repeats):
            for key, (call, _) in runs.items():
                self.log(f"round {r + 1}/{repeats}: {key[0]}, batch {key[1]}")
                elapsed, scores[key] = self.timed(call)
                best[key] = min(best.get(key, float("inf")), elapsed)

        def row(key: tuple[str, int]) -> dict[str, Any]:
            n = runs[key][1]
            out = {"precision": "fp32" if key[0] == "reference" else key[0], "batch_size": key[1],
                   "images": n, "images_per_s": round(n / best[key], 3),
                   "ms_per_image": round(best[key] * 1000 / n, 2)}
            gflops = flops * n / best[key] / 1e9
            out["gflops_per_s"] = round(gflops, 3)
            for p in ("fp32", "bf16"):
                if p in matmul:
                    out[f"share_of_{p}_peak"] = round(gflops / matmul[p], 4)
            return out

        rows = []
        for key in runs:
            if key[0] != "reference":
                rows.append({**row(key), "channels_last": self.channels_last})
        by_precision: dict[str, list[np.ndarray]] = {}
        for key, s in scores.items():
            if key[0] != "reference":
                by_precision.setdefault(key[0], []).append(s)
        out: dict[str, Any] = {
            "model_id": self.bundle.model_id, "method": cfg.method, "image_size": cfg.data.image_size,
            "units_per_image": self.method.num_units(), "max_units_per_pass": cfg.score.max_units_per_pass,
            "device": self.device.type,
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else cpu_summary()["model"]),
            "cpu": cpu_summary(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "repeats": repeats, "flops_per_image": int(flops), "peak_gflops": peaks, "results": rows,
        }
        if "fp32" in by_precision and "bf16" in by_precision:
            out["bf16_vs_fp32_max_abs_image_score_diff"] = _max_diff(by_precision["bf16"], by_precision["fp32"])
        if reference:
            ref = {**row(("reference", 1)), "calls_per_image": self.method.num_units()}
            batched = by_precision.get("fp32") or next(iter(by_precision.values()))
            ref["max_abs_image_score_diff"] = _max_diff([scores[("reference", 1)]], batched)
            for r in rows:
                r["speedup_vs_reference"] = round(ref["ms_per_image"] / r["ms_per_image"], 2)
            out["reference"] = ref
        return out


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| over the images both runs scored (each run scores images
    0..n-1 of the pool, n depending on its batch size)."""
    worst = 0.0
    for x in a:
        for y in b:
            n = min(len(x), len(y))
            if n:
                worst = max(worst, float(np.abs(x[:n] - y[:n]).max()))
    return worst

"""Cluster training with Ray Train, then calibration, then one bundle.

``train_bundle`` runs each of the method's training stages in order (DiffAD:
autoencoder, latent denoiser, segmenter; DRDC: base, inpainter; recon/dta:
denoiser), each as one ``TorchTrainer`` (data-parallel over
``train.num_workers`` CPU or GPU workers), with checkpoints under
``<bundle>/checkpoints/<stage>-<fingerprint>``. Pretrained networks (DRDC's
backbone) and the networks of earlier stages reach the workers frozen, through
the object store. Re-running the same command resumes every stage from its
latest checkpoint; changed settings, data or upstream weights give a new
fingerprint and a fresh run; ``stages=`` runs some stages and reuses the
checkpoints of the others. A worker that dies mid-stage is replaced by Ray
Train (``train.max_failures``) and the stage goes on from its latest
checkpoint in the same command (``train_loop.py``). The training images are
decoded once, by CPU tasks, into a few chunks in the object store that every
worker maps. A distributed calibration pass on the held-out normal images
(``calibration.py``) then fixes normalisation ranges and thresholds, and the
bundle is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    UserCallback,
)
from ray.train.torch import TorchTrainer
from safetensors.torch import save as save_safetensors

from lotscan.config import LotscanConfig, StorageConfig
from lotscan.models.bundle import Bundle
from lotscan.models.calibration import describe
from lotscan.models.registry import build_method
from lotscan.platform.bundles import save_bundle
from lotscan.platform.calibration import calibrate_networks
from lotscan.platform.checkpoints import load_networks
from lotscan.platform.decode import decode_one
from lotscan.platform.errors import TrainingError
from lotscan.platform.readers import list_training_rows, split_calibration
from lotscan.platform.runtime import ensure_ray
from lotscan.platform.storage import (
    exists,
    join,
    list_dirs,
    list_files,
    pyarrow_filesystem,
    read_bytes,
)
from lotscan.platform.train_loop import train_loop_per_worker

__all__ = ["calibrate_networks", "recalibrate_bundle", "train_bundle", "train_loop_per_worker"]

Log = Callable[[str], None]

DECODE_CHUNK = 64
"""Training images per decode task and per object-store chunk."""


def _fingerprint(cfg: LotscanConfig, rows: list[dict], method, stage: str,
                 upstream: str) -> tuple[str, str]:
    """(model part, training part) of a stage's run name. The model part covers
    what the stage's networks are: its settings, the data and the weights of
    every network it builds on (``upstream``: pretrained and earlier stages).
    The training part covers how they were trained (learning rate, batch
    size, seed, augmentation). A stage resumes only when both match; a stage
    reused by a ``stages=`` run needs only the model part to match, so the
    stage being run may use other training settings (another seed, its own
    learning rate)."""
    model = {"stage": stage, "settings": method.stage_settings(stage),
             "data_uris": sorted(r["uri"] for r in rows), "upstream": upstream}
    train = {k: v for k, v in cfg.to_dict()["train"].items()
             if k not in ("max_steps", "time_budget_minutes", "log_every_steps",
                          "checkpoint_every_steps", "num_workers", "use_gpu", "cpus_per_worker",
                          "max_failures")}

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]

    return digest(model), digest(train)


def _state_blob(net: torch.nn.Module) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})


def _upstream_digest(blobs: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(blobs):
        digest.update(name.encode() + hashlib.sha256(blobs[name]).digest())
    return digest.hexdigest()


def data_fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256("\n".join(sorted(r["uri"] for r in rows)).encode()).hexdigest()[:16]


def _decode_chunk(rows: list[dict], storage: StorageConfig, data) -> tuple[np.ndarray, dict]:
    """Decode training images: (the readable ones, uint8 (n, S, S, 3); their
    count and the errors of the others)."""
    images, errors = [], []
    for row in rows:
        image, error = decode_one(row["uri"], storage, data)
        if error:
            errors.append(error)
        else:
            images.append(image)
    size = data.image_size
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, {"count": len(images), "errors": errors}


def decode_training_images(rows: list[dict], cfg: LotscanConfig, log: Log) -> list[ray.ObjectRef]:
    """Decode every training image once, in parallel CPU tasks, into chunks of
    at most DECODE_CHUNK images that stay in the object store (one copy; the
    workers map them). Unreadable images are skipped and logged."""
    task = ray.remote(num_cpus=1, num_returns=2)(_decode_chunk)
    pending = [task.remote(rows[i:i + DECODE_CHUNK], cfg.storage, cfg.data)
               for i in range(0, len(rows), DECODE_CHUNK)]
    refs, total = [], 0
    for images_ref, info_ref in pending:
        info = ray.get(info_ref)
        for error in info["errors"]:
            log(f"[lotscan train] skipping unreadable training image: {error}")
        if info["count"]:
            refs.append(images_ref)
            total += info["count"]
    if total == 0:
        raise ValueError("no readable training images")
    if total < cfg.train.num_workers:
        raise TrainingError(f"{total} readable training image(s) for train.num_workers="
                            f"{cfg.train.num_workers}: every worker needs at least one")
    return refs


class FailureLog(UserCallback):
    """Runs in the Ray Train controller: one line per worker-group failure,
    saying whether the stage restarts (``train.max_failures``)."""

    def __init__(self, stage: str, max_failures: int):
        self.stage, self.max_failures, self.failures = stage, max_failures, 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        first = next(iter(worker_exceptions.values()), None)
        reason = f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
        if self.max_failures < 0 or self.failures <= self.max_failures:
            what = "restarting the workers from the latest checkpoint"
        else:
            what = "no restarts left (train.max_failures), giving up"
        sys.stdout.write(f"[lotscan train] {self.stage}: worker failure {self.failures} "
                         f"(ranks {sorted(worker_exceptions)}: {reason[:200]}); {what}\n")
        sys.stdout.flush()


def run_stage(cfg: LotscanConfig, stage: str, images: list[ray.ObjectRef], checkpoint_uri: str,
              name: str, frozen_ref: Any, resources_ref: Any, log: Log) -> str:
    """Run one stage with Ray Train as run ``name`` under ``checkpoint_uri``
    (resuming its latest checkpoint); returns a local folder with the final one."""
    fs, path = pyarrow_filesystem(checkpoint_uri, cfg.storage)
    loop_config = {"config": cfg.to_dict(), "stage": stage, "frozen": frozen_ref,
                   "resources": resources_ref, "images": images,
                   "run_token": uuid.uuid4().hex}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train's own INFO lines (each report, each checkpoint) stay in
            # its log files; lotscan prints the progress and every failure.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[FailureLog(stage, cfg.train.max_failures)],
        ),
    )
    log(f"[lotscan train] stage {stage}: Ray Train run {name} "
        f"({cfg.train.num_workers} worker(s), {'GPU' if cfg.train.use_gpu else 'CPU'}, "
        f"{cfg.train.precision}, up to {cfg.train.max_failures} restart(s))")
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"stage {stage} failed ({first[:300]}) after the restarts train.max_failures="
            f"{cfg.train.max_failures} allows; re-run the same command to resume from its "
            f"latest checkpoint") from err
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage} finished without a checkpoint")
    local = tempfile.mkdtemp(prefix=f"lotscan-{stage}-")
    return result.checkpoint.to_directory(local)


def _newest_checkpoint(run_uri: str, storage) -> tuple[str, int] | None:
    """(folder name, step) of the checkpoint with the highest step of a run."""
    best, best_step = None, -1
    for entry in list_dirs(run_uri, storage):
        if not entry.startswith("checkpoint_"):
            continue
        state_uri = join(run_uri, entry, "state.json")
        if not exists(state_uri, storage):
            continue  # a checkpoint still being written
        step = int(json.loads(read_bytes(state_uri, storage))["step"])
        if step > best_step:
            best, best_step = entry, step
    return None if best is None else (best, best_step)


def latest_checkpoint(checkpoint_uri: str, name: str, storage) -> str:
    """The checkpoint with the highest step of run ``name``, copied to a local folder."""
    run_uri = join(checkpoint_uri, name)
    found = _newest_checkpoint(run_uri, storage)
    if found is None:
        raise TrainingError(f"no finished checkpoint under {run_uri}")
    best = found[0]
    local = tempfile.mkdtemp(prefix=f"lotscan-{name}-")
    for uri in list_files(join(run_uri, best), storage):
        # Listed URIs may be spelled differently from run_uri (a relative local
        # path comes back absolute): cut at the checkpoint folder's own name.
        relative = uri.split(f"/{best}/", 1)[1]
        target = os.path.join(local, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(read_bytes(uri, storage))
    return local


def reusable_run(checkpoint_uri: str, stage: str, model_fp: str, train_fp: str, storage) -> str:
    """Name of the run whose checkpoint a stage that is not run reuses: the one
    with the same model part and the same training part when there is one,
    else the run with the same model part whose newest checkpoint is newest."""
    exact = f"{stage}-{model_fp}-{train_fp}"
    candidates = [d for d in list_dirs(checkpoint_uri, storage) if d.startswith(f"{stage}-{model_fp}-")]
    if exact in candidates and _newest_checkpoint(join(checkpoint_uri, exact), storage):
        return exact
    dated = [(found[0], name) for name in candidates
             if (found := _newest_checkpoint(join(checkpoint_uri, name), storage))]
    if not dated:
        raise TrainingError(f"no finished checkpoint of stage {stage} under "
                            f"{join(checkpoint_uri, stage + '-' + model_fp + '-*')}")
    return max(dated)[1]  # checkpoint folder names sort by time


STAGE_RECORD = ("restarts", "precision", "world_size", "batch_size", "steps_per_s", "images_per_s",
                "steps_this_attempt")
"""Checkpoint state entries copied into the bundle's training record per stage."""

MAX_RESOURCE_IMAGES = 2000


def _training_resources(method, cfg: LotscanConfig, log: Log) -> dict[str, np.ndarray]:
    """Decode the extra image collections a method trains with (DiffAD's anomaly
    textures), at most MAX_RESOURCE_IMAGES each (a stable sample)."""
    out: dict[str, np.ndarray] = {}
    for name, uri in method.training_resource_uris().items():
        rows = list_training_rows(uri, cfg.storage)
        rows = sorted(rows, key=lambda r: hashlib.sha256(r["uri"].encode()).hexdigest())
        rows = rows[:MAX_RESOURCE_IMAGES]
        images = []
        for row in rows:
            image, error = decode_one(row["uri"], cfg.storage, cfg.data)
            if error:
                log(f"[lotscan train] skipping unreadable {name} image: {error}")
            else:
                images.append(image)
        if not images:
            raise TrainingError(f"{name} at {uri}: no readable images")
        log(f"[lotscan train] {name}: {len(images)} images from {uri}")
        out[name] = np.stack(images)
    return out


def _calibrate(cfg: LotscanConfig, networks: dict[str, torch.nn.Module], rows: list[dict],
               log: Log):
    try:
        return calibrate_networks(cfg, networks, rows, log)
    except ValueError as err:  # no readable image, non-finite scores: say so, no traceback
        raise TrainingError(str(err)) from err


def train_bundle(
    cfg: LotscanConfig,
    data_uri: str,
    out_uri: str,
    categories: list[str] | None = None,
    log: Log = print,
    stages: list[str] | None = None,
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """Train the stages of ``cfg.method`` in order, calibrate, write the bundle.

    ``stages`` (default: all) names the stages to run; every other stage reuses
    the latest checkpoint of its run under ``checkpoint_uri`` (default
    ``<out_uri>/checkpoints``; same settings, data and upstream weights), so one
    stage can be re-run alone, e.g. DiffAD's segmenter with another
    discriminator input into another bundle. When a stage after the last one
    run has no checkpoint yet, training stops there without a bundle (stages
    run one command at a time, e.g. each with its own budget).
    """
    checkpoint_uri = checkpoint_uri or join(out_uri, "checkpoints")
    ensure_ray()
    method = build_method(cfg)
    unknown = sorted(set(stages or []) - set(method.stages))
    if unknown:
        raise TrainingError(f"{cfg.method} has no stage {', '.join(unknown)} "
                            f"(its stages: {', '.join(method.stages)})")
    rows = list_training_rows(data_uri, cfg.storage, categories)
    train_rows, calib_rows = split_calibration(rows, cfg.data.calibration_fraction)
    log(f"[lotscan train] {cfg.method}: {len(train_rows)} training and {len(calib_rows)} "
        f"calibration images from {data_uri}")
    try:
        pretrained = method.init_pretrained(lambda uri: read_bytes(uri, cfg.storage))
    except (ValueError, OSError) as err:
        raise TrainingError(f"pretrained weights: {err}") from err
    for name, what in pretrained.items():
        log(f"[lotscan train] pretrained {name}: {what}")
    resources = _training_resources(method, cfg, log)
    resources_ref = ray.put(resources) if resources else None
    images = None
    started = time.time()
    ready = {n: _state_blob(method.networks[n]) for n in method.pretrained_networks}
    stage_info: dict[str, dict[str, Any]] = {}
    last_selected = max(map(method.stages.index, stages or []), default=-1)
    for index, stage in enumerate(method.stages):
        model_fp, train_fp = _fingerprint(cfg, train_rows, method, stage, _upstream_digest(ready))
        name = f"{stage}-{model_fp}-{train_fp}"
        if stages is None or stage in stages:
            if images is None:
                images = decode_training_images(train_rows, cfg, log)
            frozen_ref = ray.put(ready) if ready else None
            folder = run_stage(cfg, stage, images, checkpoint_uri, name, frozen_ref, resources_ref,
                               log)
            trained = True
        else:
            try:
                name = reusable_run(checkpoint_uri, stage, model_fp, train_fp, cfg.storage)
                folder = latest_checkpoint(checkpoint_uri, name, cfg.storage)
            except TrainingError as err:
                if index > last_selected >= 0:
                    log(f"[lotscan train] stage {stage} has no checkpoint for these weights yet; "
                        f"stopping without a bundle (run --stages {stage} next)")
                    return {"model_id": None, "calibration": None,
                            "training": {"stages": stage_info, "pretrained": pretrained}}
                raise TrainingError(
                    f"stage {stage} is not in the stages to run, and {err}: train it first "
                    f"(with the same settings, data and earlier stages), or include it") from None
            log(f"[lotscan train] stage {stage}: reusing checkpoint run {name}")
            trained = False
        names = method.stage_networks(stage)
        load_networks(folder, {n: method.networks[n] for n in names})
        ready.update({n: _state_blob(method.networks[n]) for n in names})
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        stage_info[stage] = {"run": name, "trained_now": trained, "steps": int(state["step"]),
                             "resumed_from_step": int(state.get("resumed_from_step", 0)),
                             "loss": float(state["loss"]),
                             **{k: state[k] for k in STAGE_RECORD if k in state}}
        rate = (f", {state['images_per_s']:.1f} img/s, {state['steps_per_s']:.2f} steps/s"
                if "images_per_s" in state else "")
        log(f"[lotscan train] stage {stage} done at step {state['step']} "
            f"(loss {state['loss']:.4f}{rate})")
    log(f"[lotscan train] calibrating on {len(calib_rows)} held-out normal images")
    calibration = _calibrate(cfg, method.networks, calib_rows, log)
    last = stage_info[method.stages[-1]]
    training = {
        "data_uri": data_uri,
        "categories": sorted({r["category"] for r in rows}),
        "train_images": len(train_rows),
        "calibration_images": len(calib_rows),
        "data_fingerprint": data_fingerprint(rows),
        "steps": last["steps"],
        "resumed_from_step": last["resumed_from_step"],
        "stages": stage_info,
        "pretrained": pretrained,
        "wall_clock_s": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    bundle = Bundle(method=method, calibration=calibration, training=training)
    model_id = save_bundle(bundle, out_uri, cfg.storage)
    log(f"[lotscan train] wrote bundle {model_id} to {out_uri} ({describe(calibration)})")
    return {"model_id": model_id, "calibration": calibration.to_dict(), "training": training}


def recalibrate_bundle(source: Bundle, cfg: LotscanConfig, data_uri: str, out_uri: str,
                       categories: list[str] | None = None, log: Log = print) -> dict[str, Any]:
    """Reuse a bundle's trained networks under another method or scoring config
    (``recon`` and ``dta`` share the denoiser), recalibrate, write a new bundle."""
    ensure_ray()
    rows = list_training_rows(data_uri, cfg.storage, categories)
    _, calib_rows = split_calibration(rows, cfg.data.calibration_fraction)
    method = build_method(cfg, networks=source.method.networks)
    log(f"[lotscan calibrate] {cfg.method}: calibrating on {len(calib_rows)} held-out normal images")
    calibration = _calibrate(cfg, method.networks, calib_rows, log)
    training = {**source.training, "recalibrated_from": source.model_id,
                "calibration_images": len(calib_rows)}
    bundle = Bundle(method=method, calibration=calibration, training=training)
    model_id = save_bundle(bundle, out_uri, cfg.storage)
    log(f"[lotscan calibrate] wrote bundle {model_id} to {out_uri} ({describe(calibration)})")
    return {"model_id": model_id, "calibration": calibration.to_dict(), "training": training}

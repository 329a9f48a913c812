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
checkpoints of the others. A calibration pass on held-out normal images then
fixes normalisation ranges and the threshold, and the bundle is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lotscan.config import LotscanConfig, from_dict
from lotscan.models.bundle import Bundle
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration, Scorer, calibrate, to_model_input
from lotscan.platform.bundles import save_bundle
from lotscan.platform.checkpoints import load_checkpoint, load_networks, save_checkpoint
from lotscan.platform.decode import DecodeBatch, decode_one
from lotscan.platform.errors import TrainingError
from lotscan.platform.images import content_seed
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

Log = Callable[[str], None]


def _flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    h = torch.rand(n, generator=generator) < 0.5
    v = torch.rand(n, generator=generator) < 0.5
    images = torch.where(h.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    return torch.where(v.view(-1, 1, 1, 1).to(images.device), images.flip(-2), images)


def _stop_everywhere(local_stop: bool, device: torch.device) -> bool:
    """All workers stop at the same step (else a data-parallel all-reduce hangs).
    The flag lives on the training device: NCCL reduces only CUDA tensors."""
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1.0 if local_stop else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
    return local_stop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One training stage on one Ray Train worker."""
    cfg = from_dict(loop_config["config"])
    stage = loop_config["stage"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(tc.seed + rank)

    method = build_method(cfg)
    if loop_config.get("frozen") is not None:
        # Pretrained networks and those of earlier stages, read-only in this one.
        # They travel through the object store, so workers on other nodes get them.
        for name, blob in ray.get(loop_config["frozen"]).items():
            method.networks[name].load_state_dict(load_safetensors(blob))
    if loop_config.get("resources") is not None:
        method.set_training_resources(ray.get(loop_config["resources"]))
    names = method.stage_networks(stage)
    nets = {n: method.networks[n] for n in names}
    params = [p for n in names for p in nets[n].parameters()]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate)

    step = 0
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, nets, optimizer)
        step = resumed_from = int(state["step"])
        if rank == 0:
            print(f"[lotscan train] {stage}: resumed from step {step}", flush=True)

    device = ray.train.torch.get_device()
    for name in list(nets):
        nets[name] = ray.train.torch.prepare_model(nets[name])
    for name, net in method.networks.items():
        if name not in nets:
            net.to(device).eval().requires_grad_(False)
    # Re-home the optimizer state on the training device.
    for entry in optimizer.state.values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and key != "step":
                entry[key] = value.to(device)

    generator = torch.Generator().manual_seed(tc.seed * 1000 + rank * 7919 + step)
    shard = ray.train.get_dataset_shard("train")
    deadline = time.time() + tc.time_budget_minutes * 60.0
    start, seen, last_log_time, last_log_seen = time.time(), 0, time.time(), 0
    loss_sum, loss_n = 0.0, 0
    last_loss = float(state["loss"]) if checkpoint is not None else float("nan")
    done = step >= tc.max_steps

    def report(final: bool) -> None:
        nonlocal loss_sum, loss_n, last_log_time, last_log_seen, last_loss
        now = time.time()
        rate = (seen - last_log_seen) / max(now - last_log_time, 1e-9) * ctx.get_world_size()
        if loss_n:
            last_loss = loss_sum / loss_n
        metrics = {"step": step, "loss": last_loss, "images_per_s": rate,
                   "elapsed_s": now - start, "stage": stage}
        want_ckpt = final or step % tc.checkpoint_every_steps == 0
        if rank == 0:
            print(f"[lotscan train] {stage}: step {step}/{tc.max_steps} loss {metrics['loss']:.4f} "
                  f"{rate:.1f} img/s elapsed {metrics['elapsed_s']:.0f}s", flush=True)
        if want_ckpt:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    save_checkpoint(folder, nets, optimizer, {
                        "step": step, "stage": stage, "loss": metrics["loss"],
                        "resumed_from_step": resumed_from})
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder)
                                 if rank == 0 else None)
        else:
            ray.train.report(metrics)
        loss_sum, loss_n, last_log_time, last_log_seen = 0.0, 0, now, seen

    if done:
        report(final=True)  # an already finished stage re-reports its checkpoint
        return
    for net in nets.values():
        net.train()
    while not done:
        batches = 0
        for batch in shard.iter_torch_batches(batch_size=tc.batch_size, dtypes={"image": torch.uint8}):
            batches += 1
            x = to_model_input(batch["image"], device)
            if method.default_augment_flips if tc.augment_flips is None else tc.augment_flips:
                x = _flip(x, generator)
            loss = method.training_loss(stage, nets, x, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += x.shape[0]
            loss_sum += float(loss.detach())
            loss_n += 1
            done = _stop_everywhere(step >= tc.max_steps or time.time() > deadline, device)
            if done:
                break
            if step % tc.log_every_steps == 0 or step % tc.checkpoint_every_steps == 0:
                report(final=False)
        if batches == 0:
            raise RuntimeError("the training data shard of this worker is empty")
    report(final=True)


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
                          "checkpoint_every_steps", "num_workers", "use_gpu", "cpus_per_worker")}

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


def _decoded_dataset(rows: list[dict], cfg: LotscanConfig, log: Log):
    """Decode once and keep the images in the object store, so epochs and
    workers read memory, and the trainers need no CPU for data tasks."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows).map_batches(
        DecodeBatch(cfg.storage, cfg.data), batch_size=cfg.score.decode_batch_size,
        batch_format="numpy")
    ds = ds.materialize()
    failed = ds.filter(lambda r: bool(r["error"])).take_all()
    for row in failed:
        log(f"[lotscan train] skipping unreadable training image: {row['error']}")
    if failed:
        ds = ds.filter(lambda r: not r["error"])
    ds = ds.select_columns(["image"]).materialize()
    if ds.count() == 0:
        raise ValueError("no readable training images")
    return ds


def run_stage(cfg: LotscanConfig, stage: str, ds, checkpoint_uri: str, name: str,
              frozen_ref: Any, resources_ref: Any, log: Log) -> str:
    """Run one stage with Ray Train as run ``name`` under ``checkpoint_uri``
    (resuming its latest checkpoint); returns a local folder with the final one."""
    fs, path = pyarrow_filesystem(checkpoint_uri, cfg.storage)
    loop_config = {"config": cfg.to_dict(), "stage": stage, "frozen": frozen_ref,
                   "resources": resources_ref}
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
        ),
        datasets={"train": ds},
    )
    log(f"[lotscan train] stage {stage}: Ray Train run {name} "
        f"({cfg.train.num_workers} worker(s), {'GPU' if cfg.train.use_gpu else 'CPU'})")
    result = trainer.fit()
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


def _calibration_task(cfg_dict: dict, blobs: dict[str, bytes], rows: list[dict]) -> dict:
    from safetensors.torch import load as load_st

    cfg = from_dict(cfg_dict)
    if cfg.score.torch_threads > 0:
        torch.set_num_threads(cfg.score.torch_threads)
    method = build_method(cfg)
    for name, blob in blobs.items():
        method.networks[name].load_state_dict(load_st(blob))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = Scorer(method, device=device)

    def batches():
        bs = cfg.score.batch_size
        for i in range(0, len(rows), bs):
            images, seeds = [], []
            for row in rows[i:i + bs]:
                image, error = decode_one(row["uri"], cfg.storage, cfg.data)
                if error:
                    print(f"[lotscan calibrate] skipping {error}", flush=True)
                    continue
                images.append(image)
                seeds.append(content_seed(image))
            if images:
                yield np.stack(images), seeds

    return calibrate(scorer, batches()).to_dict()


def calibrate_networks(cfg: LotscanConfig, networks: dict[str, torch.nn.Module],
                       rows: list[dict]) -> Calibration:
    """Run calibration as a Ray task (on a GPU when training used them)."""
    from safetensors.torch import save as save_st

    blobs = {n: save_st({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
             for n, net in networks.items()}
    task = ray.remote(_calibration_task).options(num_gpus=1 if cfg.train.use_gpu else 0, num_cpus=1)
    return Calibration.from_dict(ray.get(task.remote(cfg.to_dict(), blobs, rows)))


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
    ds = None
    started = time.time()
    ready = {n: _state_blob(method.networks[n]) for n in method.pretrained_networks}
    stage_info: dict[str, dict[str, Any]] = {}
    last_selected = max(map(method.stages.index, stages or []), default=-1)
    for index, stage in enumerate(method.stages):
        model_fp, train_fp = _fingerprint(cfg, train_rows, method, stage, _upstream_digest(ready))
        name = f"{stage}-{model_fp}-{train_fp}"
        if stages is None or stage in stages:
            if ds is None:
                ds = _decoded_dataset(train_rows, cfg, log)
            frozen_ref = ray.put(ready) if ready else None
            folder = run_stage(cfg, stage, ds, checkpoint_uri, name, frozen_ref, resources_ref, log)
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
                             "loss": float(state["loss"])}
        log(f"[lotscan train] stage {stage} done at step {state['step']} (loss {state['loss']:.4f})")
    log(f"[lotscan train] calibrating on {len(calib_rows)} held-out normal images")
    calibration = calibrate_networks(cfg, method.networks, calib_rows)
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
    log(f"[lotscan train] wrote bundle {model_id} to {out_uri} "
        f"(threshold {calibration.threshold:.4f} at normal FPR {calibration.normal_fpr})")
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
    calibration = calibrate_networks(cfg, method.networks, calib_rows)
    training = {**source.training, "recalibrated_from": source.model_id,
                "calibration_images": len(calib_rows)}
    bundle = Bundle(method=method, calibration=calibration, training=training)
    model_id = save_bundle(bundle, out_uri, cfg.storage)
    log(f"[lotscan calibrate] wrote bundle {model_id} to {out_uri} "
        f"(threshold {calibration.threshold:.4f})")
    return {"model_id": model_id, "calibration": calibration.to_dict(), "training": training}

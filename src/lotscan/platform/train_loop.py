"""One training stage on one Ray Train worker: data, steps, progress, checkpoints.

Data. The decoded training images live in the object store as a few chunks
(uint8 arrays, decoded once by the driver's tasks; see ``training.py``). Every
worker maps them (zero-copy on its node) and draws its batches from them: at
each epoch one global permutation, seeded by ``train.seed`` and the epoch,
dealt round-robin to the workers (``DistributedSampler``'s scheme), so every
epoch is shuffled anew, the workers' batches are disjoint and every worker
takes the same number of steps. The batch of a step is a function of the step
alone, so a resumed stage continues with the batch it would have trained on.

Steps. ``train.precision=bf16`` runs the forward pass and the loss under
``torch.autocast`` (bfloat16, CPU or CUDA); weights, gradients and the
optimizer stay fp32. The loss stays on the device and is read back only when
a progress line is printed (no host sync per step). The time budget is agreed
between workers every ``STOP_SYNC_STEPS`` steps (one all-reduce), so a stage
may run that many steps past its budget.

Faults. A killed worker ends the worker group; Ray Train
(``train.max_failures``) starts a new one, which resumes from the latest
checkpoint of this run. Checkpoints carry a token of the command that wrote
them: a restart in the same command keeps the time budget already used and
counts the restart; a new command gets a fresh budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from safetensors.torch import load as load_safetensors

from lotscan.config import TrainConfig, from_dict
from lotscan.models.registry import build_method
from lotscan.models.scoring import to_model_input
from lotscan.platform.checkpoints import load_checkpoint, save_checkpoint

STOP_SYNC_STEPS = 5
"""Steps between the workers' agreements on the time budget (one all-reduce;
with a single worker the budget is checked every step, for free)."""


def say(line: str) -> None:
    """Print one line from a Ray Train worker once. Ray Train V2 patches
    ``print`` in workers to also log the line through its console handler,
    and the driver then shows it twice; writing to the stream does not."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ``ray.train.report`` at INFO through a logger
    named after its source file (so ``LoggingConfig(log_level=...)``, which
    filters ``ray.train.*``, misses it) and the driver shows each one; keep
    them in Ray's log files only."""
    try:
        from ray.train.v2._internal.execution import context as v2_context
    except ImportError:  # another Ray Train version: nothing to quiet
        return
    logging.getLogger(v2_context.__file__).setLevel(logging.WARNING)


def duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(stage: str, step: int, max_steps: int, used_s: float, budget_s: float,
                  steps_per_s: float, loss: float, images_per_s: float) -> str:
    """``[lotscan train] denoiser: step 25/≈191 (time budget) loss 0.1234 9.8 img/s
    elapsed 40s ETA 2m10s``: the final step is whichever budget ends first, the
    time budget's projected at the current rate."""
    left_s = max(budget_s - used_s, 0.0)
    if steps_per_s > 0 and step + steps_per_s * left_s < max_steps:
        target = f"≈{int(step + steps_per_s * left_s)} (time budget)"
        eta = left_s
    else:
        target = str(max_steps)
        eta = (max_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
    eta_text = duration(eta) if math.isfinite(eta) else "?"
    return (f"[lotscan train] {stage}: step {step}/{target} loss {loss:.4f} "
            f"{images_per_s:.1f} img/s elapsed {duration(used_s)} ETA {eta_text}")


class EpochBatches:
    """The batch of every step for one worker (see the module doc)."""

    def __init__(self, chunks: list[np.ndarray], batch_size: int, rank: int, world_size: int,
                 seed: int):
        self.chunks = chunks
        self.offsets = np.cumsum([0] + [len(c) for c in chunks])
        self.total = int(self.offsets[-1])
        self.per_worker = self.total // world_size
        if self.per_worker == 0:
            raise ValueError(f"{self.total} training image(s) for {world_size} workers: "
                             f"every worker needs at least one")
        self.batch_size = min(batch_size, self.per_worker)
        self.steps_per_epoch = self.per_worker // self.batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._epoch, self._mine = -1, np.zeros(0, np.int64)

    def indices(self, step: int) -> np.ndarray:
        """Global image indices of the batch of ``step`` (0-based) on this worker."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.total)
            self._epoch, self._mine = epoch, order[self.rank::self.world_size][:self.per_worker]
        return self._mine[k * self.batch_size:(k + 1) * self.batch_size]

    def batch(self, step: int) -> np.ndarray:
        """(B, H, W, 3) uint8: a copy of this step's images."""
        idx = self.indices(step)
        chunk = np.searchsorted(self.offsets, idx, side="right") - 1
        return np.stack([self.chunks[c][i - self.offsets[c]] for c, i in zip(chunk, idx, strict=True)])


def _flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    h = torch.rand(n, generator=generator) < 0.5
    v = torch.rand(n, generator=generator) < 0.5
    images = torch.where(h.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    return torch.where(v.view(-1, 1, 1, 1).to(images.device), images.flip(-2), images)


def autocast(tc: TrainConfig, device: torch.device):
    """The precision context of a training forward pass (``train.precision``)."""
    if tc.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StageSteps:
    """The optimisation step of one stage, apart from Ray (the benchmark runs it too)."""

    def __init__(self, method, stage: str, nets: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, tc: TrainConfig, device: torch.device,
                 generator: torch.Generator):
        self.method, self.stage, self.nets, self.optimizer = method, stage, nets, optimizer
        self.tc, self.device, self.generator = tc, device, generator
        self.loss_sum: torch.Tensor | None = None
        self.loss_n = 0

    def step(self, images: np.ndarray) -> None:
        x = to_model_input(torch.from_numpy(images), self.device)
        flips = self.tc.augment_flips
        if flips if flips is not None else self.method.default_augment_flips:
            x = _flip(x, self.generator)
        with autocast(self.tc, self.device):
            loss = self.method.training_loss(self.stage, self.nets, x, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        value = loss.detach().float()
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.loss_n += 1

    def mean_loss(self) -> float | None:
        """Mean loss since the last call (one host sync), None when no step ran."""
        if not self.loss_n:
            return None
        value = float(self.loss_sum) / self.loss_n
        self.loss_sum, self.loss_n = None, 0
        return value


def _agree(local_stop: bool, device: torch.device) -> bool:
    """All workers stop at the same step (else a data-parallel all-reduce hangs).
    The flag lives on the training device: NCCL reduces only CUDA tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if local_stop else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
    return local_stop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One training stage on one Ray Train worker."""
    quiet_ray_train_reports()
    cfg = from_dict(loop_config["config"])
    stage, token = loop_config["stage"], loop_config["run_token"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed + rank)

    method = build_method(cfg)
    if loop_config.get("frozen") is not None:
        # Pretrained networks and those of earlier stages, read-only in this one.
        for name, blob in ray.get(loop_config["frozen"]).items():
            method.networks[name].load_state_dict(load_safetensors(blob))
    if loop_config.get("resources") is not None:
        method.set_training_resources(ray.get(loop_config["resources"]))
    names = method.stage_networks(stage)
    nets = {n: method.networks[n] for n in names}
    optimizer = torch.optim.AdamW([p for n in names for p in nets[n].parameters()],
                                  lr=tc.learning_rate)

    step, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, nets, optimizer)
        step = int(state["step"])
    same_command = state is not None and state.get("run_token") == token
    used_before = float(state.get("budget_used_s", 0.0)) if same_command else 0.0
    restarts = int(state.get("restarts", 0)) + 1 if same_command else 0
    resumed_from = int(state.get("resumed_from_step", 0)) if same_command else step
    if rank == 0 and state is not None:
        say(f"[lotscan train] {stage}: restarted after a worker failure, resuming from step {step} "
            f"(restart {restarts} of at most {tc.max_failures if tc.max_failures >= 0 else 'any'})"
            if same_command else f"[lotscan train] {stage}: resumed from step {step}")

    device = ray.train.torch.get_device()
    for name in list(nets):
        nets[name] = ray.train.torch.prepare_model(nets[name])
    for name, net in method.networks.items():
        if name not in nets:
            net.to(device).eval().requires_grad_(False)
    for entry in optimizer.state.values():  # re-home the optimizer state on the device
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and key != "step":
                entry[key] = value.to(device)

    data = EpochBatches(ray.get(loop_config["images"]), tc.batch_size, rank, world, tc.seed)
    generator = torch.Generator().manual_seed(tc.seed * 1000 + rank * 7919 + step)
    steps = StageSteps(method, stage, nets, optimizer, tc, device, generator)
    budget_s = tc.time_budget_minutes * 60.0
    start = time.time()
    first_step = step
    last_loss = float(state["loss"]) if state is not None else float("nan")
    log_time, log_step = start, step

    def used() -> float:
        return used_before + time.time() - start

    def rates(now: float, since_time: float, since_step: int) -> tuple[float, float]:
        per_s = (step - since_step) / max(now - since_time, 1e-9)
        return per_s, per_s * data.batch_size * world

    def save(final: bool) -> None:
        steps_per_s, images_per_s = rates(time.time(), start, first_step)
        if step == first_step and state is not None:  # a finished stage, re-reported
            steps_per_s = float(state.get("steps_per_s", 0.0))
            images_per_s = float(state.get("images_per_s", 0.0))
        metrics = {"step": step, "loss": last_loss, "stage": stage}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(folder, nets, optimizer, {
                    "step": step, "stage": stage, "loss": last_loss, "run_token": token,
                    "resumed_from_step": resumed_from, "restarts": restarts,
                    "budget_used_s": used(), "precision": tc.precision,
                    "world_size": world, "batch_size": data.batch_size,
                    "steps_per_s": steps_per_s, "images_per_s": images_per_s,
                    "steps_this_attempt": step - first_step, "final": final})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)

    for net in nets.values():
        net.train()
    while step < tc.max_steps:
        steps.step(data.batch(step))
        step += 1
        local_stop = used() > budget_s
        if step >= tc.max_steps or ((world == 1 or step % STOP_SYNC_STEPS == 0)
                                    and _agree(local_stop, device)):
            break
        logging, saving = step % tc.log_every_steps == 0, step % tc.checkpoint_every_steps == 0
        if (logging or saving) and steps.loss_n:
            last_loss = steps.mean_loss()
        if logging:
            now = time.time()
            if rank == 0:
                steps_per_s, _ = rates(now, start, first_step)
                _, images_per_s = rates(now, log_time, log_step)
                say(progress_line(stage, step, tc.max_steps, used(), budget_s, steps_per_s,
                                  last_loss, images_per_s))
            log_time, log_step = now, step
        if saving:
            save(final=False)
    if steps.loss_n:
        last_loss = steps.mean_loss()
    if rank == 0 and step > first_step:
        steps_per_s, images_per_s = rates(time.time(), start, first_step)
        say(progress_line(stage, step, tc.max_steps, used(), budget_s, steps_per_s, last_loss,
                          images_per_s).split(" ETA ")[0] + " (done)")
    save(final=True)

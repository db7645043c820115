"""Physically remove MLP neurons: slice the linears, update the config so vanilla transformers reloads it."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import mlp_views, slice_mlp


def remove_neurons(model: nn.Module, kept: dict[int, torch.Tensor]) -> None:
    """Keep only neurons `kept[layer]` (sorted indices) in each layer's MLP, in place."""
    views = mlp_views(model)
    widths = {len(kept[v.index]) for v in views if v.index in kept} | {v.width for v in views if v.index not in kept}
    if len(widths) != 1:
        raise ValueError(f"uniform pruning needs one width in every layer, got {sorted(widths)}")
    for view in views:
        if view.index in kept:
            slice_mlp(view, kept[view.index], model)
            if hasattr(view.module, "intermediate_size"):
                view.module.intermediate_size = len(kept[view.index])
    model.config.intermediate_size = widths.pop()

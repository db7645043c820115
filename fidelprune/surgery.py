"""Physically remove MLP neurons: slice the linears, update the config so transformers reloads the shapes."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import add_down_bias, mlp_views, slice_mlp

# config key holding per-layer MLP widths when they differ (transformers has no per-layer intermediate_size for
# these families; fidelprune.load_model / load_pruned read it back)
LAYER_WIDTHS_KEY = "fidelprune_layer_widths"


def remove_neurons(
    model: nn.Module, kept: dict[int, torch.Tensor], down_bias_shift: dict[int, torch.Tensor] | None = None
) -> None:
    """Keep only neurons `kept[layer]` (sorted indices) in each layer's MLP, in place; optionally add a
    per-layer shift to the down_proj biases (FLAP's compensation)."""
    views = mlp_views(model)
    for view in views:
        if view.index in kept and len(kept[view.index]) < view.width:
            slice_mlp(view, kept[view.index], model)
    views = mlp_views(model)  # the linears were replaced
    for view in views:
        if hasattr(view.module, "intermediate_size"):
            view.module.intermediate_size = view.width
        if down_bias_shift is not None:
            add_down_bias(view, down_bias_shift[view.index], model)
    widths = [v.width for v in views]
    model.config.intermediate_size = max(widths)
    if len(set(widths)) > 1:
        setattr(model.config, LAYER_WIDTHS_KEY, widths)
    elif hasattr(model.config, LAYER_WIDTHS_KEY):
        delattr(model.config, LAYER_WIDTHS_KEY)

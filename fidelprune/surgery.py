"""Physically remove MLP neurons: slice the linears, update the config so transformers reloads the shapes."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import AdaptedModel, adapt
from .layout import LAYER_WIDTHS_KEY


def remove_neurons(
    model: nn.Module | AdaptedModel, kept: dict[int, torch.Tensor], down_bias_shift: dict[int, torch.Tensor] | None = None
) -> None:
    """Keep only neurons `kept[layer]` (sorted indices) in each layer's MLP, in place; optionally add a
    per-layer shift to the down_proj biases (FLAP's compensation)."""
    adapted = adapt(model)
    for index in range(adapted.num_layers):
        view = adapted.mlp(index)  # one view at a time: a layer's old linears are freed once it is sliced, so
        if index in kept and len(kept[index]) < view.width:  # surgery holds one layer's copy, not the model's
            adapted.slice_mlp(view, kept[index])
    views = adapted.mlps()  # the linears were replaced
    for view in views:
        adapted.set_mlp_width(view)
        if down_bias_shift is not None:
            adapted.add_down_bias(view, down_bias_shift[view.index])
    widths = [v.width for v in views]
    config = adapted.config
    config.intermediate_size = max(widths)
    if len(set(widths)) > 1:
        setattr(config, LAYER_WIDTHS_KEY, widths)
    elif hasattr(config, LAYER_WIDTHS_KEY):
        delattr(config, LAYER_WIDTHS_KEY)

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


def remove_layers(model: nn.Module | AdaptedModel, dropped: list[int]) -> None:
    """Remove whole decoder layers `dropped` (indices), in place. The layers that stay are renumbered (each
    module's `layer_idx`, which indexes the KV cache) and the config's per-layer entries follow them
    (`num_hidden_layers`, `layer_types`, Qwen2's `max_window_layers`, per-layer MLP widths), so the model is a
    vanilla checkpoint of the new depth that transformers and the engines load."""
    adapted = adapt(model)
    layers = adapted.layers
    gone = set(dropped)
    stay = [i for i in range(len(layers)) if i not in gone]
    if not stay or not gone <= set(range(len(layers))):
        raise ValueError(f"cannot drop layers {sorted(gone)} of a model of {len(layers)}")
    kept_modules = [layers[i] for i in stay]
    for new, layer in enumerate(kept_modules):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for index in sorted(gone, reverse=True):  # the container stays (and its hooks); ModuleList renames the rest
        del layers[index]
    config = adapted.config
    config.num_hidden_layers = len(stay)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in stay]
    if isinstance(getattr(config, "max_window_layers", None), int):  # layers below it use full attention
        config.max_window_layers = sum(1 for i in stay if i < config.max_window_layers)
    if isinstance(getattr(config, LAYER_WIDTHS_KEY, None), list):
        setattr(config, LAYER_WIDTHS_KEY, [getattr(config, LAYER_WIDTHS_KEY)[i] for i in stay])


def remove_heads(model: nn.Module | AdaptedModel, kept: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Keep, in every layer, the query heads and KV heads `kept[layer]` = (query head indices, KV head indices),
    in place: the same counts in every layer (the same number of query heads from each kept KV group), so the
    config stays vanilla: `num_attention_heads`, `num_key_value_heads`, and `head_dim` written out (it no longer
    follows from the hidden size)."""
    adapted = adapt(model)
    counts = {(len(q), len(kv)) for q, kv in kept.values()}
    if len(counts) != 1 or set(kept) != set(range(adapted.num_layers)):
        raise ValueError("remove_heads keeps the same head counts in every layer")
    head_dim = adapted.attention(0).head_dim
    for index, (query, kv) in kept.items():
        adapted.slice_attention(adapted.attention(index), query, kv)
    (query_heads, kv_heads), = counts
    config = adapted.config
    config.head_dim = head_dim
    config.num_attention_heads, config.num_key_value_heads = query_heads, kv_heads

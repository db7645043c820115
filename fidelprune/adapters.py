"""Per-architecture adapters: the only place that knows where a family keeps its MLP projections.

Every supported family has a gated MLP, `y = W_down (act(W_gate x) * W_up x)`, stored either as separate
`gate_proj` / `up_proj` linears or as one fused `gate_up_proj` (Phi-3, rows [0, I) gate, [I, 2I) up). An
adapter names those modules; everything else (views, slicing, parameter counts) is shared code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # attribute path from the CausalLM to the decoder layers
    mlp: str = "mlp"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None  # fused [gate; up] projection
    down: str = "down_proj"
    bias_flag: str | None = None  # config switch that gives every MLP linear a bias, if the family has one


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), bias_flag="mlp_bias"),
    Adapter("mistral", ("mistral",)),
    Adapter("qwen2", ("qwen2",)),
    Adapter("qwen3", ("qwen3",)),
    Adapter("gemma", ("gemma", "gemma2", "gemma3_text")),
    Adapter("phi3", ("phi3",), gate=None, up=None, gate_up="gate_up_proj"),
)


def supported_families() -> str:
    return ", ".join(sorted(t for a in ADAPTERS for t in a.model_types))


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: fidelprune prunes dense gated MLPs of the families "
        f"{supported_families()} (MoE and non-gated MLPs are not supported yet)"
    )


def _getattr_path(obj: object, path: str) -> object:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


@dataclass
class MLPView:
    """One decoder layer's MLP. Neuron i is row i of W_gate and W_up and column i of W_down."""

    index: int
    module: nn.Module
    down: nn.Linear
    gate: nn.Linear | None = None
    up: nn.Linear | None = None
    gate_up: nn.Linear | None = None

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def hidden_size(self) -> int:
        return self.down.out_features

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_gate, W_up), each [I, d]; views into the real parameters."""
        if self.gate_up is not None:
            return self.gate_up.weight[: self.width], self.gate_up.weight[self.width :]
        return self.gate.weight, self.up.weight

    def gate_up_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.gate_up is not None:
            b = self.gate_up.bias
            return (None, None) if b is None else (b[: self.width], b[self.width :])
        return self.gate.bias, self.up.bias

    def params_per_neuron(self) -> int:
        """Parameters that removing one neuron removes: its gate and up rows (+ biases), its down column."""
        gate_bias, up_bias = self.gate_up_biases()
        return 3 * self.hidden_size + (gate_bias is not None) + (up_bias is not None)


def mlp_views(model: nn.Module) -> list[MLPView]:
    adapter = get_adapter(model)
    views = []
    for i, layer in enumerate(_getattr_path(model, adapter.layers)):
        mlp = getattr(layer, adapter.mlp)
        get = lambda name: getattr(mlp, name) if name else None  # noqa: E731
        views.append(MLPView(i, mlp, get(adapter.down), get(adapter.gate), get(adapter.up), get(adapter.gate_up)))
    return views


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias = nn.Parameter((bias.index_select(0, rows) if rows is not None else bias).clone())
    return new


def slice_mlp(view: MLPView, keep: torch.Tensor, model: nn.Module) -> None:
    """Replace the MLP's linears by physically smaller ones holding only the neurons in `keep`."""
    adapter = get_adapter(model)
    keep = keep.to(view.down.weight.device)
    if view.gate_up is not None:
        fused_rows = torch.cat([keep, keep + view.width])
        setattr(view.module, adapter.gate_up, _sliced_linear(view.gate_up, rows=fused_rows))
    else:
        setattr(view.module, adapter.gate, _sliced_linear(view.gate, rows=keep))
        setattr(view.module, adapter.up, _sliced_linear(view.up, rows=keep))
    setattr(view.module, adapter.down, _sliced_linear(view.down, cols=keep))


def add_down_bias(view: MLPView, shift: torch.Tensor, model: nn.Module) -> None:
    """Add `shift` to the layer's down_proj bias, creating zero gate/up biases and the down bias where the model
    has none (the family's config flag, e.g. LLaMA's mlp_bias, then declares them so transformers reloads them)."""
    adapter = get_adapter(model)
    weight = view.down.weight
    if view.down.bias is None:
        if adapter.bias_flag is None:
            raise UnsupportedModelError(
                f"{adapter.family} models have no MLP bias option in transformers, which FLAP's compensation needs; "
                f"use another method or a llama-family model"
            )
        setattr(model.config, adapter.bias_flag, True)
        for linear in (view.gate, view.up, view.gate_up):
            if linear is not None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))
        view.down.bias = nn.Parameter(torch.zeros(view.hidden_size, dtype=weight.dtype, device=weight.device))
    with torch.no_grad():
        view.down.bias += shift.to(weight.device, weight.dtype)


def can_add_down_bias(model: nn.Module) -> bool:
    return all(v.down.bias is not None for v in mlp_views(model)) or get_adapter(model).bias_flag is not None

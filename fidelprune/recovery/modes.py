"""What is trained: LoRA adapters through peft (merged back at the end), or every weight."""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import ConfigError

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Short names -> module names, first match wins (Phi-3 fuses q/k/v and gate/up into one linear each).
SHORT_NAMES = {
    "q": ("q_proj", "qkv_proj"),
    "k": ("k_proj", "qkv_proj"),
    "v": ("v_proj", "qkv_proj"),
    "o": ("o_proj",),
    "gate": ("gate_proj", "gate_up_proj"),
    "up": ("up_proj", "gate_up_proj"),
    "down": ("down_proj",),
}


def resolve_target_modules(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Module names for peft's `target_modules` from short names (q, k, v, o, gate, up, down) or full names."""
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    resolved: list[str] = []
    for target in targets:
        candidates = SHORT_NAMES.get(target, (target,))
        found = next((c for c in candidates if c in linear_names), None)
        if found is None:
            raise ConfigError(f"LoRA target {target!r} matches no linear layer; the model has {', '.join(sorted(linear_names))}")
        if found not in resolved:
            resolved.append(found)
    return resolved


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: tuple[str, ...] | list[str]) -> nn.Module:
    """Wrap `model` (modified in place) in a peft LoRA model; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {r}")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolve_target_modules(model, targets),
        bias="none", task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft probes transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    return model.merge_and_unload(safe_merge=True)


def prepare_full(model: nn.Module) -> nn.Module:
    model.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}

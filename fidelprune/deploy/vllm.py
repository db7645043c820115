"""A folder vLLM serves as it is: the checkpoint's model files (config, safetensors weights, tokenizer, generation
config) without fidelprune's records, which vLLM would otherwise try to load as weights (it globs every top-level
*.safetensors).

vLLM builds every layer of a family at config.intermediate_size, so uniform widths are served as they are. Per-layer
widths exist in vLLM as NVIDIA's Nemotron-NAS layout (model type "nemotron-nas", DeciLMForCausalLM): LLaMA layers
whose `block_configs[i].ffn.intermediate_size` sets each MLP's width, with the weights under LLaMA's names. A
LLaMA-layout model with per-layer widths is exported in that layout, with fidelprune's configuration_decilm.py
(transformers has no config class for it; vLLM needs `trust_remote_code=True` to read it). fidelprune.load_model
reads the layout back as the LLaMA it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..adapters import adapter_for
from ..layout import DECILM_CONFIG_MODULE, DECILM_TYPE, RECORDS, SIDE_DIR, ModelShape, decilm_config
from .gguf import ExportError

DECILM_FAMILIES = ("llama", "mistral")  # LLaMA layers, as vLLM's DeciLM builds them


def check_servable(config, shape: ModelShape) -> None:
    adapter_for(config.model_type)
    if shape.uniform:
        return
    widths = shape.mlp_widths
    if config.model_type not in DECILM_FAMILIES or getattr(config, "sliding_window", None):
        raise ExportError(
            f"this model's MLP widths differ per layer ({min(widths)}..{max(widths)}); vLLM serves per-layer widths "
            f"only for LLaMA-layout models (Nemotron-NAS), not {config.model_type}: prune it with --allocation uniform "
            f"(and no --protect-first/--protect-last) for vLLM"
        )


def write_vllm(directory: Path, path: Path) -> dict:
    """Copy the model files (bit for bit; the weights keep their saved dtype) into `path`; per-layer widths get the
    Nemotron-NAS config.json and its config module."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    shape = ModelShape.from_config(config)
    copied = []
    for item in sorted(directory.iterdir()):
        if item.is_file() and item.name not in RECORDS and not item.name.startswith("."):
            shutil.copy2(item, path / item.name)
            copied.append(item.name)
    if not any(name.endswith(".safetensors") for name in copied):
        raise ExportError(f"{directory} has no safetensors weights to export")
    layout = "uniform"
    if not shape.uniform:
        (path / "config.json").write_text(json.dumps(decilm_config(config), indent=2) + "\n", encoding="utf-8")
        shutil.copy2(Path(__file__).with_name(DECILM_CONFIG_MODULE), path / DECILM_CONFIG_MODULE)
        copied.append(DECILM_CONFIG_MODULE)
        layout = f"{DECILM_TYPE} (DeciLMForCausalLM; serve with trust_remote_code=True)"
    widths = shape.mlp_widths
    return {"files": copied, "layout": layout, "intermediate_size": widths if layout != "uniform" else widths[0],
            "left_out": sorted(p.name for p in directory.iterdir() if p.name in RECORDS or p.name == SIDE_DIR)}

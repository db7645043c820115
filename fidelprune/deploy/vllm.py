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
from ..checkpoint import CALIBRATION_FILE, MANIFEST, SCORES_FILE, SIDE_DIR
from ..recovery.save import RECOVERY_FILE
from ..surgery import LAYER_WIDTHS_KEY
from .gguf import ExportError

# fidelprune's own records, left out of the served folder (scores and calibration at the top level: the pre-0.2 layout)
RECORDS = {MANIFEST, RECOVERY_FILE, SCORES_FILE, CALIBRATION_FILE}
DECILM_TYPE = "nemotron-nas"
DECILM_FAMILIES = ("llama", "mistral")  # LLaMA layers, as vLLM's DeciLM builds them
CONFIG_MODULE = "configuration_decilm.py"


def check_servable(config, widths: list[int]) -> None:
    adapter_for(config.model_type)
    if len(set(widths)) == 1:
        return
    if config.model_type not in DECILM_FAMILIES or getattr(config, "sliding_window", None):
        raise ExportError(
            f"this model's MLP widths differ per layer ({min(widths)}..{max(widths)}); vLLM serves per-layer widths "
            f"only for LLaMA-layout models (Nemotron-NAS), not {config.model_type}: prune it with --allocation uniform "
            f"(and no --protect-first/--protect-last) for vLLM"
        )


def decilm_config(config: dict, widths: list[int]) -> dict:
    """A LLaMA config.json with per-layer widths, as a Nemotron-NAS one."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    out = {key: value for key, value in config.items() if key != LAYER_WIDTHS_KEY}
    out.update(model_type=DECILM_TYPE, architectures=["DeciLMForCausalLM"],
               auto_map={"AutoConfig": f"{CONFIG_MODULE[:-3]}.DeciLMConfig"}, intermediate_size=max(widths),
               block_configs=[{"attention": {"n_heads_in_group": heads // kv_heads, "no_op": False, "replace_with_linear": False},
                               "ffn": {"intermediate_size": width, "no_op": False, "replace_with_linear": False}}
                              for width in widths])
    return out


def llama_config(config: dict) -> dict:
    """The inverse of decilm_config, for a Nemotron-NAS config.json that fidelprune can load (every block has
    attention and an MLP, with one head grouping); raises otherwise."""
    blocks = config.get("block_configs") or []
    if not blocks or any(b["attention"].get("no_op") or b["ffn"].get("no_op") or b["attention"].get("replace_with_linear")
                         or b["ffn"].get("replace_with_linear") for b in blocks):
        raise ExportError("this Nemotron-NAS model skips or replaces some blocks; fidelprune loads only the layout it "
                          "exports (every block with attention and an MLP)")
    groups = {b["attention"]["n_heads_in_group"] for b in blocks}
    if len(groups) != 1 or any("intermediate_size" not in b["ffn"] for b in blocks):
        raise ExportError("this Nemotron-NAS model varies its attention heads per block or gives MLP widths as "
                          "ffn_mult; fidelprune loads only the layout it exports")
    widths = [b["ffn"]["intermediate_size"] for b in blocks]
    out = {key: value for key, value in config.items() if key not in ("block_configs", "auto_map")}
    out.update(model_type="llama", architectures=["LlamaForCausalLM"], intermediate_size=max(widths),
               num_key_value_heads=config["num_attention_heads"] // groups.pop())
    if len(set(widths)) > 1:
        out[LAYER_WIDTHS_KEY] = widths
    return out


def write_vllm(model, tokenizer, directory: Path, path: Path) -> dict:
    """Copy the model files (bit for bit; the weights keep their saved dtype) into `path`; per-layer widths get the
    Nemotron-NAS config.json and its config module."""
    from ..adapters import adapt

    widths = adapt(model).widths()
    copied = []
    for item in sorted(directory.iterdir()):
        if item.is_file() and item.name not in RECORDS and not item.name.startswith("."):
            shutil.copy2(item, path / item.name)
            copied.append(item.name)
    if not any(name.endswith(".safetensors") for name in copied):
        raise ExportError(f"{directory} has no safetensors weights to export")
    layout = "uniform"
    if len(set(widths)) > 1:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        (path / "config.json").write_text(json.dumps(decilm_config(config, widths), indent=2) + "\n", encoding="utf-8")
        shutil.copy2(Path(__file__).with_name(CONFIG_MODULE), path / CONFIG_MODULE)
        copied.append(CONFIG_MODULE)
        layout = f"{DECILM_TYPE} (DeciLMForCausalLM; serve with trust_remote_code=True)"
    return {"files": copied, "layout": layout, "intermediate_size": widths if layout != "uniform" else widths[0],
            "left_out": sorted(p.name for p in directory.iterdir() if p.name in RECORDS or p.name == SIDE_DIR)}

"""Configuration of a LLaMA-layout model whose layers have their own MLP widths, in NVIDIA's Nemotron-NAS (DeciLM)
layout, which vLLM serves with its DeciLMForCausalLM.

fidelprune copies this file into every such export (config.json's auto_map names it), because transformers has no
config class for the "nemotron-nas" model type: vLLM reads it with `trust_remote_code=True`. It is fidelprune's own
code and only parses config.json: each entry of `block_configs` becomes an object whose fields read as attributes
(`block.ffn.intermediate_size`, `block.attention.n_heads_in_group`), as vLLM's model code expects.
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers import LlamaConfig


def _block(spec) -> SimpleNamespace:
    if isinstance(spec, SimpleNamespace):
        return spec
    return SimpleNamespace(attention=SimpleNamespace(**spec["attention"]), ffn=SimpleNamespace(**spec["ffn"]))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_block(spec) for spec in block_configs or []]

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [{"attention": vars(b.attention), "ffn": vars(b.ffn)} for b in self.block_configs]
        return output

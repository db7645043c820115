"""layout.py: the per-layer shape and its translations (config.json, transformers' per_layer_config, Nemotron-NAS,
GGUF) agree with each other and with what the readers on the other side make of them."""

import json

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

import fidelprune
from fidelprune.layout import (
    LAYER_WIDTHS_KEY,
    PER_LAYER_KEY,
    LayerShape,
    LayoutError,
    ModelShape,
    decilm_config,
    homogeneous_config,
    manifest_or_none,
)

from conftest import tiny_model

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


def test_a_plain_config_is_one_shape_for_every_layer():
    shape = ModelShape.from_config(LLAMA)
    assert shape.uniform and shape.mlp_widths == [64] * 4 and shape.hidden_size == 32
    assert shape.layers[0] == LayerShape(64, 4, 2)
    assert shape.to_config(LLAMA) == LLAMA  # nothing per layer is written for a uniform model
    assert shape.gguf_values() == {"feed_forward_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2}


def test_per_layer_widths_write_both_keys_and_transformers_reads_its_own():
    shape = ModelShape.from_config(LLAMA).with_mlp_widths([64, 16, 40, 64])
    config = shape.to_config(LLAMA)
    assert config["intermediate_size"] == 64 and config[LAYER_WIDTHS_KEY] == [64, 16, 40, 64]
    assert config[PER_LAYER_KEY] == {"1": {"intermediate_size": 16}, "2": {"intermediate_size": 40}}
    # transformers' own reading of the forward-compatible key gives every layer its width
    hf = CONFIG_MAPPING["llama"].from_dict({k: v for k, v in config.items() if k != LAYER_WIDTHS_KEY})
    assert [hf.per_layer_config[i].intermediate_size for i in range(4)] == [64, 16, 40, 64]
    # read back from either key alone
    assert ModelShape.from_config({k: v for k, v in config.items() if k != LAYER_WIDTHS_KEY}) == shape
    assert ModelShape.from_config({k: v for k, v in config.items() if k != PER_LAYER_KEY}) == shape
    assert shape.gguf_values()["feed_forward_length"] == [64, 16, 40, 64]


def test_nemotron_nas_round_trip_and_refusals():
    shape = ModelShape.from_config(LLAMA).with_mlp_widths([64, 16, 40, 64])
    nas = decilm_config(shape.to_config(LLAMA))
    assert nas["model_type"] == "nemotron-nas" and PER_LAYER_KEY not in nas and LAYER_WIDTHS_KEY not in nas
    assert [b["attention"]["n_heads_in_group"] for b in nas["block_configs"]] == [2] * 4
    assert ModelShape.from_block_configs(nas) == shape
    back = homogeneous_config(nas)
    assert back["model_type"] == "llama" and back[LAYER_WIDTHS_KEY] == [64, 16, 40, 64] and PER_LAYER_KEY not in back
    skipped = json.loads(json.dumps(nas))
    skipped["block_configs"][1]["ffn"] = {"no_op": True, "replace_with_linear": False}
    assert ModelShape.from_block_configs(skipped).layers[1] == LayerShape(0, 4, 2)  # read, but not loadable yet
    with pytest.raises(LayoutError, match="skips some blocks"):
        homogeneous_config(skipped)
    skipped["block_configs"][1]["ffn"] = {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False}
    with pytest.raises(LayoutError, match="ffn_mult"):
        ModelShape.from_block_configs(skipped)


def test_skips_and_heads_in_per_layer_config_are_read():
    config = {**LLAMA, PER_LAYER_KEY: {"1": {"skip": ["attention"]}, "2": {"num_key_value_heads": 1}, "3": {"skip": ["mlp"]}}}
    shape = ModelShape.from_config(config)
    assert shape.layers == (LayerShape(64, 4, 2), LayerShape(64, 0, 0), LayerShape(64, 4, 1), LayerShape(0, 4, 2))
    assert shape.gguf_values()["attention.head_count"] == [4, 0, 4, 4]
    assert [b["attention"]["no_op"] for b in shape.to_block_configs()] == [False, True, False, False]
    with pytest.raises(LayoutError, match="cannot shape"):
        ModelShape.from_config({**LLAMA, PER_LAYER_KEY: {"0": {"head_dim": 4}}})


def test_a_saved_per_layer_output_carries_both_keys_and_loads(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    pruned, report = fidelprune.prune(model, None, "magnitude", 0.1, protect_last=1, round_to=4, progress=False)
    widths = report.manifest["allocation"]["layer_widths_after"]
    assert len(set(widths)) > 1
    fidelprune.save(pruned, None, report, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[LAYER_WIDTHS_KEY] == widths and ModelShape.from_config(config).mlp_widths == widths
    assert {int(i): o["intermediate_size"] for i, o in config[PER_LAYER_KEY].items()} == {
        i: w for i, w in enumerate(widths) if w != max(widths)}
    with pytest.raises(Exception, match="per_layer_config"):  # transformers 5 reads the key but builds no such layers
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reloaded = fidelprune.models.load_pruned(tmp_path / "out")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, pruned(ids).logits, atol=1e-6)
    # an output of fidelprune 0.1 (fidelprune's key alone) still loads
    del config[PER_LAYER_KEY]
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert [m.mlp.down_proj.in_features for m in fidelprune.models.load_pruned(tmp_path / "out").model.layers] == widths
    assert manifest_or_none(tmp_path / "out")["allocation"]["layer_widths_after"] == widths
    assert manifest_or_none(tmp_path) is None and manifest_or_none(None) is None

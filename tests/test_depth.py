"""Dropping whole decoder layers (--drop-layers, issue 50): the layer scores against plain references, the surgery
against a model that skips those layers, the parameter budget, and the output as users load it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from gguf import GGUFReader

from fidelprune import prune
from fidelprune.adapters import adapt
from fidelprune.allocation import AllocationError, plan_width
from fidelprune.cli import main
from fidelprune.deploy.gguf import GGUF_ARCH, ExportError, Template, check_attention_pattern, write_gguf
from fidelprune.evaluation.report import run_summary
from fidelprune.objectives import get_objective
from fidelprune.scoring import LayerScores, activation_statistics, taylor_scores
from fidelprune.surgery import remove_layers

from conftest import template_fields, tiny_model, tiny_windows
from reference import block_influence, layer_gate_scores

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3", "phi3")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_taylor_scores_equal_a_gate_on_each_layers_residual(family):
    model, windows = tiny_model(family, num_hidden_layers=3).double(), tiny_windows(4)
    objective = get_objective("entropy")
    with LayerScores(model, "taylor") as layers:
        taylor_scores(model, windows, objective, "activation", batch_size=2, progress=False)
    expected = layer_gate_scores(model, windows, objective)
    torch.testing.assert_close(layers.scores().double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(family):
    model, windows = tiny_model(family, num_hidden_layers=3), tiny_windows(4)
    with LayerScores(model, "influence") as layers:
        activation_statistics(model, windows, batch_size=3, progress=False)
    torch.testing.assert_close(layers.scores().double(), block_influence(model, windows), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_layers_is_the_model_that_skips_them_and_generates_with_its_cache(family):
    model, windows = tiny_model(family, num_hidden_layers=4), tiny_windows(2)
    skip = [model.model.layers[i].register_forward_hook(
        lambda m, args, kwargs, out: (args[0] if args else kwargs["hidden_states"]), with_kwargs=True) for i in (1, 2)]
    with torch.no_grad():
        expected = model(windows).logits
        generated = model.generate(windows[:1, :5], max_new_tokens=6, do_sample=False)
    for handle in skip:
        handle.remove()
    types = list(getattr(model.config, "layer_types", None) or [])
    remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    if types:
        assert model.config.layer_types == [types[0], types[3]]
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, expected)
        assert torch.equal(model.generate(windows[:1, :5], max_new_tokens=6, do_sample=False), generated)


def test_the_ratio_counts_the_dropped_layers():
    model = tiny_model("llama", num_hidden_layers=4)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    view = adapt(model).mlp(0)
    plan = plan_width(model, ratio=0.4, round_to=4, drop=1)
    kept_params = total - layer - 3 * (view.width - plan.width_after) * view.params_per_neuron()  # 3 layers stay
    assert plan.params_after == kept_params and abs(plan.achieved_ratio - 0.4) < 0.03
    depth_only = plan_width(model, keep=view.width, drop=2)
    assert depth_only.params_after == total - 2 * layer
    with pytest.raises(AllocationError, match="alone remove"):
        plan_width(model, ratio=0.05, round_to=4, drop=2)
    with pytest.raises(AllocationError, match="leaves none"):
        plan_width(model, ratio=0.5, round_to=4, drop=4, protected=[])


@pytest.mark.parametrize("method", ["hfprune", "sdmprune", "minitron", "flap"])
def test_prune_drops_the_lowest_scoring_layers_and_prunes_the_rest(method):
    model, windows = tiny_model("llama", num_hidden_layers=4), tiny_windows()
    pruned, report = prune(model, None, method, ratio=0.3, drop_layers=1, round_to=4, calibration_ids=windows,
                           progress=False)
    allocation = report.manifest["allocation"]
    scores = allocation["layer_scores"]
    assert allocation["dropped_layers"] == [min(range(4), key=scores.__getitem__)]
    assert sorted(int(i) for i in report.manifest["kept_neurons"]) == [i for i in range(4) if i not in allocation["dropped_layers"]]
    assert pruned.config.num_hidden_layers == 3 and allocation["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert abs(allocation["achieved_ratio"] - 0.3) < 0.03
    assert torch.equal(report.extra_scores["layer_importance"], torch.tensor(scores))
    assert len(model.model.layers) == 4  # the input is left whole


def test_a_pruned_and_dropped_model_saves_as_a_vanilla_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dir), "--drop-layers", "1", "--keep", "24", "--samples", "4", "--seq-len", "32",
                 "--round-to", "4", "--allocation", "global", "-o", str(out)]) == 0
    manifest = json.loads((out / "pruning.json").read_text())
    scores = manifest["allocation"]["layer_scores"]  # the tiny model has two layers
    assert manifest["allocation"]["dropped_layers"] == [scores.index(min(scores))]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    assert sum(p.numel() for p in model.parameters()) == manifest["allocation"]["params_after"]
    rows = run_summary(out)
    assert [row["kept"] for row in rows][manifest["allocation"]["dropped_layers"][0]] == 0 and len(rows) == 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_dropped_model_exports_to_gguf_from_the_source_models_template(family, tmp_path):
    model, windows = tiny_model(family, num_hidden_layers=4), tiny_windows()
    pruned, _ = prune(model, None, "hfprune", keep=24, drop_layers=2, round_to=4, calibration_ids=windows, progress=False)
    arch = GGUF_ARCH[model.config.model_type]
    path = tmp_path / "model.gguf"  # the template is the source model's, as `fidelprune export` uses it
    write_gguf(pruned, Template(path, arch, template_fields(model.config, arch), not model.config.tie_word_embeddings),
               path, "f32", dropped_layers=2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 2
    with pytest.raises(ExportError, match="has 4 layers, the model 2: it is not this model's base"):
        write_gguf(pruned, Template(path, arch, template_fields(model.config, arch), False), tmp_path / "no.gguf", "f32")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(windows).logits, pruned(windows).logits)


def test_gguf_refuses_a_model_whose_sliding_pattern_dropping_broke():
    model = tiny_model("gemma2", num_hidden_layers=4)  # sliding, full, sliding, full
    remove_layers(model, [3])  # sliding, full, sliding: llama.cpp's rule still holds
    check_attention_pattern(model.config)
    remove_layers(model, [1])  # sliding, sliding: the second would run as a full-attention layer
    with pytest.raises(ExportError, match="export to vllm instead"):
        check_attention_pattern(model.config)


def test_fidelprune_export_takes_the_base_template_of_a_dropped_model(tiny_dir, tiny_template, tmp_path):
    run, out = tmp_path / "run", tmp_path / "run.gguf"
    assert main(["prune", str(tiny_dir), "--drop-layers", "1", "--keep", "24", "--samples", "4", "--seq-len", "32",
                 "-o", str(run)]) == 0
    assert main(["export", str(run), "--template", str(tiny_template), "--outtype", "f32", "--no-check",
                 "-o", str(out)]) == 0
    assert int(GGUFReader(str(out)).fields["llama.block_count"].contents()) == 1

"""Pruning attention heads (--keep-heads, --keep-kv-heads; issue 50): head scores against plain references, the
surgery against a model whose removed heads are silenced, the parameter budget, and the output as users load it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from fidelprune import prune
from fidelprune.adapters import adapt
from fidelprune.allocation import plan_width
from fidelprune.cli import main
from fidelprune.deploy.gguf import GGUF_ARCH, Template, write_gguf
from fidelprune.objectives import get_objective
from fidelprune.scoring import HeadScores, activation_statistics, taylor_scores
from fidelprune.surgery import remove_heads

from conftest import template_fields, tiny_model, tiny_windows
from reference import head_norms, head_scores

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


@pytest.mark.parametrize("family", FAMILIES)
def test_head_taylor_scores_are_the_activation_form_over_each_heads_channels(family):
    model, windows = tiny_model(family, num_hidden_layers=2).double(), tiny_windows(4)
    objective = get_objective("entropy")
    with HeadScores(model, "taylor") as heads:
        taylor_scores(model, windows, objective, "activation", batch_size=2, progress=False)
    expected = head_scores(model, windows, objective)
    for index, score in heads.scores().items():
        torch.testing.assert_close(score.double(), expected[index], rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_norms_are_minitrons(family):
    model, windows = tiny_model(family, num_hidden_layers=2), tiny_windows(4)
    with HeadScores(model, "norm") as heads:
        activation_statistics(model, windows, batch_size=3, progress=False)
    expected = head_norms(model, windows)
    for index, score in heads.scores().items():
        torch.testing.assert_close(score.double(), expected[index], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("query,kv", [([0, 3], [0, 1]), ([2, 3], [1])])  # a head of each group; a whole KV group
def test_removing_heads_is_the_model_with_those_heads_silenced(family, query, kv):
    model, windows = tiny_model(family), tiny_windows(2)
    head_dim = adapt(model).attention(0).head_dim
    silenced = torch.zeros(model.config.num_attention_heads * head_dim)
    for h in query:
        silenced[h * head_dim:(h + 1) * head_dim] = 1
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] * silenced,))
             for layer in model.model.layers]
    with torch.no_grad():
        expected = model(windows).logits
        generated = model.generate(windows[:1, :5], max_new_tokens=6, do_sample=False)
    for hook in hooks:
        hook.remove()
    remove_heads(model, {i: (torch.tensor(query), torch.tensor(kv)) for i in range(2)})
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (len(query), len(kv))
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, expected)
        assert torch.equal(model.generate(windows[:1, :5], max_new_tokens=6, do_sample=False), generated)


def test_the_ratio_counts_the_heads():
    model = tiny_model("llama", num_hidden_layers=4)  # 4 query heads of 8 channels over 2 KV heads, hidden 32
    total = sum(p.numel() for p in model.parameters())
    plan = plan_width(model, keep=24, heads=(2, 1))
    attention = 4 * (2 * 8 * 2 * 32 + 1 * 2 * 8 * 32)  # per layer: 2 query heads (q rows, o columns), 1 KV head
    mlp = 4 * (48 - 24) * 3 * 32
    assert plan.params_after == total - attention - mlp and plan.query_heads_after == 2 and plan.kv_heads_after == 1


@pytest.mark.parametrize("method", ["hfprune", "sdmprune", "minitron"])
def test_prune_keeps_the_best_heads_of_each_group_and_counts_them(method):
    model, windows = tiny_model("llama", num_hidden_layers=3), tiny_windows()
    pruned, report = prune(model, None, method, ratio=0.35, keep_heads=1, round_to=4, calibration_ids=windows,
                           progress=False)
    allocation = report.manifest["allocation"]
    for layer, kept in allocation["kept_heads"].items():
        scores = torch.tensor(allocation["head_scores"][layer]).reshape(2, 2)
        assert kept == {"query": [0 * 2 + int(scores[0].argmax()), 2 + int(scores[1].argmax())], "kv": [0, 1]}
    assert allocation["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert abs(allocation["achieved_ratio"] - 0.35) < 0.03 and pruned.config.num_attention_heads == 2
    assert model.config.num_attention_heads == 4  # the input is left whole


def test_a_head_pruned_model_saves_vanilla_and_exports_to_gguf(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dir), "--keep-kv-heads", "1", "--keep", "24", "--samples", "4", "--seq-len", "32",
                 "-o", str(out)]) == 0
    manifest = json.loads((out / "pruning.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 8)
    assert sum(p.numel() for p in model.parameters()) == manifest["allocation"]["params_after"]
    source = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    arch = GGUF_ARCH["llama"]
    path = tmp_path / "gguf" / "model.gguf"
    path.parent.mkdir()
    write_gguf(model, Template(path, arch, template_fields(source.config, arch), False), path, "f32")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)


def test_the_sequential_refit_fits_o_proj_on_the_kept_heads_by_ridge_least_squares():
    model, windows = tiny_model("llama", num_hidden_layers=2).double(), tiny_windows(8, 16)
    captured = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(windows)
    hook.remove()
    pruned, report = prune(model, None, "hfprune", keep=24, keep_heads=1, reconstruct="sequential", round_to=4,
                           calibration_ids=windows, progress=False)
    query = torch.tensor(report.manifest["allocation"]["kept_heads"]["0"]["query"])
    channels = (query[:, None] * 8 + torch.arange(8)).reshape(-1)
    a = captured[0].reshape(-1, 32)  # layer 0's input is the dense model's: o_proj's dense input and output
    y = a @ model.model.layers[0].self_attn.o_proj.weight.T
    kept = a[:, channels]
    gram = kept.T @ kept
    ridge = 1e-3 * gram.diagonal().mean() * torch.eye(len(channels), dtype=gram.dtype)
    expected = torch.linalg.solve(gram + ridge, kept.T @ y).T
    # the Gram is summed from fp32 per-batch products (reconstruction.Gram): fp32-level agreement
    torch.testing.assert_close(pruned.model.layers[0].self_attn.o_proj.weight, expected, rtol=1e-3, atol=2e-6)
    fits = report.manifest["reconstruction"]["attention"]
    assert [f["layer"] for f in fits] == [0, 1] and all(f["error_after"] < f["error_before"] for f in fits)


def test_the_dry_run_shows_what_goes(tiny_dir, capsys):
    assert main(["prune", str(tiny_dir), "--keep-kv-heads", "1", "--keep", "24", "--seq-len", "32", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "pruning plan" in err and "4 query / 2 KV -> 2 / 1 in every layer" in err and "48 -> 24" in err

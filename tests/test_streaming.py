"""Layer-streamed scoring (--offload cpu, AdaptedModel.stream): the forward without gradients that keeps each
layer's input, the loss through the model's own head, and the backward one layer at a time from the last, recomputing
each layer, give the scores, kept neurons and refit weights of a whole-model pass, for every score form and
objective, the forward statistics and the reconstruction, on several families."""

from __future__ import annotations

import json

import pytest
import torch

from fidelprune import prune
from fidelprune.adapters import adapt
from fidelprune.cli import main
from fidelprune.objectives import get_objective
from fidelprune.scoring import HeadScores, LayerScores, taylor_scores

from conftest import tiny_model, tiny_windows

CASES = {
    "hfprune (entropy, activation form) + sequential refit": dict(method="hfprune", reconstruct="sequential"),
    "sdmprune (ce, then kd to the unmasked model)": dict(method="sdmprune"),
    "llm-pruner element1": dict(method="llm-pruner", form="element1"),
    "llm-pruner element2 + parallel refit": dict(method="llm-pruner", form="element2", reconstruct="parallel"),
    "wanda-sp (forward statistics)": dict(method="wanda-sp"),
    "minitron, global allocation + refit to the dense target": dict(
        method="minitron", allocation="global", reconstruct="sequential", reconstruct_target="dense"),
}
# LLaMA; Gemma-2's logit soft-capping and alternating sliding windows (the head and per-layer masks come from the
# model's own forward); Phi-3's fused gate_up; Qwen3's q/k norms.
FAMILIES = ("llama", "gemma2", "phi3", "qwen3")


def _prune(family: str, options: dict, **streaming):
    windows = tiny_windows(5, 12)  # 5 windows at batch 2: a short last batch too
    return prune(tiny_model(family), None, keep=24, calibration_ids=windows, batch_size=2, progress=False,
                 **options, **streaming)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_scores_are_the_whole_model_scores(family, case):
    whole, whole_report = _prune(family, CASES[case])
    streamed, streamed_report = _prune(family, CASES[case], stream_on="cpu")
    assert streamed_report.manifest["kept_neurons"] == whole_report.manifest["kept_neurons"]
    for layer, score in whole_report.scores.items():
        other = streamed_report.scores[layer]
        assert torch.allclose(other, score, rtol=1e-5, atol=1e-6 * score.abs().max()), layer
    for key, weight in whole.state_dict().items():
        assert torch.allclose(streamed.state_dict()[key], weight, rtol=1e-5, atol=1e-6), key
    assert streamed_report.manifest["execution"]["mode"] == "streamed"
    assert "execution" not in whole_report.manifest


def test_flap_streamed_with_its_bias_shift():
    whole, whole_report = _prune("llama-bias", {"method": "flap"})
    streamed, streamed_report = _prune("llama-bias", {"method": "flap"}, stream_on="cpu")
    assert streamed_report.manifest["kept_neurons"] == whole_report.manifest["kept_neurons"]
    for key, weight in whole.state_dict().items():
        assert torch.allclose(streamed.state_dict()[key], weight, rtol=1e-5, atol=1e-7), key


def test_the_streamed_pass_runs_layer_by_layer_and_leaves_the_input_model_as_it_was(monkeypatch):
    from fidelprune import scoring

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ran: list[int] = []
    original = adapt(model).run_layer.__func__
    monkeypatch.setattr(type(adapt(model)), "run_layer", lambda self, i, h, call: ran.append(i) or original(self, i, h, call))
    calls = []
    monkeypatch.setattr(scoring, "_streamed_backward",
                        lambda *a, _f=scoring._streamed_backward, **k: calls.append(1) or _f(*a, **k))
    pruned, report = prune(model, None, keep=24, calibration_ids=tiny_windows(2, 12), batch_size=2, progress=False,
                           stream_on="cpu")
    assert calls == [1]  # one batch, through the streamed backward
    assert ran == [0, 1, 1, 0]  # forward without gradients, then each layer again from the last
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not adapt(model).streamed and not adapt(pruned).streamed


def test_cli_offload_cpu_and_dry_run(tiny_dir, tmp_path, capsys):
    argv = ["prune", str(tiny_dir), "--keep", "24", "--samples", "4", "--seq-len", "16", "--method", "sdmprune"]
    assert main([*argv, "--dry-run", "-o", str(tmp_path / "dry")]) == 0
    plan = capsys.readouterr()
    assert "memory plan" in plan.out + plan.err and "peak on the device" in plan.out + plan.err
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
    assert main([*argv, "--offload", "cpu", "-o", str(tmp_path / "streamed")]) == 0
    assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
    streamed, whole = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in ("streamed", "whole"))
    assert streamed["kept_neurons"] == whole["kept_neurons"]
    assert streamed["execution"] == {"mode": "streamed", "device": "cpu", "weights_on": "cpu"}
    assert streamed["memory_plan"]["mode"] == "streamed" and whole["memory_plan"]["mode"] == "whole"


def test_offload_disk_keeps_the_weights_mapped_and_the_input_untouched(tiny_dir, tmp_path):
    """--offload disk: the weights stay memory-mapped from the input's safetensors files (a private mapping: the refit
    writing down_proj copies the pages it writes, never the file), the scores are the plain run's."""
    from conftest import tree_digest

    before = tree_digest(tiny_dir)
    common = f"prune {tiny_dir} --keep 24 --samples 4 --seq-len 32 --reconstruct sequential"
    assert main(f"{common} -o {tmp_path / 'plain'}".split()) == 0
    assert main(f"{common} --offload disk -o {tmp_path / 'disk'}".split()) == 0
    assert tree_digest(tiny_dir) == before
    plain, disk = (json.loads((tmp_path / name / "pruning.json").read_text()) for name in ("plain", "disk"))
    assert disk["kept_neurons"] == plain["kept_neurons"]
    assert disk["execution"]["offload"] == "disk" and disk["execution"]["weights_mapped_share"] == 1.0
    assert disk["memory_plan"]["mapped_bytes"] > 0 and disk["memory_plan"]["host_bytes"] == 0


def test_a_layers_tensors_come_back_as_they_were():
    """What on_device and stream put back: the very tensors a module had where the block left them unchanged (so
    memory-mapped weights stay mapped and nothing is copied back), the new values where it wrote them. A dtype
    stands in for the device (this machine has one): the move is the same `.to`."""
    from fidelprune.adapters import _Moved

    layer = torch.nn.Linear(4, 3)
    weight, bias = layer.weight.data_ptr(), layer.bias.data_ptr()
    moved = _Moved([layer], torch.float64)
    assert layer.weight.dtype == torch.float64
    with torch.no_grad():
        layer.bias.fill_(2.0)  # as the refit writes down_proj inside on_device
    moved.restore()
    assert layer.weight.data_ptr() == weight  # untouched: the original tensor's memory itself
    assert layer.bias.data_ptr() != bias and layer.bias.dtype == torch.float32 and torch.equal(layer.bias, torch.full((3,), 2.0))


@pytest.mark.parametrize("hooks", [LayerScores, HeadScores])
def test_streamed_layer_and_head_scores_are_the_whole_models(hooks):
    """--drop-layers and --keep-heads read their scores from hooks on the decoder layers and o_proj: a streamed
    backward, which runs each layer again from its kept input, gives them as a whole-model one does."""
    model, windows = tiny_model("llama", num_hidden_layers=3), tiny_windows(4)
    objective = get_objective("entropy")
    with hooks(model, "taylor") as whole:
        taylor_scores(model, windows, objective, "activation", batch_size=2, progress=False)
    adapted = adapt(model).stream("cpu")
    try:
        with hooks(adapted, "taylor") as streamed:
            taylor_scores(adapted, windows, objective, "activation", batch_size=2, progress=False)
    finally:
        adapted.unstream()
    torch.testing.assert_close(streamed.scores(), whole.scores(), rtol=1e-5, atol=0)

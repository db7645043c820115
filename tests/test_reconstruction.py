"""Reconstruction (least-squares refit of each pruned MLP's down_proj), fidelprune/reconstruction.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fidelprune import prune, read_manifest, save
from fidelprune.adapters import StopForward, adapt, mlp_views
from fidelprune.calibration import CalibrationConfig
from fidelprune.reconstruction import Gram, ReconstructionConfig, ReconstructionError, _refit, mlp_output_errors, obs_keep

from conftest import tiny_model, tiny_windows


def spanned_model(family: str, groups: int = 8):
    """A tiny model in which neuron 3t+2 of every layer is an exact linear combination of neurons 3t and 3t+1
    (same gate row, up row a*u_3t + b*u_3t+1, biases likewise), and scores that rank those neurons last."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(1)
    scores = {}
    with torch.no_grad():
        for view in mlp_views(model):
            gate, up = view.gate_up_weights()  # views, so Phi-3's fused projection is edited too
            gate_bias, up_bias = view.gate_up_biases()
            score = torch.ones(view.width)
            for t in range(groups):
                i, m, j = 3 * t, 3 * t + 1, 3 * t + 2
                a, b = torch.randn(2, generator=generator).tolist()
                gate[m] = gate[i]
                gate[j] = gate[i]
                up[j] = a * up[i] + b * up[m]
                if gate_bias is not None:
                    gate_bias[m] = gate_bias[i]
                    gate_bias[j] = gate_bias[i]
                    up_bias[j] = a * up_bias[i] + b * up_bias[m]
                score[j] = 0
            scores[view.index] = score
    return model, scores


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_exactly_spanned_neurons_are_restored_to_float_tolerance(family, mode):
    model, scores = spanned_model(family)
    width = mlp_views(model)[0].width
    windows, heldout = tiny_windows(16, 16), tiny_windows(4, 16, seed=3)
    pruned, report = prune(model, None, "magnitude", keep=width - 8, round_to=1, scores=scores, calibration_ids=windows,
                           reconstruct=mode, reconstruct_lambda=1e-12, progress=False)
    assert pruned.config.intermediate_size == width - 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(heldout).logits, model(heldout).logits, atol=1e-5, rtol=1e-5)
    layers = report.manifest["reconstruction"]["layers"]
    assert len(layers) == model.config.num_hidden_layers
    assert all(f["error_before"] > 1e-3 and f["error_after"] < 1e-3 for f in layers)
    # plain removal of the same neurons does not restore them
    plain, _ = prune(model, None, "magnitude", keep=width - 8, round_to=1, scores=scores, progress=False)
    with torch.no_grad():
        assert (plain(heldout).logits - model(heldout).logits).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama-bias", "gemma2", "phi3"])
def test_both_modes_reduce_held_out_layer_error(family):
    model = tiny_model(family, num_hidden_layers=3)
    windows, heldout = tiny_windows(24, 32), tiny_windows(8, 32, seed=1)
    common = dict(keep=32, round_to=1, calibration_ids=windows, progress=False)
    plain, _ = prune(model, None, "wanda-sp", **common)
    before = mlp_output_errors(model, plain, heldout)
    for mode in ("parallel", "sequential"):
        pruned, report = prune(model, None, "wanda-sp", reconstruct=mode, **common)
        after = mlp_output_errors(model, pruned, heldout)
        assert all(after[i] < before[i] for i in before), (mode, before, after)
        recon = report.manifest["reconstruction"]
        assert recon["mode"] == mode and recon["lambda"] == 1e-3 and recon["windows"]["same_as_scoring"]
        assert all(f["error_after"] < f["error_before"] for f in recon["layers"])


def _own_layer_errors(dense, pruned, windows, inputs_from):
    """Per layer ||MLP_dense(x) - MLP_pruned(x)|| / ||MLP_dense(x)|| with x the MLP input of `inputs_from`:
    what reconstruct() records, computed from the outside."""
    inputs = {}
    handles = [v.module.register_forward_pre_hook(lambda m, args, i=v.index: inputs.__setitem__(i, args[0])) for v in mlp_views(inputs_from)]
    with torch.no_grad():
        inputs_from(windows)
        for h in handles:
            h.remove()
        errors = {}
        for dv, pv in zip(mlp_views(dense), mlp_views(pruned)):
            y, y_hat = dv.module(inputs[dv.index]).double(), pv.module(inputs[dv.index]).double()
            errors[dv.index] = ((y - y_hat).norm() / y.norm()).item()
    return errors


@pytest.mark.parametrize("family,method", [("llama", "flap"), ("gemma2", "wanda-sp"), ("llama-bias", "wanda-sp")])
@pytest.mark.parametrize("mode,target", [("parallel", "layer"), ("sequential", "layer"), ("sequential", "dense")])
def test_recorded_errors_match_the_saved_model(family, method, mode, target):
    """The layer-by-layer propagation (recorded decoder-layer calls, FLAP's fitted intercept) feeds every layer
    exactly what the finished model feeds it: parallel the dense inputs, sequential the pruned ones; the dense
    target is the dense model's MLP output end to end."""
    model = tiny_model(family, num_hidden_layers=3)
    windows = tiny_windows(8, 16)
    pruned, report = prune(model, None, method, keep=32, round_to=1, calibration_ids=windows, reconstruct=mode,
                           reconstruct_target=target, progress=False)
    recorded = {f["layer"]: f["error_after"] for f in report.manifest["reconstruction"]["layers"]}
    if target == "dense":
        measured = mlp_output_errors(model, pruned, windows)
    else:
        measured = _own_layer_errors(model, pruned, windows, model if mode == "parallel" else pruned)
    for i in recorded:
        assert recorded[i] == pytest.approx(measured[i], rel=1e-3, abs=1e-4)
    if method == "flap":
        assert report.manifest["reconstruction"]["replaces"].startswith("flap")
        assert all(v.down.bias is not None for v in mlp_views(pruned))


def test_layer_by_layer_propagation_reproduces_the_model(family):
    model = tiny_model(family, num_hidden_layers=3)
    windows = tiny_windows(6, 16)
    adapted = adapt(model)
    layers = adapted.layers
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
               for layer in layers]
    with torch.no_grad():
        model(windows[:4], use_cache=False)
        model(windows[4:], use_cache=False)  # a second batch shape: calls are recorded per shape
    for h in handles:
        h.remove()
    hidden, calls = [], {}
    with torch.no_grad(), adapted.recording(hidden, calls, torch.device("cpu")):
        for batch in (windows[:4], windows[4:]):
            with pytest.raises(StopForward):
                model(batch, use_cache=False)
    assert len(calls) == 2 and len(hidden) == 2
    assert all(type(layer).forward is layer.forward.__func__ for layer in layers)  # stubs removed
    for b in range(2):
        h = hidden[b]
        for index in range(len(layers)):
            torch.testing.assert_close(h, inputs[b * len(layers) + index], atol=1e-6, rtol=1e-6)
            with torch.no_grad():
                h = adapted.run_layer(index, h, calls[tuple(h.shape)][index])


def test_save_reload_gives_the_same_logits(family, tmp_path):
    model = tiny_model(family)
    windows = tiny_windows(8, 16)
    pruned, report = prune(model, None, "minitron", 0.15, round_to=4, calibration_ids=windows,
                           reconstruct="sequential", reconstruct_lambda=1e-2, progress=False)
    out = save(pruned, None, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # vanilla transformers
    assert reloaded.config.intermediate_size == pruned.config.intermediate_size < model.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows).logits, pruned(windows).logits)
    recon = read_manifest(out)["reconstruction"]
    assert recon["mode"] == "sequential" and recon["lambda"] == 1e-2 and recon["tokens"] == windows.numel()
    assert recon["bias_refit"] == (family == "llama-bias")
    assert {"layer", "error_before", "error_after", "lambda_used"} <= recon["layers"][0].keys()
    assert list(load_file(str(out / "fidelprune" / "calibration.safetensors"))) == ["input_ids"]  # the scoring windows, reused


def test_separate_windows_are_used_and_saved(tmp_path):
    model = tiny_model("llama")
    windows, other = tiny_windows(6, 12), tiny_windows(10, 12, seed=5)
    pruned, report = prune(model, None, "wanda-sp", keep=32, calibration_ids=windows, reconstruct="parallel",
                           reconstruct_calibration=other, progress=False)
    recon = report.manifest["reconstruction"]
    assert recon["windows"] == {"same_as_scoring": False, "source": "given token ids", "samples": 10, "seq_len": 12}
    assert recon["tokens"] == other.numel()
    same, _ = prune(model, None, "wanda-sp", keep=32, calibration_ids=windows, reconstruct="parallel", progress=False)
    assert not torch.equal(mlp_views(same)[0].down.weight, mlp_views(pruned)[0].down.weight)
    out = save(pruned, None, report, tmp_path / "out")
    saved = load_file(str(out / "fidelprune" / "calibration.safetensors"))
    assert torch.equal(saved["input_ids"], windows) and torch.equal(saved["reconstruction_ids"], other)


def test_data_free_method_reconstructs_on_given_windows_and_protected_layers_stay_dense():
    model = tiny_model("llama", num_hidden_layers=3)
    windows = tiny_windows(6, 12)
    pruned, report = prune(model, None, "magnitude", keep=32, protect_first=1, calibration_ids=windows,
                           reconstruct="sequential", progress=False)
    assert [f["layer"] for f in report.manifest["reconstruction"]["layers"]] == [1, 2]
    assert report.manifest["scoring_tokens_per_s"] is None
    for dense, kept in zip(mlp_views(model)[:1], mlp_views(pruned)[:1]):
        assert torch.equal(dense.down.weight, kept.down.weight)
    assert "reconstruction" in report.summary() and "->" in report.summary()["reconstruction"]


@pytest.mark.parametrize("kwargs,message", [
    ({"reconstruct": "both"}, "unknown reconstruction mode"),
    ({"reconstruct": "sequential", "reconstruct_target": "model"}, "unknown reconstruction target"),
    ({"reconstruct": "parallel", "reconstruct_lambda": 0}, "positive"),
    ({"reconstruct": "parallel", "reconstruct_lambda": -1e-3}, "positive"),
    ({"reconstruct": "parallel", "reconstruct_lambda": float("nan")}, "positive"),
    ({"reconstruct": "none", "reconstruct_samples": 8}, "reconstruct is 'none'"),
    ({"reconstruct": "sequential", "calibration_ids": None}, "reconstruction needs a tokenizer"),
    ({"reconstruct": "sequential", "reconstruct_select": "best"}, "unknown reconstruction selection"),
    ({"reconstruct": "none", "reconstruct_select": "obs"}, "choose --reconstruct parallel or sequential"),
])
def test_bad_options_are_one_line_errors_before_any_compute(kwargs, message):
    model = tiny_model("llama")
    kwargs = {"calibration_ids": tiny_windows(), **kwargs}
    with pytest.raises(ValueError, match=message) as err:
        prune(model, None, "magnitude", keep=32, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def _gram_of(view, windows, model):
    gram = Gram(view.width, torch.device("cpu"))
    handle = view.down.register_forward_pre_hook(lambda m, args: gram.add(args[0]))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return gram


def test_cholesky_failure_retries_with_a_larger_lambda_never_garbage(monkeypatch):
    model = tiny_model("llama")
    view = mlp_views(model)[0]
    gram = _gram_of(view, tiny_windows(8, 16), model)
    kept = torch.arange(0, 48, 2)
    real = torch.linalg.cholesky_ex
    failures = iter([True, True])

    def flaky(matrix, **kw):
        factor, info = real(matrix, **kw)
        return factor, torch.ones_like(info) if next(failures, False) else info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    with pytest.warns(RuntimeWarning, match="Cholesky failed"):
        fit, _ = _refit(copy.deepcopy(view), gram, kept, 1e-3)
    assert fit.lambda_used == pytest.approx(1e-1) and fit.error_after < fit.error_before
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m, **kw: (m, torch.ones((), dtype=torch.int32)))
    before = view.down.weight.clone()
    with pytest.warns(RuntimeWarning), pytest.raises(ReconstructionError, match="singular"):
        _refit(view, gram, kept, 1e-3)
    assert torch.equal(view.down.weight, before)  # nothing written
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    fit, _ = _refit(view, gram, kept, 5.0)  # a ridge this strong does worse than plain removal: plain is kept
    assert not fit.refit and fit.error_after == fit.error_before and "plain removal kept" in fit.note
    assert torch.equal(view.down.weight[:, kept], before[:, kept]) and not view.down.weight[:, 1::2].any()
    gram.matrix[0, 0] = float("nan")
    with pytest.raises(ReconstructionError, match="non-finite"):
        _refit(view, gram, kept, 1e-3)


def test_cli_reconstructs_by_default_and_takes_the_options(tiny_dir, tmp_path, capsys):
    from fidelprune.cli import main
    from fidelprune.reconstruction import DEFAULT_MODE

    common = ["prune", str(tiny_dir), "--method", "wanda-sp", "--keep", "32", "--samples", "4", "--seq-len", "32"]
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    recon = json.loads((tmp_path / "default" / "pruning.json").read_text())["reconstruction"]
    assert recon["mode"] == DEFAULT_MODE != "none" and recon["windows"]["same_as_scoring"]
    assert main([*common, "--reconstruct", "parallel", "--reconstruct-lambda", "0.01", "--reconstruct-samples", "6",
                 "--output", str(tmp_path / "separate")]) == 0
    recon = json.loads((tmp_path / "separate" / "pruning.json").read_text())["reconstruction"]
    assert recon["mode"] == "parallel" and recon["lambda"] == 0.01
    assert recon["windows"]["samples"] == 6 and recon["windows"]["seed"] == 1 and not recon["windows"]["same_as_scoring"]
    assert load_file(str(tmp_path / "separate" / "fidelprune" / "calibration.safetensors"))["reconstruction_ids"].shape == (6, 32)
    assert main([*common, "--reconstruct", "none", "--output", str(tmp_path / "none")]) == 0
    assert json.loads((tmp_path / "none" / "pruning.json").read_text())["reconstruction"] == {"mode": "none"}
    capsys.readouterr()
    assert main([*common, "--reconstruct-lambda", "0", "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "positive" in err and not (tmp_path / "bad").exists()


def _ridge_objective(gram: Gram, dense: torch.Tensor, keep: list[int], lam: float, scale: float) -> float:
    """min_c ||A_K c - Y||^2 + lam * scale * ||c||^2 for Y = A W^T, by a fresh solve on the kept columns only."""
    g = gram.matrix[:-1, :-1]
    t = g @ dense
    h = g[keep][:, keep] + lam * scale * torch.eye(len(keep), dtype=g.dtype)
    return float((dense * t).sum() - (t[keep] * torch.linalg.solve(h, t[keep])).sum())


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_obs_selection_is_the_greedy_removal_it_claims(lam):
    """One neuron per round, obs_keep removes at each step the neuron whose removal (with the others refit from
    scratch) raises the ridge objective least: checked step by step against fresh solves."""
    model = tiny_model("llama")
    view = mlp_views(model)[0]
    gram = _gram_of(view, tiny_windows(8, 16), model)
    dense = view.down.weight.detach().T.double()
    scale = float(gram.matrix.diagonal()[:view.width].mean())
    kept = list(range(view.width))
    for removed in range(1, 7):
        costs = {i: _ridge_objective(gram, dense, [k for k in kept if k != i], lam, scale) for i in kept}
        kept.remove(min(costs, key=costs.get))
        assert obs_keep(view, gram, view.width - removed, lam, rounds=10_000).tolist() == kept
    # batched rounds keep the count, and on this layer choose almost the same neurons
    batched = obs_keep(view, gram, view.width - 24, lam, rounds=4)
    exact = obs_keep(view, gram, view.width - 24, lam, rounds=10_000)
    assert len(batched) == view.width - 24 and len(set(batched.tolist()) & set(exact.tolist())) >= view.width - 28


@pytest.mark.parametrize("family,mode", [("llama-bias", "sequential"), ("gemma2", "parallel")])
def test_obs_selection_prunes_what_it_refit_and_beats_the_scores_choice(family, mode):
    """--reconstruct-select obs: same widths as the method's choice; the kept neurons recorded in pruning.json are
    the ones the saved model has (its recorded errors are its own); a lower refit error than the scores' choice."""
    model = tiny_model(family, num_hidden_layers=3)
    windows = tiny_windows(8, 16)
    common = dict(keep=32, round_to=1, calibration_ids=windows, reconstruct=mode, progress=False)
    by_scores, scores_report = prune(model, None, "wanda-sp", **common)
    by_obs, report = prune(model, None, "wanda-sp", reconstruct_select="obs", **common)
    recon = report.manifest["reconstruction"]
    assert recon["select"].startswith("greedy structured OBS") and report.manifest["settings"]["reconstruction"]["select"] == "obs"
    assert [v.width for v in mlp_views(by_obs)] == [v.width for v in mlp_views(by_scores)] == [32] * 3
    kept = report.manifest["kept_neurons"]
    assert kept != scores_report.manifest["kept_neurons"]
    for view, dense in zip(mlp_views(by_obs), mlp_views(model)):
        gate = dense.gate_up_weights()[0][torch.tensor(kept[str(view.index)])]
        assert torch.equal(view.gate_up_weights()[0], gate)
    recorded = {f["layer"]: f["error_after"] for f in recon["layers"]}
    measured = _own_layer_errors(model, by_obs, windows, model if mode == "parallel" else by_obs)
    assert all(recorded[i] == pytest.approx(measured[i], rel=1e-3, abs=1e-4) for i in recorded)
    if family == "llama-bias":
        assert all(v.down.bias is not None for v in mlp_views(by_obs))
    mean = lambda r: r.manifest["reconstruction"]["mean_error_after"]  # noqa: E731
    assert mean(report) < mean(scores_report)


def test_the_refits_own_windows_default_to_the_scoring_count_and_the_next_seed():
    scoring = CalibrationConfig("c4", samples=64, seed=3)
    assert ReconstructionConfig("sequential", samples=256).own_draw(scoring) == ("c4", 256, 4)
    assert ReconstructionConfig("sequential", calibration="other.txt", seed=9).own_draw(scoring) == ("other.txt", 64, 9)

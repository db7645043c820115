"""`--allocation search` (fidelprune/search.py): the fitness is the pruned model's KL to the dense model, the
widths stay on budget, and the search is seeded and never ends worse than where it started."""

import json
import random

import pytest
import torch

from fidelprune import load_model
from fidelprune.adapters import adapt
from fidelprune.allocation import AllocationConfig, AllocationError
from fidelprune.cli import main
from fidelprune.errors import ConfigError
from fidelprune.evaluation import plot_run
from fidelprune.pruning import prune
from fidelprune.reconstruction import reconstruct
from fidelprune.search import SearchSpace, search_space, search_widths
from fidelprune.surgery import remove_neurons

from conftest import tiny_model, tiny_windows


def _reference_kl(model, windows, scores, widths, refit_windows=None, lam=1e-3):
    """The fitness the slow way: copy the model, keep each layer's top-w neurons (refit as --reconstruct parallel
    when refit_windows are given), cut them out and run the whole model."""
    dense = adapt(model)
    pruned = dense.copy()
    kept = {i: torch.argsort(scores[i], descending=True, stable=True)[:w].sort().values for i, w in widths.items()}
    kept = {i: kept.get(i, torch.arange(len(scores[i]))) for i in range(dense.num_layers)}
    if refit_windows is not None:
        reconstruct(pruned, kept, refit_windows, "parallel", lam, progress=False)
    remove_neurons(pruned, kept)
    with torch.no_grad():
        log_p = model(windows).logits.double().log_softmax(-1)
        log_q = pruned.model(windows).logits.double().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "llama-bias", "gemma3"])
@pytest.mark.parametrize("refit", [False, True])
def test_fitness_is_the_pruned_models_kl_to_the_dense_model(family, refit):
    model = tiny_model(family, num_hidden_layers=4)
    adapted = adapt(model)
    scores = {i: torch.randn(48, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    windows, refit_windows = tiny_windows(3, 10), tiny_windows(6, 10, seed=1)
    layers = [0, 1, 3]  # layer 2 protected: stays whole
    space = search_space(scores, layers, 24, 4, None, 8)
    found = search_widths(adapted, scores, space, windows, AllocationConfig("search", round_to=4, search_generations=0),
                          refit_windows=refit_windows if refit else None, batch_size=2, progress=False)
    assert len(found.record["starts"]) == 3
    for start in found.record["starts"]:
        widths = dict(zip(layers, start["widths"]))
        expected = _reference_kl(model, windows, scores, widths, refit_windows if refit else None)
        assert start["fitness"] == pytest.approx(expected, rel=1e-4, abs=1e-7), start["name"]


def test_children_rerun_from_their_first_change_exactly():
    """A child's fitness, computed on the parent's cached layer inputs, equals its fitness from scratch."""
    model = tiny_model("llama", num_hidden_layers=5)
    scores = {i: torch.randn(48, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    windows = tiny_windows(3, 10)
    config = AllocationConfig("search", round_to=4, search_generations=4, search_offspring=3)
    space = search_space(scores, list(range(5)), 28, 4, None, 4)
    found = search_widths(adapt(model), scores, space, windows, config, batch_size=2, progress=False)
    assert found.record["final_fitness"] == pytest.approx(
        _reference_kl(model, windows, scores, found.widths), rel=1e-4, abs=1e-7)


def test_the_search_puts_back_every_down_proj_forward_as_it_found_it():
    """Candidates swap down_proj's forward for their cut one; a forward set on the instance before (as accelerate's
    hooks set one) is there again afterwards, and the others are the class's own again."""
    model = tiny_model("llama", num_hidden_layers=3)
    adapted = adapt(model)
    scores = {i: torch.randn(48, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    hooked = adapted.mlp(1).down
    wrapper = hooked.forward = lambda x, own=hooked.forward: own(x)  # an instance forward, like accelerate's
    space = search_space(scores, [0, 1, 2], 28, 4, None, 4)
    config = AllocationConfig("search", round_to=4, search_generations=2, search_offspring=3)
    found = search_widths(adapted, scores, space, tiny_windows(3, 10), config, refit_windows=tiny_windows(4, 10, seed=1),
                          batch_size=2, progress=False)
    assert any(w < 48 for w in found.widths.values())  # candidates did cut layers
    assert hooked.forward is wrapper
    assert all("forward" not in vars(adapted.mlp(i).down) for i in (0, 2))


def test_widths_keep_the_budget_and_bounds_and_the_search_is_seeded():
    model = tiny_model("llama", num_hidden_layers=6, intermediate_size=64)
    windows = tiny_windows(8, 16)
    common = dict(ratio=0.2, round_to=4, allocation="search", calibration_ids=windows, min_keep=16,
                  search_generations=6, search_offspring=4, progress=False)
    _, first = prune(model, None, "wanda-sp", **common)
    _, again = prune(model, None, "wanda-sp", **common)
    _, uniform = prune(model, None, "wanda-sp", ratio=0.2, round_to=4, calibration_ids=windows, progress=False)
    alloc = first.manifest["allocation"]
    widths = alloc["layer_widths_after"]
    assert widths == again.manifest["allocation"]["layer_widths_after"]
    assert sum(widths) == sum(uniform.manifest["allocation"]["layer_widths_after"])
    assert alloc["params_after"] == uniform.manifest["allocation"]["params_after"]
    assert all(w % 4 == 0 and 16 <= w <= 64 for w in widths)
    record = alloc["search"]
    assert record["final_fitness"] <= min(s["fitness"] for s in record["starts"])
    parents = [h["fitness"] for h in record["history"]]
    assert parents == sorted(parents, reverse=True)
    assert record["evaluations"] <= len(record["starts"]) + 6 * 4


def test_a_layer_that_matters_gets_more_width():
    """Layer 2's MLP carries the signal (its down_proj scaled up, the others scaled down): the search, starting
    from uniform with uninformative scores, moves width into it."""
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(20.0 if index == 2 else 0.05)
    scores = {i: torch.rand(48, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    space = search_space(scores, list(range(4)), 24, 4, None, 4)
    config = AllocationConfig("search", round_to=4, search_generations=12, search_offspring=6)
    found = search_widths(adapt(model), scores, space, tiny_windows(4, 12), config, batch_size=4, progress=False)
    assert found.widths[2] > 24 and found.widths[2] == max(found.widths.values())


def test_mutations_and_repair_stay_feasible():
    space = SearchSpace([0, 1, 2, 3], budget=96, lower=8, upper=[48, 48, 40, 48], round_to=4, step=8)
    rng = random.Random(0)
    widths = space.repair([24.0] * 4)
    assert widths == (24, 24, 24, 24)
    for _ in range(200):
        widths = space.mutate(widths, rng)
        assert space.feasible(widths)
    # clamped to [8, upper], then trimmed from the layers furthest above (least below) their target
    assert space.repair([48.0, 48.0, 48.0, 0.0]) == (28, 28, 32, 8)
    assert space.repair([10.0] * 4) == (24, 24, 24, 24)
    assert SearchSpace([0], budget=96, lower=8, upper=[48], round_to=4, step=8).repair([96.0]) is None


def test_search_space_bounds_a_layer_by_the_neurons_its_scores_rank():
    scores = {0: torch.tensor([1.0, 2.0, float("-inf"), 3.0] * 4), 1: torch.arange(16.0)}
    space = search_space(scores, [0, 1], 8, 4, None, None)
    assert space.upper == [12, 16] and space.budget == 16 and space.step == 4


def test_data_free_methods_and_saved_scores_search_on_drawn_windows(tiny_dir, tmp_path):
    out = tmp_path / "searched"
    assert main(["prune", str(tiny_dir), "--method", "magnitude", "--keep", "32", "--round-to", "4",
                 "--allocation", "search", "--samples", "4", "--seq-len", "16", "--search-samples", "2",
                 "--search-generations", "3", "--search-offspring", "2", "--output", str(out)]) == 0
    manifest = json.loads((out / "pruning.json").read_text())
    assert manifest["calibration"]["samples"] == 4 and manifest["allocation"]["search"]["search_tokens"] == 2 * 16
    widths = manifest["allocation"]["layer_widths_after"]
    reloaded, _, _ = load_model(out)
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == widths
    png = plot_run(out, tmp_path / "search.png")  # the report's third panel: KL per generation
    assert png.stat().st_size > 0
    again = tmp_path / "again"
    assert main(["prune", str(tiny_dir), "--method", "magnitude", "--keep", "32", "--round-to", "4",
                 "--allocation", "search", "--samples", "4", "--seq-len", "16", "--search-samples", "2",
                 "--search-generations", "3", "--search-offspring", "2",
                 "--scores", str(out), "--output", str(again)]) == 0
    assert json.loads((again / "pruning.json").read_text())["allocation"]["layer_widths_after"] == widths


def test_the_search_refits_on_the_calibration_windows_whatever_the_reconstruction_windows(monkeypatch):
    """Separate reconstruction windows feed only the final refit: the in-loop refit of the search fits on the
    calibration windows, so the searched widths are those of a run without separate windows."""
    import fidelprune.pruning

    seen = []
    real = fidelprune.pruning.search_widths
    monkeypatch.setattr(fidelprune.pruning, "search_widths",
                        lambda *a, **k: seen.append(k["refit_windows"]) or real(*a, **k))
    calibration = tiny_windows(6, 12)
    options = dict(method="wanda-sp", keep=24, round_to=4, allocation="search", reconstruct="parallel", search_samples=2,
                   search_generations=3, search_offspring=2, calibration_ids=calibration, progress=False)
    _, alone = prune(tiny_model("llama"), None, **options)
    _, apart = prune(tiny_model("llama"), None, reconstruct_calibration=tiny_windows(9, 12, seed=1), **options)
    assert all(torch.equal(windows, calibration) for windows in seen) and len(seen) == 2
    assert apart.manifest["reconstruction"]["windows"]["samples"] == 9
    assert apart.manifest["allocation"]["search"]["widths"] == alone.manifest["allocation"]["search"]["widths"]
    assert apart.manifest["allocation"]["search"]["refit_in_loop"].endswith("(dense activations of 6 windows)")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"allocation": "uniform", "search_generations": 3}, AllocationError, "--allocation search only"),
    ({"allocation": "global", "search_seed": 1}, AllocationError, "--allocation search only"),
    ({"allocation": "uniform", "min_keep": 8}, AllocationError, "--min-keep applies to"),
    ({"allocation": "search", "search_step": 6}, AllocationError, "multiple of --round-to"),
    ({"allocation": "search", "search_samples": 0}, ConfigError, "--search-samples"),
    ({"allocation": "search", "search_samples": 9}, ConfigError, "more than the 6 calibration windows"),
    ({"allocation": "search", "min_keep": 48}, AllocationError, "--min-keep 48"),
    ({"allocation": "search", "method": "flap"}, AllocationError, "bias compensation"),
])
def test_bad_search_options_are_one_line_errors_before_any_compute(kwargs, error, message, monkeypatch):
    monkeypatch.setattr("fidelprune.pruning.search_widths", lambda *a, **k: pytest.fail("searched"))
    monkeypatch.setattr("fidelprune.pruning.run_method", lambda *a, **k: pytest.fail("scored"))
    kwargs = {"method": "wanda-sp", "keep": 24, "round_to": 4, "calibration_ids": tiny_windows(), **kwargs}
    with pytest.raises(error, match=message) as caught:
        prune(tiny_model("llama-bias"), None, progress=False, **kwargs)
    assert "\n" not in str(caught.value)

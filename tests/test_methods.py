"""The method registry, and the forward-only methods against tests/reference.py (every activation held at once,
formulas from docs/methods.md, "Baselines users will ask for"), with FLAP's bias compensation."""

import pytest
import torch

from fidelprune import prune
from fidelprune.adapters import adapt, mlp_views
from fidelprune.methods import METHODS, MethodConfig, get_method
from fidelprune.methods.base import METHOD_REGISTRY, DataFreeMethod, register_method
from fidelprune.scoring import activation_statistics

import reference
from conftest import tiny_model, tiny_windows

FORWARD = (("minitron", "mean"), ("minitron", "l2"), ("wanda-sp", "mean"), ("flap", "mean"))


def forward_scores(model, stats, method, aggregation):
    return get_method(method).scores_from(adapt(model), stats, MethodConfig(method, aggregation=aggregation))


def test_every_method_is_registered_with_a_kind():
    assert METHODS == ("hfprune", "sdmprune", "llm-pruner", "wanda-sp", "flap", "minitron", "magnitude", "random")
    kinds = {name: get_method(name).kind for name in METHODS}
    assert kinds == {"hfprune": "gradient", "sdmprune": "gradient", "llm-pruner": "gradient", "wanda-sp": "forward",
                     "flap": "forward", "minitron": "forward", "magnitude": "data-free", "random": "data-free"}


def test_the_old_name_activation_still_works_with_a_warning():
    """The Minitron method was called "activation", like HFPrune's score form; the old name is an alias."""
    model, windows = tiny_model("llama"), tiny_windows()
    with pytest.warns(FutureWarning, match="now called 'minitron'"):
        _, old = prune(model, None, "activation", keep=24, calibration_ids=windows, progress=False)
    _, new = prune(model, None, "minitron", keep=24, calibration_ids=windows, progress=False)
    assert old.manifest["method"]["method"] == "minitron"
    assert old.manifest["kept_neurons"] == new.manifest["kept_neurons"]


def test_a_registered_method_is_usable_by_name_everywhere(monkeypatch):
    """Adding a method is one registered class: prune() needs nothing else."""
    class LastNeurons(DataFreeMethod):
        name = "last-neurons"

        def neuron_scores(self, adapted, config):
            return {v.index: torch.arange(v.width, dtype=torch.float32) for v in adapted.mlps()}

    monkeypatch.setitem(METHOD_REGISTRY, "last-neurons", None)
    register_method(LastNeurons())
    _, report = prune(tiny_model("llama"), None, "last-neurons", keep=8, progress=False)
    assert report.manifest["kept_neurons"]["0"] == list(range(40, 48))


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_forward_scores_match_plain_formulas(family):
    model, windows = tiny_model(family), tiny_windows(5)
    stats = activation_statistics(model, windows, batch_size=2, progress=False)
    for method, aggregation in FORWARD:
        got = forward_scores(model, stats, method, aggregation)
        expected = reference.forward_scores(model, windows, method, aggregation)
        for i in expected:
            torch.testing.assert_close(got[i].double(), expected[i], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "llama-bias"])
def test_flap_bias_keeps_the_first_layers_mean_output(family):
    """The compensation W_down[:, removed] . mean(a[removed]) in the down_proj bias leaves the MLP's mean output
    over the calibration tokens unchanged (layer 0 sees identical inputs before and after pruning)."""
    model, windows = tiny_model(family), tiny_windows(6)
    pruned, _ = prune(model, None, "flap", keep=24, calibration_ids=windows, progress=False)

    def mean_mlp0_output(m):
        outs = []
        handle = mlp_views(m)[0].module.register_forward_hook(lambda mod, i, out: outs.append(out.reshape(-1, out.shape[-1])))
        with torch.no_grad():
            m(windows)
        handle.remove()
        return torch.cat(outs).double().mean(dim=0)

    assert pruned.config.mlp_bias is True
    torch.testing.assert_close(mean_mlp0_output(pruned), mean_mlp0_output(model), rtol=1e-4, atol=1e-5)


def test_flap_refuses_families_without_an_mlp_bias_option_before_compute():
    with pytest.raises(ValueError, match="no MLP bias option"):
        prune(tiny_model("qwen2"), None, "flap", 0.1, calibration_ids=tiny_windows(), progress=False)


def test_collecting_only_the_needed_statistics_changes_no_score():
    """Each method collects only the sums it reads; scores (and FLAP's bias shift) equal those from all three."""
    model, windows = tiny_model("llama"), tiny_windows(5)
    full = activation_statistics(model, windows, batch_size=2, progress=False)
    kept = {i: torch.arange(0, 48, 2) for i in full}
    flap = get_method("flap")
    for method, aggregation in FORWARD:
        statistics = get_method(method).statistics(MethodConfig(method, aggregation=aggregation))
        only = activation_statistics(model, windows, batch_size=2, progress=False, statistics=statistics)
        assert all(only[i].sum_abs is None for i in only) == ("sum_abs" not in statistics)
        got, expected = forward_scores(model, only, method, aggregation), forward_scores(model, full, method, aggregation)
        assert all(torch.equal(got[i], expected[i]) for i in expected)
    shifts, expected = flap.down_bias_shift(adapt(model), only, kept), flap.down_bias_shift(adapt(model), full, kept)
    assert all(torch.equal(shifts[i], expected[i]) for i in expected)


# ------------------------------------------------------------------------------------ iterative pruning (--steps)
def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


def _reference_iterative(model, windows, objective, scores_of, widths):
    """Iterative pruning written plainly: score with the reference implementation, physically remove the lowest
    neurons (surgery), score the smaller model again, and map its neurons back to the original indices."""
    import copy

    from fidelprune.surgery import remove_neurons

    current = copy.deepcopy(model)
    original = {v.index: torch.arange(v.width) for v in mlp_views(model)}
    for width in widths:
        scores = scores_of(current, windows, objective)
        keep = {i: _top(s.float(), width) for i, s in scores.items()}
        original = {i: original[i][keep[i]] for i in keep}
        remove_neurons(current, keep)
    return original, scores


@pytest.mark.parametrize("method,form,scores_of", [
    ("hfprune", "activation", reference.activation_scores),
    ("llm-pruner", "weight-element", reference.weight_element_scores),
])
def test_steps_rescore_the_pruned_model_as_a_physically_smaller_one(method, form, scores_of):
    """--steps 3 from 48 to 24 neurons (40, 32, 24): each step scores the model with the neurons removed so far (as a
    mask), which must rank exactly as scoring the physically smaller model does."""
    from fidelprune.objectives import ce, entropy

    model, windows = tiny_model("llama"), tiny_windows(4, 12)
    objective = entropy if method == "hfprune" else ce
    _, report = prune(model, None, method, keep=24, form=form, steps=3, calibration_ids=windows, batch_size=2,
                      progress=False)
    expected, last_scores = _reference_iterative(model, windows, objective, scores_of, [40, 32, 24])
    assert {int(i): k for i, k in report.manifest["kept_neurons"].items()} == {i: k.tolist() for i, k in expected.items()}
    assert [s["keep"] for s in report.manifest["stages"]] == [40, 32, 24]
    for i, score in report.scores.items():  # the last step's scores of the survivors of step 2, -inf elsewhere
        survivors = torch.isfinite(score)
        assert int(survivors.sum()) == 32
        torch.testing.assert_close(score[survivors].double(), last_scores[i], rtol=1e-4, atol=1e-9)
    assert set(report.extra_scores) == {f"step{s}.layer.{i}" for s in (1, 2) for i in (0, 1)}


def test_one_step_is_the_one_shot_method():
    model, windows = tiny_model("llama"), tiny_windows(4, 12)
    _, one_shot = prune(model, None, "hfprune", keep=24, calibration_ids=windows, progress=False)
    _, stepped = prune(model, None, "hfprune", keep=24, steps=1, calibration_ids=windows, progress=False)
    assert stepped.manifest["kept_neurons"] == one_shot.manifest["kept_neurons"]
    assert all(torch.equal(stepped.scores[i], s) for i, s in one_shot.scores.items())


def test_sdmprune_steps_run_its_stage_two_iteratively():
    model, windows = tiny_model("llama"), tiny_windows(4, 12)
    _, report = prune(model, None, "sdmprune", keep=24, steps=2, calibration_ids=windows, batch_size=2, progress=False)
    assert [s["name"] for s in report.manifest["stages"]] == ["stage1", "stage2-step1", "stage2-step2"]
    stage1 = report.manifest["stages"][0]["keep"]
    assert [s["keep"] for s in report.manifest["stages"][1:]] == [stage1 - round((stage1 - 24) / 2), 24]
    assert all(len(k) == 24 for k in report.manifest["kept_neurons"].values())


def test_steps_are_for_gradient_methods():
    from fidelprune.errors import ConfigError

    with pytest.raises(ConfigError, match="--steps"):
        MethodConfig("wanda-sp", steps=2)
    with pytest.raises(ConfigError, match="--steps must be at least 1"):
        MethodConfig("hfprune", steps=0)

"""Forward-only baselines against fidelprune.reference (every activation held at once, formulas from
../shared/docs/methods.md, "Baselines users will ask for"), and FLAP's bias compensation."""

import pytest
import torch

from conftest import tiny_model, tiny_windows
from fidelprune import prune, reference
from fidelprune.adapters import mlp_views
from fidelprune.scoring import activation_statistics, flap_bias_shift, forward_scores, needed_statistics


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_forward_scores_match_plain_formulas(family):
    model, windows = tiny_model(family), tiny_windows(5)
    stats = activation_statistics(model, windows, batch_size=2, progress=False)
    for method, aggregation in (("activation", "mean"), ("activation", "l2"), ("wanda-sp", "mean"), ("flap", "mean")):
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
    for method, aggregation in (("activation", "mean"), ("activation", "l2"), ("wanda-sp", "mean"), ("flap", "mean")):
        statistics = needed_statistics(method, aggregation)
        only = activation_statistics(model, windows, batch_size=2, progress=False, statistics=statistics)
        assert all(only[i].sum_abs is None for i in only) == ("sum_abs" not in statistics)
        got, expected = forward_scores(model, only, method, aggregation), forward_scores(model, full, method, aggregation)
        assert all(torch.equal(got[i], expected[i]) for i in expected)
    shifts, expected = flap_bias_shift(model, only, kept), flap_bias_shift(model, full, kept)
    assert all(torch.equal(shifts[i], expected[i]) for i in expected)

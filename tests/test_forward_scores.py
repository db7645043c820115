"""Forward-only baselines against plain references from ../shared/docs/methods.md ("Baselines users will ask for")."""

import pytest
import torch

from conftest import tiny_model, tiny_windows
from fidelprune import prune
from fidelprune.adapters import mlp_views
from fidelprune.scoring import activation_statistics, forward_scores


def captured_activations(model, windows):
    """a[layer] = every calibration token's down_proj input, [N*L, I], via a plain hook."""
    acts = {}
    handles = [v.down.register_forward_pre_hook(lambda m, args, i=v.index: acts.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
               for v in mlp_views(model)]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in handles:
        h.remove()
    return {i: torch.cat(a).double() for i, a in acts.items()}


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_forward_scores_match_plain_formulas(family):
    model, windows = tiny_model(family), tiny_windows(5)
    acts = captured_activations(model, windows)
    stats = activation_statistics(model, windows, batch_size=2, progress=False)
    for view in mlp_views(model):
        a, down = acts[view.index], view.down.weight.detach().double()
        flap = a.var(dim=0, unbiased=False) * down.square().sum(dim=0)
        expected = {
            ("activation", "mean"): a.abs().mean(dim=0),
            ("activation", "l2"): a.norm(dim=0),
            ("wanda-sp", "mean"): down.abs().sum(dim=0) * a.norm(dim=0),
            ("flap", "mean"): (flap - flap.mean()) / flap.std(),
        }
        for (method, aggregation), reference in expected.items():
            got = forward_scores(model, stats, method, aggregation)[view.index].double()
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)


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

import pytest
import torch
from transformers import AutoModelForCausalLM

from fidelprune import UnsupportedModelError, prune, save
from fidelprune.adapters import get_adapter, mlp_views
from fidelprune.scoring import MLPHooks

from conftest import tiny_model, tiny_windows


def test_prune_save_reload_gives_same_logits(family, tmp_path):
    model = tiny_model(family)
    windows = tiny_windows()
    pruned, report = prune(model, None, "llm-pruner", 0.15, calibration_ids=windows, round_to=4, progress=False)
    save(pruned, None, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # vanilla transformers, no custom code
    assert reloaded.config.intermediate_size == pruned.config.intermediate_size < model.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows).logits, pruned(windows).logits)
    assert sum(p.numel() for p in reloaded.parameters()) == report.manifest["allocation"]["params_after"]


def test_zeroing_neurons_equals_removing_them(family):
    model = tiny_model(family)
    windows = tiny_windows()
    pruned, report = prune(model, None, "random", keep=20, progress=False)
    kept = {int(i): torch.tensor(k) for i, k in report.manifest["kept_neurons"].items()}
    with torch.no_grad(), MLPHooks(model, form=None, mask=kept):
        masked_logits = model(windows).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(windows).logits, masked_logits)


def test_input_model_is_left_untouched(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, None, "hfprune", 0.1, calibration_ids=tiny_windows(), round_to=1, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad or p.requires_grad for p in model.parameters())
    assert [v.width for v in mlp_views(model)] == [model.config.intermediate_size] * model.config.num_hidden_layers


def test_fused_gate_up_is_sliced_consistently():
    model = tiny_model("phi3")
    view = mlp_views(model)[0]
    gate, up = view.gate_up_weights()
    assert view.gate_up is not None and gate.shape == up.shape == (48, 32)


def test_unsupported_architecture_names_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama.*qwen2"):
        get_adapter(model)
    with pytest.raises(UnsupportedModelError):
        prune(model, None, "magnitude", 0.1)

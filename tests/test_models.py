import pytest
import torch

from fidelprune import ModelLoadError, load_model, prune, save
from fidelprune.models import load_pruned

from conftest import tiny_model, tiny_windows


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_non_uniform_widths_reload_with_the_same_logits(family, tmp_path):
    model, windows = tiny_model(family, num_hidden_layers=4), tiny_windows()
    pruned, report = prune(model, None, "minitron", 0.1, allocation="global", protect_last=1, round_to=4,
                           calibration_ids=windows, progress=False)
    widths = report.manifest["allocation"]["layer_widths_after"]
    assert len(set(widths)) > 1 and widths[-1] == 48
    save(pruned, None, report, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert [m.mlp.down_proj.in_features for m in reloaded.model.layers] == widths
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows).logits, pruned(windows).logits)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")

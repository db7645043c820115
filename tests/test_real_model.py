"""The packaged SmolLM2-135M-Instruct, pruned for real on a few calibration windows."""

import math

import pytest

import fidelprune
from fidelprune.evaluation import perplexity


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, source = fidelprune.load_model("smollm2", dtype="float32", device="cpu")
    return model, tokenizer, source


def test_hfprune_beats_random_at_20_percent_on_wikitext2(smollm2):
    model, tokenizer, source = smollm2
    ppl = {}
    for method in ("hfprune", "random"):
        pruned, report = fidelprune.prune(model, tokenizer, method, 0.2, samples=8, seq_len=128, progress=False, source=source)
        assert abs(report.manifest["allocation"]["achieved_ratio"] - 0.2) < 0.005
        ppl[method] = perplexity(pruned, tokenizer, "wikitext2", seq_len=128, limit_windows=16, progress=False).ppl
        del pruned
    dense = perplexity(model, tokenizer, "wikitext2", seq_len=128, limit_windows=16, progress=False).ppl
    assert all(math.isfinite(p) for p in ppl.values())
    assert dense < ppl["hfprune"] < ppl["random"], (dense, ppl)

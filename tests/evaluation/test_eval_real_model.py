"""The packaged SmolLM2-135M-Instruct, dense, on a small slice: WikiText-2 perplexity and ARC-Easy accuracy.
The full-set numbers, with the commands that produced them, are in docs/evaluation.md."""

import math

import pytest

import fidelprune
from fidelprune.evaluation import perplexity, zeroshot


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = fidelprune.load_model("smollm2", dtype="float32", device="cpu")
    return model, tokenizer


def test_dense_smollm2_wikitext2_ppl_and_arc_easy_are_sane(smollm2):
    model, tokenizer = smollm2
    ppl = perplexity(model, tokenizer, "wikitext2", seq_len=128, limit_windows=8, progress=False)
    assert ppl.windows == 8 and math.isfinite(ppl.ppl)
    assert 10 < ppl.ppl < 150  # a 135M model at 128-token windows; random weights give ~ the vocabulary size
    arc = zeroshot(model, tokenizer, "arc_easy", limit=20).tasks["arc_easy"]
    assert arc.n == 20
    for metric in ("acc", "acc_norm"):
        assert 0.15 <= arc.metrics[metric] <= 1.0 and math.isfinite(arc.metrics[metric])

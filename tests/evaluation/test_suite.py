"""fidelprune.evaluate on in-memory models: one protocol for the model and its baseline, one results document."""

import json

import pytest

import fidelprune
from fidelprune.evaluation import EvalConfig, load_corpus

from eval_helpers import smollm2_tokenizer, tiny_lm


def test_evaluate_in_memory_model_beside_baseline(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(load_corpus("ptb")[:3000])
    tokenizer = smollm2_tokenizer()
    results = fidelprune.evaluate(tiny_lm(seed=1), tokenizer, baseline=(tiny_lm(seed=2), tokenizer), ppl=str(corpus),
                                  tasks="boolq", limit=2, seq_len=16, limit_windows=3, prompt_len=8, new_tokens=2,
                                  repeats=1, speed_devices="cpu", progress=False)
    assert results["protocol"]["ppl"] == [str(corpus)] and results["protocol"]["tasks"] == ["boolq"]
    for role in ("model", "baseline"):
        assert results[role]["perplexity"][str(corpus)]["windows"] == 3
        assert results[role]["zeroshot"]["tasks"]["boolq"]["n"] == 2
    # different random weights, same protocol: the rows carry both numbers and their difference
    ppl_row = results["comparison"][0]
    assert ppl_row["delta"] == pytest.approx(ppl_row["model"] - ppl_row["baseline"]) and ppl_row["delta"] != 0
    # both answered the same two documents, kept by id, so the accuracy delta is also paired
    boolq = next(r for r in results["comparison"] if r["metric"].startswith("boolq acc*"))
    outcomes = [results[role]["zeroshot"]["tasks"]["boolq"]["per_item"] for role in ("model", "baseline")]
    assert boolq["delta"] == pytest.approx((sum(outcomes[0]) - sum(outcomes[1])) / 2)
    assert boolq["paired"]["only_model"] + boolq["paired"]["only_baseline"] == sum(a != b for a, b in zip(*outcomes))
    json.dumps(results)  # results.json-ready as returned


def test_config_from_user_values():
    config = EvalConfig.build("wikitext2, ptb", "none", speed_devices="cpu")
    assert config.ppl == ["wikitext2", "ptb"] and config.tasks == [] and config.speed_devices == ["cpu"]
    assert EvalConfig.build("none", "piqa").ppl == []
    assert EvalConfig().tasks == ["arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa"]


def test_evaluate_takes_the_protocol_as_a_config_or_as_keywords_not_both():
    model, tokenizer = tiny_lm(), smollm2_tokenizer()
    config = EvalConfig.build(ppl="none", tasks="none", speed=False)
    results = fidelprune.evaluate(model, tokenizer, config)
    assert results["protocol"]["tasks"] == [] and results["protocol"]["speed"] is False
    with pytest.raises(TypeError, match="not both"):
        fidelprune.evaluate(model, tokenizer, config, limit=3)

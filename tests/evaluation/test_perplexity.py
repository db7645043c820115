"""Perplexity against an explicit loop over windows, on a tiny model with the real tokenizer."""

import math

import pytest
import torch
import torch.nn.functional as F

from fidelprune.evaluation import CORPORA, load_corpus, perplexity

from eval_helpers import smollm2_tokenizer, tiny_lm


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(load_corpus("wikitext2")[:4000], encoding="utf-8")
    return path


def reference_ppl(model, tokenizer, text: str, seq_len: int, limit: int | None = None) -> tuple[float, int]:
    """The definition, one window at a time: exp(total NLL of tokens 2..L of each window / tokens scored)."""
    ids = tokenizer(text)["input_ids"]
    n = len(ids) // seq_len if limit is None else min(limit, len(ids) // seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            window = torch.tensor(ids[w * seq_len : (w + 1) * seq_len])
            logp = F.log_softmax(model(window[None]).logits[0, :-1].double(), dim=-1)
            total -= logp.gather(1, window[1:, None]).sum().item()  # token t predicts token t + 1
            count += seq_len - 1
    return math.exp(total / count), n


def test_ppl_equals_explicit_loop_over_windows(text_file):
    model, tokenizer = tiny_lm(), smollm2_tokenizer()
    # batch_size 3 does not divide the window count, so batching cannot hide an off-by-one
    result = perplexity(model, tokenizer, text_file, seq_len=24, batch_size=3, progress=False)
    expected, windows = reference_ppl(model, tokenizer, text_file.read_text(), 24)
    assert result.windows == result.windows_available == windows > 3
    assert result.tokens_scored == windows * 23
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.mean_nll == pytest.approx(math.log(expected), rel=1e-5)


def test_limit_windows_keeps_the_first_windows_and_records_the_count(text_file):
    model, tokenizer = tiny_lm(), smollm2_tokenizer()
    result = perplexity(model, tokenizer, text_file, seq_len=24, limit_windows=2, progress=False)
    expected, _ = reference_ppl(model, tokenizer, text_file.read_text(), 24, limit=2)
    assert (result.windows, result.tokens_scored) == (2, 46) and result.windows_available > 2
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.to_dict()["windows"] == 2


@pytest.mark.parametrize("corpus", list(CORPORA))
def test_bundled_corpora_are_offline_and_joined(corpus):
    text = load_corpus(corpus)
    assert len(text) > 100_000
    assert "\n\n" in text  # documents / sentences joined with a blank line, as the papers do


def test_a_corpus_shorter_than_one_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a few words")
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_lm(), smollm2_tokenizer(), path, seq_len=128, progress=False)
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing.txt")

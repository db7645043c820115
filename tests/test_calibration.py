import json

import pytest
import torch

from fidelprune.calibration import CalibrationError, read_documents, sample_windows


class CharTokenizer:
    """One token per character: lengths are easy to reason about."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 97 for c in t] for t in texts]}


def test_windows_are_seeded_spans_of_long_enough_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["a" * 5, "b" * 40, "c" * 60]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ids, record = sample_windows(CharTokenizer(), path, samples=6, seq_len=10, seed=3)
    again, _ = sample_windows(CharTokenizer(), path, samples=6, seq_len=10, seed=3)
    other, _ = sample_windows(CharTokenizer(), path, samples=6, seq_len=10, seed=4)
    assert ids.shape == (6, 10) and torch.equal(ids, again) and not torch.equal(ids, other)
    assert all(len(set(row.tolist())) == 1 and row[0] != ord("a") % 97 for row in ids)  # never the short doc
    assert record.documents_used == 2 and record.sha256 and record.seed == 3


def test_bundled_c4_and_file_types(tmp_path):
    assert len(read_documents("c4")) == 1000
    (tmp_path / "t.txt").write_text("hello " * 100)
    assert read_documents(tmp_path / "t.txt") == ["hello " * 100]


@pytest.mark.parametrize("content", ["", "short text"])
def test_too_little_text_is_an_error_before_compute(tmp_path, content):
    path = tmp_path / "small.txt"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="fewer than"):
        sample_windows(CharTokenizer(), path, samples=4, seq_len=32)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        read_documents(tmp_path / "nope.jsonl")

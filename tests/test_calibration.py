import json

import pytest
import torch

from fidelprune.calibration import CalibrationError, read_documents, sample_windows

import reference

BOS = 96


class CharTokenizer:
    """One token per character: lengths are easy to reason about. With special tokens (the default, as for real
    tokenizers) a BOS (96, no character's id) comes first."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[BOS] * add_special_tokens + [ord(c) % 96 for c in t] for t in texts]}


def _write(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_windows_are_one_per_document_as_the_seeds_draw_them(tmp_path):
    """documents (the default): the seeds' procedure, pinned against the plain walk in tests/reference.py: shuffled
    documents in order, the short ones skipped, one window each at an offset in [0, len - L - 1]."""
    docs = ["a" * 5, "b" * 40, "c" * 60, "d" * 10, "e" * 25, "f" * 31]
    path = _write(tmp_path / "docs.jsonl", docs)
    for seed in range(5):
        ids, record = sample_windows(CharTokenizer(), path, samples=4, seq_len=10, seed=seed)
        assert ids.tolist() == reference.seed_calibration_windows(CharTokenizer()(docs)["input_ids"], 4, 10, seed)
        assert len({row[-1] for row in ids.tolist()}) == 4  # four distinct documents
        assert record.documents_used == 4 and record.sampling == "documents"
    with pytest.raises(CalibrationError, match="--sampling spans"):  # 5 documents are longer than 10 tokens (BOS counts)
        sample_windows(CharTokenizer(), path, samples=6, seq_len=10)


def test_the_offset_never_reaches_the_last_token_and_bos_only_at_offset_zero(tmp_path):
    """A document of L + 1 tokens (its BOS and L characters) gives the window at offset 0 only: the seeds' range
    stops one short of the last start. That window holds the BOS; no other window does."""
    path = _write(tmp_path / "docs.jsonl", ["x" * 11] + ["y" * 30] * 20)
    for seed in range(20):
        ids, _ = sample_windows(CharTokenizer(), path, samples=21, seq_len=11, seed=seed)
        rows = ids.tolist()
        x_rows = [r for r in rows if ord("x") % 96 in r]
        assert x_rows == [[BOS] + [ord("x") % 96] * 10]
        assert all(BOS not in r[1:] for r in rows)


def test_spans_draw_documents_with_replacement(tmp_path):
    """spans: fidelprune's first sampling, seeded spans of long enough documents, one document possibly twice, no
    special tokens."""
    path = _write(tmp_path / "docs.jsonl", ["a" * 5, "b" * 40, "c" * 60])
    ids, record = sample_windows(CharTokenizer(), path, samples=6, seq_len=10, seed=3, sampling="spans")
    again, _ = sample_windows(CharTokenizer(), path, samples=6, seq_len=10, seed=3, sampling="spans")
    other, _ = sample_windows(CharTokenizer(), path, samples=6, seq_len=10, seed=4, sampling="spans")
    assert ids.shape == (6, 10) and torch.equal(ids, again) and not torch.equal(ids, other)
    assert all(len(set(row.tolist())) == 1 and row[0] != ord("a") % 96 for row in ids)  # never the short doc, no BOS
    assert record.documents_used == 2 and record.sha256 and record.seed == 3 and record.sampling == "spans"


def test_old_runs_settings_rebuild_with_the_sampling_they_used():
    from fidelprune.calibration import CalibrationConfig

    assert CalibrationConfig.from_dict({"source": "c4", "samples": 4, "seq_len": 8, "seed": 0}).sampling == "spans"
    assert CalibrationConfig().sampling == "documents"
    with pytest.raises(CalibrationError, match="unknown --sampling"):
        CalibrationConfig(sampling="sideways")


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


def test_a_json_file_of_json_lines_reads_as_jsonl(tmp_path):
    """C4's own shards (c4-train.00000-of-01024.json) are JSON lines under a .json name."""
    path = tmp_path / "c4-train.00000-of-01024.json"
    path.write_text("".join(json.dumps({"text": f"document {i}", "timestamp": "t"}) + "\n" for i in range(3)))
    assert read_documents(path) == ["document 0", "document 1", "document 2"]
    (tmp_path / "list.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert read_documents(tmp_path / "list.json") == ["one", "two"]

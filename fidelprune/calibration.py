"""Calibration text -> seeded windows of L tokens (and the record that lets a run be reproduced)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import FidelpruneError, check_int, check_seed
from .utils import bundled_path, file_sha256

DEFAULT_CALIBRATION = "c4"  # the bundled C4 train sample, shard 00000 (the seed methods' corpus)
# Sized so the packaged SmolLM2 prunes in a few minutes on a 2-core CPU; the seed methods use 1,024 x 1,024.
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256


class CalibrationError(FidelpruneError, ValueError):
    """Calibration source missing, unreadable, or too small for the requested windows."""


BUNDLED_TEXTS = {"c4": "c4/sample_c4-rp1.jsonl"}
# How windows are drawn (docs/methods.md, "Calibration"). documents: the seeds' own procedure, one window from each
# of the first `samples` shuffled documents longer than the window. spans: fidelprune's first sampling, documents
# drawn with replacement (one may give two windows), kept to reproduce runs made with it and for sources of few
# documents (a .txt file is one).
SAMPLINGS = ("documents", "spans")
DEFAULT_SAMPLING = "documents"

# A fast tokenizer holds its offsets and alignments for every character it is given at once, so text goes to it
# in batches of at most TOKENIZE_CHARS characters, and a document longer than PIECE_CHARS (or 16 characters per
# window token, if more) is cut at whitespace into documents of that length: a window needs a few hundred tokens
# of one document, not all of a one-line file. No document of the bundled C4 sample is that long, so the seeds'
# windows are unchanged. TOKENIZER_BYTES_PER_CHAR is what the memory planner counts (docs/outputs.md, "Memory for
# text is bounded", has the measurement).
TOKENIZE_CHARS = 1 << 20
PIECE_CHARS = 1 << 17
TOKENIZER_BYTES_PER_CHAR = 125


@dataclass
class CalibrationConfig:
    """Which windows score the neurons (the `calibration` section of a PruneConfig): `samples` windows of
    `seq_len` tokens drawn with `seed` from `source` ("c4", the bundled sample, or a .txt/.jsonl/.json/.parquet
    file) by `sampling` (SAMPLINGS)."""

    source: str = DEFAULT_CALIBRATION
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    sampling: str = DEFAULT_SAMPLING

    def __post_init__(self) -> None:
        self.source = str(self.source)
        check_window_shape(self.samples, self.seq_len)
        check_sampling(self.sampling)
        check_seed("--seed", self.seed)

    @classmethod
    def from_dict(cls, settings: dict) -> CalibrationConfig:
        """From pruning.json's settings; runs recorded before `sampling` existed drew spans."""
        return cls(**{"sampling": "spans", **settings})


def check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise CalibrationError(f"unknown --sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")


def check_window_shape(samples: int, seq_len: int) -> None:
    check_int("--samples", samples)
    check_int("--seq-len", seq_len)
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")


def read_documents(source: str | Path) -> list[str]:
    """Documents of a text source: the bundled name 'c4', or a local .txt (one document), .jsonl / .json
    (field "text" per record) or .parquet (column "text") file; else a Hugging Face dataset id (online)."""
    if str(source) in BUNDLED_TEXTS:
        source = bundled_path(BUNDLED_TEXTS[str(source)])
    path = Path(source)
    if path.suffix in {".txt", ".jsonl", ".json", ".parquet"}:
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path} (give a .txt, .jsonl or .parquet file, or 'c4')")
        try:
            return _read_file(path)
        except UnicodeDecodeError as err:
            raise CalibrationError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from err
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''} "
                                   f"(line {err.lineno}: {err.msg}); give one JSON record per line with a 'text' field") from err
    if path.is_dir():
        raise CalibrationError(f"calibration source {path} is a directory: give a .txt, .jsonl, .json or .parquet file, or 'c4'")
    if path.exists():
        raise CalibrationError(f"calibration file {path} has an unsupported type {path.suffix!r}: use .txt, .jsonl, .json or .parquet")
    try:  # a hub dataset, for users who are online or have it cached
        import datasets

        dataset = datasets.load_dataset(str(source), split="train", streaming=True)
        return [row["text"] for _, row in zip(range(20_000), dataset)]
    except Exception as err:  # noqa: BLE001 - any failure here means "no such source"
        raise CalibrationError(f"calibration source {source!r} is neither a local file nor a loadable dataset: {err}") from err


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for damaged files vary
            raise CalibrationError(f"{path} is not a readable parquet file ({err})") from err
        if "text" not in table.column_names:
            raise CalibrationError(f"{path} has no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text) if path.suffix == ".json" else None
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":  # a .json file of JSON lines (C4's own shards are named so) reads as .jsonl
            raise
        records = None
    if records is None:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CalibrationError(f"{path}: give a list of records (objects) with a 'text' field")
    texts = [r["text"] for r in records if isinstance(r.get("text"), str) and r["text"]]
    if records and not texts:
        raise CalibrationError(f"{path}: no record has a non-empty 'text' field (fields: {sorted(records[0])[:8]})")
    return texts


def cut_long(documents: list[str], longest: int) -> list[str]:
    """The documents, each longer than `longest` characters cut at whitespace into pieces of at most that length
    (at `longest` itself where a piece has no whitespace)."""
    out = []
    for text in documents:
        while len(text) > longest:
            cut = max(text.rfind(" ", 0, longest), text.rfind("\n", 0, longest))
            cut = cut if cut > longest // 2 else longest
            out.append(text[:cut])
            text = text[cut:]
        out.append(text)
    return out


def tokenize_bounded(tokenizer, texts: list[str], **kwargs) -> Iterator[list[int]]:
    """The token ids of each text in order, the tokenizer given at most TOKENIZE_CHARS characters at a time."""
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= TOKENIZE_CHARS):
            chars += len(texts[end])
            end += 1
        yield from tokenizer(texts[start:end], **kwargs)["input_ids"]
        start = end


def text_memory(source: str | Path, seq_len: int) -> int:
    """Host memory a draw of windows from `source` holds at its peak: the documents read (a parquet file's text is
    about 3 x its compressed size) and one batch of tokenization; 0 for a hub dataset (read as it streams)."""
    path = bundled_path(BUNDLED_TEXTS[str(source)]) if str(source) in BUNDLED_TEXTS else Path(source)
    if not path.is_file():
        return 0
    chars = path.stat().st_size * (3 if path.suffix == ".parquet" else 1)
    return chars + TOKENIZER_BYTES_PER_CHAR * min(chars, TOKENIZE_CHARS, max(PIECE_CHARS, 16 * seq_len) * 256)


def check_source(source: str | Path) -> None:
    """Cheap early check (before a model is loaded) that a local calibration file exists."""
    if str(source) not in BUNDLED_TEXTS and Path(source).suffix in {".txt", ".jsonl", ".json", ".parquet"} and not Path(source).is_file():
        raise CalibrationError(f"calibration file not found: {source} (give a .txt, .jsonl or .parquet file, or 'c4')")


@dataclass
class CalibrationRecord:
    source: str
    sha256: str | None
    samples: int
    seq_len: int
    seed: int
    documents_used: int  # documents: the distinct documents the windows come from; spans: those drawn from
    sampling: str = DEFAULT_SAMPLING


def sample_windows(
    tokenizer, source: str | Path, samples: int, seq_len: int, seed: int = 0, sampling: str = DEFAULT_SAMPLING,
    *, samples_flag: str = "--samples",
) -> tuple[torch.Tensor, CalibrationRecord]:
    """`samples` windows of `seq_len` tokens from the documents of `source`, seeded. Raises before any compute when
    the source holds too little text for them, naming `samples_flag` (the flag that set `samples`) as the fix.

    documents (the seed methods' procedure, docs/methods.md): shuffle the documents, walk them in order, skip
    those of `seq_len` tokens or fewer, and cut one window from each of the next `samples`, at a uniform offset
    in [0, len - seq_len - 1]. Documents are tokenized as the tokenizer does by default, so a tokenizer that adds a
    BOS gives it to windows at offset 0 only. No document gives two windows.
    spans: each window a random span, offset in [0, len - seq_len], of a random document longer than `seq_len`
    (drawn with replacement, so one may give two), tokenized without special tokens (no BOS anywhere)."""
    check_window_shape(samples, seq_len)
    check_sampling(sampling)
    documents = cut_long(read_documents(source), max(PIECE_CHARS, 16 * seq_len))
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    distinct = sampling == "documents"
    # Tokenize in the seeded order only until there is enough, so a huge file costs little.
    eligible: list[list[int]] = []
    eligible_tokens, wanted = 0, 4 * samples * seq_len
    for start in range(0, len(order), 256):
        batch = [documents[i] for i in order[start : start + 256]]
        for ids in tokenize_bounded(tokenizer, batch, add_special_tokens=distinct):
            if len(ids) > seq_len:
                eligible.append(ids)
                eligible_tokens += len(ids)
        if (len(eligible) >= samples) if distinct else (eligible_tokens >= wanted):
            break
    if distinct and len(eligible) < samples:
        raise CalibrationError(
            f"calibration source {source} has {len(eligible)} documents longer than {seq_len} tokens, fewer than the "
            f"{samples} windows needed (one per document, as the seed methods draw them): use a larger source, lower "
            f"{samples_flag} / --seq-len, or --sampling spans (windows may share a document)"
        )
    if not distinct and eligible_tokens < samples * seq_len:
        raise CalibrationError(
            f"calibration source {source} has {eligible_tokens} tokens in documents longer than {seq_len} tokens, "
            f"fewer than the {samples} x {seq_len} = {samples * seq_len} needed: use a larger file or lower "
            f"{samples_flag} / --seq-len"
        )
    windows = []
    for index in range(samples):
        ids = eligible[index] if distinct else eligible[rng.randrange(len(eligible))]
        begin = rng.randint(0, len(ids) - seq_len - 1) if distinct else rng.randrange(len(ids) - seq_len + 1)
        windows.append(ids[begin : begin + seq_len])
    path = Path(source) if str(source) not in BUNDLED_TEXTS else bundled_path(BUNDLED_TEXTS[str(source)])
    record = CalibrationRecord(
        source=str(source),
        sha256=file_sha256(path) if path.is_file() else None,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        documents_used=samples if distinct else len(eligible),
        sampling=sampling,
    )
    return torch.tensor(windows, dtype=torch.long), record


def record_dict(record: CalibrationRecord) -> dict:
    return asdict(record)

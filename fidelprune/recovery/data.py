"""Recovery data: Alpaca instructions or plain text -> tokenized examples -> packed sequences.

An example is a token list plus the length of its prompt; every token from `prompt_len` on is a training
target (the whole example for plain text, the response + EOS for an instruction). Examples are packed into
rows of `seq_len` tokens and kept apart by position ids that restart at 0 for each example: with
`attention_mask=None` and no cache, transformers 5 detects those restarts and builds a block-diagonal causal
mask for whichever attention kernel is in use (eager / sdpa masks, flash-attention varlen), so no token attends
across examples and rotary positions are per example. The label of each example's first token is -100, so the
last token of one example is never trained to predict the first token of the next.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..calibration import BUNDLED_TEXTS, PIECE_CHARS, cut_long, read_documents, tokenize_bounded
from ..errors import ConfigError
from ..utils import bundled_path, file_sha256

IGNORE = -100  # label of a token that is not a target (prompt, padding, first token of an example)

# Stanford Alpaca's prompt templates, verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

BUNDLED_DATA = {**BUNDLED_TEXTS, "alpaca": "alpaca/alpaca_en_demo.json"}
FORMATS = ("auto", "alpaca", "text")


def render_alpaca(record: dict) -> tuple[str, str]:
    """(prompt, response) of one Alpaca record; the EOS token is appended at tokenization."""
    instruction, extra = record["instruction"], record.get("input") or ""
    if extra.strip():
        prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    return prompt, record["output"]


# ------------------------------------------------------------------------------------------------ reading
def _read_records(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for damaged files vary
            raise ConfigError(f"{path} is not a readable parquet file ({err})") from err
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json":
                records = json.load(f)
                if not isinstance(records, list):
                    raise ConfigError(f"{path}: expected a JSON list of records")
                return records
            return [json.loads(line) for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''} (line {err.lineno}: "
                          f"{err.msg}); give one JSON record per line") from err


def _kind_of(records: list, where: str) -> str:
    first = records[0] if records else None
    if isinstance(first, str):
        return "text"
    if isinstance(first, dict) and "instruction" in first and "output" in first:
        return "alpaca"
    if isinstance(first, dict) and "text" in first:
        return "text"
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise ConfigError(f"{where}: records need 'instruction' + 'output' (Alpaca) or 'text' fields, found {keys}")


def load_records(data, data_format: str = "auto") -> tuple[str, list, dict]:
    """(kind, records, provenance) of a data source: a bundled name ('alpaca', 'c4'), a .json/.jsonl/.parquet
    file of Alpaca or {"text"} records, a .txt file (one document), or an in-memory list of dicts / strings."""
    if data_format not in FORMATS:
        raise ConfigError(f"unknown data format {data_format!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(data, (list, tuple)):
        records, provenance = list(data), {"source": "in-memory", "sha256": None}
        where = "data"
    else:
        path = bundled_path(BUNDLED_DATA[str(data)]) if str(data) in BUNDLED_DATA else Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {data} (give a .json/.jsonl/.parquet/.txt file, 'alpaca' or 'c4')")
        if path.suffix not in {".json", ".jsonl", ".parquet", ".txt"}:
            raise ConfigError(f"unsupported data file type {path.suffix!r}: use .json, .jsonl, .parquet or .txt")
        records = read_documents(path) if path.suffix == ".txt" else _read_records(path)
        provenance = {"source": str(data), "path": str(path), "sha256": file_sha256(path)}
        where = str(path)
    if not records:
        raise ConfigError(f"{where} holds no records")
    kind = _kind_of(records, where) if data_format == "auto" else data_format
    if kind == "text":
        records = [r if isinstance(r, str) else r.get("text") for r in records]
        records = [r for r in records if r]
    elif not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in records):
        raise ConfigError(f"{where}: every Alpaca record needs 'instruction' and 'output' fields")
    return kind, records, provenance


# ------------------------------------------------------------------------------------------------ tokenizing
@dataclass
class Example:
    ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are context only; the rest are targets


@dataclass
class TokenStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0  # longer than seq_len, cut to it
    dropped: int = 0  # no target token left within seq_len (prompt too long, or empty)
    tokens: int = 0
    target_tokens: int = 0


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, which recovery appends to every example")
    return tokenizer.eos_token_id


def tokenize_alpaca(tokenizer, records: list[dict], seq_len: int, stats: TokenStats) -> list[Example]:
    """Prompt and response are tokenized separately (so the boundary is exact, never a token that straddles
    it); the prompt gets the tokenizer's own special tokens (a BOS where it adds one), the response gets EOS."""
    prompts, responses = zip(*(render_alpaca(r) for r in records))
    prompt_ids = list(tokenize_bounded(tokenizer, list(prompts), add_special_tokens=True))
    response_ids = list(tokenize_bounded(tokenizer, list(responses), add_special_tokens=False))
    eos = _eos_id(tokenizer)
    examples = []
    for p, r in zip(prompt_ids, response_ids):
        ids = p + r + [eos]
        if len(ids) > seq_len:
            stats.truncated += 1
            ids = ids[:seq_len]
        if len(p) >= len(ids):
            stats.dropped += 1
            continue
        examples.append(Example(ids, len(p)))
    return examples


def tokenize_text(tokenizer, documents: list[str], seq_len: int, stats: TokenStats) -> list[Example]:
    """Each document (+ EOS) is one example, cut into seq_len chunks when longer; every token is a target
    except a chunk's first, which has nothing before it in the chunk to be predicted from."""
    eos = _eos_id(tokenizer)
    examples = []
    # a document longer than PIECE_CHARS is tokenized piece by piece (calibration.py), each piece an example
    for ids in tokenize_bounded(tokenizer, cut_long(list(documents), max(PIECE_CHARS, 16 * seq_len)), add_special_tokens=True):
        ids = ids + [eos]
        if len(ids) > seq_len:
            stats.truncated += 1
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            if len(chunk) >= 2:
                examples.append(Example(chunk, 0))
    return examples


# ------------------------------------------------------------------------------------------------ packing
@dataclass
class Packed:
    """Rows of exactly seq_len tokens. labels use the transformers convention (aligned with input_ids; the
    loss shifts them), IGNORE where a token is not a target."""

    input_ids: torch.Tensor  # [N, L] long
    labels: torch.Tensor  # [N, L] long
    position_ids: torch.Tensor  # [N, L] long, restarting at 0 for every example (and for the padding tail)
    segment_ids: torch.Tensor  # [N, L] long, index of the example within its row, -1 on padding

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, index) -> Packed:
        return Packed(self.input_ids[index], self.labels[index], self.position_ids[index], self.segment_ids[index])

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def real_tokens(self) -> int:
        """Tokens that belong to an example (not padding)."""
        return int((self.segment_ids >= 0).sum())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for t in (self.input_ids, self.labels, self.position_ids):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()


def pack(examples: list[Example], seq_len: int, pad_id: int) -> Packed:
    """Best-fit decreasing packing: longest example first, each into the open row with the least room that
    still holds it (else a new row); a row's unused tail is padding (its own position segment, no targets).
    In-order greedy packing left 14-23 % of the bundled C4 and Alpaca rows' slots as padding, this 0.1-1.9 %
    (benchmarks/results/packing.md; TRL's `packing_strategy="bfd"` is the same idea). The row order does not matter: training draws rows
    in a seeded random order every epoch. Ties keep the given order, so the result is deterministic."""
    for ex in examples:
        if len(ex.ids) > seq_len:
            raise ConfigError(f"example of {len(ex.ids)} tokens is longer than seq_len {seq_len}")
    rows: list[list[Example]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index) of rows not yet full, sorted
    for ex in sorted(examples, key=lambda ex: -len(ex.ids)):
        k = bisect.bisect_left(open_rows, (len(ex.ids), -1))  # the least room that fits; lowest row on a tie
        if k < len(open_rows):
            room, r = open_rows.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(ex)
        if room > len(ex.ids):
            bisect.insort(open_rows, (room - len(ex.ids), r))
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, seq_len), dtype=torch.long)
    segment_ids = torch.full((n, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for k, ex in enumerate(row):
            length = len(ex.ids)
            ids = torch.tensor(ex.ids, dtype=torch.long)
            input_ids[r, offset : offset + length] = ids
            first_target = max(ex.prompt_len, 1)  # never a target without context inside its own example
            labels[r, offset + first_target : offset + length] = ids[first_target:]
            position_ids[r, offset : offset + length] = torch.arange(length)
            segment_ids[r, offset : offset + length] = k
            offset += length
        position_ids[r, offset:] = torch.arange(seq_len - offset)
    return Packed(input_ids, labels, position_ids, segment_ids)


# ------------------------------------------------------------------------------------------------ dataset
@dataclass
class RecoveryData:
    train: Packed
    val: Packed | None
    record: dict  # provenance and counts, for recovery.json


def build_data(
    tokenizer,
    data,
    seq_len: int,
    *,
    data_format: str = "auto",
    val_fraction: float = 0.02,
    max_examples: int | None = None,
    seed: int = 0,
) -> RecoveryData:
    """Read, shuffle the records (seeded), keep the first `max_examples`, hold out a validation slice of whole
    records (so no chunk of a held-out document is trained on), then tokenize and pack both parts."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    kind, records, provenance = load_records(data, data_format)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    records = [records[i] for i in order[:max_examples]]
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and len(records) >= 2:
        n_val = max(1, n_val)
    stats = TokenStats(records=len(records))
    tokenize = tokenize_alpaca if kind == "alpaca" else tokenize_text
    val_examples = tokenize(tokenizer, records[:n_val], seq_len, stats) if n_val else []
    train_examples = tokenize(tokenizer, records[n_val:], seq_len, stats)
    if not train_examples:
        raise ConfigError(f"{provenance['source']}: no training example has a target token within seq_len {seq_len}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    train = pack(train_examples, seq_len, pad_id)
    val = pack(val_examples, seq_len, pad_id) if val_examples else None
    stats.examples = len(train_examples) + len(val_examples)
    stats.tokens = sum(len(e.ids) for e in train_examples + val_examples)
    stats.target_tokens = train.target_tokens + (val.target_tokens if val is not None else 0)
    record = {
        **provenance,
        "format": kind,
        "template": "alpaca (Stanford), loss on response + EOS" if kind == "alpaca" else "plain text + EOS, loss on all tokens",
        "seq_len": seq_len,
        "seed": seed,
        "max_examples": max_examples,
        **asdict(stats),
        "train_records": len(records) - n_val,
        "val_records": n_val,
        "train_examples": len(train_examples),
        "val_examples": len(val_examples),
        "train_rows": len(train),
        "val_rows": len(val) if val is not None else 0,
        "train_tokens": train.real_tokens,
        "train_target_tokens": train.target_tokens,
        "packing_efficiency": train.real_tokens / train.input_ids.numel(),
        "train_fingerprint": train.fingerprint(),
    }
    return RecoveryData(train, val, record)

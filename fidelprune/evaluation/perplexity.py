"""Perplexity over non-overlapping windows (docs/methods.md, "Evaluation protocols").

The text is tokenized once with the tokenizer's own special-token convention (a BOS at the very start where
the tokenizer adds one, as LLM-Pruner does), cut into non-overlapping windows of `seq_len` tokens (a
trailing partial window is dropped), and each window predicts its last seq_len - 1 tokens.
PPL = exp(mean token NLL over all windows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import read_documents
from ..errors import ConfigError, FidelpruneError
from ..utils import bundled_path, eval_mode

# Bundled perplexity corpora (see fidelprune/data/SOURCES.md); each is joined with "\n\n" as the papers do.
CORPORA = {
    "wikitext2": "wikitext2/wikitext-2-raw-v1_test_joined.txt",
    "ptb": "ptb/ptb.valid.txt",  # LLM-Pruner reports PTB on the validation split
    "ptb-test": "ptb/ptb.test.txt",
    "c4": "c4/c4_validation_2k.parquet",
}


class EvaluationError(FidelpruneError, ValueError):
    """A measurement came out unusable (NaN / inf)."""


def load_corpus(name_or_path: str | Path) -> str:
    """The evaluation text of a bundled corpus or a local .txt / .jsonl / .parquet file."""
    name = str(name_or_path)
    if name in CORPORA:
        path = bundled_path(CORPORA[name])
        if name.startswith("ptb"):  # one sentence a line, joined with "\n\n" (LLM-Pruner)
            return "\n\n".join(line.strip() for line in path.read_text().splitlines())
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return "\n\n".join(pq.read_table(path).column("text").to_pylist())
        return path.read_text(encoding="utf-8")
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity corpus not found: {name} (bundled: {', '.join(CORPORA)}; or a local file)")
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")

    return "\n\n".join(read_documents(path))


@dataclass
class PerplexityResult:
    corpus: str
    ppl: float
    mean_nll: float
    seq_len: int
    windows: int
    windows_available: int
    tokens_scored: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Sum of next-token NLL per window, [num_windows], in fp64."""
    device = next(model.parameters()).device
    totals = []
    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc="perplexity", disable=not progress)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)  # a device map may return the logits elsewhere
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        totals.append(nll.view(len(batch), -1).double().sum(dim=1).cpu())
        bar.update(batch.numel())
    bar.close()
    return torch.cat(totals)


def perplexity(
    model: nn.Module,
    tokenizer,
    corpus: str | Path = "wikitext2",
    seq_len: int = 128,
    limit_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """PPL of `model` on `corpus` (bundled name or local file) over non-overlapping windows of seq_len tokens;
    `limit_windows` keeps the first N windows for a quick run (the count used is recorded)."""
    ids = tokenizer(load_corpus(corpus), return_tensors="pt")["input_ids"][0]
    available = len(ids) // seq_len
    if available == 0:
        raise ConfigError(f"{corpus} has {len(ids)} tokens, fewer than one window of {seq_len}")
    used = available if limit_windows is None else min(limit_windows, available)
    windows = ids[: used * seq_len].view(used, seq_len)
    with eval_mode(model):
        nll = window_nll(model, windows, batch_size, progress)
    tokens = used * (seq_len - 1)
    mean = nll.sum().item() / tokens
    if not math.isfinite(mean):
        raise EvaluationError(f"perplexity on {corpus} is not finite: the model's weights or activations hold NaN/inf "
                              f"(run in float32 with --dtype float32, or check the model)")
    return PerplexityResult(str(corpus), math.exp(mean), mean, seq_len, used, available, tokens)

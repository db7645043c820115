"""The load check of an export: read the written file back with another reader and compare next-token logits.

Readers: transformers' own GGUF loader where it knows the architecture and the widths are uniform (fully
independent of fidelprune's writer); otherwise gguf's reader with fidelprune's inverse layout (gguf.read_gguf_state:
per-layer `deci` files, families transformers' GGUF loader lacks). vLLM folders are reloaded by transformers'
from_pretrained, or fidelprune's loader where it must shape per-layer widths.
Tolerances per output type (what rounding to that type costs, measured on SmolLM2 with some margin; docs/deploy.md):
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.perplexity import load_corpus
from ..models import load_model
from ..utils import eval_mode
from .gguf import ExportError, read_gguf_state

TOLERANCES = {
    "f32": {"top1_agreement": 0.999, "ppl_ratio": 1e-3},
    "f16": {"top1_agreement": 0.97, "ppl_ratio": 0.01},
    "bf16": {"top1_agreement": 0.93, "ppl_ratio": 0.03},
    "q8_0": {"top1_agreement": 0.93, "ppl_ratio": 0.03},
}
CHECK_TEXT_CHARS = 200_000  # of the bundled WikiText-2 test text: plenty for a few windows, cheap to tokenize
# where transformers' GGUF loader rebuilds the model exactly from the file (tested); it has no key for LLaMA's
# mlp_bias (FLAP's compensation), so biased MLPs are read with gguf's reader
TRANSFORMERS_GGUF_ARCHS = {"llama", "qwen2", "gemma2", "gemma3"}


def check_windows(tokenizer, windows: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(load_corpus("wikitext2")[:CHECK_TEXT_CHARS], return_tensors="pt")["input_ids"][0]
    windows = min(windows, len(ids) // seq_len)
    return ids[: windows * seq_len].view(windows, seq_len)


@torch.no_grad()
def compare(reference: nn.Module, candidate: nn.Module, windows: torch.Tensor) -> dict:
    """Top-1 agreement of next-token predictions, max |logit difference|, and both perplexities."""
    agree, total, max_diff, nll_ref, nll_cand = 0, 0, 0.0, 0.0, 0.0
    with eval_mode(reference), eval_mode(candidate):
        for window in windows:
            batch = window[None]
            a = reference(input_ids=batch, use_cache=False).logits[0, :-1].float()
            b = candidate(input_ids=batch, use_cache=False).logits[0, :-1].float()
            targets = batch[0, 1:]
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            total += len(targets)
            max_diff = max(max_diff, (a - b).abs().max().item())
            nll_ref += F.cross_entropy(a, targets, reduction="sum").item()
            nll_cand += F.cross_entropy(b, targets, reduction="sum").item()
    ppl_ref, ppl_cand = math.exp(nll_ref / total), math.exp(nll_cand / total)
    return {"top1_agreement": agree / total, "max_abs_logit_diff": max_diff, "ppl_checkpoint": ppl_ref,
            "ppl_exported": ppl_cand, "ppl_ratio": ppl_cand / ppl_ref, "tokens": total}


def verdict(metrics: dict, outtype: str) -> dict:
    tolerance = TOLERANCES[outtype]
    passed = (metrics["top1_agreement"] >= tolerance["top1_agreement"]
              and abs(metrics["ppl_ratio"] - 1) <= tolerance["ppl_ratio"])
    return {**metrics, "tolerance": tolerance, "passed": passed}


def gguf_reader_model(path: Path, model: nn.Module, arch: str) -> tuple[nn.Module, str]:
    """The exported GGUF as a torch model, and which reader built it."""
    if arch in TRANSFORMERS_GGUF_ARCHS and not getattr(model.config, "mlp_bias", False):
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return loaded, "transformers GGUF loader"
    candidate = copy.deepcopy(model)
    state = read_gguf_state(path, model)
    missing, unexpected = candidate.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied: llama.cpp reuses token_embd
    if missing or unexpected:
        raise ExportError(f"{path}: tensors missing {missing[:3]} / unexpected {unexpected[:3]} on reading back")
    if getattr(model.config, "tie_word_embeddings", False):
        candidate.tie_weights()
    return candidate, "gguf reader (fidelprune layout)"


def check_gguf(model: nn.Module, tokenizer, path: Path, config, arch: str) -> dict:
    candidate, reader_name = gguf_reader_model(path, model, arch)
    windows = check_windows(tokenizer, config.check_windows, config.check_seq_len)
    metrics = compare(model, candidate, windows)
    return {"reader": reader_name, "windows": len(windows), "seq_len": windows.shape[1], **verdict(metrics, config.outtype)}


def check_vllm(model: nn.Module, tokenizer, path: Path, config, arch: str | None = None) -> dict:
    candidate, _, _ = load_model(path, dtype="float32", device="cpu")
    windows = check_windows(tokenizer, config.check_windows, config.check_seq_len)
    metrics = compare(model, candidate, windows)
    return {"reader": "fidelprune.load_model", "windows": len(windows), "seq_len": windows.shape[1], **verdict(metrics, "f32")}

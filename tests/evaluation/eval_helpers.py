"""Shared pieces for the evaluation tests: the real SmolLM2 tokenizer (loaded once) and tiny models sized to it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from conftest import tiny_model


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from fidelprune.models import packaged_gguf

    gguf = packaged_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tiny_lm(seed: int = 0, **overrides):
    """A 2-layer random LLaMA whose vocabulary covers the real tokenizer (cheap at hidden size 32)."""
    return tiny_model("llama", seed=seed, vocab_size=len(smollm2_tokenizer()), max_position_embeddings=256, **overrides)


def save_tiny(path: Path, seed: int = 0) -> Path:
    model = tiny_lm(seed)
    model.save_pretrained(path)
    smollm2_tokenizer().save_pretrained(path)
    return path


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

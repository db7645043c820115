"""Tiny random models of every supported family, built from configs in-process (no download)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)

# family -> (model class, config class, extra config)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "llama-bias": ("LlamaForCausalLM", "LlamaConfig", {"mlp_bias": True}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 8}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    model_cls, config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init leaves biases at 0; give them values so bias handling is tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


# A CLI run in a child process that stops at the `call`-th call of module.function (it touches `marker` and sleeps
# there), so that a kill, a signal or a second run lands at that moment every time (test_kill.py, test_faults.py).
_STOPPED_CHILD = """
import sys, time
from pathlib import Path
import {module} as target
original = target.{function}
calls = []
def stop_here(*args, **kwargs):
    calls.append(1)
    if len(calls) == {call}:
        Path({marker!r}).touch()
        time.sleep(120)
    return original(*args, **kwargs)
target.{function} = stop_here
from fidelprune.cli import main
sys.exit(main({argv!r}))
"""


def start_stopped(module: str, function: str, argv: list[str], marker: Path, call: int = 1) -> subprocess.Popen:
    """The child, once it has reached the stop point (its stderr is a pipe, text)."""
    code = _STOPPED_CHILD.format(module=module, function=function, argv=argv, marker=str(marker), call=call)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert child.poll() is None, f"the child ended before the stop point: {child.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the child never reached the stop point"
        time.sleep(0.05)
    return child


def tree_digest(directory: Path) -> str:
    """One hash of a folder's file names and contents: equal before and after means the folder was not touched."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def tiny_windows(n: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny LLaMA saved as an HF directory with the real SmolLM2 tokenizer, for CLI tests."""
    from transformers import AutoTokenizer

    from fidelprune.models import packaged_gguf

    gguf = packaged_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def template_fields(config, arch: str, tokens: list[str] | None = None) -> dict:
    """GGUF metadata for a tiny model of `config` (what llama.cpp's converter would write for it), with a
    placeholder vocabulary unless `tokens` are given: the template an export adds its tensors to."""
    from gguf import GGUFValueType as T

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or rope.get("full_attention", {}).get("rope_theta") or 10000.0
    fields = {
        f"{arch}.block_count": (config.num_hidden_layers, T.UINT32, None),
        f"{arch}.context_length": (config.max_position_embeddings, T.UINT32, None),
        f"{arch}.embedding_length": (config.hidden_size, T.UINT32, None),
        f"{arch}.attention.head_count": (config.num_attention_heads, T.UINT32, None),
        f"{arch}.attention.head_count_kv": (config.num_key_value_heads, T.UINT32, None),
        f"{arch}.attention.key_length": (head_dim, T.UINT32, None),
        f"{arch}.attention.value_length": (head_dim, T.UINT32, None),
        f"{arch}.rope.dimension_count": (head_dim, T.UINT32, None),
        f"{arch}.rope.freq_base": (float(theta), T.FLOAT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), T.FLOAT32, None),
        "tokenizer.ggml.model": ("gpt2", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens or [f"t{i}" for i in range(config.vocab_size)], T.ARRAY, T.STRING),
    }
    if getattr(config, "sliding_window", None):
        fields[f"{arch}.attention.sliding_window"] = (config.sliding_window, T.UINT32, None)
    return fields


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory, tiny_dir):
    """A vocabulary-only GGUF for the tiny LLaMA of tiny_dir: the packaged SmolLM2 GGUF's vocabulary and
    tokenizer metadata with the tiny model's hyperparameters, as --template takes it."""
    import gguf

    from fidelprune.deploy.gguf import Template
    from fidelprune.models import packaged_gguf

    smollm2 = Template.read(packaged_gguf())
    fields = {k: v for k, v in smollm2.fields.items() if not k.startswith("llama.")}
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    fields.update(template_fields(config, "llama", tokens=smollm2.fields["tokenizer.ggml.tokens"][0]))
    path = tmp_path_factory.mktemp("template") / "tiny-base.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, kind, sub) in fields.items():
        writer.add_key_value(key, value, kind, sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

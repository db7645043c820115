"""Size and speed of a causal LM: parameters and bytes, prefill and decode tokens/s, peak memory.

Prefill: one forward over a batch of `prompt_len` random token ids that builds the KV cache. Decode: greedy
steps of one token per sequence with the KV cache, after such a prefill. Each is timed `repeats` times after a
warm-up run and the median is reported. Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed
runs; on CPU the process's peak resident set (Linux VmHWM, reset before the timed runs), which includes the
Python runtime and everything else the process holds, so compare it between models of the same process only.
Speeds depend on the machine and its load: they are measurements, never assertions.
"""

from __future__ import annotations

import inspect
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..placement import device_map_of
from ..utils import eval_mode

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class SpeedResult:
    device: str
    device_name: str
    dtype: str
    threads: int | None  # torch intra-op threads, on CPU
    batch_size: int
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_s: float  # median seconds for one prefill of batch_size x prompt_len tokens
    prefill_tokens_per_s: float
    decode_s: float  # median seconds for new_tokens decode steps
    decode_tokens_per_s: float  # batch_size x new_tokens / decode_s
    peak_memory_bytes: int | None
    peak_memory_kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def model_size(model: nn.Module) -> dict:
    """Parameter count and bytes in memory (tied weights counted once, as model.parameters() yields them)."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "dtype": str(params[0].dtype).removeprefix("torch.") if params else None}


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({threads} thread{'s' if threads != 1 else ''}, {os.cpu_count()} cores visible)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's resident-set high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 resets the VmHWM high-water mark to the current RSS
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.kind = "process peak RSS since start (ru_maxrss)"

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind.endswith("(VmHWM)"):
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if platform.system() == "Darwin" else maxrss * 1024)


# transformers 5.25 renamed the KV cache's forward argument and output field from past_key_values to cache (the old
# names go in 5.40); fidelprune supports transformers 5.x on either side of the change.
def cache_keyword(model: nn.Module) -> str:
    """The name under which `model`'s forward takes a KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward with use_cache=True returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True)
    return output_cache(out), out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def _decode(model: nn.Module, cache, token: torch.Tensor, steps: int) -> None:
    keyword = cache_keyword(model)
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{keyword: cache})
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def measure_speed(
    model: nn.Module,
    device: str | torch.device | None = None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> SpeedResult:
    """Prefill and decode speed of `model` on `device` (default: where it is; it is moved there and back). A model
    spread over devices by a device map is timed where it is (device None); its peak memory is the first device's."""
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    placed = device_map_of(model)
    if placed and device != home:
        raise ConfigError("this model is spread over devices by a device map: time it where it is (device None)")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and prompt_len + new_tokens > max_positions:
        raise ConfigError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's {max_positions} positions")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    with eval_mode(model):
        if not placed:
            model.to(device)
        peak = _PeakMemory(device)
        try:
            cache, token = _prefill(model, ids)  # warm-up: first-call allocations, kernel selection
            _decode(model, cache, token, new_tokens)
            cache = None  # each cache is freed before the next prefill
            peak.reset()
            prefill, decode = [], []
            for _ in range(repeats):
                seconds, (cache, token) = _timed(lambda: _prefill(model, ids), device)
                prefill.append(seconds)
                decode.append(_timed(lambda: _decode(model, cache, token, new_tokens), device)[0])
                cache = None
            peak_bytes = peak.read()
        finally:
            if not placed:
                model.to(home)
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    return SpeedResult(
        device=f"device map ({', '.join(dict.fromkeys(placed.values()))})" if placed else str(device), device_name=_device_name(device), dtype=model_size(model)["dtype"],
        threads=torch.get_num_threads() if device.type == "cpu" else None, batch_size=batch_size,
        prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, prefill_s=prefill_s,
        prefill_tokens_per_s=batch_size * prompt_len / prefill_s, decode_s=decode_s,
        decode_tokens_per_s=batch_size * new_tokens / decode_s, peak_memory_bytes=peak_bytes, peak_memory_kind=peak.kind,
    )

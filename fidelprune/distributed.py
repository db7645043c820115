"""Data-parallel runs: `torchrun --nproc-per-node K -m fidelprune.cli prune ...`, no flag.

Every process loads the model and draws the same calibration windows (same seed); each scores its share, windows
rank, rank + K, rank + 2K, ...; the per-neuron accumulators (the Taylor sums, element1/element2's summed gradients
before |w g| is taken, the activation statistics, the reconstruction Gram matrices) are summed across processes
once, before anything is selected or solved. Every process then holds the scores of all windows and makes the same
choices; only rank 0 writes. Summation order is the only difference from one process (float rounding).

With one process every function here is a no-op, so the single-process path is unchanged bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import FidelpruneError


class DistributedError(FidelpruneError, RuntimeError):
    """The processes of a data-parallel run disagree (model, calibration) or cannot form a group."""


def requested() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment() -> bool:
    """Join the process group the launcher describes in the environment (once); False when run alone."""
    if not requested():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """`cuda` means this process's own GPU (LOCAL_RANK) in a data-parallel run."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This process's windows: rank, rank + K, ... (an uneven split is fine: the sums cover every window once)."""
    return windows[rank() :: world_size()] if world_size() > 1 else windows


def _all_reduce(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":  # streamed runs keep accumulators in host memory
        on_gpu = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(on_gpu)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor)


def sum_(*tensors: torch.Tensor | None) -> None:
    """Sum each tensor over the processes, in place (None entries are skipped)."""
    if world_size() > 1:
        for tensor in tensors:
            if tensor is not None:
                _all_reduce(tensor)


def sum_number(value: float | int, device: torch.device | str = "cpu") -> float | int:
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    _all_reduce(tensor)
    return type(value)(tensor.item())


def check_same(what: str, value: str) -> None:
    """Stop every process with one line when they do not hold the same `value` (a digest)."""
    if world_size() == 1:
        return
    values: list[str | None] = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise DistributedError(f"the {world_size()} processes disagree on {what} ({len(set(values))} different "
                               f"digests): start every process with the same model, files and arguments")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()

"""Training checkpoints that make `resume` exact: trainable weights (safetensors), optimizer and scheduler
state, every process's RNG state, and the loop state (step, history) with a fingerprint of the run.

Layout: <root>/step-000050/{trainable.safetensors, optimizer.pt, scheduler.pt, rng-rank<R>.pt, state.json}.
state.json is written last, so a directory without it is incomplete (interrupted while saving) and ignored.
The .pt files hold only tensors and plain containers, and are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..outputs import OutputWriteError, os_error, remove_stale_siblings, size_text, temporary_sibling
from .modes import trainable_parameters

STATE = "state.json"
WEIGHTS = "trainable.safetensors"
# the names this module writes; retention and clean-up touch nothing else in a --checkpoint-dir (a user's
# "step-1-notes" folder there is theirs)
STEP_NAME = re.compile(r"step-\d{6}")
TEMPORARY_NAME = re.compile(r"\.step-\d{6}\.tmp-\d+-.*")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _written_here(root: Path, name: re.Pattern) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and name.fullmatch(p.name)) if root.is_dir() else []


def complete_checkpoints(root: str | Path) -> list[Path]:
    return [p for p in _written_here(Path(root), STEP_NAME) if (p / STATE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict, accelerator, keep_last: int
) -> Path:
    """Write checkpoint `step` (model = the unwrapped model) and drop all but the newest `keep_last`."""
    final = step_dir(root, step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(final)
        tmp = temporary_sibling(final)
        try:
            weights = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model).items()}
            save_file(weights, str(tmp / WEIGHTS))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        except BaseException as err:
            written = sum(p.stat().st_size for p in tmp.iterdir())
            shutil.rmtree(tmp, ignore_errors=True)
            if (cause := os_error(err)) is not None:
                raise _checkpoint_failure(root, step, cause, written) from err
            raise
        if final.exists():  # left by a run interrupted while saving this very step
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), final / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        part = final / (STATE + ".part")
        part.write_text(json.dumps(state, indent=1, default=str) + "\n")
        os.replace(part, final / STATE)  # the completion marker
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoint_failure(root: Path, step: int, err: OSError, written: int) -> OutputWriteError:
    last = latest_checkpoint(root)
    kept = f"the last complete checkpoint, {last}, is kept (resume from it)" if last else "no earlier checkpoint exists"
    problem = (f"the disk filled after {size_text(written)}" if err.errno in (errno.ENOSPC, errno.EDQUOT)
               else f"{err.strerror or err}")
    return OutputWriteError(f"cannot write checkpoint step {step} in {root}: {problem}; {kept}; free some space or "
                            f"give another --checkpoint-dir")


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text())


def load_weights(checkpoint: Path, model: nn.Module) -> None:
    """Copy `checkpoint`'s trainable weights into `model` (prepared as the run prepared it: adapters or full)."""
    weights = load_file(str(checkpoint / WEIGHTS))
    params = trainable_parameters(model)
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ConfigError(f"checkpoint {checkpoint} does not match the model's trainable weights (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer, scheduler, accelerator) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from `checkpoint`; return its loop state."""
    load_weights(checkpoint, model)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True))
    rng = checkpoint / f"rng-rank{accelerator.process_index}.pt"
    if not rng.is_file():
        raise ConfigError(f"checkpoint {checkpoint} has no RNG state for process {accelerator.process_index}: was it written with another number of processes?")
    _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return read_state(checkpoint)


def remove_checkpoints_from(root: Path, step: int) -> None:
    """Delete the complete checkpoints of `step` and later (their weights are not to be resumed from)."""
    for path in complete_checkpoints(root):
        if read_state(path)["step"] >= step:
            shutil.rmtree(path, ignore_errors=True)


def remove_checkpoints(root: Path) -> None:
    """Delete the checkpoint folders this module writes (complete, incomplete and temporary), and `root` itself if
    nothing else is left in it."""
    for path in [*_written_here(root, STEP_NAME), *_written_here(root, TEMPORARY_NAME)]:
        shutil.rmtree(path, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()

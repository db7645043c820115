"""Small helpers every stage shares: model modes, hooks, batching, bundled files, hashes, versions."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import platform
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .errors import FidelpruneError


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; the model's train/eval mode is restored afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode, every parameter frozen; restores both afterwards so the caller's model is unchanged."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with eval_mode(model):
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad[name])


@contextmanager
def registered(handles: list) -> Iterator[None]:
    """Remove the hook handles when the block ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_finite_weights(model: nn.Module, what: str = "the model") -> None:
    """NaN or inf in the weights makes every score, loss and perplexity meaningless: stop with a clear error."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FidelpruneError(f"{what} has NaN or inf weights ({name}): it is damaged; load the checkpoint again or "
                                  f"use another one")


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


def bundled_path(relative: str) -> Path:
    """Path of a file shipped in fidelprune/data (see its SOURCES.md)."""
    return Path(str(resources.files("fidelprune") / "data" / relative))


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def moved_names(module: str, moves: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that still finds the names `moves` took to other modules ({name: new module}), with a
    DeprecationWarning saying where to import them from (fidelprune 0.2 moved them; a later version drops them)."""

    def __getattr__(name: str) -> object:
        if name not in moves:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {moves[name]}.{name}; import it from there", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moves[name]), name)

    return __getattr__


def library_versions(*packages: str) -> dict[str, str]:
    """The versions a result depends on, recorded in every manifest and results file; `packages` adds those of
    other installed packages (recovery: peft, accelerate)."""
    import transformers

    return {"fidelprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            **{name: importlib.metadata.version(name) for name in packages}}

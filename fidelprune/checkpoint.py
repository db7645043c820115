"""Atomic save of a pruned model with its manifest (pruning.json), scores and calibration tokens."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .scoring import Scores

MANIFEST = "pruning.json"
SCORES_FILE = "scores.safetensors"
CALIBRATION_FILE = "calibration.safetensors"


class OutputExistsError(FileExistsError):
    """The output directory already holds files."""


def check_output_dir(output: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty output directory unless overwrite; call before any compute."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {output} is not empty; choose another --output or pass --overwrite")
    return output


def atomic_directory_write(output: str | Path, write, overwrite: bool = False) -> Path:
    """Run write(tmp_dir) in a temporary sibling of `output`, then rename it into place, so an interrupted run
    never leaves a directory that looks complete."""
    output = check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        write(tmp)
        _default_permissions(tmp)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(old / output.name)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _default_permissions(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give the output the permissions of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_scores(scores: Scores, path: str | Path, extra: Scores | None = None, prefix: str = "layer") -> None:
    tensors = {f"{prefix}.{i}": s.float().contiguous() for i, s in scores.items()}
    for name, s in (extra or {}).items():
        tensors[name] = s.float().contiguous()
    save_file(tensors, str(path))


def load_scores(path: str | Path, prefix: str = "layer") -> Scores:
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path} (give a scores.safetensors from an earlier run)")
    tensors = load_file(str(path))
    scores = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith(prefix + ".")}
    if not scores:
        raise ValueError(f"{path} holds no '{prefix}.N' score tensors")
    return dict(sorted(scores.items()))


def save_pruned(
    model: nn.Module,
    tokenizer,
    output: str | Path,
    manifest: dict,
    scores: Scores,
    calibration_ids: torch.Tensor | None,
    *,
    extra_scores: Scores | None = None,
    overwrite: bool = False,
    reconstruction_ids: torch.Tensor | None = None,
) -> Path:
    """Write safetensors weights + config + generation config + tokenizer + pruning.json + scores and the
    exact calibration token ids, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_scores(scores, tmp / SCORES_FILE, extra_scores)
        windows = {"input_ids": calibration_ids, "reconstruction_ids": reconstruction_ids}  # the latter: separate windows
        windows = {name: ids.contiguous() for name, ids in windows.items() if ids is not None}
        if windows:
            save_file(windows, str(tmp / CALIBRATION_FILE))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    return atomic_directory_write(output, write, overwrite)


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a fidelprune output directory?")
    return json.loads(path.read_text())

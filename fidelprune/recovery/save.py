"""Write a recovered model: a vanilla transformers checkpoint + recovery.json (+ the input's pruning.json)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..layout import MANIFEST, RECOVERY_FILE
from ..outputs import atomic_directory_write, loaded_from, save_model, tensor_bytes
from .train import RecoveryReport


def save_recovered(model: nn.Module, tokenizer, report: RecoveryReport, output: str | Path, overwrite: bool = False) -> Path:
    """Safetensors weights, config, generation config and tokenizer, recovery.json, and the pruned input's
    pruning.json extended with a pointer to the recovery, all written atomically. Only the main process
    writes (under accelerate / torchrun every process returns the path)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return Path(output)
    tokenizer = tokenizer if tokenizer is not None else report.tokenizer

    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp)
        (tmp / RECOVERY_FILE).write_text(json.dumps(report.record, indent=2, default=str) + "\n")
        if report.pruning_manifest is not None:
            r = report.record
            manifest = {**report.pruning_manifest, "recovery": {
                "file": RECOVERY_FILE, "mode": r["hyperparameters"]["mode"], "loss": r["hyperparameters"]["loss"],
                "steps": r["training"]["steps"], "tokens": r["training"]["tokens"], "from": r["student"]["path"]}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    student = report.record.get("student", {}).get("path")
    inputs = [*loaded_from(model), *([Path(student)] if student and Path(student).exists() else [])]
    return atomic_directory_write(output, write, overwrite, inputs, size=tensor_bytes(model))

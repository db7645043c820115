"""The end-to-end pruning recipe: plan width -> calibrate -> score -> select -> remove -> (save)."""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .adapters import UnsupportedModelError, can_add_down_bias, get_adapter, mlp_views
from .allocation import AllocationConfig, WidthPlan, count_parameters, params_after_widths, plan_width, select_neurons
from .calibration import DEFAULT_CALIBRATION, record_dict, sample_windows
from .checkpoint import load_scores, save_pruned
from .methods import RECIPES, MethodConfig, MethodResult, run_method
from .models import ModelSource, parameters_sha256
from .scoring import Scores
from .surgery import remove_neurons

# Sized so the packaged SmolLM2 prunes in a few minutes on a 2-core CPU; the seed methods use 1,024 x 1,024.
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256


def library_versions() -> dict[str, str]:
    import transformers

    return {"fidelprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _width_range(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)} (per layer)"


def alloc_record(alloc: AllocationConfig, plan: WidthPlan) -> dict:
    return {**asdict(alloc), **plan.to_dict()}


@dataclass
class PruneReport:
    """What a pruning run did: `manifest` is pruning.json; scores and token ids go to their own files."""

    manifest: dict
    scores: Scores
    extra_scores: Scores = field(default_factory=dict)
    calibration_ids: torch.Tensor | None = None

    def summary(self) -> dict:
        m = self.manifest
        return {
            "method": m["method"]["method"],
            "width": f'{m["allocation"]["width_before"]} -> {_width_range(m["allocation"]["layer_widths_after"])}',
            "params": f'{m["allocation"]["params_before"]:,} -> {m["allocation"]["params_after"]:,}',
            "target ratio": m["allocation"]["target_ratio"],
            "achieved ratio": round(m["allocation"]["achieved_ratio"], 4),
            "scoring s": round(m["timings_s"]["scoring"], 1),
        }


def prune(
    model: nn.Module,
    tokenizer=None,
    method: str = "hfprune",
    ratio: float | None = 0.2,
    *,
    keep: int | None = None,
    round_to: int = 8,
    calibration: str | Path = DEFAULT_CALIBRATION,
    calibration_ids: torch.Tensor | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    batch_size: int = 4,
    objective: str | None = None,
    form: str | None = None,
    alpha: float | None = None,
    temperature: float | None = None,
    aggregation: str = "mean",
    allocation: str = "uniform",
    protect_first: int = 0,
    protect_last: int = 0,
    min_keep: int | None = None,
    scores: str | Path | Scores | None = None,
    inplace: bool = False,
    progress: bool = True,
    source: ModelSource | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune every layer's MLP to the same width and return (pruned model, report).

    `ratio` is the fraction of total parameters removed (or give `keep`, neurons per layer); `allocation`
    "global" ranks all layers' neurons together (non-uniform widths, see load_model), and `protect_first` /
    `protect_last` layers keep every neuron. Calibration is
    drawn from `calibration` (bundled "c4", or a .txt/.jsonl/.parquet file) unless `calibration_ids` [N, L]
    are given. `scores` (a dict or a scores.safetensors from an earlier run) skips scoring entirely. The
    input model is left untouched unless `inplace=True` (which saves a copy's memory)."""
    get_adapter(model)  # unsupported architectures stop here, before any compute
    if keep is not None:
        ratio = None
    config = MethodConfig(method, objective, form, alpha, temperature, batch_size=batch_size, seed=seed, aggregation=aggregation)
    alloc = AllocationConfig(allocation, round_to, protect_first, protect_last, min_keep)
    adds_bias = method == "flap" and scores is None
    if adds_bias and not can_add_down_bias(model):
        raise UnsupportedModelError(
            f"flap folds its compensation into a down_proj bias, but {model.config.model_type} models have no MLP "
            f"bias option in transformers; use wanda-sp or another method"
        )
    protected = alloc.protected(len(mlp_views(model)))
    plan = plan_width(model, ratio=ratio, keep=keep, round_to=round_to, protected=protected, adds_mlp_bias=adds_bias)
    config = config.resolved(plan.achieved_ratio)
    timings: dict[str, float] = {}
    source = source or ModelSource(getattr(model.config, "_name_or_path", "") or "in-memory", None, None, parameters_sha256(model))
    layer_widths_before = [v.width for v in mlp_views(model)]

    start = time.perf_counter()
    calibration_record = None
    needs_data = scores is None and RECIPES[config.method].kind != "data-free"
    if calibration_ids is not None:
        calibration_record = {"source": "given token ids", "samples": len(calibration_ids), "seq_len": calibration_ids.shape[1]}
    elif needs_data:
        if tokenizer is None:
            raise ValueError(f"{method} needs a tokenizer to draw calibration windows (or pass calibration_ids)")
        calibration_ids, record = sample_windows(tokenizer, calibration, samples, seq_len, seed)
        calibration_record = record_dict(record)
    timings["calibration"] = time.perf_counter() - start

    start = time.perf_counter()
    if scores is not None:
        loaded = load_scores(scores) if isinstance(scores, (str, Path)) else scores
        result = MethodResult(loaded, select_neurons(loaded, plan, alloc), stages=[{"name": "from saved scores", "scores": str(scores) if isinstance(scores, (str, Path)) else "given"}])
    else:
        result = run_method(model, calibration_ids, config, plan, alloc, progress=progress)
    timings["scoring"] = time.perf_counter() - start

    start = time.perf_counter()
    pruned = model if inplace else copy.deepcopy(model)
    remove_neurons(pruned, result.kept, result.down_bias_shift)
    widths = {i: len(k) for i, k in result.kept.items()}
    params_after = count_parameters(pruned)
    if params_after != params_after_widths(model, widths, adds_bias):
        raise RuntimeError(f"pruned model has {params_after} parameters, expected {params_after_widths(model, widths, adds_bias)}")
    timings["pruning"] = time.perf_counter() - start

    scored_tokens = 0 if calibration_ids is None or scores is not None else calibration_ids.numel() * max(1, len(result.stages))
    manifest = {
        "fidelprune_version": __version__,
        "source_model": source.to_dict(),
        "architecture": model.config.model_type,
        "method": config.to_dict(),
        "stages": result.stages,
        "calibration": calibration_record,
        "allocation": {
            **alloc_record(alloc, plan), "params_after": params_after, "achieved_ratio": 1 - params_after / plan.params_before,
            "layer_widths_before": layer_widths_before, "layer_widths_after": [widths[i] for i in sorted(widths)],
        },
        "kept_neurons": {str(i): k.tolist() for i, k in sorted(result.kept.items())},
        "timings_s": timings,
        "scoring_tokens_per_s": scored_tokens / timings["scoring"] if scored_tokens and timings["scoring"] > 0 else None,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": library_versions(),
    }
    return pruned, PruneReport(manifest, result.scores, result.extra_scores, calibration_ids)


def save(model: nn.Module, tokenizer, report: PruneReport, output: str | Path, overwrite: bool = False) -> Path:
    """Write the pruned checkpoint (vanilla transformers layout) plus pruning.json, scores and calibration ids."""
    start = time.perf_counter()
    path = save_pruned(model, tokenizer, output, report.manifest, report.scores, report.calibration_ids,
                       extra_scores=report.extra_scores, overwrite=overwrite)
    report.manifest["timings_s"]["save"] = time.perf_counter() - start  # in memory only: the file is already written
    return path

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
from .reconstruction import DEFAULT_LAMBDA as RECONSTRUCT_LAMBDA
from .reconstruction import check_options as check_reconstruct_options
from .reconstruction import reconstruct as reconstruct_mlps
from .reconstruction import reconstruction_windows
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
    reconstruction_ids: torch.Tensor | None = None  # only when reconstruction used windows other than scoring's

    def summary(self) -> dict:
        m = self.manifest
        recon, extra = m.get("reconstruction") or {"mode": "none"}, {}
        if recon["mode"] != "none":
            extra["reconstruction"] = (
                f'{recon["mode"]}, layer error {recon["mean_error_before"]:.3f} -> {recon["mean_error_after"]:.3f}, {recon["seconds"]:.1f} s'
                if recon["layers"] else f'{recon["mode"]} (no layer lost neurons)'
            )
        return {
            "method": m["method"]["method"],
            "width": f'{m["allocation"]["width_before"]} -> {_width_range(m["allocation"]["layer_widths_after"])}',
            "params": f'{m["allocation"]["params_before"]:,} -> {m["allocation"]["params_after"]:,}',
            "target ratio": m["allocation"]["target_ratio"],
            "achieved ratio": round(m["allocation"]["achieved_ratio"], 4),
            "scoring s": round(m["timings_s"]["scoring"], 1),
            **extra,
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
    reconstruct: str = "none",
    reconstruct_lambda: float = RECONSTRUCT_LAMBDA,
    reconstruct_target: str = "layer",
    reconstruct_calibration: str | Path | torch.Tensor | None = None,
    reconstruct_samples: int | None = None,
    reconstruct_seed: int | None = None,
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
    input model is left untouched unless `inplace=True` (which saves a copy's memory).

    `reconstruct` ("parallel" or "sequential", see docs/reconstruction.md) refits each pruned MLP's down_proj
    (and bias) by ridge least squares, `reconstruct_lambda`, on the scoring windows, or on separate ones:
    `reconstruct_calibration` token ids [N, L] or a text source, drawn with `reconstruct_samples` (default
    `samples`) and `reconstruct_seed` (default seed + 1); giving only the count or the seed draws separate windows
    from `calibration`. `reconstruct_target` "dense" fits sequential mode to the dense model's outputs instead of
    each layer's own. The default "none" is the published method as is."""
    get_adapter(model)  # unsupported architectures stop here, before any compute
    check_reconstruct_options(reconstruct, reconstruct_lambda, reconstruct_target)
    if reconstruct == "none" and (reconstruct_calibration is not None or reconstruct_samples or reconstruct_seed is not None):
        raise ValueError("separate reconstruction windows were given but reconstruct is 'none': choose parallel or sequential")
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
    scores_need_data = scores is None and RECIPES[config.method].kind != "data-free"
    # Separate reconstruction windows: from reconstruct_calibration, or from `calibration` when only their count
    # or seed is given; otherwise the refit reuses the scoring windows.
    separate_source = reconstruct_calibration
    if separate_source is None and (reconstruct_samples or reconstruct_seed is not None):
        separate_source = calibration
    needs_data = scores_need_data or (reconstruct != "none" and separate_source is None)
    if calibration_ids is not None:
        calibration_record = {"source": "given token ids", "samples": len(calibration_ids), "seq_len": calibration_ids.shape[1]}
    elif needs_data:
        if tokenizer is None:
            who = method if scores_need_data else "reconstruction"
            raise ValueError(f"{who} needs a tokenizer to draw calibration windows (or pass calibration_ids)")
        calibration_ids, record = sample_windows(tokenizer, calibration, samples, seq_len, seed)
        calibration_record = record_dict(record)
    reconstruction_ids = reconstruction_record = None
    if reconstruct != "none":  # drawn now, so a source too small fails before any compute
        reconstruction_ids, reconstruction_record = reconstruction_windows(
            separate_source, calibration_ids, tokenizer, reconstruct_samples or samples, seq_len,
            seed + 1 if reconstruct_seed is None else reconstruct_seed,
        )
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
    timings["pruning"] = time.perf_counter() - start
    shift = result.down_bias_shift
    reconstruction = None
    if reconstruct != "none":
        # On the still-dense copy, before surgery: each layer's Gram needs every neuron's activation. FLAP adds a
        # down_proj bias anyway; there the fitted intercept replaces its mean compensation.
        reconstruction = reconstruct_mlps(pruned, result.kept, reconstruction_ids, reconstruct, reconstruct_lambda,
                                          target=reconstruct_target, fit_bias=shift is not None, batch_size=batch_size,
                                          progress=progress)
        shift = reconstruction.bias_shift if shift is not None else None
        timings["reconstruction"] = reconstruction.seconds
    start = time.perf_counter()
    remove_neurons(pruned, result.kept, shift)
    widths = {i: len(k) for i, k in result.kept.items()}
    params_after = count_parameters(pruned)
    if params_after != params_after_widths(model, widths, adds_bias):
        raise RuntimeError(f"pruned model has {params_after} parameters, expected {params_after_widths(model, widths, adds_bias)}")
    timings["pruning"] += time.perf_counter() - start

    scored_tokens = 0 if calibration_ids is None or not scores_need_data else calibration_ids.numel() * max(1, len(result.stages))
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
        "reconstruction": {"mode": "none"} if reconstruction is None else {
            **reconstruction.to_dict(), "windows": reconstruction_record,
            **({"replaces": "flap's mean compensation (the fitted intercept is the down_proj bias)"} if result.down_bias_shift is not None else {}),
        },
        "timings_s": timings,
        "scoring_tokens_per_s": scored_tokens / timings["scoring"] if scored_tokens and timings["scoring"] > 0 else None,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": library_versions(),
    }
    separate = reconstruction_ids if reconstruction_record and not reconstruction_record["same_as_scoring"] else None
    return pruned, PruneReport(manifest, result.scores, result.extra_scores, calibration_ids, separate)


def save(model: nn.Module, tokenizer, report: PruneReport, output: str | Path, overwrite: bool = False) -> Path:
    """Write the pruned checkpoint (vanilla transformers layout) plus pruning.json, scores and calibration ids."""
    start = time.perf_counter()
    path = save_pruned(model, tokenizer, output, report.manifest, report.scores, report.calibration_ids,
                       extra_scores=report.extra_scores, overwrite=overwrite, reconstruction_ids=report.reconstruction_ids)
    report.manifest["timings_s"]["save"] = time.perf_counter() - start  # in memory only: the file is already written
    return path

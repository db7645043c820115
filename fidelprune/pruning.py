"""The pruning run: plan width -> calibrate -> score -> select -> (refit) -> remove -> (save), and around it, for a
model given by location, the checks before the load, the memory plan, the load and the save.

    config = PruneConfig(MethodConfig("sdmprune"), allocation=AllocationConfig(ratio=0.3))
    pruned, report = fidelprune.prune(model, tokenizer, config)
    pruned, report = fidelprune.prune(model, tokenizer, method="sdmprune", ratio=0.3)   # the same, as keywords
    run = fidelprune.prune_location("smollm2", config, "pruned/")   # `fidelprune prune`: load, prune, save

Everything that can be checked from the config and the model's shapes is checked before any compute.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed
from ._version import __version__
from .adapters import AdaptedModel, adapt
from .allocation import AllocationConfig, WidthPlan, count_parameters, params_after_widths, select_neurons
from .calibration import record_dict, sample_windows
from .errors import ConfigError
from .methods import MethodConfig, MethodResult, run_method
from .models import (
    DEFAULT_MODEL,
    ModelSource,
    load_model,
    load_tokenizer,
    locate,
    mapped_share,
    parameters_sha256,
    resolve_device,
    resolve_dtype,
    source_paths,
    stored_dtype,
)
from .outputs import check_output_dir, check_output_space, check_scores_fit, claimed, load_scores, loaded_from, save_pruned
from .placement import describe, device_map_of, offloaded, resolve_device_map
from .planner import MemoryPlan, check_device_map_fits, check_fits, plan_run
from .preflight import check_calibration, check_prune
from .reconstruction import ReconstructionResult, reconstruction_windows
from .reconstruction import reconstruct as reconstruct_mlps
from .scoring import Scores, ScoringError
from .search import search_space, search_widths
from .settings import RECIPES, PruneConfig, check_width_plan
from .surgery import remove_heads, remove_layers, remove_neurons
from .utils import check_finite_weights, library_versions, moved_names

__all__ = ["PruneConfig", "PruneReport", "PruneRun", "RECIPES", "prune", "prune_location", "save"]
log = logging.getLogger(__name__)
__getattr__ = moved_names(__name__, {"DEFAULT_RATIO": "fidelprune.settings", "DEFAULT_CALIBRATION": "fidelprune.calibration",
                                     "DEFAULT_SAMPLES": "fidelprune.calibration", "DEFAULT_SEQ_LEN": "fidelprune.calibration"})


def _width_range(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)} (per layer)"


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
        if m["allocation"].get("dropped_layers"):
            extra["dropped layers"] = ", ".join(map(str, m["allocation"]["dropped_layers"]))
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
    method: str | PruneConfig | None = None,
    ratio: float | None = None,
    *,
    config: PruneConfig | None = None,
    calibration_ids: torch.Tensor | None = None,
    scores: str | Path | Scores | None = None,
    inplace: bool = False,
    progress: bool = True,
    source: ModelSource | None = None,
    stream_on: str | torch.device | None = None,
    **options,
) -> tuple[nn.Module, PruneReport]:
    """Prune the model's MLP neurons and return (pruned model, report); the input model is left untouched
    unless `inplace=True` (which saves a copy's memory).

    Settings come as a `PruneConfig` (`prune(model, tokenizer, config)`), or as keywords, one per CLI flag
    (`method` (default hfprune), `ratio` or `keep`, `allocation`, `reconstruct`, `recipe`, ...; see
    `PruneConfig.from_options`). `ratio` is
    the fraction of total parameters removed; uniform allocation gives every layer the same width (a vanilla
    checkpoint), global allocation and protected layers give per-layer widths (see load_model).

    Data, not settings: `calibration_ids` [N, L] replace the drawn calibration windows; `scores` (a dict or an
    earlier run's scores.safetensors) skip scoring entirely; `reconstruct_calibration` may be token ids [N, L]
    for the refit (docs/reconstruction.md). `source` records where the model came from.

    `stream_on` (a device) runs scoring and reconstruction one decoder layer at a time on that device while the
    layers' weights stay where the model is (CLI: --offload cpu): the same scores, for one layer's weights and one
    batch's activations of device memory (docs/scale.md). The returned model is where the input model was. A model
    loaded on the CPU in its checkpoint's stored dtype has its weights memory-mapped from the safetensors files by
    transformers; streamed, they stay mapped (CLI: --offload disk)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prune() takes a loaded model, got {type(model).__name__}; for a folder, .gguf file or hub id "
                          f"use fidelprune.prune_location(source, config, output), or load it with fidelprune.load_model")
    if scores is not None and not isinstance(scores, (str, Path, dict)):
        raise ConfigError(f"scores must be a scores.safetensors path or a {{layer: tensor}} dict, got {type(scores).__name__}")
    if isinstance(method, PruneConfig):
        config, method = method, None
    reconstruction_ids = None
    if config is not None:
        if options or ratio is not None or method is not None:
            raise ConfigError("pass the settings either as a PruneConfig or as keywords, not both")
    else:
        unknown = sorted(set(options) - set(inspect.signature(PruneConfig.from_options).parameters))
        if unknown:
            raise ConfigError(f"prune() has no option {unknown[0]!r}; the options are PruneConfig.from_options' "
                              f"keywords, one per CLI flag (fidelprune prune --help)")
        if isinstance(options.get("reconstruct_calibration"), torch.Tensor):
            reconstruction_ids = options.pop("reconstruct_calibration")
        config = PruneConfig.from_options(method, ratio, **options)
    adapted = adapt(model)
    check_placement(model, streamed=stream_on is not None)
    if any(p.is_inference() for p in model.parameters()):
        raise ConfigError("the model's weights were made under torch.inference_mode(), so no gradient can flow "
                          "through them; load the model outside inference_mode")
    if stream_on is not None:
        adapted.stream(stream_on)
    # Gradient methods need autograd: a caller's no_grad() or inference_mode() block (a notebook's habit) is lifted
    # for the run; every weight stays frozen, so nothing else changes.
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _run(adapted, tokenizer, config, calibration_ids=calibration_ids,
                        reconstruction_ids=reconstruction_ids, scores=scores, inplace=inplace, progress=progress,
                        source=source)
    finally:
        adapted.unstream()


def check_placement(model: nn.Module, streamed: bool) -> None:
    """A model spread over devices (placement.py, or transformers' device_map) is scored where it is; weights that
    accelerate offloads (meta tensors between calls) cannot be read by the score forms, surgery or the refit."""
    missing = offloaded(model)
    if missing:
        raise ConfigError(f"{len(missing)} weights (e.g. {missing[0]}) are offloaded by accelerate and not in memory; load "
                          f"the model without 'cpu'/'disk' device map entries (fidelprune.load_model(..., device_map=...)) "
                          f"or on one device and pass stream_on")
    if streamed and device_map_of(model) and len(set(device_map_of(model).values())) > 1:
        raise ConfigError("stream_on (--offload) runs a model that is on one device; this one is spread over devices by a "
                          "device map: use one or the other")


def check_token_ids(name: str, ids, vocab: int) -> None:
    """Given windows must be [N, L] token ids of this model's vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] < 2 or not len(ids):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"{name} must be a [N, L] tensor of token ids (torch.long, N >= 1, L >= 2), got {got}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ConfigError(f"{name} holds ids outside the model's vocabulary [0, {vocab}): were they made with another tokenizer?")


def _windows(tokenizer, config: PruneConfig, calibration_ids: torch.Tensor | None, reconstruction_ids: torch.Tensor | None,
             scores_need_data: bool) -> tuple[torch.Tensor | None, dict | None, torch.Tensor | None, dict | None]:
    """(scoring windows, their record, reconstruction windows, their record). All are drawn before any compute,
    so a source too small fails at once."""
    calib, recon = config.calibration, config.reconstruction
    # Separate reconstruction windows: given ids, or drawn from recon.calibration, or from the scoring corpus when
    # only their count or seed is given; otherwise the refit reuses the scoring windows.
    own_source, samples, seed = recon.own_draw(calib)
    separate_source = reconstruction_ids if reconstruction_ids is not None else own_source if recon.separate else None
    needs_data = (scores_need_data or config.allocation.kind == "search"
                  or (recon.mode != "none" and separate_source is None))
    record = None
    if calibration_ids is not None:
        record = {"source": "given token ids", "samples": len(calibration_ids), "seq_len": calibration_ids.shape[1]}
    elif needs_data:
        if tokenizer is None:
            who = (config.method.method if scores_need_data
                   else "--allocation search" if config.allocation.kind == "search" else "reconstruction")
            raise ConfigError(f"{who} needs a tokenizer to draw calibration windows (or pass calibration_ids)")
        calibration_ids, drawn = sample_windows(tokenizer, calib.source, calib.samples, calib.seq_len, calib.seed,
                                                calib.sampling)
        record = record_dict(drawn)
    if config.allocation.kind == "search" and len(calibration_ids) < config.allocation.search_samples:
        raise ConfigError(f"--search-samples {config.allocation.search_samples} is more than the {len(calibration_ids)} "
                          f"calibration windows; choose --search-samples {len(calibration_ids)} or less, or more --samples")
    if recon.mode == "none":
        return calibration_ids, record, None, None
    ids, recon_record = reconstruction_windows(separate_source, calibration_ids, tokenizer, samples, calib.seq_len, seed,
                                               calib.sampling)
    return calibration_ids, record, ids, recon_record


def _run(
    adapted: AdaptedModel,
    tokenizer,
    config: PruneConfig,
    *,
    calibration_ids: torch.Tensor | None,
    reconstruction_ids: torch.Tensor | None,
    scores: str | Path | Scores | None,
    inplace: bool,
    progress: bool,
    source: ModelSource | None,
) -> tuple[nn.Module, PruneReport]:
    model, recon = adapted.model, config.reconstruction
    if recon.mode == "none" and reconstruction_ids is not None:
        raise ConfigError("separate reconstruction windows were given but reconstruct is 'none': choose parallel or sequential")
    plan = check_width_plan(adapted, config, scores is not None)
    method = config.method.resolved(plan.achieved_ratio)
    timings: dict[str, float] = {}
    source = source or ModelSource(getattr(model.config, "_name_or_path", "") or "in-memory", None, None, parameters_sha256(model))
    layer_widths_before = adapted.widths()
    vocab = model.get_input_embeddings().num_embeddings
    for name, ids in (("calibration_ids", calibration_ids), ("reconstruct_calibration", reconstruction_ids)):
        if ids is not None:
            check_token_ids(name, ids, vocab)
    if scores is not None:  # scores from another model would silently prune the wrong neurons
        given = str(scores) if isinstance(scores, (str, Path)) else "given"
        loaded = load_scores(scores) if isinstance(scores, (str, Path)) else scores
        check_scores_fit({i: tuple(t.shape) for i, t in loaded.items()}, layer_widths_before, given)

    start = time.perf_counter()
    scores_need_data = scores is None and method.spec.kind != "data-free"
    calibration_ids, calibration_record, reconstruction_ids, reconstruction_record = _windows(
        tokenizer, config, calibration_ids, reconstruction_ids, scores_need_data)
    timings["calibration"] = time.perf_counter() - start
    if distributed.world_size() > 1:  # each process scores a share of these windows: they must be the same ones
        distributed.check_same("the model", source.sha256 or parameters_sha256(model))
        for name, ids in (("the calibration windows", calibration_ids), ("the reconstruction windows", reconstruction_ids)):
            distributed.check_same(name, "none" if ids is None else hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest())

    start = time.perf_counter()
    if scores is not None:
        result = MethodResult(loaded, select_neurons(loaded, plan, config.allocation),
                              stages=[{"name": "from saved scores", "scores": given}])
    else:
        try:
            result = run_method(adapted, calibration_ids, method, plan, config.allocation, progress=progress,
                                score_layers=plan.drop_layers > 0, score_heads=plan.query_heads_after is not None)
        except ScoringError:
            check_finite_weights(model)  # damaged weights explain non-finite scores better than an overflow does
            raise
    timings["scoring"] = time.perf_counter() - start
    search_record = None
    if config.allocation.kind == "search":
        start = time.perf_counter()
        result.kept, search_record = _search_widths(adapted, result.scores, plan, config, calibration_ids,
                                                    method.batch_size, progress)
        timings["search"] = time.perf_counter() - start

    dropped = _drop_layers(result, plan, config.allocation) if plan.drop_layers else []
    heads = _select_heads(result, plan, dropped, adapted.attention(0).kv_heads) if plan.query_heads_after else {}
    # the parameter count the surgery must reach (counted on the model before it, which `inplace` changes)
    expected = params_after_widths(adapted, {i: len(k) for i, k in result.kept.items()}, plan.adds_mlp_bias) - sum(
        _layer_params(adapted, i, plan.adds_mlp_bias) for i in dropped) - sum(
        adapted.attention(i).params_removed(plan.query_heads_after, plan.kv_heads_after) for i in heads)

    start = time.perf_counter()
    pruned = adapted if inplace else adapted.copy()
    kept, shift = result.kept, result.down_bias_shift
    if dropped:  # first, so that the refit below fits each layer on the inputs it will see
        remove_layers(pruned, dropped)
        renumber = {old: new for new, old in enumerate(sorted(kept))}
        kept = {renumber[i]: k for i, k in kept.items()}
        shift = None if shift is None else {renumber[i]: s for i, s in shift.items() if i in renumber}
    stay = [i for i in range(len(layer_widths_before)) if i not in dropped]
    heads_kept = {new: heads[old] for new, old in enumerate(stay)} if heads else {}
    timings["pruning"] = time.perf_counter() - start
    reconstruction = None
    if recon.mode != "none":
        # On the still-dense copy, before surgery: each layer's Gram needs every neuron's activation. FLAP adds a
        # down_proj bias anyway; there the fitted intercept replaces its mean compensation.
        # pruned heads: each layer's o_proj is refit on the kept heads first, then its MLP on what they pass
        channels = {i: (q[:, None] * pruned.attention(i).head_dim + torch.arange(pruned.attention(i).head_dim)).reshape(-1)
                    for i, (q, _) in heads_kept.items()}
        reconstruction = reconstruct_mlps(pruned, kept, reconstruction_ids, recon.mode, recon.lam,
                                          target=recon.target, select=recon.select, fit_bias=shift is not None,
                                          attention=channels, batch_size=method.batch_size, progress=progress)
        shift = reconstruction.bias_shift if shift is not None else None
        kept = {**kept, **reconstruction.kept}  # --reconstruct-select obs chose these layers' neurons
        timings["reconstruction"] = reconstruction.seconds
    start = time.perf_counter()
    if heads_kept:  # after the refit, which zeroed the removed heads' o_proj columns: the same function
        remove_heads(pruned, heads_kept)
    remove_neurons(pruned, kept, shift)
    result.kept = dict(zip(sorted(result.kept), (kept[i] for i in sorted(kept))))  # the source model's layer numbers
    params_after = count_parameters(pruned.model)
    if params_after != expected:
        raise RuntimeError(f"pruned model has {params_after} parameters, expected {expected}")
    timings["pruning"] += time.perf_counter() - start

    # The calibration section is what windows would be drawn with; the `calibration` record says what was used
    # (given token ids, or none for data-free methods).
    settings = {**config.to_dict(), "method": method.to_dict()}
    manifest = build_manifest(
        adapted, method, config.allocation, plan, source, result, reconstruction, layer_widths_before, params_after,
        calibration_record, reconstruction_record, timings, settings,
        scored_tokens=0 if calibration_ids is None or not scores_need_data else calibration_ids.numel() * max(1, len(result.stages)),
    )
    if search_record is not None:
        manifest["allocation"]["search"] = search_record
    if heads:  # the source model's layer and head numbers
        manifest["allocation"]["kept_heads"] = {str(i): {"query": q.tolist(), "kv": kv.tolist()} for i, (q, kv) in heads.items()}
    if adapted.streamed:
        manifest["execution"] = {"mode": "streamed", "device": str(adapted.device), "weights_on": str(adapted.home)}
    elif device_map_of(model):
        manifest["execution"] = {"mode": "device map", "device_map": device_map_of(model),
                                 "layers": describe(device_map_of(model), model)}
    pruned.unstream()
    if distributed.world_size() > 1:
        manifest["data_parallel"] = {"processes": distributed.world_size(),
                                     "split": "window i scored by process i mod processes; sums reduced before selection"}
    separate = reconstruction_ids if reconstruction_record and not reconstruction_record["same_as_scoring"] else None
    return pruned.model, PruneReport(manifest, result.scores, result.extra_scores, calibration_ids, separate)


def _drop_layers(result: MethodResult, plan: WidthPlan, allocation: AllocationConfig) -> list[int]:
    """The `plan.drop_layers` unprotected layers of the lowest layer scores; `result` keeps the neurons of the
    others only (global allocation shares its budget among them again)."""
    protected = set(plan.protected_layers)
    order = sorted((i for i in range(len(result.layer_scores)) if i not in protected), key=lambda i: float(result.layer_scores[i]))
    dropped = sorted(order[: plan.drop_layers])
    stay = {i: s for i, s in result.scores.items() if i not in dropped}
    result.kept = select_neurons(stay, plan, allocation) if allocation.kind == "global" else {
        i: k for i, k in result.kept.items() if i not in dropped}
    if result.down_bias_shift is not None:
        result.down_bias_shift = {i: s for i, s in result.down_bias_shift.items() if i not in dropped}
    result.extra_scores["layer_importance"] = result.layer_scores
    return dropped


def _select_heads(result: MethodResult, plan: WidthPlan, dropped: list[int], kv_heads: int
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer that stays, Minitron's choice: the `plan.kv_heads_after` KV groups of the highest summed scores,
    and in each the `query_heads_after / kv_heads_after` query heads of the highest scores (sorted indices)."""
    per_group = plan.query_heads_after // plan.kv_heads_after
    chosen = {}
    for index, scores in result.head_scores.items():
        if index in dropped:
            continue
        groups = scores.reshape(kv_heads, -1)
        kv = torch.sort(torch.topk(groups.sum(dim=1), plan.kv_heads_after).indices).values
        query = torch.cat([j * groups.shape[1] + torch.sort(torch.topk(groups[j], per_group).indices).values for j in kv])
        chosen[index] = (query, kv)
    result.extra_scores.update({f"heads.layer.{i}": s for i, s in result.head_scores.items()})
    return chosen


def _layer_params(adapted: AdaptedModel, index: int, adds_mlp_bias: bool) -> int:
    """Decoder layer `index`'s parameters as params_after_widths counts them (with the biases a compensation adds)."""
    view = adapted.mlp(index)
    added = 2 * view.width + view.hidden_size if adds_mlp_bias and view.down.bias is None else 0
    return sum(p.numel() for p in adapted.layers[index].parameters()) + added


def _search_widths(adapted: AdaptedModel, scores: Scores, plan: WidthPlan, config: PruneConfig, calibration_ids: torch.Tensor,
                   batch_size: int, progress: bool) -> tuple[dict[int, torch.Tensor], dict]:
    """`--allocation search` (search.py): the widths of the prunable layers searched from the method's scores on
    the first calibration windows, refit in the loop when the run reconstructs; protected layers stay whole.

    The in-loop refit fits on the calibration windows, not on separate reconstruction windows: the search then
    works on one set of windows and costs the same whatever `--reconstruct-samples` is, and only the final refit
    uses the reconstruction windows. On SmolLM2 with 256 reconstruction windows this measured no worse than
    searching on them (benchmarks/RESULTS.md, "More refit windows, and the calibration draw")."""
    alloc, recon = config.allocation, config.reconstruction
    protected = set(plan.protected_layers)
    layers = [i for i in sorted(scores) if i not in protected]
    space = search_space(scores, layers, plan.width_after, alloc.round_to, alloc.min_keep, alloc.search_step)
    found = search_widths(adapted, scores, space, calibration_ids[:alloc.search_samples], alloc,
                          refit_windows=None if recon.mode == "none" else calibration_ids, lam=recon.lam,
                          batch_size=batch_size, progress=progress)
    kept = {**found.kept, **{i: torch.arange(len(scores[i])) for i in protected}}
    return dict(sorted(kept.items())), found.record


def build_manifest(
    adapted: AdaptedModel,
    method: MethodConfig,
    allocation: AllocationConfig,
    plan: WidthPlan,
    source: ModelSource,
    result: MethodResult,
    reconstruction: ReconstructionResult | None,
    layer_widths_before: list[int],
    params_after: int,
    calibration_record: dict | None,
    reconstruction_record: dict | None,
    timings: dict[str, float],
    settings: dict,
    scored_tokens: int,
) -> dict:
    """pruning.json: what went in (source, settings), what came out (widths, kept neurons, refit), what it cost."""
    widths = [len(result.kept[i]) for i in sorted(result.kept)]
    return {
        "fidelprune_version": __version__,
        "source_model": source.to_dict(),
        "architecture": adapted.config.model_type,
        "method": method.to_dict(),
        "stages": result.stages,
        "calibration": calibration_record,
        "allocation": {
            **asdict(allocation), **plan.to_dict(), "params_after": params_after,
            "achieved_ratio": 1 - params_after / plan.params_before,
            "layer_widths_before": layer_widths_before, "layer_widths_after": widths,
            **({} if result.layer_scores is None else {
                "dropped_layers": sorted(set(range(len(layer_widths_before))) - set(result.kept)),
                "layer_scores": result.layer_scores.tolist()}),
            **({} if result.head_scores is None else {
                "head_scores": {str(i): s.tolist() for i, s in result.head_scores.items()}}),
        },
        "kept_neurons": {str(i): k.tolist() for i, k in sorted(result.kept.items())},
        "reconstruction": {"mode": "none"} if reconstruction is None else {
            **reconstruction.to_dict(), "windows": reconstruction_record,
            **({"replaces": "flap's mean compensation (the fitted intercept is the down_proj bias)"} if result.down_bias_shift is not None else {}),
        },
        "timings_s": timings,
        "scoring_tokens_per_s": scored_tokens / timings["scoring"] if scored_tokens and timings["scoring"] > 0 else None,
        "device": str(adapted.device),
        "dtype": str(next(adapted.model.parameters()).dtype).replace("torch.", ""),
        "versions": library_versions(),
        "settings": settings,
    }


def save(model: nn.Module, tokenizer, report: PruneReport, output: str | Path, overwrite: bool = False) -> Path:
    """Write the pruned checkpoint (vanilla transformers layout) plus pruning.json, scores and calibration ids."""
    if not isinstance(report, PruneReport):
        raise ConfigError(f"save() needs the PruneReport that prune() returned with the model, got {type(report).__name__}")
    start = time.perf_counter()
    inputs = [*source_paths(report.manifest["source_model"]), *loaded_from(model)]  # whatever loaded it
    path = save_pruned(model, tokenizer, output, report.manifest, report.scores, report.calibration_ids,
                       extra_scores=report.extra_scores, overwrite=overwrite, reconstruction_ids=report.reconstruction_ids,
                       inputs=inputs)
    report.manifest["timings_s"]["save"] = time.perf_counter() - start  # in memory only: the file is already written
    return path


@dataclass
class PruneRun:
    """What `prune_location` did: the output written (None on a dry run), its report, and the memory plan printed
    before the load (one per device of a device map)."""

    output: Path | None
    report: PruneReport | None
    memory_plans: list[MemoryPlan]


def default_output(source: str | Path | None, config: PruneConfig) -> Path:
    """pruned-MODEL-METHOD-AMOUNT in the working directory."""
    name = Path(str(source or DEFAULT_MODEL)).name.removesuffix(".gguf")
    alloc = config.allocation
    amount = f"keep{alloc.keep}" if alloc.keep else f"{alloc.ratio:g}"
    return Path(f"pruned-{name}-{config.method.method}-{amount}")


def prune_location(
    source: str | Path | None = None,
    config: PruneConfig | None = None,
    output: str | Path | None = None,
    *,
    scores: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    offload: str | None = None,
    device_map: str | Path | dict | None = None,
    trust_remote_code: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    show: Callable[[str, dict], None] | None = None,
) -> PruneRun:
    """`fidelprune prune` as a function: prune the model at `source` (a HF directory, a .gguf file, a hub id, or
    None for the packaged default) with `config` (default PruneConfig()) and save it to `output` (default
    pruned-MODEL-METHOD-AMOUNT), with everything the CLI does around `prune`: every check that needs no weights
    (settings, files, the output, the device, the model's shapes), the memory plan (`show(title, rows)` gets its
    table; a run that will not fit stops with one line naming the flags that fit), then load, prune, save.

    `offload` ("cpu" or "disk") streams one decoder layer at a time through `device`; `device_map` spreads the
    modules over devices (placement.py); under torchrun each process scores a share of the windows and rank 0
    writes. `dry_run` stops after the memory plan. `say` gets the lines meant for people (default: logging)."""
    say = say or log.info
    show = show or (lambda title, rows: log.info("%s: %s", title, rows))
    config = config or PruneConfig()
    distributed.init_from_environment()  # under torchrun: each process scores a share
    _check_execution(device_map, offload, device)
    where = locate(source)
    output = Path(output) if output is not None else default_output(source, config)
    inputs = [*where.input_paths(), *([scores] if scores else []),
              *(Path(p) for p in (config.calibration.source, config.reconstruction.calibration) if p and Path(p).exists())]
    with ExitStack() as held:
        if not dry_run:
            check_output_dir(output, overwrite, inputs)  # rank 0 also clears what killed runs left beside the output
            if distributed.is_main():
                held.enter_context(claimed(output))  # until it is saved: a second run to it stops at once
        distributed.barrier()
        device = distributed.local_device(resolve_device(device))
        torch_dtype = resolve_dtype(dtype, device)
        if offload == "disk":
            torch_dtype = _disk_dtype(where, dtype, torch_dtype)
        shapes, width_plan = check_prune(where, config, scores, trust_remote_code)
        placement = resolve_device_map(device_map, shapes.model, torch_dtype) if device_map else None
        if distributed.is_main():
            show("pruning plan", _plan_rows(width_plan, shapes))
        plans = _memory_plans(shapes, config, torch_dtype, device, offload, placement, dry_run, where.gguf_file is None, say, show)
        if dry_run:
            return PruneRun(None, None, plans)
        if distributed.is_main():  # the pruned weights must fit on the output's disk: known now, not after the run
            check_output_space(output, width_plan.params_after * torch_dtype.itemsize)
        start = time.perf_counter()
        tokenizer = load_tokenizer(where, trust_remote_code)
        check_calibration(tokenizer, config, shapes.model.get_input_embeddings().num_embeddings,
                          scores_given=scores is not None)
        say(f"loading {source or 'packaged SmolLM2-135M-Instruct'}")
        model, tokenizer, model_source = load_model(source, dtype=torch_dtype, device="cpu" if offload else device,
                                                    trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                                                    device_map=placement)
        load_s = time.perf_counter() - start
        mapped = mapped_share(model) if offload == "disk" else None
        if mapped is not None and mapped < 0.9:
            say(f"warning: only {mapped:.0%} of the weights are memory-mapped from their files "
                f"(this transformers copied the rest into memory): --offload disk saves little over --offload cpu")
        pruned, report = prune(model, tokenizer, config, scores=scores, inplace=True, source=model_source,
                               progress=progress and distributed.is_main(), stream_on=device if offload else None)
        report.manifest["timings_s"]["load"] = load_s
        if mapped is not None:
            report.manifest["execution"].update(offload="disk", weights_on="memory-mapped from the safetensors files",
                                                weights_mapped_share=mapped)
        report.manifest["memory_plan"] = plans[0].to_dict() if len(plans) == 1 else [plan.to_dict() for plan in plans]
        path = save(pruned, tokenizer, report, output, overwrite=overwrite) if distributed.is_main() else output
        distributed.barrier()  # every process holds the same pruned model; one writes it
        return PruneRun(path, report, plans)


def _plan_rows(plan: WidthPlan, shapes: AdaptedModel) -> dict[str, str]:
    """What the run will remove, for people, before the load (the layers dropped and heads kept are chosen by
    their scores; the counts are known now)."""
    attention = shapes.attention(0)
    layers = shapes.num_layers
    rows = {"parameters": f"{plan.params_before:,} -> {plan.params_after:,} (ratio {plan.achieved_ratio:.4f})",
            "MLP width (prunable layers)": f"{plan.width_before} -> {plan.width_after}"}
    if plan.drop_layers:
        rows["decoder layers"] = f"{layers} -> {layers - plan.drop_layers} (the lowest-scoring dropped)"
    if plan.query_heads_after is not None:
        rows["attention heads"] = (f"{attention.query_heads} query / {attention.kv_heads} KV -> "
                                   f"{plan.query_heads_after} / {plan.kv_heads_after} in every layer")
    return rows


def _check_execution(device_map, offload: str | None, device: str | None) -> None:
    """Settings that decide where the run computes and exclude each other, before anything is read."""
    if offload not in (None, "cpu", "disk"):
        raise ConfigError(f"offload {offload!r}: choose cpu or disk")
    if device_map and offload:
        raise ConfigError("--device-map spreads the layers over devices and --offload streams them through one; "
                          "choose one")
    if device_map and distributed.world_size() > 1:
        raise ConfigError("--device-map under torchrun is not supported yet: each process would place the whole "
                          "model on every GPU; use torchrun with one GPU per process, or one process with --device-map")
    if device_map and device not in (None, "auto"):
        raise ConfigError("--device-map places every module itself; drop --device (or drop --device-map)")


def _disk_dtype(where, asked: str | None, resolved: torch.dtype) -> torch.dtype:
    """--offload disk computes in the dtype the weights are stored in, so that they stay mapped from the files
    (a conversion would copy them all into memory): that dtype by default, and an error for another one."""
    stored = stored_dtype(where)
    if asked not in (None, "auto") and resolved != stored:
        name = str(stored).replace("torch.", "")
        raise ConfigError(f"--offload disk keeps the weights as stored ({name}) so that they stay memory-mapped; "
                          f"pass --dtype {name}, or use --offload cpu to convert them in host memory")
    return stored


def _memory_plans(shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype, device: str, offload: str | None,
                  device_map, dry_run: bool, mappable: bool, say, show) -> list[MemoryPlan]:
    """The planner's estimate for this run, shown on rank 0 (one table per device of a device map); stops with one
    line when it will not fit."""
    plans = plan_run(shapes, config, dtype, device, offload, device_map)
    title = "memory plan (fidelprune prune --dry-run)" if dry_run else "memory plan"
    if distributed.is_main():
        if device_map:
            say(f"device map: {describe(device_map, shapes.model)}")
        for plan in plans:
            show(title + (f": {plan.device}" if device_map else ""), dict(plan.rows()))
    if device_map:
        check_device_map_fits(plans, shapes, config, dtype, device_map)
    else:
        check_fits(plans[0], shapes, config, dtype, mappable)
    return plans

"""The end-to-end pruning recipe: plan width -> calibrate -> score -> select -> (refit) -> remove -> (save).

    config = PruneConfig(MethodConfig("sdmprune"), allocation=AllocationConfig(ratio=0.3))
    pruned, report = fidelprune.prune(model, tokenizer, config)
    pruned, report = fidelprune.prune(model, tokenizer, method="sdmprune", ratio=0.3)   # the same, as keywords

Everything that can be checked from the config and the model's shapes is checked before any compute.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed
from ._version import __version__
from .adapters import AdaptedModel, UnsupportedModelError, adapt
from .allocation import AllocationConfig, AllocationError, WidthPlan, count_parameters, params_after_widths, plan_width, select_neurons
from .calibration import (DEFAULT_CALIBRATION, DEFAULT_SAMPLES, DEFAULT_SAMPLING, DEFAULT_SEQ_LEN, CalibrationConfig,
                          record_dict, sample_windows)
from .checkpoint import check_scores_fit, load_scores, save_pruned
from .errors import ConfigError
from .methods import MethodConfig, MethodResult, run_method
from .models import ModelSource, parameters_sha256, source_paths
from .placement import describe, device_map_of
from .reconstruction import DEFAULT_LAMBDA as RECONSTRUCT_LAMBDA
from .reconstruction import ReconstructionConfig, ReconstructionResult, reconstruction_windows
from .reconstruction import reconstruct as reconstruct_mlps
from .scoring import Scores, ScoringError
from .search import search_space, search_widths
from .surgery import remove_neurons
from .utils import check_finite_weights, library_versions

DEFAULT_RATIO = 0.2
# Named combinations of settings, chosen by the benchmarks (docs/methods.md, "Recipes"). A recipe fills in the
# settings it names; giving one of them as well, with another value, is an error. best's final refit fits on 256
# windows of their own (drawn with seed + 1), not the 64 scoring windows: lower perplexity at every ratio measured.
RECIPES = {
    "best": {"method": "hfprune", "allocation": "search", "reconstruct": "sequential", "reconstruct_select": "obs",
             "reconstruct_samples": 256},
}
__all__ = ["DEFAULT_CALIBRATION", "DEFAULT_RATIO", "DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN", "RECIPES", "PruneConfig",
           "PruneReport", "library_versions", "prune", "save"]


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
        return {
            "method": m["method"]["method"],
            "width": f'{m["allocation"]["width_before"]} -> {_width_range(m["allocation"]["layer_widths_after"])}',
            "params": f'{m["allocation"]["params_before"]:,} -> {m["allocation"]["params_after"]:,}',
            "target ratio": m["allocation"]["target_ratio"],
            "achieved ratio": round(m["allocation"]["achieved_ratio"], 4),
            "scoring s": round(m["timings_s"]["scoring"], 1),
            **extra,
        }


def _with_recipe(recipe: str | None, **given: str | int | None) -> tuple:
    """The settings in `given` with the recipe's filled in where none was given, else the plain defaults."""
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    named = RECIPES.get(recipe, {})
    for name, value in given.items():
        if value is not None and name in named and value != named[name]:
            flag = name.replace("_", "-")
            raise ConfigError(f"--recipe {recipe} sets --{flag} {named[name]}; drop --{flag} {value} or the recipe")
    defaults = {"method": "hfprune", "allocation": "uniform", "reconstruct": "none", "reconstruct_select": "scores",
                "reconstruct_samples": None}
    return tuple(value if value is not None else named.get(name, defaults[name]) for name, value in given.items())


@dataclass
class PruneConfig:
    """Every setting of a pruning run, in the four sections of the pipeline; recorded in pruning.json as
    `settings` (with the method's defaults filled in), from which `PruneConfig.from_dict` rebuilds it."""

    method: MethodConfig = field(default_factory=MethodConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    allocation: AllocationConfig = field(default_factory=lambda: AllocationConfig(ratio=DEFAULT_RATIO))
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    @classmethod
    def from_options(
        cls,
        method: str | None = None,
        ratio: float | None = None,
        *,
        recipe: str | None = None,
        keep: int | None = None,
        round_to: int = 8,
        calibration: str | Path = DEFAULT_CALIBRATION,
        samples: int = DEFAULT_SAMPLES,
        seq_len: int = DEFAULT_SEQ_LEN,
        seed: int = 0,
        sampling: str = DEFAULT_SAMPLING,
        batch_size: int = 4,
        objective: str | None = None,
        form: str | None = None,
        alpha: float | None = None,
        temperature: float | None = None,
        aggregation: str = "mean",
        steps: int = 1,
        allocation: str | None = None,
        protect_first: int = 0,
        protect_last: int = 0,
        min_keep: int | None = None,
        search_samples: int = 4,
        search_generations: int = 12,
        search_offspring: int = 8,
        search_step: int | None = None,
        search_seed: int = 0,
        reconstruct: str | None = None,
        reconstruct_lambda: float = RECONSTRUCT_LAMBDA,
        reconstruct_target: str = "layer",
        reconstruct_calibration: str | Path | None = None,
        reconstruct_samples: int | None = None,
        reconstruct_seed: int | None = None,
        reconstruct_select: str | None = None,
    ) -> PruneConfig:
        """The flat form, one keyword per CLI flag: `ratio` (default 0.2) or `keep`; `seed` draws the windows
        and seeds the random method; `recipe` (a RECIPES name) fills in method, allocation, reconstruct,
        reconstruct_select and reconstruct_samples, which otherwise default to hfprune, uniform, none, scores and
        None (the refit fits on the calibration windows)."""
        if ratio is None and keep is None:
            ratio = DEFAULT_RATIO
        method, allocation, reconstruct, reconstruct_select, reconstruct_samples = _with_recipe(
            recipe, method=method, allocation=allocation, reconstruct=reconstruct, reconstruct_select=reconstruct_select,
            reconstruct_samples=reconstruct_samples)
        return cls(
            MethodConfig(method, objective, form, alpha, temperature, batch_size=batch_size, seed=seed, aggregation=aggregation,
                         steps=steps),
            CalibrationConfig(str(calibration), samples, seq_len, seed, sampling),
            AllocationConfig(allocation, round_to, protect_first, protect_last, min_keep, ratio=ratio, keep=keep,
                             search_samples=search_samples, search_generations=search_generations,
                             search_offspring=search_offspring, search_step=search_step, search_seed=search_seed),
            ReconstructionConfig(reconstruct, reconstruct_lambda, reconstruct_target,
                                 None if reconstruct_calibration is None else str(reconstruct_calibration),
                                 reconstruct_samples, reconstruct_seed, reconstruct_select),
        )

    def draws_windows(self, scores_given: bool = False) -> bool:
        """Whether a run draws the calibration windows: to score, to search the widths on, or to refit on."""
        return ((not scores_given and self.method.spec.kind != "data-free") or self.allocation.kind == "search"
                or self.reconstruction.mode != "none")

    @classmethod
    def from_dict(cls, settings: dict) -> PruneConfig:
        return cls(MethodConfig(**settings["method"]), CalibrationConfig.from_dict(settings["calibration"]),
                   AllocationConfig(**settings["allocation"]), ReconstructionConfig(**settings["reconstruction"]))

    def to_dict(self) -> dict:
        return asdict(self)


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
    if isinstance(method, PruneConfig):
        config, method = method, None
    reconstruction_ids = None
    if config is not None:
        if options or ratio is not None or method is not None:
            raise TypeError("pass the settings either as a PruneConfig or as keywords, not both")
    else:
        if isinstance(options.get("reconstruct_calibration"), torch.Tensor):
            reconstruction_ids = options.pop("reconstruct_calibration")
        config = PruneConfig.from_options(method, ratio, **options)
    adapted = adapt(model)
    check_placement(model, streamed=stream_on is not None)
    if stream_on is not None:
        adapted.stream(stream_on)
    try:
        return _run(adapted, tokenizer, config, calibration_ids=calibration_ids, reconstruction_ids=reconstruction_ids,
                    scores=scores, inplace=inplace, progress=progress, source=source)
    finally:
        adapted.unstream()


def check_placement(model: nn.Module, streamed: bool) -> None:
    """A model spread over devices (placement.py, or transformers' device_map) is scored where it is; weights that
    accelerate offloads (meta tensors between calls) cannot be read by the score forms, surgery or the refit."""
    from .placement import device_map_of, offloaded

    missing = offloaded(model)
    if missing:
        raise ConfigError(f"{len(missing)} weights (e.g. {missing[0]}) are offloaded by accelerate and not in memory; load "
                          f"the model without 'cpu'/'disk' device map entries (fidelprune.load_model(..., device_map=...)) "
                          f"or on one device and pass stream_on")
    if streamed and device_map_of(model) and len(set(device_map_of(model).values())) > 1:
        raise ConfigError("stream_on (--offload) runs a model that is on one device; this one is spread over devices by a "
                          "device map: use one or the other")


def plan_for(adapted: AdaptedModel, config: PruneConfig, scores_given: bool = False) -> WidthPlan:
    """The width plan, and every check that needs only the config and the model's shapes."""
    alloc = config.allocation
    adds_bias = config.method.spec.adds_down_bias and not scores_given
    if adds_bias and not adapted.can_add_down_bias():
        raise UnsupportedModelError(
            f"{config.method.method} folds its compensation into a down_proj bias, but {adapted.config.model_type} "
            f"models have no MLP bias option in transformers; use wanda-sp or another method"
        )
    protected = alloc.protected(adapted.num_layers)
    plan = plan_width(adapted, ratio=alloc.ratio, keep=alloc.keep, round_to=alloc.round_to, protected=protected,
                      adds_mlp_bias=adds_bias)
    if alloc.kind == "search" and adds_bias:
        raise AllocationError(f"--allocation search refits down_proj without {config.method.method}'s bias compensation, "
                              f"so it would search the wrong model; use --allocation global with {config.method.method}")
    min_keep = alloc.min_keep or alloc.round_to
    if alloc.kind in ("global", "search") and min_keep > plan.width_after:
        raise AllocationError(f"--min-keep {min_keep} is more than the {plan.width_after} neurons a layer keeps on average "
                              f"at this ratio, so nothing could be pruned; choose --min-keep {plan.width_after} or less")
    return plan


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
    plan = plan_for(adapted, config, scores is not None)
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
            result = run_method(adapted, calibration_ids, method, plan, config.allocation, progress=progress)
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

    start = time.perf_counter()
    pruned = adapted if inplace else adapted.copy()
    timings["pruning"] = time.perf_counter() - start
    shift = result.down_bias_shift
    reconstruction = None
    if recon.mode != "none":
        # On the still-dense copy, before surgery: each layer's Gram needs every neuron's activation. FLAP adds a
        # down_proj bias anyway; there the fitted intercept replaces its mean compensation.
        reconstruction = reconstruct_mlps(pruned, result.kept, reconstruction_ids, recon.mode, recon.lam,
                                          target=recon.target, select=recon.select, fit_bias=shift is not None,
                                          batch_size=method.batch_size, progress=progress)
        shift = reconstruction.bias_shift if shift is not None else None
        result.kept = {**result.kept, **reconstruction.kept}  # --reconstruct-select obs chose these layers' neurons
        timings["reconstruction"] = reconstruction.seconds
    start = time.perf_counter()
    remove_neurons(pruned, result.kept, shift)
    widths = {i: len(k) for i, k in result.kept.items()}
    params_after = count_parameters(pruned.model)
    expected = params_after_widths(adapted, widths, plan.adds_mlp_bias)
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


def _search_widths(adapted: AdaptedModel, scores: Scores, plan: WidthPlan, config: PruneConfig, calibration_ids: torch.Tensor,
                   batch_size: int, progress: bool) -> tuple[dict[int, torch.Tensor], dict]:
    """`--allocation search` (search.py): the widths of the prunable layers searched from the method's scores on
    the first calibration windows, refit in the loop when the run reconstructs; protected layers stay whole.

    The in-loop refit fits on the calibration windows, not on separate reconstruction windows: the search then
    works on one set of windows and costs the same whatever `--reconstruct-samples` is, and only the final refit
    uses the reconstruction windows. On SmolLM2 with 256 reconstruction windows this measured no worse than
    searching on them (benchmarks/README.md, "More refit windows, and the calibration draw")."""
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
    start = time.perf_counter()
    inputs = source_paths(report.manifest["source_model"])
    path = save_pruned(model, tokenizer, output, report.manifest, report.scores, report.calibration_ids,
                       extra_scores=report.extra_scores, overwrite=overwrite, reconstruction_ids=report.reconstruction_ids,
                       inputs=inputs)
    report.manifest["timings_s"]["save"] = time.perf_counter() - start  # in memory only: the file is already written
    return path

"""The settings of a pruning run: `PruneConfig` (its four sections, each owned by its stage's module), the named
`RECIPES`, and the width plan every check before the load and the run itself take from them.

Each default is written once, in the field of the config section it belongs to; `PruneConfig.from_options` and the
CLI's flags read theirs from those fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .adapters import AdaptedModel, UnsupportedModelError
from .allocation import AllocationConfig, AllocationError, WidthPlan, plan_width
from .calibration import CalibrationConfig
from .errors import ConfigError
from .methods import MethodConfig
from .reconstruction import ReconstructionConfig

DEFAULT_RATIO = 0.2  # of the model's parameters, when neither a ratio nor a width is given
# Named combinations of settings, chosen by the benchmarks (docs/methods.md, "Recipes"). A recipe fills in the
# settings it names; giving one of them as well, with another value, is an error. best's final refit fits on 256
# windows of their own (drawn with seed + 1), not the 64 scoring windows: lower perplexity at every ratio measured.
RECIPES = {
    "best": {"method": "hfprune", "allocation": "search", "reconstruct": "sequential", "reconstruct_select": "obs",
             "reconstruct_samples": 256},
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
    defaults = {"method": MethodConfig.method, "allocation": AllocationConfig.kind, "reconstruct": ReconstructionConfig.mode,
                "reconstruct_select": ReconstructionConfig.select, "reconstruct_samples": ReconstructionConfig.samples}
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
        round_to: int = AllocationConfig.round_to,
        calibration: str | Path = CalibrationConfig.source,
        samples: int = CalibrationConfig.samples,
        seq_len: int = CalibrationConfig.seq_len,
        seed: int = CalibrationConfig.seed,
        sampling: str = CalibrationConfig.sampling,
        batch_size: int = MethodConfig.batch_size,
        objective: str | None = None,
        form: str | None = None,
        alpha: float | None = None,
        temperature: float | None = None,
        aggregation: str = MethodConfig.aggregation,
        steps: int = MethodConfig.steps,
        allocation: str | None = None,
        protect_first: int = AllocationConfig.protect_first,
        protect_last: int = AllocationConfig.protect_last,
        min_keep: int | None = None,
        search_samples: int = AllocationConfig.search_samples,
        search_generations: int = AllocationConfig.search_generations,
        search_offspring: int = AllocationConfig.search_offspring,
        search_step: int | None = None,
        search_seed: int = AllocationConfig.search_seed,
        drop_layers: int = AllocationConfig.drop_layers,
        keep_heads: int | None = None,
        keep_kv_heads: int | None = None,
        reconstruct: str | None = None,
        reconstruct_lambda: float = ReconstructionConfig.lam,
        reconstruct_target: str = ReconstructionConfig.target,
        reconstruct_calibration: str | Path | None = None,
        reconstruct_samples: int | None = None,
        reconstruct_seed: int | None = None,
        reconstruct_select: str | None = None,
    ) -> PruneConfig:
        """The flat form, one keyword per CLI flag, each defaulting to its config field: `ratio` (default
        DEFAULT_RATIO) or `keep`; `seed` draws the windows
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
                             search_offspring=search_offspring, search_step=search_step, search_seed=search_seed,
                             drop_layers=drop_layers, keep_heads=keep_heads, keep_kv_heads=keep_kv_heads),
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


def check_width_plan(adapted: AdaptedModel, config: PruneConfig, scores_given: bool = False) -> WidthPlan:
    """The width plan of a run, after every check that needs only its settings and the model's shapes (the
    meta-device model before the load, the real one in `prune`)."""
    alloc = config.allocation
    adds_bias = config.method.spec.adds_down_bias and not scores_given
    if adds_bias and not adapted.can_add_down_bias():
        raise UnsupportedModelError(
            f"{config.method.method} folds its compensation into a down_proj bias, but {adapted.config.model_type} "
            f"models have no MLP bias option in transformers; use wanda-sp or another method"
        )
    protected = alloc.protected(adapted.num_layers)
    if alloc.drop_layers:
        _check_drop_layers(config, scores_given)
    heads = _check_heads(adapted, config, scores_given) if alloc.prunes_heads else None
    plan = plan_width(adapted, ratio=alloc.ratio, keep=alloc.keep, round_to=alloc.round_to, protected=protected,
                      adds_mlp_bias=adds_bias, drop=alloc.drop_layers, heads=heads)
    if alloc.kind == "search" and adds_bias:
        raise AllocationError(f"--allocation search refits down_proj without {config.method.method}'s bias compensation, "
                              f"so it would search the wrong model; use --allocation global with {config.method.method}")
    min_keep = alloc.min_keep or alloc.round_to
    if alloc.kind in ("global", "search") and min_keep > plan.width_after:
        raise AllocationError(f"--min-keep {min_keep} is more than the {plan.width_after} neurons a layer keeps on average "
                              f"at this ratio, so nothing could be pruned; choose --min-keep {plan.width_after} or less")
    return plan


def _check_drop_layers(config: PruneConfig, scores_given: bool) -> None:
    """What dropping whole layers needs: a method that reads data (the layer scores come from its passes), fresh
    scores (a scores file holds neurons' only), and a refit whose target is each layer's own output."""
    method, n = config.method.spec, config.allocation.drop_layers
    if method.kind == "data-free":
        raise ConfigError(f"--drop-layers {n}: {method.name} reads no data, so it cannot score whole layers; choose a "
                          f"method that does (hfprune, sdmprune, llm-pruner, wanda-sp, flap, minitron)")
    if scores_given:
        raise ConfigError(f"--drop-layers {n} scores the layers in the scoring passes, which --scores skips; drop --scores")
    if config.reconstruction.mode != "none" and config.reconstruction.target == "dense":
        raise ConfigError(f"--drop-layers {n} with --reconstruct-target dense: the dense model's layer outputs do not "
                          f"line up with a model that lost layers; use --reconstruct-target layer (the default)")


def _check_heads(adapted: AdaptedModel, config: PruneConfig, scores_given: bool) -> tuple[int, int]:
    """(query heads, KV heads) every layer keeps under --keep-heads (per KV group) / --keep-kv-heads, after what
    head pruning needs: heads to remove, a method that reads data, fresh scores."""
    alloc, method = config.allocation, config.method.spec
    view = adapted.attention(0)
    kv = alloc.keep_kv_heads if alloc.keep_kv_heads is not None else view.kv_heads
    per_group = alloc.keep_heads if alloc.keep_heads is not None else view.group_size
    if kv > view.kv_heads:
        raise ConfigError(f"--keep-kv-heads {kv}: the model has {view.kv_heads} KV heads per layer; keep fewer")
    if per_group > view.group_size:
        raise ConfigError(f"--keep-heads {per_group}: each of the model's KV groups has {view.group_size} query heads "
                          f"({view.query_heads} query heads over {view.kv_heads} KV heads); keep fewer")
    if (kv, per_group) == (view.kv_heads, view.group_size):
        raise ConfigError("--keep-heads / --keep-kv-heads keep every head: nothing to prune; keep fewer or drop them")
    if method.kind == "data-free":
        raise ConfigError(f"{method.name} reads no data, so it cannot score attention heads; choose a method that does "
                          f"(hfprune, sdmprune, llm-pruner, wanda-sp, flap, minitron)")
    if scores_given:
        raise ConfigError("--keep-heads / --keep-kv-heads score the heads in the scoring passes, which --scores skips; "
                          "drop --scores")
    recon = config.reconstruction
    if recon.mode == "parallel" or (recon.mode == "sequential" and recon.target == "dense"):
        raise ConfigError("pruned heads are refit (o_proj, then the MLP) in sequential reconstruction to each layer's "
                          "own output: use --reconstruct sequential (target layer) or none")
    return kv * per_group, kv

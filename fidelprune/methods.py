"""Named recipes: each method is an objective x score form x schedule, read like the papers' algorithm boxes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .allocation import AllocationConfig, WidthPlan, select_neurons
from .objectives import KD, get_objective
from .scoring import (
    AGGREGATIONS, Scores, activation_statistics, flap_bias_shift, forward_scores, magnitude_scores, needed_statistics,
    random_scores, taylor_scores,
)

@dataclass(frozen=True)
class Recipe:
    kind: str  # "taylor" (gradients), "forward" (activation statistics, one forward pass) or "data-free"
    objective: str | None = None
    form: str | None = None


RECIPES: dict[str, Recipe] = {
    "hfprune": Recipe("taylor", "entropy", "activation"),
    "sdmprune": Recipe("taylor", "kd", "weight-element"),  # stage 2; stage 1 is ("ce", "weight-element")
    "llm-pruner": Recipe("taylor", "ce", "element1"),
    "wanda-sp": Recipe("forward"),
    "flap": Recipe("forward"),
    "activation": Recipe("forward"),
    "magnitude": Recipe("data-free"),
    "random": Recipe("data-free"),
}
METHODS = tuple(RECIPES)

# SDMPrune's published (alpha, temperature) for LLaMA-3.2-1B by pruning ratio; the nearest ratio's pair is the default.
SDMPRUNE_SETTINGS = {0.2: (0.4, 0.2), 0.3: (0.42, 0.5), 0.4: (0.1, 0.2)}
SDMPRUNE_STAGE1_KEEP = 0.975


def sdmprune_defaults(ratio: float) -> tuple[float, float]:
    return SDMPRUNE_SETTINGS[min(SDMPRUNE_SETTINGS, key=lambda r: abs(r - ratio))]


@dataclass
class MethodConfig:
    """Everything that decides the scores; serialised into pruning.json as it is."""

    method: str = "hfprune"
    objective: str | None = None  # override the recipe's objective (ce / entropy / kd)
    form: str | None = None  # override the recipe's score form (activation / weight-element / element1 / element2)
    alpha: float | None = None  # kd mix weight; sdmprune default from SDMPRUNE_SETTINGS
    temperature: float | None = None  # kd teacher temperature; likewise
    stage1_keep: float = SDMPRUNE_STAGE1_KEEP
    batch_size: int = 4
    seed: int = 0
    aggregation: str = "mean"  # activation method: mean |a| or l2 norm

    def __post_init__(self) -> None:
        if self.method not in RECIPES:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if RECIPES[self.method].kind != "taylor" and (self.objective or self.form):
            raise ValueError(f"{self.method} takes no gradients; --objective/--form apply to the Taylor methods only")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")

    def resolved(self, achieved_ratio: float) -> MethodConfig:
        """The config with every default filled in, as it will be recorded."""
        recipe = RECIPES[self.method]
        if recipe.kind != "taylor":
            return self
        objective, form = self.objective or recipe.objective, self.form or recipe.form
        alpha, temperature = self.alpha, self.temperature
        if objective == "kd":
            default_alpha, default_temperature = sdmprune_defaults(achieved_ratio)
            alpha = default_alpha if alpha is None else alpha
            temperature = default_temperature if temperature is None else temperature
        return replace(self, objective=objective, form=form, alpha=alpha, temperature=temperature)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodResult:
    scores: Scores  # final ranking per layer; -inf marks neurons a previous stage removed
    kept: dict[int, torch.Tensor]
    extra_scores: Scores = field(default_factory=dict)  # e.g. sdmprune's stage-1 scores, "stage1.layer.N"
    stages: list[dict] = field(default_factory=list)
    down_bias_shift: dict[int, torch.Tensor] | None = None  # flap's compensation, added to down_proj biases


def run_method(
    model: nn.Module,
    windows: torch.Tensor | None,
    config: MethodConfig,
    plan: WidthPlan,
    allocation: AllocationConfig,
    progress: bool = True,
) -> MethodResult:
    """Score the model's MLP neurons with `config` (already resolved) and choose the neurons `plan` keeps."""
    recipe = RECIPES[config.method]
    choose = lambda scores, candidates=None: select_neurons(scores, plan, allocation, candidates)  # noqa: E731
    if recipe.kind == "data-free":
        scores = magnitude_scores(model) if config.method == "magnitude" else random_scores(model, config.seed)
        return MethodResult(scores, choose(scores), stages=[{"name": config.method}])
    if windows is None:
        raise ValueError(f"{config.method} needs calibration windows")
    if recipe.kind == "forward":
        stats = activation_statistics(model, windows, batch_size=config.batch_size, progress=progress,
                                      statistics=needed_statistics(config.method, config.aggregation))
        scores = forward_scores(model, stats, config.method, config.aggregation)
        kept = choose(scores)
        shift = flap_bias_shift(model, stats, kept) if config.method == "flap" else None
        return MethodResult(scores, kept, stages=[{"name": "forward", "aggregation": config.aggregation}], down_bias_shift=shift)

    common = dict(batch_size=config.batch_size, progress=progress)
    objective = get_objective(config.objective, config.alpha, config.temperature)
    if config.method != "sdmprune":
        scores = taylor_scores(model, windows, objective, config.form, needs_teacher=config.objective == "kd", **common)
        return MethodResult(scores, choose(scores), stages=[{"name": "one-shot", "objective": config.objective, "form": config.form}])

    # SDMPrune stage 1: CE, weight-element form, each prunable layer to 97.5 % of its neurons (never below the
    # final width); a uniform cut whatever the final allocation.
    stage1_plan = replace(plan, width_after=max(plan.width_after, int(config.stage1_keep * plan.width_before)))
    stage1 = taylor_scores(model, windows, get_objective("ce"), config.form, description="stage 1 (ce)", **common)
    survivors = select_neurons(stage1, stage1_plan, replace(allocation, kind="uniform"))
    stages = [{"name": "stage1", "objective": "ce", "form": config.form, "keep": stage1_plan.width_after}]
    extra = {f"stage1.layer.{i}": s for i, s in stage1.items()}
    if stage1_plan.width_after == plan.width_after and allocation.kind == "uniform":
        return MethodResult(stage1, survivors, extra, stages)
    # Stage 2: the stage-1 model (the original with neurons masked) learns from the original (hooks off).
    stage2 = taylor_scores(
        model, windows, KD(config.alpha, config.temperature), config.form, mask=survivors, needs_teacher=True,
        description="stage 2 (kd)", **common,
    )
    ranked = {}
    for i, score in stage2.items():
        ranked[i] = torch.full_like(score, float("-inf"))
        ranked[i][survivors[i]] = score[survivors[i]]
    stages.append({"name": "stage2", "objective": "kd", "form": config.form, "alpha": config.alpha, "temperature": config.temperature})
    return MethodResult(ranked, choose(ranked, survivors), extra, stages)

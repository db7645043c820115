"""Named recipes: each method is an objective x score form x schedule, read like the papers' algorithm boxes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adapters import mlp_views
from .allocation import select_uniform
from .objectives import KD, get_objective
from .scoring import Scores, magnitude_scores, random_scores, taylor_scores

# method -> (objective, score form); None = data-free
RECIPES: dict[str, tuple[str, str] | None] = {
    "hfprune": ("entropy", "activation"),
    "sdmprune": ("kd", "weight-element"),  # stage 2; stage 1 is ("ce", "weight-element")
    "llm-pruner": ("ce", "element1"),
    "magnitude": None,
    "random": None,
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

    def __post_init__(self) -> None:
        if self.method not in RECIPES:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if RECIPES[self.method] is None and (self.objective or self.form):
            raise ValueError(f"{self.method} uses no data; objective/form apply to the Taylor methods only")

    def resolved(self, achieved_ratio: float) -> MethodConfig:
        """The config with every default filled in, as it will be recorded."""
        recipe = RECIPES[self.method]
        if recipe is None:
            return self
        objective, form = self.objective or recipe[0], self.form or recipe[1]
        alpha, temperature = self.alpha, self.temperature
        if objective == "kd":
            default_alpha, default_temperature = sdmprune_defaults(achieved_ratio)
            alpha = default_alpha if alpha is None else alpha
            temperature = default_temperature if temperature is None else temperature
        return MethodConfig(self.method, objective, form, alpha, temperature, self.stage1_keep, self.batch_size, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodResult:
    scores: Scores  # final ranking per layer; -inf marks neurons a previous stage removed
    kept: dict[int, torch.Tensor]
    extra_scores: Scores = field(default_factory=dict)  # e.g. sdmprune's stage-1 scores, "stage1.layer.N"
    stages: list[dict] = field(default_factory=list)


def run_method(model: nn.Module, windows: torch.Tensor | None, config: MethodConfig, keep: int, progress: bool = True) -> MethodResult:
    """Score the model's MLP neurons with `config` (already resolved) and choose `keep` per layer."""
    recipe = RECIPES[config.method]
    if recipe is None:
        scores = magnitude_scores(model) if config.method == "magnitude" else random_scores(model, config.seed)
        return MethodResult(scores, select_uniform(scores, keep), stages=[{"name": config.method, "keep": keep}])
    if windows is None:
        raise ValueError(f"{config.method} needs calibration windows")
    common = dict(batch_size=config.batch_size, progress=progress)
    objective = get_objective(config.objective, config.alpha, config.temperature)
    if config.method != "sdmprune":
        scores = taylor_scores(model, windows, objective, config.form, needs_teacher=config.objective == "kd", **common)
        return MethodResult(scores, select_uniform(scores, keep), stages=[{"name": "one-shot", "objective": config.objective, "form": config.form, "keep": keep}])

    # SDMPrune stage 1: CE, weight-element form, each layer to 97.5 % of its neurons.
    width = mlp_views(model)[0].width
    stage1_keep = max(keep, int(config.stage1_keep * width))
    stage1 = taylor_scores(model, windows, get_objective("ce"), config.form, description="stage 1 (ce)", **common)
    survivors = select_uniform(stage1, stage1_keep)
    stages = [{"name": "stage1", "objective": "ce", "form": config.form, "keep": stage1_keep}]
    extra = {f"stage1.layer.{i}": s for i, s in stage1.items()}
    if stage1_keep == keep:
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
    stages.append({"name": "stage2", "objective": "kd", "form": config.form, "alpha": config.alpha, "temperature": config.temperature, "keep": keep})
    return MethodResult(ranked, select_uniform(ranked, keep, candidates=survivors), extra, stages)


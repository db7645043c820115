"""What a pruning method is: a registered unit with a kind, a config, and a way to score neurons.

A method is one subclass of `GradientMethod`, `ForwardMethod` or `DataFreeMethod` in its own module of this
package, registered with `register_method`. Adding a method is adding that module (and its import in
`__init__.py`) plus a test; nothing else in fidelprune branches on method names.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace

import torch

from ..adapters import AdaptedModel, MLPView
from ..allocation import AllocationConfig, WidthPlan, select_neurons
from ..errors import ConfigError, check_float, check_int, check_seed
from ..objectives import OBJECTIVES, get_objective, sdmprune_defaults
from ..scoring import FORMS, ActivationStats, Scores, activation_statistics, check_finite, taylor_scores

KINDS = ("gradient", "forward", "data-free")  # needs backward passes / one forward pass / no data at all
AGGREGATIONS = ("mean", "l2")  # how the minitron method aggregates |a| over tokens
SDMPRUNE_STAGE1_KEEP = 0.975  # sdmprune: stage 1 keeps this fraction of each layer's neurons

METHOD_REGISTRY: dict[str, Method] = {}
# Old names that still work, with a FutureWarning: the Minitron method was called "activation", the same word as
# HFPrune's score form, so `--method activation` and `--form activation` meant different things.
ALIASES = {"activation": "minitron"}


def register_method(method: Method) -> Method:
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name!r}: kind must be one of {', '.join(KINDS)}")
    METHOD_REGISTRY[method.name] = method
    return method


def canonical_name(name: str) -> str:
    """The registered name for `name`, warning once per call when it is a deprecated alias."""
    if name in ALIASES:
        warnings.warn(f"method {name!r} is now called {ALIASES[name]!r}; the old name will be removed",
                      FutureWarning, stacklevel=3)
        return ALIASES[name]
    if name not in METHOD_REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHOD_REGISTRY)}")
    return name


def get_method(name: str) -> Method:
    return METHOD_REGISTRY[canonical_name(name)]


@dataclass
class MethodConfig:
    """Everything that decides the scores; serialised into pruning.json as it is."""

    method: str = "hfprune"
    objective: str | None = None  # gradient methods: override the objective (ce / entropy / kd)
    form: str | None = None  # gradient methods: override the score form (activation / weight-element / element1 / element2)
    alpha: float | None = None  # kd mix weight; default by ratio from SDMPrune's published settings
    temperature: float | None = None  # kd teacher temperature; likewise
    stage1_keep: float = SDMPRUNE_STAGE1_KEEP
    batch_size: int = 4
    seed: int = 0
    aggregation: str = "mean"  # minitron: mean |a| or l2 norm
    steps: int = 1  # gradient methods: iterative pruning, re-scoring the pruned model K times (iterative_select)

    def __post_init__(self) -> None:
        self.method = canonical_name(self.method)
        check_int("--batch-size", self.batch_size, 1)
        check_seed("--seed", self.seed)
        check_int("--steps", self.steps, 1)
        check_float("stage1_keep", self.stage1_keep, 0, 1, low_open=True)
        if self.alpha is not None:
            check_float("--alpha (the kd weight)", self.alpha, 0, 1)
        if self.temperature is not None:
            check_float("--temperature", self.temperature, 0, low_open=True)
        if METHOD_REGISTRY[self.method].kind != "gradient" and (self.objective or self.form or self.steps > 1):
            raise ConfigError(f"{self.method} takes no gradients; --objective/--form/--steps apply to the Taylor methods only")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.form is not None and self.form not in FORMS:
            raise ConfigError(f"unknown score form {self.form!r}: choose one of {', '.join(FORMS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown aggregation {self.aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")

    @property
    def spec(self) -> Method:
        return METHOD_REGISTRY[self.method]

    def resolved(self, achieved_ratio: float) -> MethodConfig:
        """The config with every default filled in, as it will be recorded."""
        return self.spec.resolve(self, achieved_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodResult:
    scores: Scores  # final ranking per layer; -inf marks neurons a previous stage removed
    kept: dict[int, torch.Tensor]
    extra_scores: Scores = field(default_factory=dict)  # e.g. sdmprune's stage-1 scores, "stage1.layer.N"
    stages: list[dict] = field(default_factory=list)
    down_bias_shift: dict[int, torch.Tensor] | None = None  # flap's compensation, added to down_proj biases
    layer_scores: torch.Tensor | None = None  # [layers], whole decoder layers' importance (run_method score_layers)
    head_scores: dict[int, torch.Tensor] | None = None  # {layer: [query heads]} (run_method score_heads)


class Method:
    """One pruning criterion. Subclasses set `name` (and, for gradient methods, the default objective and form)
    and implement `score`; `kind` says what data it needs."""

    name: str
    kind: str
    summary: str = ""
    adds_down_bias: bool = False  # its compensation creates down_proj biases (the width plan counts them)

    def resolve(self, config: MethodConfig, achieved_ratio: float) -> MethodConfig:
        return config

    def score(self, adapted: AdaptedModel, windows: torch.Tensor | None, config: MethodConfig, plan: WidthPlan,
              allocation: AllocationConfig, progress: bool = True) -> MethodResult:
        """Score every MLP neuron of `adapted` with `config` (already resolved) and choose the neurons `plan` keeps."""
        raise NotImplementedError


class GradientMethod(Method):
    """Taylor importance: an objective's gradient times the neurons' activations or weights, in a score form. A
    one-shot method is just its defaults: `GradientMethod("name", objective=..., form=...)`."""

    kind = "gradient"

    def __init__(self, name: str, *, objective: str, form: str, summary: str = "") -> None:
        self.name, self.objective, self.form, self.summary = name, objective, form, summary

    def resolve(self, config: MethodConfig, achieved_ratio: float) -> MethodConfig:
        objective, form = config.objective or self.objective, config.form or self.form
        alpha, temperature = config.alpha, config.temperature
        if objective == "kd":
            default_alpha, default_temperature = sdmprune_defaults(achieved_ratio)
            alpha = default_alpha if alpha is None else alpha
            temperature = default_temperature if temperature is None else temperature
        return replace(config, objective=objective, form=form, alpha=alpha, temperature=temperature)

    def stage_objectives(self, config: MethodConfig) -> list[str]:
        """The objective of each Taylor pass over the windows, in order (what the memory planner counts)."""
        return [config.objective] * config.steps

    def score(self, adapted: AdaptedModel, windows: torch.Tensor | None, config: MethodConfig, plan: WidthPlan,
              allocation: AllocationConfig, progress: bool = True) -> MethodResult:
        """One shot (one Taylor pass with the resolved objective and form), or `config.steps` of them."""
        if config.steps > 1:
            return iterative_select(adapted, windows, config, plan, allocation, progress=progress)
        objective = get_objective(config.objective, config.alpha, config.temperature)
        scores = taylor_scores(adapted, windows, objective, config.form, needs_teacher=config.objective == "kd",
                               batch_size=config.batch_size, progress=progress)
        stages = [{"name": "one-shot", "objective": config.objective, "form": config.form}]
        return MethodResult(scores, select_neurons(scores, plan, allocation), stages=stages)


def step_widths(width_before: int, width_after: int, steps: int) -> list[int]:
    """The (mean) width after each of `steps` steps: an equal share of the neurons to remove at each, the last
    step at the final width (LLM-Pruner's iterative schedule)."""
    return [width_before - round(s * (width_before - width_after) / steps) for s in range(1, steps + 1)]


def iterative_select(adapted: AdaptedModel, windows: torch.Tensor, config: MethodConfig, plan: WidthPlan,
                     allocation: AllocationConfig, *, kept: dict[int, torch.Tensor] | None = None,
                     width_before: int | None = None, name: str = "step", progress: bool = True,
                     teacher_hidden: list[torch.Tensor] | None = None) -> MethodResult:
    """Iterative pruning (--steps K): score, remove an equal share of the neurons still to go, and score the pruned
    model again, K times; the last step reaches `plan`. The pruned model is the original with the removed neurons
    masked (the same function, tests/test_methods.py checks it against physically smaller models), so a KD
    objective's teacher is the unmasked original. Each step chooses among the survivors of the one before (`kept`:
    where to start, e.g. sdmprune's stage 1); neurons removed earlier rank -inf in the result. A KD objective's
    teacher runs once: its last-layer output is kept (`teacher_hidden`, if a step before did not) for every step."""
    objective = get_objective(config.objective, config.alpha, config.temperature)
    if config.objective == "kd" and teacher_hidden is None:
        teacher_hidden = []
    widths = step_widths(width_before or plan.width_before, plan.width_after, config.steps)
    ranked: Scores = {}
    extra: Scores = {}
    stages = []
    for step, width in enumerate(widths, start=1):
        scores = taylor_scores(adapted, windows, objective, config.form, mask=kept, needs_teacher=config.objective == "kd",
                               teacher_hidden=teacher_hidden, batch_size=config.batch_size, progress=progress,
                               description=f"{name} {step}/{len(widths)} ({config.objective})")
        ranked = scores if kept is None else {i: survivors_only(score, kept[i]) for i, score in scores.items()}
        kept = select_neurons(ranked, replace(plan, width_after=width), allocation, kept)
        stages.append({"name": f"{name}{step}", "objective": config.objective, "form": config.form, "keep": width})
        if step < len(widths):
            extra.update({f"{name}{step}.layer.{i}": s for i, s in ranked.items()})
    return MethodResult(ranked, kept, extra, stages)


def survivors_only(score: torch.Tensor, survivors: torch.Tensor) -> torch.Tensor:
    """`score` with every neuron but the survivors at -inf: removed neurons rank below all the others."""
    out = torch.full_like(score, float("-inf"))
    out[survivors] = score[survivors]
    return out


class ForwardMethod(Method):
    """A score from per-neuron activation sums over one forward pass of the calibration windows."""

    kind = "forward"

    def statistics(self, config: MethodConfig) -> tuple[str, ...]:
        """The sums (of `scoring.STATISTICS`) the score and any compensation read; only these are collected."""
        raise NotImplementedError

    def neuron_scores(self, view: MLPView, stats: ActivationStats, config: MethodConfig) -> torch.Tensor:
        """One layer's scores from its statistics (fp64 in, any float out)."""
        raise NotImplementedError

    def down_bias_shift(self, adapted: AdaptedModel, stats: dict[int, ActivationStats],
                        kept: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """A per-layer shift to add to down_proj biases after pruning (FLAP's compensation); None for none."""
        return None

    def scores_from(self, adapted: AdaptedModel, stats: dict[int, ActivationStats], config: MethodConfig) -> Scores:
        return check_finite({view.index: self.neuron_scores(view, stats[view.index], config).float().cpu()
                             for view in adapted.mlps()})

    def score(self, adapted: AdaptedModel, windows: torch.Tensor | None, config: MethodConfig, plan: WidthPlan,
              allocation: AllocationConfig, progress: bool = True) -> MethodResult:
        stats = activation_statistics(adapted, windows, batch_size=config.batch_size, progress=progress,
                                      statistics=self.statistics(config))
        scores = self.scores_from(adapted, stats, config)
        kept = select_neurons(scores, plan, allocation)
        return MethodResult(scores, kept, stages=[{"name": "forward", "aggregation": config.aggregation}],
                            down_bias_shift=self.down_bias_shift(adapted, stats, kept))


class DataFreeMethod(Method):
    """A score from the weights alone (or from nothing): no calibration data."""

    kind = "data-free"

    def neuron_scores(self, adapted: AdaptedModel, config: MethodConfig) -> Scores:
        raise NotImplementedError

    def score(self, adapted: AdaptedModel, windows: torch.Tensor | None, config: MethodConfig, plan: WidthPlan,
              allocation: AllocationConfig, progress: bool = True) -> MethodResult:
        scores = self.neuron_scores(adapted, config)
        return MethodResult(scores, select_neurons(scores, plan, allocation), stages=[{"name": self.name}])

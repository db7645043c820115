"""The pruning methods, one module each, registered by name (in this order: the CLI's and METHODS' order).

    from fidelprune.methods import get_method
    get_method("hfprune").kind     # "gradient"
"""

from contextlib import ExitStack

from ..adapters import adapt
from ..errors import ConfigError
from ..objectives import sdmprune_defaults
from ..scoring import HeadScores, LayerScores

# isort: off
# registers each, in this order: METHODS and the CLI's --method choices list them so
from . import hfprune, sdmprune, llm_pruner, wanda_sp, flap, minitron, magnitude, random  # noqa: F401
# isort: on
from .base import (
    AGGREGATIONS,
    ALIASES,
    KINDS,
    METHOD_REGISTRY,
    SDMPRUNE_STAGE1_KEEP,
    DataFreeMethod,
    ForwardMethod,
    GradientMethod,
    Method,
    MethodConfig,
    MethodResult,
    canonical_name,
    get_method,
    register_method,
)

METHODS = tuple(METHOD_REGISTRY)


def run_method(adapted, windows, config: MethodConfig, plan, allocation, progress: bool = True,
               score_layers: bool = False, score_heads: bool = False) -> MethodResult:
    """Score the neurons of `adapted` with `config` (already resolved) and choose the neurons `plan` keeps. From
    the same passes, `score_layers` also scores each whole decoder layer (scoring.LayerScores: the Taylor term of a
    gradient method's objectives, a forward method's Block Influence) into `result.layer_scores`, and
    `score_heads` each attention head (scoring.HeadScores: the activation form, or Minitron's norm) into
    `result.head_scores`."""
    adapted = adapt(adapted)
    method = config.spec
    if windows is None and method.kind != "data-free":
        raise ConfigError(f"{method.name} needs calibration windows")
    if (score_layers or score_heads) and method.kind == "data-free":
        raise ConfigError(f"{method.name} reads no data, so it cannot score whole layers or heads; choose a method "
                          f"that does (hfprune, sdmprune, llm-pruner, minitron, ...)")
    gradient = method.kind == "gradient"
    with ExitStack() as stack:
        layers = stack.enter_context(LayerScores(adapted, "taylor" if gradient else "influence")) if score_layers else None
        heads = stack.enter_context(HeadScores(adapted, "taylor" if gradient else "norm")) if score_heads else None
        result = method.score(adapted, windows, config, plan, allocation, progress=progress)
    result.layer_scores = layers.scores() if layers is not None else None
    result.head_scores = heads.scores() if heads is not None else None
    return result


__all__ = [
    "AGGREGATIONS", "ALIASES", "KINDS", "METHODS", "METHOD_REGISTRY", "DataFreeMethod", "ForwardMethod",
    "GradientMethod", "Method", "MethodConfig", "MethodResult", "SDMPRUNE_STAGE1_KEEP", "canonical_name",
    "get_method", "register_method", "run_method", "sdmprune_defaults",
]

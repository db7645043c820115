"""The pruning methods, one module each, registered by name (in this order: the CLI's and METHODS' order).

    from fidelprune.methods import get_method
    get_method("hfprune").kind     # "gradient"
"""

from ..adapters import adapt
from ..errors import ConfigError
from ..objectives import sdmprune_defaults
from ..scoring import LayerScores

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
               score_layers: bool = False) -> MethodResult:
    """Score the neurons of `adapted` with `config` (already resolved) and choose the neurons `plan` keeps; with
    `score_layers`, also score each whole decoder layer from the same passes (scoring.LayerScores: the Taylor
    term of a gradient method's objectives, a forward method's Block Influence) into `result.layer_scores`."""
    adapted = adapt(adapted)
    method = config.spec
    if windows is None and method.kind != "data-free":
        raise ConfigError(f"{method.name} needs calibration windows")
    if not score_layers:
        return method.score(adapted, windows, config, plan, allocation, progress=progress)
    if method.kind == "data-free":
        raise ConfigError(f"{method.name} reads no data, so it cannot score whole layers; choose a method that does "
                          f"(hfprune, sdmprune, llm-pruner, minitron, ...) to drop layers")
    with LayerScores(adapted, "taylor" if method.kind == "gradient" else "influence") as layers:
        result = method.score(adapted, windows, config, plan, allocation, progress=progress)
    result.layer_scores = layers.scores()
    return result


__all__ = [
    "AGGREGATIONS", "ALIASES", "KINDS", "METHODS", "METHOD_REGISTRY", "DataFreeMethod", "ForwardMethod",
    "GradientMethod", "Method", "MethodConfig", "MethodResult", "SDMPRUNE_STAGE1_KEEP", "canonical_name",
    "get_method", "register_method", "run_method", "sdmprune_defaults",
]

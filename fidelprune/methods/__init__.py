"""The pruning methods, one module each, registered by name (in this order: the CLI's and METHODS' order).

    from fidelprune.methods import get_method
    get_method("hfprune").kind     # "gradient"
"""

from ..adapters import adapt
from ..errors import ConfigError
from ..objectives import sdmprune_defaults

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


def run_method(adapted, windows, config: MethodConfig, plan, allocation, progress: bool = True) -> MethodResult:
    """Score the neurons of `adapted` with `config` (already resolved) and choose the neurons `plan` keeps."""
    adapted = adapt(adapted)
    method = config.spec
    if windows is None and method.kind != "data-free":
        raise ConfigError(f"{method.name} needs calibration windows")
    return method.score(adapted, windows, config, plan, allocation, progress=progress)


__all__ = [
    "AGGREGATIONS", "ALIASES", "KINDS", "METHODS", "METHOD_REGISTRY", "DataFreeMethod", "ForwardMethod",
    "GradientMethod", "Method", "MethodConfig", "MethodResult", "SDMPRUNE_STAGE1_KEEP", "canonical_name",
    "get_method", "register_method", "run_method", "sdmprune_defaults",
]

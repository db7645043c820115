"""LLM-Pruner's Taylor criterion on MLP neurons: next-token CE, element-wise first-order form (`element1`) or
with the Fisher second-order term (`element2`), one shot (docs/methods.md, "Baselines")."""

from .base import GradientMethod, register_method

register_method(GradientMethod("llm-pruner", objective="ce", form="element1",
                               summary="next-token CE; sum_w |w g| (element1) or with the Fisher term (element2); one shot"))

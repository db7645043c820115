"""HFPrune: Taylor importance from the entropy of the model's own next-token distribution, activation form,
one shot (docs/methods.md, "HFPrune")."""

from .base import GradientMethod, register_method

register_method(GradientMethod("hfprune", objective="entropy", form="activation",
                               summary="entropy of the model's own output; sum |a * dH/da|; one shot"))

"""Random: uniform scores from a seeded generator; the floor every criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import AdaptedModel, adapt
from ..scoring import Scores
from .base import DataFreeMethod, register_method


def random_scores(model: nn.Module | AdaptedModel, seed: int = 0) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    return {view.index: torch.rand(view.width, generator=generator) for view in adapt(model).mlps()}


class Random(DataFreeMethod):
    name = "random"
    summary = "uniform, seeded; no data"

    def neuron_scores(self, adapted, config):
        return random_scores(adapted, config.seed)


register_method(Random())

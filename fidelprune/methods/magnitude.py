"""Magnitude: ||W_gate[i]|| + ||W_up[i]|| + ||W_down[:, i]||, from the weights alone."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import AdaptedModel, adapt
from ..scoring import Scores, check_finite
from .base import DataFreeMethod, register_method


def magnitude_scores(model: nn.Module | AdaptedModel) -> Scores:
    scores = {}
    for view in adapt(model).mlps():
        gate, up = view.gate_up_weights()
        with torch.no_grad():
            score = gate.float().norm(dim=1) + up.float().norm(dim=1) + view.down.weight.float().norm(dim=0)
        scores[view.index] = score.cpu()
    return check_finite(scores)


class Magnitude(DataFreeMethod):
    name = "magnitude"
    summary = "||W_gate[i]|| + ||W_up[i]|| + ||W_down[:,i]||; no data"

    def neuron_scores(self, adapted, config):
        return magnitude_scores(adapted)


register_method(Magnitude())

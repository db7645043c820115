"""FLAP: s_i = var_{n,t}(a_i) * ||W_down[:, i]||^2, standardised per layer; the removed neurons' mean output is
folded into a down_proj bias so each layer's mean output is unchanged (docs/methods.md, "Baselines")."""

from __future__ import annotations

import torch

from ..scoring import standardize
from .base import ForwardMethod, register_method


class FLAP(ForwardMethod):
    name = "flap"
    summary = "var(a_i) * ||W_down[:,i]||^2, standardised; mean compensation in a down_proj bias; forward only"
    adds_down_bias = True

    def statistics(self, config):
        return ("sum", "sum_sq")

    def neuron_scores(self, view, stats, config):
        return standardize(stats.variance * view.down.weight.detach().double().square().sum(dim=0))

    def down_bias_shift(self, adapted, stats, kept):
        """W_down[:, removed] . mean(a[removed]) per layer: added to the down_proj bias, it keeps the layer's mean
        output over the calibration tokens unchanged."""
        shifts = {}
        for view in adapted.mlps():
            removed = torch.ones(view.width, dtype=torch.bool)
            removed[kept[view.index].cpu()] = False
            down = view.down.weight.detach().double().cpu()
            shifts[view.index] = (down[:, removed] @ stats[view.index].mean.cpu()[removed]).float()
        return shifts


register_method(FLAP())

"""Wanda-sp: s_i = sum_j |W_down[j, i]| * ||a_:,i||_2 over the calibration tokens; one forward pass
(docs/methods.md, "Baselines")."""

from .base import ForwardMethod, register_method


class WandaSP(ForwardMethod):
    name = "wanda-sp"
    summary = "sum_j |W_down[j,i]| * ||a_i||_2; forward only"

    def statistics(self, config):
        return ("sum_sq",)

    def neuron_scores(self, view, stats, config):
        return view.down.weight.detach().double().abs().sum(dim=0) * stats.sum_sq.sqrt()


register_method(WandaSP())

"""Minitron's activation criterion: mean_{n,t} |a_i| (aggregation "mean") or ||a_:,i||_2 ("l2") over the
calibration tokens; one forward pass (docs/methods.md, "Baselines"). Formerly the method "activation"."""

from .base import ForwardMethod, register_method


class Minitron(ForwardMethod):
    name = "minitron"
    summary = "mean |a_i| (--aggregation l2: ||a_i||_2); forward only"

    def statistics(self, config):
        return ("sum_abs",) if config.aggregation == "mean" else ("sum_sq",)

    def neuron_scores(self, view, stats, config):
        return stats.sum_abs / stats.count if config.aggregation == "mean" else stats.sum_sq.sqrt()


register_method(Minitron())

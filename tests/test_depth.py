"""Whole decoder layers (issue 50): the layer scores against plain references."""

from __future__ import annotations

import pytest
import torch

from fidelprune.adapters import adapt
from fidelprune.objectives import get_objective
from fidelprune.scoring import LayerScores, activation_statistics, taylor_scores

from conftest import tiny_model, tiny_windows
from reference import block_influence, layer_gate_scores

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3", "phi3")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_taylor_scores_equal_a_gate_on_each_layers_residual(family):
    model, windows = tiny_model(family, num_hidden_layers=3).double(), tiny_windows(4)
    objective = get_objective("entropy")
    with LayerScores(model, "taylor") as layers:
        taylor_scores(model, windows, objective, "activation", batch_size=2, progress=False)
    expected = layer_gate_scores(model, windows, objective)
    torch.testing.assert_close(layers.scores().double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(family):
    model, windows = tiny_model(family, num_hidden_layers=3), tiny_windows(4)
    with LayerScores(model, "influence") as layers:
        activation_statistics(model, windows, batch_size=3, progress=False)
    torch.testing.assert_close(layers.scores().double(), block_influence(model, windows), rtol=1e-5, atol=1e-7)


def test_streamed_layer_scores_are_the_whole_models():
    model, windows = tiny_model("llama", num_hidden_layers=3), tiny_windows(4)
    objective = get_objective("entropy")
    with LayerScores(model, "taylor") as whole:
        taylor_scores(model, windows, objective, "activation", batch_size=2, progress=False)
    adapted = adapt(model).stream("cpu")
    try:
        with LayerScores(adapted, "taylor") as streamed:
            taylor_scores(adapted, windows, objective, "activation", batch_size=2, progress=False)
    finally:
        adapted.unstream()
    torch.testing.assert_close(streamed.scores(), whole.scores(), rtol=1e-5, atol=0)


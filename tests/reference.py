"""Slow, obviously-correct implementations of every score, written straight from docs/methods.md the way the
published code computes them: one sequence at a time, full weight gradients from plain autograd, and [I, d] fp64
accumulators. An oracle, not part of the package: the tests pin fidelprune's fast scores to it and
`benchmarks/cost.py` measures against it (both import it from here)."""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch
from torch import nn

from fidelprune.adapters import mlp_views
from fidelprune.scoring import Objective, Scores


@contextmanager
def _all_weights_trainable(model: nn.Module):
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
            p.grad = None


def _neuron_weights(view) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(weight, its .grad, the dim that runs over a neuron's weights) for gate, up, down."""
    if view.gate_up is not None:
        w, g, width = view.gate_up.weight, view.gate_up.weight.grad, view.width
        pairs = [(w[:width], g[:width]), (w[width:], g[width:])]
    else:
        pairs = [(view.gate.weight, view.gate.weight.grad), (view.up.weight, view.up.weight.grad)]
    return [(w.detach().double(), g.double(), 1) for w, g in pairs] + [
        (view.down.weight.detach().double(), view.down.weight.grad.double(), 0)]


def _backward_one(model: nn.Module, sequence: torch.Tensor, objective: Objective, teacher: nn.Module | None) -> None:
    model.zero_grad(set_to_none=True)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(sequence[None]).logits
    objective(model(sequence[None]).logits, sequence[None], teacher_logits)[0].backward()


def weight_element_scores(model: nn.Module, windows: torch.Tensor, objective: Objective, teacher: nn.Module | None = None) -> Scores:
    """SDMPrune: per sequence P_ij = G^down_ji W^down_ji + G^up_ij W^up_ij + G^gate_ij W^gate_ij; s_i = sum_n mean_j |P_ij|."""
    views = mlp_views(model)
    acc = {v.index: torch.zeros(v.width, v.hidden_size, dtype=torch.float64) for v in views}
    with _all_weights_trainable(model):
        for sequence in windows:
            _backward_one(model, sequence, objective, teacher)
            for view in views:
                (gate, g_gate, _), (up, g_up, _), (down, g_down, _) = _neuron_weights(view)
                acc[view.index] += (g_down.T * down.T + g_up * up + g_gate * gate).abs()
    return {i: a.mean(dim=1) for i, a in acc.items()}


def activation_scores(model: nn.Module, windows: torch.Tensor, objective: Objective) -> Scores:
    """HFPrune: s_i = sum_n sum_t |a_nti * dL_n/da_nti|."""
    views = mlp_views(model)
    scores = {v.index: torch.zeros(v.width, dtype=torch.float64) for v in views}
    with _all_weights_trainable(model):
        for sequence in windows:
            captured = {}

            def keep(module, args, index):
                args[0].retain_grad()
                captured[index] = args[0]

            handles = [v.down.register_forward_pre_hook(lambda m, args, i=v.index: keep(m, args, i)) for v in views]
            _backward_one(model, sequence, objective, None)
            for handle in handles:
                handle.remove()
            for index, a in captured.items():
                scores[index] += (a * a.grad).detach().double().abs().sum(dim=(0, 1))
    return scores


def element_scores(model: nn.Module, windows: torch.Tensor, objective: Objective, second_order: bool = False) -> Scores:
    """LLM-Pruner element1: sum_w |w g|, g summed over sequences; element2: sum_w |w g - 1/2 w^2 sum_n g_n^2|."""
    views = mlp_views(model)
    grads = {v.index: None for v in views}
    fisher = {v.index: None for v in views}
    with _all_weights_trainable(model):
        for sequence in windows:
            _backward_one(model, sequence, objective, None)
            for view in views:
                per_weight = [g for _, g, _ in _neuron_weights(view)]
                grads[view.index] = per_weight if grads[view.index] is None else [a + b for a, b in zip(grads[view.index], per_weight)]
                squares = [g.square() for g in per_weight]
                fisher[view.index] = squares if fisher[view.index] is None else [a + b for a, b in zip(fisher[view.index], squares)]
        scores = {}
        for view in views:
            score = 0
            for (w, _, dim), g, f in zip(_neuron_weights(view), grads[view.index], fisher[view.index]):
                change = w * g - (0.5 * w.square() * f if second_order else 0)
                score = score + change.abs().sum(dim=dim)
            scores[view.index] = score
    return scores


@torch.no_grad()
def forward_scores(model: nn.Module, windows: torch.Tensor, method: str, aggregation: str = "mean") -> Scores:
    """minitron / wanda-sp / flap from every calibration activation held at once (tokens x I per layer)."""
    views = mlp_views(model)
    acts = {v.index: [] for v in views}
    handles = [v.down.register_forward_pre_hook(lambda m, args, i=v.index: acts[i].append(args[0].reshape(-1, args[0].shape[-1]).double()))
               for v in views]
    for sequence in windows:
        model(sequence[None])
    for handle in handles:
        handle.remove()
    scores = {}
    for view in views:
        a, down = torch.cat(acts[view.index]), view.down.weight.double()
        if method == "minitron":
            scores[view.index] = a.abs().mean(dim=0) if aggregation == "mean" else a.norm(dim=0)
        elif method == "wanda-sp":
            scores[view.index] = down.abs().sum(dim=0) * a.norm(dim=0)
        else:
            flap = a.var(dim=0, unbiased=False) * down.square().sum(dim=0)
            scores[view.index] = (flap - flap.mean()) / flap.std()
    return scores


def seed_calibration_windows(documents: list[list[int]], samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """The seed methods' calibration draw (their get_c4), written as they write it: shuffle the documents, walk them,
    and from each one longer than seq_len take one window at random.randint(0, len - seq_len - 1), until `samples`."""
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    windows = []
    for index in order:
        ids = documents[index]
        if len(ids) <= seq_len:
            continue
        start = rng.randint(0, len(ids) - seq_len - 1)
        windows.append(ids[start : start + seq_len])
        if len(windows) == samples:
            break
    return windows


def layer_gate_scores(model: nn.Module, windows: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Whole layers, Taylor: a gate g_nt on each decoder layer's residual contribution, h_out' = h_in + g (h_out -
    h_in), at g = 1; s_l = sum_n sum_t |dL_n/dg_nt|, one sequence at a time with every weight trainable."""
    layers = model.model.layers
    scores = torch.zeros(len(layers), dtype=torch.float64)
    with _all_weights_trainable(model):
        for sequence in windows:
            gates = {}

            def gated(module, args, kwargs, output, index):
                h_in = args[0] if args else kwargs["hidden_states"]
                h_out = output[0] if isinstance(output, tuple) else output
                gates[index] = torch.ones(*h_out.shape[:-1], 1, dtype=h_out.dtype, requires_grad=True)
                new = h_in + gates[index] * (h_out - h_in)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles = [layer.register_forward_hook(lambda m, a, k, o, i=i: gated(m, a, k, o, i), with_kwargs=True)
                       for i, layer in enumerate(layers)]
            _backward_one(model, sequence, objective, None)
            for handle in handles:
                handle.remove()
            for index, gate in gates.items():
                scores[index] += gate.grad.double().abs().sum()
    return scores


def block_influence(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Whole layers, ShortGPT's Block Influence: mean over every token of 1 - cos(h_in, h_out), from the hidden
    states transformers returns (entry l is layer l's input; the last entry is normed, so the last layer's output
    is read by a hook)."""
    layers = model.model.layers
    last = []
    handle = layers[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o))
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    with torch.no_grad():
        for sequence in windows:
            states = list(model(sequence[None], output_hidden_states=True).hidden_states[:-1]) + [last.pop()]
            for index in range(len(layers)):
                cos = torch.nn.functional.cosine_similarity(states[index].double(), states[index + 1].double(), dim=-1)
                sums[index] += (1 - cos).sum()
            count += sequence.numel()
    handle.remove()
    return sums / count


def head_scores(model: nn.Module, windows: torch.Tensor, objective: Objective) -> dict[int, torch.Tensor]:
    """Attention heads, Taylor: s_h = sum over the head's channels c of o_proj's input, sum_n sum_t |a_ntc dL_n/da_ntc|,
    one sequence at a time with every weight trainable."""
    layers = model.model.layers
    heads = model.config.num_attention_heads
    scores = {i: torch.zeros(heads, dtype=torch.float64) for i in range(len(layers))}
    with _all_weights_trainable(model):
        for sequence in windows:
            captured = {}

            def keep(args, index):
                args[0].retain_grad()
                captured[index] = args[0]

            handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: keep(args, i))
                       for i, layer in enumerate(layers)]
            _backward_one(model, sequence, objective, None)
            for handle in handles:
                handle.remove()
            for index, a in captured.items():
                per_channel = (a * a.grad).detach().double().abs().sum(dim=(0, 1))
                scores[index] += per_channel.reshape(heads, -1).sum(dim=1)
    return scores


def head_norms(model: nn.Module, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Attention heads, Minitron: the mean over tokens of the L2 norm of each head's output (o_proj's input)."""
    layers = model.model.layers
    heads = model.config.num_attention_heads
    sums = {i: torch.zeros(heads, dtype=torch.float64) for i in range(len(layers))}
    count = 0

    def add(args, index):
        a = args[0].detach().double()
        sums[index].add_(a.reshape(*a.shape[:-1], heads, -1).norm(dim=-1).reshape(-1, heads).sum(dim=0))

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: add(args, i))
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        for sequence in windows:
            model(sequence[None])
            count += sequence.numel()
    for handle in handles:
        handle.remove()
    return {i: s / count for i, s in sums.items()}

"""How many neurons each layer keeps, and which (docs/methods.md, "Allocation").

The ratio is the fraction of the model's *total* parameters removed (embeddings included, tied weights once,
as `model.parameters()` counts them). `plan_width` solves the width k that reaches it when every prunable layer
keeps k neurons; `select_neurons` then keeps k per layer (uniform allocation) or the same total spread over the
layers by one global ranking (global allocation), with protected layers kept whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .adapters import AdaptedModel, MLPView, adapt
from .errors import FidelpruneError, check_float, check_int, check_seed
from .scoring import Scores, standardize


class AllocationError(FidelpruneError, ValueError):
    """The requested ratio or width cannot be reached."""


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ALLOCATIONS = ("uniform", "global", "search")


# --serve-on ENGINE: the multiple of neurons each kept width is rounded to so the engine's fast paths take every MLP
# tensor (docs/deploy.md). Any width loads and computes correctly in all three; these grids are about speed and size.
#   llama.cpp: 256, the k-quant super-block (Q4_K..Q6_K): an MLP width off this grid leaves ffn_down unquantized
#   vllm: 128, the group size of GPTQ/AWQ/Marlin kernels along the input dimension (ffn_down's input is the width)
#   transformers: 8, fidelprune's default (tensor-core friendly)
ENGINE_GRID = {"transformers": 8, "vllm": 128, "llama.cpp": 256}


@dataclass
class AllocationConfig:
    """How widths are chosen: `uniform` (every prunable layer keeps the same k, a vanilla checkpoint) or `global`
    (all prunable layers' neurons ranked together on per-layer standardised scores, at least `min_keep` per
    layer); the first `protect_first` and last `protect_last` layers keep every neuron (LLM-Pruner's habit)."""

    kind: str = "uniform"
    round_to: int = ENGINE_GRID["transformers"]
    protect_first: int = 0
    protect_last: int = 0
    min_keep: int | None = None  # global and search; default: round_to
    ratio: float | None = None  # the target: fraction of total parameters removed ...
    keep: int | None = None  # ... or the width of the prunable layers (exactly one of the two; see plan_width)
    # search only (search.py): the first N calibration windows measure the fitness; G generations of C children
    # moving `search_step` neurons at a time (default about 3 % of the width), seeded
    search_samples: int = 4
    search_generations: int = 12
    search_offspring: int = 8
    search_step: int | None = None
    search_seed: int = 0
    # whole decoder layers to drop (the lowest-scoring unprotected ones, scoring.LayerScores); the MLP neurons of
    # the layers that stay take the rest of the --ratio budget
    drop_layers: int = 0
    # attention heads kept in every layer (Minitron's way): query heads per KV group, and KV groups; None keeps all
    keep_heads: int | None = None
    keep_kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise AllocationError(f"unknown allocation {self.kind!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.protect_first < 0 or self.protect_last < 0:
            raise AllocationError("--protect-first / --protect-last take a number of layers >= 0")
        check_int("--round-to", self.round_to, 1)
        if self.min_keep is not None:
            check_int("--min-keep", self.min_keep, 1)
        if self.ratio is not None and self.keep is not None:
            raise AllocationError("give --ratio (fraction of parameters to remove) or --keep (neurons per layer), not both")
        if self.ratio is not None:
            check_float("--ratio", self.ratio)
        if self.keep is not None:
            check_int("--keep", self.keep, 1)
        check_int("--search-samples", self.search_samples, 1)
        check_int("--search-generations", self.search_generations, 0)
        check_int("--search-offspring", self.search_offspring, 1)
        check_seed("--search-seed", self.search_seed)
        check_int("--drop-layers", self.drop_layers, 0)
        for flag, value in (("--keep-heads", self.keep_heads), ("--keep-kv-heads", self.keep_kv_heads)):
            if value is not None:
                check_int(flag, value, 1)
        if self.prunes_heads and self.kind == "search":
            raise AllocationError("--keep-heads / --keep-kv-heads with --allocation search is not supported yet; use "
                                  "--allocation uniform or global")
        if self.prunes_heads and (self.protect_first or self.protect_last):
            raise AllocationError("--keep-heads / --keep-kv-heads prune every layer's attention alike (a vanilla "
                                  "config); protected layers would need per-layer head counts, not supported yet")
        if self.drop_layers and self.kind == "search":
            raise AllocationError("--drop-layers with --allocation search is not supported yet: the search moves neurons "
                                  "between a fixed set of layers; use --allocation uniform or global")
        if self.search_step is not None:
            check_int("--search-step", self.search_step, 1)
            if self.search_step % self.round_to:
                raise AllocationError(f"--search-step {self.search_step} must be a multiple of --round-to {self.round_to}")
        searched = {f.name for f in fields(self) if f.name.startswith("search_") and getattr(self, f.name) != f.default}
        if self.kind != "search" and searched:
            raise AllocationError("--search-* options apply to --allocation search only")
        if self.kind == "uniform" and self.min_keep is not None:
            raise AllocationError("--min-keep applies to --allocation global or search (uniform keeps the same width everywhere)")

    @property
    def prunes_heads(self) -> bool:
        return self.keep_heads is not None or self.keep_kv_heads is not None

    def protected(self, num_layers: int) -> list[int]:
        layers = sorted(set(range(self.protect_first)) | set(range(num_layers - self.protect_last, num_layers)))
        if len(layers) >= num_layers:
            raise AllocationError(f"protecting {len(layers)} of {num_layers} layers leaves nothing to prune")
        return layers


@dataclass
class WidthPlan:
    width_before: int
    width_after: int  # the uniform width of the prunable layers (global allocation: the budget's mean)
    params_before: int
    params_after: int
    target_ratio: float | None
    achieved_ratio: float
    round_to: int
    protected_layers: list[int]
    adds_mlp_bias: bool
    drop_layers: int = 0  # whole decoder layers dropped (which ones the layer scores decide)
    query_heads_after: int | None = None  # every layer's query and KV heads once heads are pruned (None: kept)
    kv_heads_after: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def params_after_widths(model: nn.Module | AdaptedModel, widths: dict[int, int], adds_mlp_bias: bool = False) -> int:
    """Exact parameter count once layer l keeps widths[l] neurons (and, with adds_mlp_bias, once every MLP gains
    gate/up/down biases, as FLAP's compensation needs)."""
    adapted = adapt(model)
    total = count_parameters(adapted.model)
    for view in adapted.mlps():
        width = widths.get(view.index, view.width)
        total -= (view.width - width) * view.params_per_neuron()
        if adds_mlp_bias and view.down.bias is None:
            total += 2 * width + view.hidden_size
    return total


def plan_width(
    model: nn.Module | AdaptedModel,
    ratio: float | None = None,
    keep: int | None = None,
    round_to: int = 8,
    protected: list[int] | tuple[int, ...] = (),
    adds_mlp_bias: bool = False,
    drop: int = 0,
    heads: tuple[int, int] | None = None,
) -> WidthPlan:
    """Solve the kept width of the prunable layers from a parameter ratio (the multiple of `round_to` whose
    achieved ratio is closest to the target) or take it as given (`keep`). Errors if nothing or every neuron
    would go. With `drop`, that many of the prunable layers go whole (the layers are alike, so which ones does
    not change the count) and the ratio counts them; the width is then that of the layers that stay, and may be
    the whole width (depth alone). With `heads` (query heads, KV heads kept in every layer), the attention of
    every layer that stays loses the rest, and the ratio counts that too."""
    if (ratio is None) == (keep is None):
        raise AllocationError("give exactly one of ratio (fraction of parameters to remove) or keep (neurons per layer)")
    adapted = adapt(model)
    prunable = [v for v in adapted.mlps() if v.index not in set(protected)]
    widths = {v.width for v in prunable}
    if len(widths) != 1:
        raise AllocationError(f"MLP widths differ across layers ({sorted(widths)}); this plan needs one width")
    width = widths.pop()
    total = count_parameters(adapted.model)
    if round_to >= width:
        raise AllocationError(f"--round-to {round_to} is not below the MLP width {width}: no width is left to choose; "
                              f"choose a smaller --round-to")
    round_to = max(1, int(round_to))

    # params_after is linear in k (each kept neuron costs the same in every prunable layer)
    base = params_after_widths(adapted, {v.index: 0 for v in prunable}, adds_mlp_bias)
    per_k = params_after_widths(adapted, {v.index: 1 for v in prunable}, adds_mlp_bias) - base
    if drop:
        if drop >= len(prunable):
            raise AllocationError(f"--drop-layers {drop} leaves none of the {len(prunable)} prunable layers (of "
                                  f"{adapted.num_layers}; protected ones stay); drop fewer layers")
        emptied = {_params_at_width_zero(v, adapted, adds_mlp_bias) for v in prunable}  # a layer with its MLP emptied
        if len(emptied) != 1:
            raise AllocationError("--drop-layers needs decoder layers of one size, and this model's differ; drop none")
        base -= drop * emptied.pop()
        per_k = per_k // len(prunable) * (len(prunable) - drop)
    if heads is not None:
        base -= (adapted.num_layers - drop) * adapted.attention(0).params_removed(*heads)

    def params_after(k: int) -> int:
        return base + per_k * k

    if keep is None:
        if not 0 < ratio < 1:
            raise AllocationError(f"ratio must be between 0 and 1 (fraction of parameters removed), got {ratio}")
        max_ratio = 1 - base / total
        candidates = [*range(round_to, width, round_to), width]
        if ratio > max_ratio or len(candidates) == 1:
            raise AllocationError(
                f"ratio {ratio} is unreachable: removing every prunable MLP neuron removes only {max_ratio:.1%} of "
                f"this model's parameters; choose a ratio below {max_ratio:.3f}"
            )
        achieved = {k: 1 - params_after(k) / total for k in candidates}
        if (drop or heads) and achieved[width] > ratio:
            raise AllocationError(f"the layers and heads pruned alone remove {achieved[width]:.1%} of the parameters, "
                                  f"more than --ratio {ratio}; drop fewer layers, keep more heads or raise --ratio")
        keep = min(candidates, key=lambda k: (abs(achieved[k] - ratio), -k))
        if keep >= width and not (drop or heads):
            raise AllocationError(f"ratio {ratio} removes no neuron at round-to {round_to}; choose a larger ratio")
    elif not 0 < keep < width + bool(drop or heads):
        raise AllocationError(f"keep must be between 1 and {width - (not (drop or heads))} neurons per layer (the MLP width is {width}), "
                              f"got {keep}")
    return WidthPlan(
        width_before=width,
        width_after=keep,
        params_before=total,
        params_after=params_after(keep),
        target_ratio=ratio,
        achieved_ratio=1 - params_after(keep) / total,
        round_to=round_to,
        protected_layers=list(protected),
        adds_mlp_bias=adds_mlp_bias,
        drop_layers=drop,
        query_heads_after=None if heads is None else heads[0],
        kv_heads_after=None if heads is None else heads[1],
    )


def _params_at_width_zero(view: MLPView, adapted: AdaptedModel, adds_mlp_bias: bool) -> int:
    """A decoder layer's parameters once its MLP keeps no neuron (with the down_proj bias a compensation adds)."""
    layer = sum(p.numel() for p in adapted.layers[view.index].parameters())
    return layer - view.width * view.params_per_neuron() + (view.hidden_size if adds_mlp_bias and view.down.bias is None else 0)


def top_k(score: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k highest scores (ties to the lower index), returned in their original order.
    With `candidates`, only those indices may be kept."""
    if candidates is not None:
        masked = torch.full_like(score, float("-inf"))
        masked[candidates] = score[candidates]
        score = masked
        if k > len(candidates):
            raise AllocationError(f"cannot keep {k} neurons out of {len(candidates)} candidates")
    order = torch.argsort(score, descending=True, stable=True)
    return order[:k].sort().values


def select_uniform(scores: Scores, k: int, candidates: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """The same k neurons kept per layer, top-k by score."""
    kept = {}
    for index, score in scores.items():
        finite = int(torch.isfinite(score).sum())
        if finite < k and candidates is None:
            raise AllocationError(
                f"layer {index} has {finite} rankable scores, fewer than the {k} neurons to keep (scores from an "
                f"sdmprune run rank only its stage-1 survivors: re-prune to a smaller width, or score afresh)"
            )
        kept[index] = top_k(score, k, None if candidates is None else candidates[index])
    return kept


def global_widths(scores: Scores, budget: int, config: AllocationConfig, candidates: dict[int, torch.Tensor] | None = None) -> dict[int, int]:
    """Per-layer widths from one ranking of every prunable neuron on per-layer standardised scores, so layers
    with flat score distributions are not starved by layers with large raw scores; each layer keeps at least
    min_keep, and widths are multiples of round_to (largest remainders keep the total on budget)."""
    min_keep = max(config.min_keep or config.round_to, 1)
    pooled, owners = [], []
    for index, score in scores.items():
        z = standardize(score)
        if candidates is not None:
            allowed = torch.full_like(z, float("-inf"))
            allowed[candidates[index]] = z[candidates[index]]
            z = allowed
        z = z.sort(descending=True).values
        z[:min_keep] = float("inf")  # the floor is kept whatever the ranking says
        pooled.append(z)
        owners.append(torch.full_like(z, index, dtype=torch.long))
    pooled, owners = torch.cat(pooled), torch.cat(owners)
    chosen = owners[torch.argsort(pooled, descending=True, stable=True)[:budget]]
    raw = {index: int((chosen == index).sum()) for index in scores}
    # round to multiples of round_to, distributing the remainder to the layers that lost the most
    step = config.round_to
    widths = {i: max(min_keep, (w // step) * step) for i, w in raw.items()}
    leftover = budget - sum(widths.values())
    for index in sorted(raw, key=lambda i: raw[i] - widths[i], reverse=True):
        if leftover < step:
            break
        limit = len(scores[index]) if candidates is None else len(candidates[index])
        if widths[index] + step <= limit:
            widths[index] += step
            leftover -= step
    return widths


def select_neurons(
    scores: Scores, plan: WidthPlan, config: AllocationConfig, candidates: dict[int, torch.Tensor] | None = None
) -> dict[int, torch.Tensor]:
    """Kept neuron indices per layer for `plan` under `config` (protected layers keep every neuron)."""
    protected = set(plan.protected_layers)
    prunable = {i: s for i, s in scores.items() if i not in protected}
    if config.kind in ("uniform", "search"):  # search: the uniform plan is where pruning.prune's search starts
        kept = select_uniform(prunable, plan.width_after, None if candidates is None else {i: candidates[i] for i in prunable})
    else:
        widths = global_widths(prunable, plan.width_after * len(prunable), config, candidates)
        kept = {i: top_k(prunable[i], w, None if candidates is None else candidates[i]) for i, w in widths.items()}
    for index in protected:
        kept[index] = torch.arange(len(scores[index]))
    return dict(sorted(kept.items()))

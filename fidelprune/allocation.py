"""How many neurons each layer keeps, and which (../shared/docs/methods.md, "Allocation").

The ratio is the fraction of the model's *total* parameters removed (embeddings included, tied weights once,
as `model.parameters()` counts them), reached by shrinking every layer's MLP to the same width k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapters import mlp_views
from .scoring import Scores


class AllocationError(ValueError):
    """The requested ratio or width cannot be reached."""


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class WidthPlan:
    width_before: int
    width_after: int
    params_before: int
    params_after: int
    target_ratio: float | None
    achieved_ratio: float
    round_to: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_width(model: nn.Module, ratio: float | None = None, keep: int | None = None, round_to: int = 8) -> WidthPlan:
    """Solve the uniform kept width from a parameter ratio (the multiple of `round_to` whose achieved ratio is
    closest to the target) or take it as given (`keep`). Errors if nothing or every neuron would go."""
    if (ratio is None) == (keep is None):
        raise AllocationError("give exactly one of ratio (fraction of parameters to remove) or keep (neurons per layer)")
    views = mlp_views(model)
    widths = {v.width for v in views}
    if len(widths) != 1:
        raise AllocationError(f"MLP widths differ across layers ({sorted(widths)}); uniform allocation needs one width")
    width = widths.pop()
    per_width_unit = sum(v.params_per_neuron() for v in views)  # parameters removed per neuron removed in every layer
    total = count_parameters(model)
    round_to = max(1, int(round_to))

    def params_after(k: int) -> int:
        return total - (width - k) * per_width_unit

    if keep is None:
        if not 0 < ratio < 1:
            raise AllocationError(f"ratio must be between 0 and 1 (fraction of parameters removed), got {ratio}")
        max_ratio = width * per_width_unit / total
        exact = width - ratio * total / per_width_unit
        candidates = [*range(round_to, width, round_to), width]
        if exact < 0 or len(candidates) == 1:
            raise AllocationError(
                f"ratio {ratio} is unreachable: removing every MLP neuron removes only {max_ratio:.1%} of this "
                f"model's parameters; choose a ratio below {max_ratio:.3f}"
            )
        keep = min(candidates, key=lambda k: (abs(k - exact), -k))
        if keep >= width:
            raise AllocationError(f"ratio {ratio} removes no neuron at round-to {round_to}; choose a larger ratio")
    elif not 0 < keep < width:
        raise AllocationError(f"keep must be between 1 and {width - 1} neurons per layer (the MLP width is {width}), got {keep}")
    return WidthPlan(
        width_before=width,
        width_after=keep,
        params_before=total,
        params_after=params_after(keep),
        target_ratio=ratio,
        achieved_ratio=1 - params_after(keep) / total,
        round_to=round_to,
    )


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

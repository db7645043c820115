"""Token-level recovery losses over the target tokens of packed rows.

Per target token t (labels shifted by one, IGNORE dropped):
    loss_t = (1 - alpha) * CE_t + alpha * KL( softmax(z_T / tau) || softmax(z_S) )
the same KL as the scoring objective `objectives.KD`: the temperature softens the teacher only, and there is
no tau^2 factor. (Hinton's tau^2 compensates for the 1/tau^2 shrinking of gradients when the student is
softened too; here the student's logits are not divided by tau, so there is nothing to compensate.)
Functions return sums, not means, so the trainer can normalise by the target-token count of the whole
optimizer step (all micro-batches, all processes): every target token then weighs the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE


@dataclass
class LossSums:
    loss: torch.Tensor  # differentiable sum over target tokens
    ce: torch.Tensor  # detached sums, for logging
    kl: torch.Tensor
    tokens: int


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over logits[:, :-1], targets) of the predicted positions."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return mask, targets[mask]


def select_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the predicting positions only, [T, V] in fp32: the full [B, L, V] is never upcast."""
    return logits[:, :-1][mask].float()


def teacher_log_probs(teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(select_logits(teacher_logits, mask) / temperature, dim=-1)


def token_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_log_p: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> LossSums:
    """Sums over target tokens of the mixed loss. `teacher_log_p` is [T, V], from `teacher_log_probs` on the
    same labels (already tempered); needed when alpha > 0."""
    mask, targets = target_positions(labels)
    student = select_logits(logits, mask)
    log_p = F.log_softmax(student, dim=-1)
    ce = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    if alpha > 0:
        if teacher_log_p is None:
            raise ValueError("a distillation loss (alpha > 0) needs the teacher's log-probabilities")
        kl = (teacher_log_p.exp() * (teacher_log_p - log_p)).sum(dim=-1)
    else:
        kl = torch.zeros_like(ce)
    if alpha == 0:
        loss = ce.sum()
    elif alpha == 1:  # pure distillation: leave CE out of the graph entirely
        loss = kl.sum()
    else:
        loss = ((1 - alpha) * ce + alpha * kl).sum()
    return LossSums(loss, ce.detach().sum(), kl.detach().sum(), int(mask.sum()))

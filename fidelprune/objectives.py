"""The losses whose gradients drive Taylor importance (../shared/docs/methods.md, "Objectives").

Each returns one loss per sequence, shape [B]. Scoring sums them (never averages over the batch), so the
gradient reaching sequence n's activations is exactly d loss_n / d a_n however sequences are batched.
All softmaxes run in fp32 over the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def ce(logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, mean over the L-1 predicted positions."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).mean(dim=1)


class _Entropy(torch.autograd.Function):
    """Per-position entropy H = -sum_v p_v log p_v with its analytic gradient -p * (log p + H) w.r.t. the logits.
    Autograd through log_softmax, exp and the product keeps three [B, T, V] tensors for the backward pass (over
    0.6 GB at batch 4 x 256 tokens of a 49k vocabulary); this keeps only the logits and recomputes the rest,
    in place, when the gradient is needed. Same values and gradient up to float rounding (tested)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logits)
        return -(log_p.exp() * log_p).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors
        log_p = F.log_softmax(logits, dim=-1)
        p = log_p.exp()
        h = -(p * log_p).sum(dim=-1, keepdim=True)
        return p.mul_(log_p.add_(h)).mul_(-grad_output.unsqueeze(-1))


def entropy(logits: torch.Tensor, input_ids: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """HFPrune: mean over positions of the entropy of the model's own next-token distribution."""
    return _Entropy.apply(logits.float()).mean(dim=1)


class _KLToTeacher(torch.autograd.Function):
    """Per-position KL(softmax(teacher) || softmax(student)) with its analytic gradient p_S - p_T w.r.t. the
    student logits. Autograd through log_softmax gives p_S * sum(p_T) - p_T, which is ~1e-8 rather than 0 at
    student = teacher because sum(p_T) is 1 only up to rounding; the seed method's premise (zero KD gradient at
    the unpruned model) holds exactly with the analytic form."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        teacher_log_p = F.log_softmax(teacher_logits, dim=-1)
        student_log_p = F.log_softmax(student_logits, dim=-1)
        ctx.save_for_backward(student_logits, teacher_logits)
        return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student_logits, teacher_logits = ctx.saved_tensors  # recompute the softmaxes rather than keep two [B,T,V]
        grad = F.softmax(student_logits, dim=-1) - F.softmax(teacher_logits, dim=-1)
        return grad_output.unsqueeze(-1) * grad, None


@dataclass(frozen=True)
class KD:
    """SDMPrune: (1-alpha) CE + alpha mean_t KL(softmax(z_T / tau) || softmax(z_S)), no tau^2 factor."""

    alpha: float
    temperature: float

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("the kd objective needs teacher logits")
        kl = _KLToTeacher.apply(logits.float(), teacher_logits.float() / self.temperature).mean(dim=1)
        if self.alpha == 1.0:  # skip CE entirely so its gradient is not even approximately present
            return kl
        return (1 - self.alpha) * ce(logits, input_ids) + self.alpha * kl


OBJECTIVES = ("ce", "entropy", "kd")


def get_objective(name: str, alpha: float = 0.4, temperature: float = 0.2):
    if name == "ce":
        return ce
    if name == "entropy":
        return entropy
    if name == "kd":
        return KD(alpha, temperature)
    raise ValueError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")

"""The losses whose gradients drive Taylor importance (docs/methods.md, "Objectives").

Each returns one loss per sequence, shape [B]. Scoring sums them (never averages over the batch), so the
gradient reaching sequence n's activations is exactly d loss_n / d a_n however sequences are batched.
All softmaxes run in fp32 over the full vocabulary, a few rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

# The softmaxes below run over a few rows of the logits at a time, each upcast to fp32 on its own: the
# full-vocabulary fp32 intermediates of one chunk are about this many values (16 MiB), whatever the batch,
# sequence length or vocabulary. Done at once, a loss keeps or makes several [B, T, V] fp32 tensors (an fp32
# copy of bf16 logits, log-softmax, its exp, their product), each 8.4 GB for 4 x 4,096 tokens of a 128k
# vocabulary. Each row's arithmetic is unchanged, so chunking changes no value (tested).
CHUNK_VALUES = 1 << 22


# Scoring reads only a loss's gradient, never its value. Under gradients_only() a loss may skip computing a value
# that its backward does not read; the KL does (its value is then 0). With a sharp teacher (tau = 0.2) a large share
# of exp(log p_T) lands in float32's denormal range, which x86 CPUs compute far more slowly, so the KL's value cost
# more than its gradient. The gradient is the same computation either way.
_VALUES_NEEDED: ContextVar[bool] = ContextVar("loss_values_needed", default=True)


@contextmanager
def gradients_only() -> Iterator[None]:
    """Inside the block, losses whose backward does not read their value may return 0 for it (the KL does)."""
    token = _VALUES_NEEDED.set(False)
    try:
        yield
    finally:
        _VALUES_NEEDED.reset(token)


def _row_chunks(rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, CHUNK_VALUES // vocab)
    for start in range(0, rows, step):
        yield slice(start, start + step)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _NextTokenNLL(torch.autograd.Function):
    """Per-position -log p_t(x_{t+1}) for t < L-1, [B, L-1], with its analytic gradient softmax - onehot
    w.r.t. the logits (what autograd through log_softmax and the gather gives)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length, vocab = logits.shape
        nll = torch.zeros(batch, length - 1, dtype=torch.float32, device=logits.device)
        for n in range(batch):  # per sequence, so the predicting positions [:-1] stay a contiguous view
            for rows in _row_chunks(length - 1, vocab):
                nll[n, rows] = F.cross_entropy(logits[n, :-1][rows].float(), input_ids[n, 1:][rows], reduction="none")
        ctx.save_for_backward(logits, input_ids)
        return nll

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, input_ids = ctx.saved_tensors
        batch, length, vocab = logits.shape
        grad = torch.zeros_like(logits)
        for n in range(batch):
            for rows in _row_chunks(length - 1, vocab):
                g = F.softmax(logits[n, :-1][rows].float(), dim=-1)
                g.scatter_add_(-1, input_ids[n, 1:][rows, None], g.new_full((g.shape[0], 1), -1.0))
                grad[n, :-1][rows] = g.mul_(grad_output[n, rows, None])
        return grad, None


def ce(logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, mean over the L-1 predicted positions."""
    return _NextTokenNLL.apply(logits, input_ids).mean(dim=1)


class _Entropy(torch.autograd.Function):
    """Per-position entropy H = -sum_v p_v log p_v with its analytic gradient -p * (log p + H) w.r.t. the logits.
    Autograd through log_softmax, exp and the product would keep three [B, T, V] fp32 tensors for the backward
    pass; this keeps only the logits and recomputes the rest, chunk by chunk, when the gradient is needed.

    The gradient is computed in fp64 and rounded once: in fp32, log p + H cancels (both ~10 for a 50k vocabulary
    while the result is ~1), which made it less accurate than autograd's (relative error against an fp64 reference
    2.4e-5 vs 1.6e-5) and flipped near-tied neurons; in fp64 it is the fp64 reference, rounded (tested)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        flat = _rows(logits)
        h = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _row_chunks(*flat.shape):
            log_p = F.log_softmax(flat[rows].float(), dim=-1)
            h[rows] = -(log_p.exp() * log_p).sum(dim=-1)
        ctx.save_for_backward(logits)
        return h.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors
        flat, g = _rows(logits), grad_output.reshape(-1, 1)
        grad = torch.empty_like(flat)
        for rows in _row_chunks(*flat.shape):
            log_p = F.log_softmax(flat[rows].double(), dim=-1)
            p = log_p.exp()
            h = -(p * log_p).sum(dim=-1, keepdim=True)
            grad[rows] = p.mul_(log_p.add_(h)).mul_(-g[rows].double())
        return grad.view_as(logits)


def entropy(logits: torch.Tensor, input_ids: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """HFPrune: mean over positions of the entropy of the model's own next-token distribution."""
    return _Entropy.apply(logits).mean(dim=1)


class _KLToTeacher(torch.autograd.Function):
    """Per-position KL(softmax(teacher / tau) || softmax(student)) with its analytic gradient p_S - p_T w.r.t. the
    student logits. Autograd through log_softmax gives p_S * sum(p_T) - p_T, which is ~1e-8 rather than 0 at
    student = teacher because sum(p_T) is 1 only up to rounding; the seed method's premise (zero KD gradient at
    the unpruned model) holds exactly with the analytic form. Softmaxes are recomputed chunk by chunk. Under
    gradients_only() the forward returns zeros: the backward does not read the KL."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        student, teacher = _rows(student_logits), _rows(teacher_logits)
        kl = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        for rows in _row_chunks(*student.shape) if _VALUES_NEEDED.get() else ():  # backward reads only the logits
            teacher_log_p = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
            student_log_p = F.log_softmax(student[rows].float(), dim=-1)
            kl[rows] = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=-1)
        ctx.temperature = temperature
        ctx.save_for_backward(student_logits, teacher_logits)
        return kl.view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student_logits, teacher_logits = ctx.saved_tensors
        student, teacher, g = _rows(student_logits), _rows(teacher_logits), grad_output.reshape(-1, 1)
        grad = torch.empty_like(student)
        for rows in _row_chunks(*student.shape):
            p_s = F.softmax(student[rows].float(), dim=-1)
            grad[rows] = p_s.sub_(F.softmax(teacher[rows].float() / ctx.temperature, dim=-1)).mul_(g[rows])
        return grad.view_as(student_logits), None, None


@dataclass(frozen=True)
class KD:
    """SDMPrune: (1-alpha) CE + alpha mean_t KL(softmax(z_T / tau) || softmax(z_S)), no tau^2 factor."""

    alpha: float
    temperature: float

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("the kd objective needs teacher logits")
        kl = _KLToTeacher.apply(logits, teacher_logits, self.temperature).mean(dim=1)
        if self.alpha == 1.0:  # skip CE entirely so its gradient is not even approximately present
            return kl
        return (1 - self.alpha) * ce(logits, input_ids) + self.alpha * kl


OBJECTIVES = ("ce", "entropy", "kd")

# SDMPrune's published (alpha, temperature) for LLaMA-3.2-1B by pruning ratio; the nearest ratio's pair is the kd
# objective's default, whichever method uses it.
SDMPRUNE_SETTINGS = {0.2: (0.4, 0.2), 0.3: (0.42, 0.5), 0.4: (0.1, 0.2)}


def sdmprune_defaults(ratio: float) -> tuple[float, float]:
    return SDMPRUNE_SETTINGS[min(SDMPRUNE_SETTINGS, key=lambda r: abs(r - ratio))]


def get_objective(name: str, alpha: float = 0.4, temperature: float = 0.2):
    if name == "ce":
        return ce
    if name == "entropy":
        return entropy
    if name == "kd":
        return KD(alpha, temperature)
    raise ConfigError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")

import pytest
import torch
import torch.nn.functional as F

from fidelprune import objectives
from fidelprune.objectives import KD, ce, entropy


def logits_and_ids(seed=0, shape=(3, 7, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, shape[-1], shape[:2], generator=g)


@pytest.fixture(params=["one chunk", "2-row chunks"])
def chunking(request, monkeypatch):
    """Every objective test runs with the default chunking (one chunk at these sizes) and with chunks of two
    rows, so ragged last chunks and per-sequence chunk boundaries are exercised."""
    if request.param == "2-row chunks":
        monkeypatch.setattr(objectives, "CHUNK_VALUES", 2 * 11)
    return request.param


def test_ce_is_mean_next_token_nll_per_sequence(chunking):
    logits, ids = logits_and_ids()
    expected = torch.stack([
        torch.stack([-F.log_softmax(logits[n, t], -1)[ids[n, t + 1]] for t in range(6)]).mean() for n in range(3)
    ])
    torch.testing.assert_close(ce(logits, ids).double(), expected, rtol=1e-6, atol=1e-6)


def test_ce_gradient_matches_autograd_through_cross_entropy(chunking):
    logits, ids = logits_and_ids(3)
    fast = logits.clone().requires_grad_()
    ce(fast, ids).sum().backward()
    plain = logits.clone().requires_grad_()
    nll = F.cross_entropy(plain[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none")
    nll.view(3, 6).mean(1).sum().backward()
    assert fast.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    torch.testing.assert_close(fast.grad, plain.grad, rtol=1e-4, atol=1e-7)


def test_entropy_is_mean_over_positions_of_full_vocabulary_entropy(chunking):
    logits, ids = logits_and_ids()
    p = torch.softmax(logits, -1)
    expected = (-(p * p.log()).sum(-1)).mean(-1)
    torch.testing.assert_close(entropy(logits, ids).double(), expected, rtol=1e-6, atol=1e-6)


def test_entropy_gradient_matches_autograd_through_the_plain_formula(chunking):
    logits, ids = logits_and_ids(2)
    fast = logits.float().clone().requires_grad_()
    entropy(fast, ids).sum().backward()
    plain = logits.clone().requires_grad_()
    p = torch.softmax(plain, -1)
    (-(p * torch.log_softmax(plain, -1)).sum(-1)).mean(-1).sum().backward()
    torch.testing.assert_close(fast.grad.double(), plain.grad, rtol=1e-4, atol=1e-7)


def test_kd_value_and_gradient_match_the_plain_formula(chunking):
    student, ids = logits_and_ids(0)
    teacher, _ = logits_and_ids(1)
    alpha, tau = 0.4, 0.2
    s1 = student.clone().requires_grad_()
    loss = KD(alpha, tau)(s1, ids, teacher)
    s2 = student.clone().requires_grad_()
    p_t = torch.softmax(teacher / tau, -1)  # temperature on the teacher only, no tau^2
    kl = (p_t * (p_t.log() - torch.log_softmax(s2, -1))).sum(-1).mean(-1)
    plain = (1 - alpha) * ce(s2, ids).double() + alpha * kl
    torch.testing.assert_close(loss.double(), plain, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    plain.sum().backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


def test_gradients_only_skips_the_kl_value_and_changes_no_gradient(chunking):
    """Scoring runs its losses under gradients_only(): the KL's value (its costliest part with a sharp teacher) is
    not computed, and the gradient is bitwise the one computed with it."""
    student, ids = logits_and_ids(0)
    teacher, _ = logits_and_ids(1)
    kd = KD(alpha=0.4, temperature=0.2)
    with_value = student.clone().float().requires_grad_()
    loss = kd(with_value, ids, teacher.float())
    loss.sum().backward()
    without_value = student.clone().float().requires_grad_()
    with objectives.gradients_only():
        skipped = kd(without_value, ids, teacher.float())
    skipped.sum().backward()
    assert torch.equal(without_value.grad, with_value.grad)
    torch.testing.assert_close(skipped, 0.6 * ce(student.float(), ids))  # the CE part only
    assert not torch.equal(skipped, loss)
    assert objectives._VALUES_NEEDED.get()  # restored after the block


def loss_and_gradient(name: str, dtype: torch.dtype, rounded_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective `name` on the fixed student/teacher logits (first rounded to `rounded_to`, then cast to dtype):
    the per-sequence loss and the logits' gradient."""
    student, ids = logits_and_ids(0)
    teacher, _ = logits_and_ids(1)
    if rounded_to is not None:
        student, teacher = student.to(rounded_to), teacher.to(rounded_to)
    logits = student.to(dtype).requires_grad_()
    loss = objectives.get_objective(name)(logits, ids, teacher.to(dtype))
    loss.sum().backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("name", ["ce", "entropy", "kd"])
def test_chunking_changes_no_value_or_gradient(name, monkeypatch):
    whole = loss_and_gradient(name, torch.float32)
    monkeypatch.setattr(objectives, "CHUNK_VALUES", 2 * 11)
    chunked = loss_and_gradient(name, torch.float32)
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ce", "entropy", "kd"])
def test_bf16_logits_are_upcast_chunk_by_chunk_with_the_gradient_in_bf16(name, chunking):
    loss, grad = loss_and_gradient(name, torch.bfloat16)
    expected, expected_grad = loss_and_gradient(name, torch.float32, rounded_to=torch.bfloat16)  # upcast up front
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # kd's two terms each hand autograd a bf16 gradient, which it sums in bf16: one more rounding
    exact = name != "kd"
    torch.testing.assert_close(grad, expected_grad.bfloat16(), rtol=0 if exact else 2**-7, atol=0 if exact else 2**-10)


def test_entropy_gradient_is_at_least_as_accurate_as_fp32_autograd():
    """Against an fp64 reference at a real vocabulary's size (fp32 logits of an LM's spread), the analytic gradient
    is the reference rounded once, so closer to it than fp32 autograd through log_softmax: near-tied neurons no longer
    flip on rounding the seeds' autograd does not make (docs/methods.md)."""
    g = torch.Generator().manual_seed(0)
    logits32 = (torch.randn(2, 8, 49152, generator=g) * 3).float()

    def autograd_entropy_grad(logits):
        x = logits.clone().requires_grad_()
        log_p = F.log_softmax(x, dim=-1)
        (-(log_p.exp() * log_p).sum(-1)).mean(1).sum().backward()
        return x.grad

    reference = autograd_entropy_grad(logits32.double())
    fast = logits32.clone().requires_grad_()
    entropy(fast).sum().backward()
    ours = (fast.grad.double() - reference).abs().max() / reference.abs().max()
    theirs = (autograd_entropy_grad(logits32).double() - reference).abs().max() / reference.abs().max()
    rounding = (reference.float().double() - reference).abs().max() / reference.abs().max()
    assert ours <= theirs and ours == rounding, (ours, theirs, rounding)

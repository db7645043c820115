import torch
import torch.nn.functional as F

from fidelprune.objectives import KD, ce, entropy


def logits_and_ids(seed=0, shape=(3, 7, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, shape[-1], shape[:2], generator=g)


def test_ce_is_mean_next_token_nll_per_sequence():
    logits, ids = logits_and_ids()
    expected = torch.stack([
        torch.stack([-F.log_softmax(logits[n, t], -1)[ids[n, t + 1]] for t in range(6)]).mean() for n in range(3)
    ])
    torch.testing.assert_close(ce(logits, ids).double(), expected, rtol=1e-6, atol=1e-6)


def test_entropy_is_mean_over_positions_of_full_vocabulary_entropy():
    logits, ids = logits_and_ids()
    p = torch.softmax(logits, -1)
    expected = (-(p * p.log()).sum(-1)).mean(-1)
    torch.testing.assert_close(entropy(logits, ids).double(), expected, rtol=1e-6, atol=1e-6)


def test_entropy_gradient_matches_autograd_through_the_plain_formula():
    logits, ids = logits_and_ids(2)
    fast = logits.float().clone().requires_grad_()
    entropy(fast, ids).sum().backward()
    plain = logits.clone().requires_grad_()
    p = torch.softmax(plain, -1)
    (-(p * torch.log_softmax(plain, -1)).sum(-1)).mean(-1).sum().backward()
    torch.testing.assert_close(fast.grad.double(), plain.grad, rtol=1e-4, atol=1e-7)


def test_kd_value_and_gradient_match_the_plain_formula():
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

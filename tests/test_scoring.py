"""Each score form against fidelprune.reference: plain implementations written straight from
docs/methods.md, one sequence at a time, full weight (or activation) gradients from autograd,
no hooks of fidelprune's."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fidelprune import scoring
from fidelprune.adapters import adapt
from fidelprune.allocation import select_uniform
from fidelprune.methods.magnitude import magnitude_scores
from fidelprune.objectives import KD, ce, entropy
from fidelprune.scoring import ScoringError, check_finite, taylor_scores
from fidelprune.surgery import remove_neurons

import reference
from conftest import tiny_model, tiny_windows


def assert_scores_close(scores, expected):
    for i, ref in expected.items():
        torch.testing.assert_close(scores[i].double(), ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "llama-bias", "phi3", "gemma3"])
def test_weight_element_matches_per_sequence_reference(family):
    model, windows = tiny_model(family), tiny_windows(5)
    scores = taylor_scores(copy.deepcopy(model), windows, ce, "weight-element", batch_size=3, progress=False)
    assert_scores_close(scores, reference.weight_element_scores(model, windows, ce))


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3"])
def test_activation_form_matches_reference(family):
    model, windows = tiny_model(family), tiny_windows(5)
    scores = taylor_scores(copy.deepcopy(model), windows, entropy, "activation", batch_size=2, progress=False)
    assert_scores_close(scores, reference.activation_scores(model, windows, entropy))


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_llm_pruner_element_forms_match_reference(family, second_order):
    model, windows = tiny_model(family), tiny_windows(4)
    form = "element2" if second_order else "element1"
    scores = taylor_scores(copy.deepcopy(model), windows, ce, form, batch_size=3, progress=False)
    assert_scores_close(scores, reference.element_scores(model, windows, ce, second_order))


@pytest.mark.parametrize("form", ["weight-element", "activation", "element1"])
def test_scores_do_not_depend_on_batch_size(form):
    model, windows = tiny_model("qwen2"), tiny_windows(6)
    one = taylor_scores(model, windows, ce, form, batch_size=1, progress=False)
    all_ = taylor_scores(model, windows, ce, form, batch_size=6, progress=False)
    for i in one:
        torch.testing.assert_close(one[i], all_[i], rtol=1e-4, atol=1e-8)


def test_kd_gradient_is_exactly_zero_at_the_teacher():
    model, windows = tiny_model("llama"), tiny_windows(3)
    for form in ("weight-element", "activation"):
        scores = taylor_scores(model, windows, KD(alpha=1.0, temperature=1.0), form, needs_teacher=True, progress=False)
        assert all(torch.count_nonzero(s) == 0 for s in scores.values())
    sharpened = taylor_scores(model, windows, KD(alpha=1.0, temperature=0.5), "activation", needs_teacher=True, progress=False)
    assert all(torch.count_nonzero(s) > 0 for s in sharpened.values())


def test_masked_student_scores_equal_a_physically_pruned_student():
    """SDMPrune stage 2 scores the stage-1 model against the original without a second copy: the student is the
    original with neurons masked. It must equal a real pruned copy scored against a real teacher copy."""
    model, windows = tiny_model("llama"), tiny_windows(4)
    survivors = select_uniform(magnitude_scores(model), 40)
    kd = KD(alpha=0.4, temperature=0.2)
    masked = taylor_scores(model, windows, kd, "weight-element", mask=survivors, needs_teacher=True, batch_size=2, progress=False)
    student = copy.deepcopy(model)
    remove_neurons(student, survivors)
    expected = reference.weight_element_scores(student, windows, kd, teacher=model)
    for i, ref in expected.items():
        torch.testing.assert_close(masked[i][survivors[i]].double(), ref, rtol=1e-4, atol=1e-9)
        removed = torch.ones(48, dtype=torch.bool)
        removed[survivors[i]] = False
        assert torch.all(masked[i][removed] == 0)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # Gemma-2: a soft-capped head after the final norm
def test_a_kept_teacher_output_gives_the_teacher_forwards_scores(family, streamed):
    """SDMPrune's stage 1 runs the original model and keeps its last decoder layer's output; stage 2 then takes the
    teacher's logits from it through the final norm and head alone. Its scores are bitwise those of a whole teacher
    forward, whether a pass without a mask or the first teacher forward keeps the output."""
    model, windows = tiny_model(family), tiny_windows(5)  # at batch 2: a short last batch too
    survivors = select_uniform(magnitude_scores(model), 40)
    kd = KD(alpha=0.4, temperature=0.2)
    adapted = adapt(model)
    if streamed:
        adapted.stream("cpu")
    run = dict(batch_size=2, progress=False)
    last_mlp = []  # how often the last decoder layer's MLP runs: once per stack of layers run
    handle = adapted.mlps()[-1].module.register_forward_hook(lambda *_: last_mlp.append(1))
    expected = taylor_scores(adapted, windows, kd, "weight-element", mask=survivors, needs_teacher=True, **run)
    teacher_forward = len(last_mlp)

    kept = []
    taylor_scores(adapted, windows, ce, "weight-element", teacher_hidden=kept, **run)  # stage 1: keeps
    assert [len(h) for h in kept] == [2, 2, 1]
    assert all(h.device.type == "cpu" and not h.requires_grad for h in kept)
    last_mlp.clear()
    reused = taylor_scores(adapted, windows, kd, "weight-element", mask=survivors, needs_teacher=True,
                           teacher_hidden=kept, **run)
    assert len(last_mlp) == teacher_forward - 3  # no teacher forward for any of the 3 batches
    for i, score in expected.items():
        assert torch.equal(reused[i], score), i
    handle.remove()

    first_teacher = []  # iterative KD's first step: its teacher forward keeps the output for the next steps
    taylor_scores(adapted, windows, kd, "weight-element", mask=survivors, needs_teacher=True,
                  teacher_hidden=first_teacher, **run)
    assert all(torch.equal(a, b) for a, b in zip(first_teacher, kept, strict=True))
    if streamed:
        adapted.unstream()


def test_weights_never_get_gradients_and_flags_are_restored():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)
    taylor_scores(model, tiny_windows(2), ce, "weight-element", progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert model.lm_head.weight.requires_grad is False
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad is True


def test_nan_scores_raise_a_clear_error():
    with pytest.raises(ScoringError, match="layer 1.*float32"):
        check_finite({0: torch.ones(3), 1: torch.tensor([1.0, float("nan"), 0.0])})


def test_activation_values_are_recomputed_from_the_gated_products_factors():
    gate, up = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7, requires_grad=True)
    a = F.silu(gate) * up
    mask = (torch.arange(7) % 2).float()
    values = scoring._activation_values(a, mask)
    recomputed = values()
    assert recomputed.data_ptr() != a.data_ptr()  # a itself was not held
    assert torch.equal(recomputed, a.detach() * mask)
    # anything that is not a product of two same-shaped tensors keeps a itself, bit for bit
    b = F.gelu(gate)
    assert scoring._activation_values(b, None)().data_ptr() == b.data_ptr()


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_recomputing_a_changes_no_score(family, monkeypatch):
    """The activation form multiplies a gated MLP's two saved factors again instead of holding a; scores, plain
    and masked (SDMPrune stage 2), must equal those made holding a, bit for bit."""
    model, windows = tiny_model(family), tiny_windows(4)
    survivors = select_uniform(magnitude_scores(model), 40)
    kd = KD(alpha=0.4, temperature=0.5)

    def run():
        return (taylor_scores(model, windows, entropy, "activation", batch_size=2, progress=False),
                taylor_scores(model, windows, kd, "activation", mask=survivors, needs_teacher=True, batch_size=2, progress=False))

    recomputed = run()
    monkeypatch.setattr(scoring, "_activation_values", lambda a, mask: (lambda: a.detach() if mask is None else a.detach() * mask))
    held = run()
    for new, old in zip(recomputed, held):
        assert all(torch.equal(new[i], old[i]) for i in old)

"""Per-neuron importance scores, {layer_index: fp32 tensor [I]} (docs/methods.md, "Importance scores").

Taylor forms need gradients, but never weight gradients of the whole model: every parameter is frozen, the
embedding output is made a leaf that requires grad, and tensor hooks on each MLP read the few activation
gradients a score needs as backward passes through that layer, reduce them into fp32 per-neuron (or, for
LLM-Pruner's summed-gradient forms, per-weight) accumulators, and let them go.

- activation (HFPrune):      s_i = sum_n sum_t |a_nti * dL_n/da_nti|
- weight-element (SDMPrune): P_ij = G^down_ji W^down_ji + G^up_ij W^up_ij + G^gate_ij W^gate_ij per sequence,
                             s_i = sum_n mean_j |P_ij|; per-sequence weight gradients come from
                             G^down_n = sum_t gy_t (x) a_t and G^up/gate_n = sum_t g_t (x) x_t, so a batch of
                             B sequences gives exactly B per-sequence gradients.
- element1 (LLM-Pruner):     s_i = sum_{w in neuron i} |w g_w|, g = sum_n dL_n/dw
- element2 (LLM-Pruner):     s_i = sum_{w in neuron i} |w g_w - 1/2 w^2 sum_n (dL_n/dw)^2|: the second-order
                             Taylor change of the loss when w is zeroed, Fisher diagonal for the Hessian.
Biases are not scored (the formulas cover weights only); they leave with their neuron.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import AdaptedModel, AttentionView, MLPView, adapt
from .distributed import is_main, shard, sum_, sum_number
from .errors import ConfigError, FidelpruneError
from .objectives import gradients_only
from .utils import batches, frozen_eval, registered

FORMS = ("activation", "weight-element", "element1", "element2")
Scores = dict[int, torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class ScoringError(FidelpruneError, ValueError):
    """Scores came out unusable (NaN / inf)."""


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


class _LayerState:
    """What one MLP's hooks hold between its forward and its backward."""

    def __init__(self, view: MLPView, form: str) -> None:
        self.view = view
        self.form = form
        width, hidden = view.width, view.hidden_size
        self.score = torch.zeros(width, dtype=torch.float32, device=view.down.weight.device)
        # From a layer's forward until its backward: the MLP's input, and how to get down_proj's input back
        self.x: torch.Tensor | None = None
        self.a: Callable[[], torch.Tensor] | None = None
        self.x_uses = 0
        self.pending: torch.Tensor | None = None  # weight-element: sum of the P terms seen so far, [B, d, I]
        self.terms_seen = 0
        if form in ("element1", "element2"):
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.score.device)  # noqa: E731
            self.grad = {"down": zeros(hidden, width), "up": zeros(width, hidden), "gate": zeros(width, hidden)}
            self.fisher = {k: torch.zeros_like(v) for k, v in self.grad.items()} if form == "element2" else None

    def weight(self, name: str) -> torch.Tensor:
        if name == "down":
            return self.view.down.weight
        gate, up = self.view.gate_up_weights()
        return gate if name == "gate" else up

    def add_weight_grad(self, name: str, per_sequence_grad: torch.Tensor) -> None:
        """per_sequence_grad: [B, *W.shape] fp32, the gradient of each sequence's loss w.r.t. W (element forms)."""
        # Accumulators stay with the layer's weights: in host memory when streamed (a 70B model's element
        # sums are ~3x its MLP weights in fp32), on the device otherwise.
        self.grad[name] += per_sequence_grad.sum(dim=0).to(self.score.device)
        if self.fisher is not None:
            self.fisher[name] += per_sequence_grad.square().sum(dim=0).to(self.score.device)

    def add_weight_element_term(self, name: str, per_sequence_grad: torch.Tensor) -> None:
        """per_sequence_grad: [B, d, I] fp32, each sequence's gradient w.r.t. W in down_proj's layout (G^down, and
        G^up / G^gate transposed), so that P's three terms G * W add as contiguous tensors. The sum is the same
        elementwise additions in the same order as in any layout, and |P| is reduced over j in this layout as
        before, so the scores are bitwise those of the [B, I, d] formulation (tests/test_score_digests.py)."""
        weight = self.weight(name).detach()
        if name != "down":  # [I, d] -> [d, I], one copy per call (cheaper than a strided multiply over B)
            weight = weight.t()
        # In place: the gradient is this call's own tensor, so the three [B, d, I] terms cost no new buffers.
        term = per_sequence_grad.mul_(weight.to(torch.float32, memory_format=torch.contiguous_format))
        self.pending = term if self.pending is None else self.pending.add_(term)
        self.terms_seen += 1
        if self.terms_seen == 3:
            self.score += self.pending.abs().mean(dim=1).sum(dim=0).to(self.score.device)
            self.pending, self.terms_seen = None, 0

    def reduce(self) -> None:
        """Sum this layer's accumulators over the processes of a data-parallel run (distributed.py): the summed
        gradients before |w g| is taken, for the element forms."""
        sum_(self.score)
        if self.form in ("element1", "element2"):
            sum_(*self.grad.values(), *(self.fisher or {}).values())

    def finish(self) -> torch.Tensor:
        if self.form not in ("element1", "element2"):
            return self.score
        score = torch.zeros_like(self.score)
        for name, grad in self.grad.items():
            weight = self.weight(name).detach().float()
            change = weight * grad
            if self.fisher is not None:
                change = change - 0.5 * weight.square() * self.fisher[name]
            score += change.abs().sum(dim=0 if name == "down" else 1)
        return score


def _activation_values(a: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """How a hook gets the down_proj input (a, times mask when masked) back once in the backward pass: when a's
    gradient arrives (activation form) or down_proj's output gradient does (the weight forms). With frozen weights
    nothing else keeps it alive (down_proj saves only its weight), so holding it costs one [B, T, I] tensor per layer. A gated MLP's a = act(gate) * up is a
    product whose two factors autograd keeps anyway for the product's own backward, which runs after this
    gradient hook: holding those (the same storage) and multiplying them again gives a, bit for bit, for no
    memory. Anything else (a GELU MLP) holds a itself. Either way the references are dropped once used, so the
    backward pass frees as usual."""
    fn = a.grad_fn
    held: list[torch.Tensor] = [a.detach()]
    if fn is not None and fn.name() == "MulBackward0":
        left, right = fn._saved_self, fn._saved_other
        if left is not None and right is not None and left.shape == right.shape == a.shape and left.dtype == right.dtype == a.dtype:
            held = [left, right]

    def values() -> torch.Tensor:
        factors = held.copy()
        held.clear()
        value = factors[0] if len(factors) == 1 else factors[0] * factors[1]
        return value if mask is None else value * mask

    return values


class _Hooked:
    """Hooks registered on entering the block (in `self._handles`), removed on leaving it, whatever happens."""

    _handles: list

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class MLPHooks(_Hooked):
    """Hooks on every MLP: an optional neuron mask (a_i -> 0 for masked neurons, the same function as a model
    with those neurons removed) and the gradient capture for a score form. `active = False` turns both off,
    which makes the model the original, unmasked one: the SDMPrune teacher without a second copy."""

    def __init__(self, model: nn.Module | AdaptedModel, form: str | None, mask: dict[int, torch.Tensor] | None = None) -> None:
        if form is not None and form not in FORMS:
            raise ConfigError(f"unknown score form {form!r}: choose one of {', '.join(FORMS)}")
        self.views = adapt(model).mlps()
        self.form = form
        self.active = True
        self.mask = {}
        for view in self.views:
            if mask is not None and view.index in mask:
                m = torch.zeros(view.width, dtype=view.down.weight.dtype, device=view.down.weight.device)
                m[mask[view.index].to(m.device)] = 1
                self.mask[view.index] = m
        self.states = {v.index: _LayerState(v, form) for v in self.views} if form else {}
        self._handles: list = []

    def __enter__(self) -> MLPHooks:
        for view in self.views:
            self._handles.append(view.down.register_forward_pre_hook(self._down_input(view.index)))
            if self.form in ("weight-element", "element1", "element2"):
                state = self.states[view.index]
                self._handles.append(view.module.register_forward_pre_hook(self._mlp_input(state), with_kwargs=True))
                self._handles.append(view.down.register_forward_hook(self._grad_hook(state, "down")))
                if view.gate_up is not None:
                    self._handles.append(view.gate_up.register_forward_hook(self._grad_hook(state, "gate_up")))
                else:
                    self._handles.append(view.gate.register_forward_hook(self._grad_hook(state, "gate")))
                    self._handles.append(view.up.register_forward_hook(self._grad_hook(state, "up")))
        return self

    def _down_input(self, index: int):
        def hook(module, args):
            if not self.active:
                return None
            a = args[0]
            mask = self.mask.get(index)
            if mask is not None:
                mask = mask.to(a.device)  # streamed: the mask lives with the layer's weights in host memory
                a = a * mask
            if self.form == "activation" and a.requires_grad:
                state, values = self.states[index], _activation_values(args[0], mask)

                def on_grad(g: torch.Tensor) -> None:  # |a * dL/da|, summed over sequences and positions
                    state.score.add_((values().float() * g.float()).abs().sum(dim=(0, 1)).to(state.score.device))

                a.register_hook(on_grad)
            elif self.form is not None and self.form != "activation" and a.requires_grad:
                # for this layer's backward (a pass without gradients has none), from what autograd keeps anyway
                self.states[index].a = _activation_values(args[0], mask)
            return (a,) + args[1:]

        return hook

    def _mlp_input(self, state: _LayerState):
        def hook(module, args, kwargs):
            x = _first_arg(args, kwargs)
            if self.active and x.requires_grad:
                state.x = x.detach()
                state.x_uses = 1 if state.view.gate_up is not None else 2  # gate and up each need it once

        return hook

    def _grad_hook(self, state: _LayerState, name: str):
        # element1 needs only the gradient summed over sequences: reduce over b and t in one einsum.
        b = "" if self.form == "element1" else "b"

        def on_grad(g: torch.Tensor) -> None:
            g = g.float()
            add = state.add_weight_element_term if self.form == "weight-element" else state.add_weight_grad
            if name == "down":  # G^down_n = sum_t gy_t (x) a_t   -> [B, d, I]
                grad = torch.einsum(f"btj,bti->{b}ji", g, state.a().float())
                state.a = None  # let go once used: a layer-by-layer backward then holds one layer's, not all
                add("down", grad if b else grad[None])
                return
            x = state.x.float()
            state.x_uses -= 1
            if state.x_uses == 0:
                state.x = None
            parts = {"gate": g[..., : state.view.width], "up": g[..., state.view.width :]} if name == "gate_up" else {name: g}
            # G^{gate,up}_n = sum_t g_t (x) x_t -> [B, I, d]; weight-element takes it transposed, [B, d, I]
            layout = "ji" if self.form == "weight-element" else "ij"
            for part, grad_out in parts.items():
                grad = torch.einsum(f"bti,btj->{b}{layout}", grad_out, x)
                add(part, grad if b else grad[None])

        def hook(module, args, output):
            if self.active and output.requires_grad:
                output.register_hook(on_grad)

        return hook

    def scores(self) -> Scores:
        for state in self.states.values():
            state.reduce()
        return {i: state.finish().cpu() for i, state in self.states.items()}


@contextmanager
def leaf_embeddings(model: nn.Module) -> Iterator[None]:
    """Make the embedding output a leaf that requires grad, so activation gradients exist while every
    parameter stays frozen (no weight gradient is ever allocated)."""
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
    with registered([handle]):
        yield


def check_finite(scores: Scores) -> Scores:
    for index, score in scores.items():
        if not torch.isfinite(score).all():
            raise ScoringError(
                f"non-finite importance scores in layer {index}: the model overflowed; run in float32 "
                f"(--dtype float32) or check the model's weights"
            )
    return scores


def taylor_scores(
    model: nn.Module | AdaptedModel,
    windows: torch.Tensor,
    objective: Objective,
    form: str,
    *,
    batch_size: int = 4,
    mask: dict[int, torch.Tensor] | None = None,
    needs_teacher: bool = False,
    teacher_hidden: list[torch.Tensor] | None = None,
    progress: bool = True,
    description: str = "scoring",
) -> Scores:
    """Taylor importance of every MLP neuron under `objective` (per-sequence losses, summed), in `form`.

    With `mask`, only the listed neurons of each layer are active (the student); with `needs_teacher`, each
    batch also gets the original model's logits (the teacher), under no_grad.

    `teacher_hidden` (a list, shared by the passes of one method over the same windows) holds the original
    model's last-decoder-layer output for each batch, in host memory. The first pass that computes it appends it
    (a pass without a mask runs the original model; a teacher forward does); a later KD pass then takes the
    teacher's logits from it through the model's own final norm and head (AdaptedModel.head_logits) instead of
    running every layer again: the same arithmetic on the same values, so the same logits (tests/test_scoring.py).
    """
    adapted = adapt(model)
    model, device = adapted.model, adapted.device
    windows = shard(windows)  # this process's share in a data-parallel run; MLPHooks.scores() sums the shares
    record = teacher_hidden is not None and not teacher_hidden  # nothing kept yet: this pass keeps it
    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc=description, disable=not progress or not is_main())
    with frozen_eval(model), leaf_embeddings(model), MLPHooks(adapted, form, mask) as hooks, gradients_only():
        for index, batch in enumerate(batches(windows, batch_size)):
            batch = batch.to(device)
            kept = teacher_hidden[index] if teacher_hidden and not record else None
            # what runs the original model here keeps its output: the teacher forward, else an unmasked pass
            keep = teacher_hidden.append if record and (needs_teacher or mask is None) else None
            if adapted.streamed:
                _streamed_backward(adapted, batch, objective, hooks, needs_teacher, kept, keep)
            else:
                teacher_logits = None
                if needs_teacher:
                    hooks.active = False
                    with torch.no_grad():
                        teacher_logits = _teacher_logits(adapted, batch, kept, keep)
                    hooks.active = True
                    keep = None
                with _last_layer_output(adapted, keep):
                    logits = model(input_ids=batch, use_cache=False).logits
                # under a device map the head may sit on another device than the embeddings
                loss = objective(logits, batch.to(logits.device), teacher_logits).sum()
                del logits, teacher_logits
                loss.backward()
            bar.update(batch.numel())
        bar.close()
        return check_finite(hooks.scores())


def _teacher_logits(adapted: AdaptedModel, batch: torch.Tensor, kept: torch.Tensor | None,
                    keep: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """The original model's logits for `batch` (hooks off, no_grad): from its kept last-layer output when there is
    one, else by a whole forward, keeping that output when asked (`keep`)."""
    if kept is not None:
        return adapted.head_logits(batch, kept.to(adapted.layer_device(adapted.num_layers - 1)))
    with _last_layer_output(adapted, keep):
        return adapted.model(input_ids=batch, use_cache=False).logits


@contextmanager
def _last_layer_output(adapted: AdaptedModel, keep: Callable[[torch.Tensor], None] | None) -> Iterator[None]:
    """Hand the last decoder layer's output of the forward inside the block to `keep` (host memory, detached)."""
    if keep is None:
        yield
        return

    def hook(module, args, output):
        keep((output[0] if isinstance(output, tuple) else output).detach().to("cpu"))

    with registered([adapted.layers[-1].register_forward_hook(hook)]):
        yield


def _streamed_backward(adapted: AdaptedModel, batch: torch.Tensor, objective: Objective, hooks: MLPHooks,
                       needs_teacher: bool, kept: torch.Tensor | None = None,
                       keep: Callable[[torch.Tensor], None] | None = None) -> None:
    """One batch's loss and backward pass, one decoder layer at a time (--offload): a forward without gradients
    keeps each layer's input, the loss's gradient reaches the last layer's output through the model's own head,
    then from the last layer down each layer runs again from its kept input with gradients on and passes the
    gradient of its input to the layer below. The recomputed forward is the same arithmetic on the same input,
    so the hooks see the activations and gradients of a whole-model backward; only the order in which autograd
    adds a few gradient terms may differ (float rounding, tested to 1e-5). `kept` / `keep`: the original model's
    last-layer output, as in taylor_scores."""
    (first,), calls = adapted.layer_inputs(batch, len(batch), adapted.device)
    call = calls[tuple(first.shape)]
    teacher_logits = None
    with torch.no_grad():
        if needs_teacher:
            hooks.active = False
            if kept is None:
                kept = adapted.run_layers(first, call, keep=False)[0]
                if keep is not None:
                    keep(kept.to("cpu"))
                    keep = None
            teacher_logits = adapted.head_logits(batch, kept.to(adapted.device))
            hooks.active = True
        inputs = adapted.run_layers(first, call)  # the input of every layer, then the last layer's output
    if keep is not None:
        keep(inputs[-1].detach().to("cpu"))
    last = inputs.pop().requires_grad_(True)
    loss = objective(adapted.head_logits(batch, last), batch, teacher_logits).sum()
    del teacher_logits
    loss.backward()
    grad = last.grad
    for index in reversed(range(adapted.num_layers)):
        hidden = inputs.pop().requires_grad_(True)
        with adapted.on_device(index):
            adapted.run_layer(index, hidden, call[index]).backward(grad)
        grad = hidden.grad


# ------------------------------------------------------------------------ activation statistics (forward only)
STATISTICS = ("sum", "sum_abs", "sum_sq")


class ActivationStats:
    """Per-neuron sums of a, |a| and a^2 over calibration tokens (fp64: variances of millions of tokens). Only
    the sums asked for are kept (the others stay None): on a small model each costs a visible share of the
    forward pass."""

    def __init__(self, width: int, device: torch.device, statistics: tuple[str, ...] = STATISTICS) -> None:
        zeros = lambda name: torch.zeros(width, dtype=torch.float64, device=device) if name in statistics else None  # noqa: E731
        self.sum, self.sum_abs, self.sum_sq, self.count = zeros("sum"), zeros("sum_abs"), zeros("sum_sq"), 0

    def reduce(self) -> None:
        """Sum over the processes of a data-parallel run."""
        sum_(self.sum, self.sum_abs, self.sum_sq)
        self.count = sum_number(self.count, next(t for t in (self.sum, self.sum_abs, self.sum_sq) if t is not None).device)

    def add(self, a: torch.Tensor) -> None:
        a = a.detach().reshape(-1, a.shape[-1]).double()
        if self.sum is not None:
            self.sum += a.sum(dim=0)
        if self.sum_abs is not None:
            self.sum_abs += a.abs().sum(dim=0)
        if self.sum_sq is not None:
            self.sum_sq += a.square().sum(dim=0)
        self.count += a.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def variance(self) -> torch.Tensor:  # population variance over all (n, t), as FLAP's fluctuation metric
        return (self.sum_sq / self.count - self.mean.square()).clamp_min(0)


@torch.no_grad()
def activation_statistics(
    model: nn.Module | AdaptedModel, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
    statistics: tuple[str, ...] = STATISTICS,
) -> dict[int, ActivationStats]:
    """One forward pass over the calibration windows, hooks on every down_proj input."""
    adapted = adapt(model)
    model, device = adapted.model, adapted.device
    views = adapted.mlps()
    # Each layer's sums live where its activations appear: the layer's device, or the compute device when streamed.
    stats = {v.index: ActivationStats(v.width, device if adapted.streamed else v.down.weight.device, statistics) for v in views}
    hooks = [v.down.register_forward_pre_hook(lambda m, args, i=v.index: stats[i].add(args[0])) for v in views]
    windows = shard(windows)  # this process's share in a data-parallel run, summed below
    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc="activations", disable=not progress or not is_main())
    with frozen_eval(model), registered(hooks):
        for batch in batches(windows, batch_size):
            if adapted.streamed:  # one decoder layer at a time; the head is not needed
                (first,), calls = adapted.layer_inputs(batch, len(batch), device)
                adapted.run_layers(first, calls[tuple(first.shape)], keep=False)
            else:
                model(input_ids=batch.to(device), use_cache=False)
            bar.update(batch.numel())
    bar.close()
    for stat in stats.values():
        stat.reduce()
    return stats


def standardize(score: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over the layer's finite entries: FLAP's per-layer standardisation."""
    finite = score[torch.isfinite(score)]
    return (score - finite.mean()) / finite.std().clamp_min(1e-12)


# ------------------------------------------------------------------------------------ whole decoder layers
LAYER_SCORES = ("taylor", "influence")


class LayerScores(_Hooked):
    """Importance of each whole decoder layer, read from the passes of the method that runs inside the block
    (docs/methods.md, "Whole layers"); the layer's output is h_out = h_in + delta, delta its residual contribution.

    - taylor (gradient methods): the Taylor term of a gate g on delta, per token (the activation form's
      granularity: a neuron's activation is the gate of its down_proj column): s_l = sum_n sum_t |<delta_nt,
      dL_n/dh_out_nt>|, summed over every Taylor pass the method makes (sdmprune: stage 1 and stage 2). Teacher
      and other passes without gradients add nothing.
    - influence (forward methods): ShortGPT's Block Influence, the mean over tokens of 1 - cos(h_in, h_out).

    A low score marks a layer to drop. The hooks sit on the decoder layers themselves, so whole-model, streamed
    (--offload) and device-map passes read the same values; data-parallel sums are reduced in `scores()`."""

    def __init__(self, model: nn.Module | AdaptedModel, kind: str) -> None:
        if kind not in LAYER_SCORES:
            raise ConfigError(f"unknown layer score {kind!r}: choose one of {', '.join(LAYER_SCORES)}")
        self.adapted, self.kind = adapt(model), kind
        layers = self.adapted.num_layers
        self.sums = torch.zeros(layers, dtype=torch.float64)
        self.tokens = torch.zeros(layers, dtype=torch.float64)
        self._handles: list = []

    def __enter__(self) -> LayerScores:
        for index, layer in enumerate(self.adapted.layers):
            self._handles.append(layer.register_forward_hook(self._hook(index), with_kwargs=True))
        return self

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            if getattr(module.forward, "is_stub", False):  # a pass-through of the recording or head passes
                return
            h_in = _first_arg(args, {"hidden_states": kwargs["hidden_states"]} if "hidden_states" in kwargs else kwargs)
            h_out = output[0] if isinstance(output, tuple) else output
            if self.kind == "influence":
                with torch.no_grad():
                    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                    self.sums[index] += float((1 - cos).double().sum())
                    self.tokens[index] += cos.numel()
            elif h_out.requires_grad:
                # both are kept by autograd anyway (each is a norm's input); holding them adds no copy
                h_in_held, h_out_held = h_in.detach(), h_out.detach()

                def on_grad(g: torch.Tensor) -> None:
                    delta = h_out_held.float() - h_in_held.to(h_out_held.device).float()
                    self.sums[index] += float((delta * g.float()).sum(dim=-1).abs().double().sum())

                h_out.register_hook(on_grad)

        return hook

    def scores(self) -> torch.Tensor:
        """[layers] fp32: the Taylor sums, or the mean Block Influence; summed over a data-parallel run's processes."""
        sums, tokens = self.sums.clone(), self.tokens.clone()
        sum_(sums, tokens)
        score = sums if self.kind == "taylor" else sums / tokens.clamp_min(1)
        if not torch.isfinite(score).all():
            raise ScoringError("non-finite layer scores: the model overflowed; run in float32 (--dtype float32)")
        return score.float()


class HeadScores(_Hooked):
    """Importance of each query head of every layer, from the passes of the method that runs inside the block
    (docs/methods.md, "Attention heads"), read at o_proj's input a, where head h owns channels [h hd, (h+1) hd):

    - taylor (gradient methods): the activation form summed over the head's channels,
      s_h = sum_{c in h} sum_n sum_t |a_ntc dL_n/da_ntc|, over every Taylor pass of the method.
    - norm (forward methods): Minitron's head importance, the mean over tokens of the head output's L2 norm.

    A KV group's score is the sum of its query heads' (`group_scores`)."""

    def __init__(self, model: nn.Module | AdaptedModel, kind: str) -> None:
        if kind not in ("taylor", "norm"):
            raise ConfigError(f"unknown head score {kind!r}: choose taylor or norm")
        self.adapted, self.kind = adapt(model), kind
        self.views = [self.adapted.attention(i) for i in range(self.adapted.num_layers)]
        self.sums = {v.index: torch.zeros(v.query_heads, dtype=torch.float64) for v in self.views}
        self.tokens = dict.fromkeys(self.sums, 0)
        self._handles: list = []

    def __enter__(self) -> HeadScores:
        for view in self.views:
            self._handles.append(view.o.register_forward_pre_hook(self._hook(view)))
        return self

    def _hook(self, view: AttentionView):
        heads, hd = view.query_heads, view.head_dim

        def hook(module, args):
            a = args[0]
            if self.kind == "norm":
                with torch.no_grad():
                    norms = a.detach().float().reshape(*a.shape[:-1], heads, hd).norm(dim=-1)
                    self.sums[view.index] += norms.reshape(-1, heads).double().sum(dim=0).cpu()
                    self.tokens[view.index] += norms.numel() // heads
            elif a.requires_grad:
                held = a.detach()

                def on_grad(g: torch.Tensor) -> None:
                    per_channel = (held.float() * g.float()).abs().reshape(-1, heads, hd).sum(dim=(0, 2))
                    self.sums[view.index] += per_channel.double().cpu()

                a.register_hook(on_grad)

        return hook

    def scores(self) -> dict[int, torch.Tensor]:
        """{layer: [query heads]} fp32, summed over a data-parallel run's processes."""
        out = {}
        for index, sums in self.sums.items():
            sums = sums.clone()
            tokens = torch.tensor([float(self.tokens[index])], dtype=torch.float64)
            sum_(sums, tokens)
            score = sums if self.kind == "taylor" else sums / tokens.clamp_min(1)
            if not torch.isfinite(score).all():
                raise ScoringError(f"non-finite head scores in layer {index}: the model overflowed; run in float32")
            out[index] = score.float()
        return out


def group_scores(head_scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A KV group's score: the sum of its query heads' (heads h of group j: h // group_size == j)."""
    return head_scores.reshape(kv_heads, -1).sum(dim=1)

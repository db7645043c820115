"""`--allocation search`: each layer's width chosen to keep the pruned model's predictions closest to the dense
model's, under the exact parameter budget (docs/methods.md, "Allocation search").

The method's scores decide *which* neurons a layer keeps at any width (its top w_l); the search decides the
widths w = (w_l). The fitness of a width vector is

    F(w) = mean over the search tokens of KL(p_dense || p_w)      (nats per token)

where p_w is the model whose layer l keeps its top-w_l neurons and, when the run reconstructs, whose pruned
down_proj are refit as `--reconstruct parallel` refits them (ridge least squares on the dense model's own
activations, reconstruction.refit_coefficients): one Gram per layer is made once from the reconstruction
windows, so a candidate costs one small solve per layer width it has not seen, and no extra data pass. The run's
own reconstruction (sequential by default) then refits the chosen widths as usual.

Every kept neuron costs the same parameters in every prunable layer, so moving `step` neurons from one layer to
another keeps the budget exact. The search is EvoPress's (1 + lambda) evolution with level-switch mutations: it
starts from the best of three allocations (uniform; the first and last layers spared, the sweep's best heuristic;
one global ranking of standardised scores), then for each generation makes `offspring` children of the parent by
one to three random moves and keeps the best child when it beats the parent. Selection is EvoPress's multi-step
one: the children are screened on the first quarter of the search windows, and the best SURVIVORS alone are
evaluated on all of them. A child recomputes only the layers from the first one it changes (the parent's layer
inputs are kept) and the head. The search is seeded: the same seed, windows and scores give the same widths.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import AdaptedModel
from .allocation import AllocationConfig, global_widths, top_k
from .distributed import is_main, shard, sum_number
from .reconstruction import Gram, dense_and_target, refit_coefficients
from .scoring import Scores
from .utils import batches, frozen_eval, registered

Widths = tuple[int, ...]  # one width per prunable layer, in the order of `SearchSpace.layers`
# EvoPress's multi-step selection: every child is screened on the first quarter of the search windows, and only
# the best SURVIVORS are evaluated on the rest and compete with the parent
SURVIVORS = 2


@dataclass
class SearchSpace:
    """The widths a search may choose: per prunable layer, a multiple of `round_to` in [lower, upper[l]], moved
    `step` neurons at a time, summing to `budget` (the uniform plan's total, so the parameter count is exact)."""

    layers: list[int]
    budget: int
    lower: int
    upper: list[int]
    round_to: int
    step: int

    def feasible(self, widths: Widths) -> bool:
        return (sum(widths) == self.budget
                and all(self.lower <= w <= u and (w % self.round_to == 0 or w == u) for w, u in zip(widths, self.upper)))

    def repair(self, target: list[float]) -> Widths | None:
        """The feasible widths nearest `target`: clamped, rounded down to the grid, and the shortfall (or excess)
        handed out `round_to` neurons at a time to the layers furthest below (above) their target. None when the
        bounds cannot hold the budget."""
        if not self.lower * len(self.layers) <= self.budget <= sum(self.upper):
            return None
        step = self.round_to
        widths = [min(u, max(self.lower, int(t // step) * step)) for t, u in zip(target, self.upper)]
        while sum(widths) != self.budget:
            short = sum(widths) < self.budget
            room = [i for i, (w, u) in enumerate(zip(widths, self.upper)) if (w + step <= u if short else w - step >= self.lower)]
            if not room:
                return None
            pick = max(room, key=lambda i: ((target[i] - widths[i]) if short else (widths[i] - target[i]), -i))
            widths[pick] += step if short else -step
        return tuple(widths) if self.feasible(tuple(widths)) else None

    def mutate(self, widths: Widths, rng: random.Random) -> Widths:
        """One to three level switches: `step` neurons leave one layer and join another."""
        child = list(widths)
        for _ in range(rng.randint(1, 3)):
            givers = [i for i, w in enumerate(child) if w - self.step >= self.lower]
            takers = [i for i, (w, u) in enumerate(zip(child, self.upper)) if w + self.step <= u]
            if not givers or not takers:
                break
            give = rng.choice(givers)
            take = rng.choice([i for i in takers if i != give] or [give])
            child[give] -= self.step
            child[take] += self.step
        return tuple(child)


def search_space(scores: Scores, layers: list[int], width_after: int, round_to: int, min_keep: int | None,
                 step: int | None) -> SearchSpace:
    """The space for `layers` (the prunable ones) keeping `width_after` on average. A layer can keep at most the
    neurons its scores rank (sdmprune's stage 2 and `--steps` rank only the survivors of the step before)."""
    upper = []
    for index in layers:
        finite, width = int(torch.isfinite(scores[index]).sum()), len(scores[index])
        upper.append(width if finite == width else finite // round_to * round_to)
    width = max(len(scores[i]) for i in layers)
    if step is None:  # about 3 % of the width, on the grid
        step = max(round_to, round(width / 32 / round_to) * round_to)
    return SearchSpace(list(layers), width_after * len(layers), max(min_keep or round_to, 1), upper, round_to, step)


def starts(space: SearchSpace, scores: Scores, config: AllocationConfig) -> dict[str, Widths]:
    """Where the search begins: the uniform plan, the ends spared (the first tenth and last fifteenth of the layers
    kept whole, the sweep's protect-first-3 / protect-last-2 on a 30-layer model) and one global ranking."""
    n, mean = len(space.layers), space.budget / len(space.layers)
    found = {"uniform": space.repair([mean] * n)}
    first, last = max(1, round(n / 10)), max(1, round(n / 15))
    if first + last < n:
        spared = set(range(first)) | set(range(n - last, n))
        rest = (space.budget - sum(space.upper[i] for i in spared)) / (n - len(spared))
        found["ends spared"] = space.repair([space.upper[i] if i in spared else rest for i in range(n)])
    ranked = global_widths({i: scores[i] for i in space.layers}, space.budget, config)
    found["global"] = space.repair([ranked[i] for i in space.layers])
    return {name: w for name, w in found.items() if w is not None}


class _Refits:
    """Per layer the dense model's down_proj-input Gram (from the refit windows, one layer-by-layer pass) and
    the refit's target made from it, and the parallel-mode ridge refit of any width, kept for the widths in use."""

    def __init__(self, adapted: AdaptedModel, windows: torch.Tensor, layers: list[int], lam: float, batch_size: int) -> None:
        self.adapted, self.lam, self.cache = adapted, lam, {}
        self.grams: dict[int, Gram] = {}
        self.targets: dict[int, tuple[torch.Tensor, float]] = {}  # per layer: the same for every width
        views = {v.index: v for v in adapted.mlps()}
        hidden, calls = adapted.layer_inputs(shard(windows), batch_size, torch.device("cpu"))
        with torch.no_grad(), frozen_eval(adapted.model):
            for index in range(max(layers) + 1):
                with adapted.on_device(index):
                    hooks = []
                    if index in layers:
                        # accumulated where the layer runs, then kept in host memory: every layer's Gram stays
                        # for the whole search
                        gram = self.grams[index] = Gram(views[index].width, adapted.layer_device(index))
                        hooks = [views[index].down.register_forward_pre_hook(lambda m, args, g=gram: g.add(args[0]))]
                    with registered(hooks):
                        for b, h in enumerate(hidden):
                            hidden[b] = adapted.run_layer(index, h, calls[tuple(h.shape)][index]).cpu()
                    if index in layers:
                        self.grams[index].reduce()
                        self.grams[index].matrix = self.grams[index].matrix.cpu()
                        self.targets[index] = dense_and_target(views[index], self.grams[index])[1:]

    def weights(self, index: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (index, len(kept))
        if key not in self.cache:
            view = self.adapted.mlp(index)
            gram = self.grams[index]
            with warnings.catch_warnings():  # a ridge retry only changes one candidate's fitness
                warnings.simplefilter("ignore", RuntimeWarning)
                _, coef = refit_coefficients(view, gram, kept, self.lam, target=self.targets[index])
            down = view.down.weight
            bias = None if view.down.bias is None else coef[view.width].to(down.device, down.dtype)
            self.cache[key] = (coef[kept.to(coef.device)].T.to(down.device, down.dtype).contiguous(), bias)
        return self.cache[key]

    def keep_near(self, widths: dict[int, int], step: int) -> None:
        """Keep the refits of `widths` and of the widths one move away, the ones the next children ask for."""
        self.cache = {k: v for k, v in self.cache.items() if abs(widths[k[0]] - k[1]) <= step}


@contextmanager
def _forward_replaced(module: torch.nn.Module, forward) -> Iterator[None]:
    """`module` computing `forward` instead of its own product until the block ends (a forward hook would compute the
    dense product and drop it: about a quarter of a layer's products). Set on the instance, as accelerate's hooks set theirs,
    and whatever instance forward was there before is put back."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


class _Fitness:
    """F(w) on the search windows, with the dense model's next-token distributions and each candidate's layer
    inputs kept so a child reruns only the layers from its first change. The first `screen` windows are batched
    apart from the rest, so a child can be screened on them alone and completed on the others."""

    def __init__(self, adapted: AdaptedModel, windows: torch.Tensor, scores: Scores, batch_size: int,
                 refits: _Refits | None, screen: int) -> None:
        self.adapted, self.scores, self.refits = adapted, scores, refits
        screened, rest = shard(windows[:screen]), shard(windows[screen:])
        self.batches = list(batches(screened, batch_size))
        self.screen_batches = len(self.batches)
        self.batches += list(batches(rest, batch_size))
        self.windows = torch.cat([screened, rest])
        hidden, self.calls = adapted.layer_inputs(screened, batch_size, torch.device("cpu"))
        if len(rest):  # batched apart, as self.batches are
            more, calls = adapted.layer_inputs(rest, batch_size, torch.device("cpu"))
            hidden, self.calls = hidden + more, {**self.calls, **calls}
        self.dense_inputs = self._run(hidden, 0, {})
        self.teacher = []  # per batch: (p, sum p log p) of the dense model, fp32
        with torch.no_grad(), frozen_eval(adapted.model):
            for ids, last in zip(self.batches, self.dense_inputs[-1]):
                p = adapted.head_logits(ids, last).float().softmax(-1).cpu()
                self.teacher.append((p, torch.xlogy(p, p).sum(-1)))
        self.screen_tokens = sum_number(screened.numel())
        self.tokens = sum_number(self.windows.numel())
        self.evaluations = 0  # candidates evaluated on every search window
        self.screenings = 0  # children evaluated on the screening windows only

    def kept(self, index: int, width: int) -> torch.Tensor:
        """Layer `index`'s top-`width` neurons by score, in index order."""
        return top_k(self.scores[index], width)

    def _run(self, hidden: list[torch.Tensor], start: int, widths: dict[int, int]) -> list[list[torch.Tensor]]:
        """Inputs of layers start..L-1 and the last layer's output, per batch, with layer l cut to widths[l]."""
        adapted = self.adapted
        states = [hidden]
        with torch.no_grad(), frozen_eval(adapted.model):
            for index in range(start, adapted.num_layers):
                with adapted.on_device(index), self._cut(index, widths.get(index)):
                    states.append([adapted.run_layer(index, h, self.calls[tuple(h.shape)][index]).cpu() for h in states[-1]])
        return states

    def _cut(self, index: int, width: int | None):
        """Layer `index`'s down_proj reading only its kept neurons (refit when the run reconstructs)."""
        view = self.adapted.mlp(index)
        if width is None or width == view.width:
            return nullcontext()
        kept = self.kept(index, width)
        if self.refits is not None:
            weight, bias = self.refits.weights(index, kept)
        else:
            weight, bias = view.down.weight[:, kept.to(view.down.weight.device)], view.down.bias
        columns = kept.to(weight.device)
        return _forward_replaced(view.down, lambda a: F.linear(a.index_select(-1, columns), weight, bias))

    def kl_sum(self, widths: dict[int, int], parent: list[list[torch.Tensor]], start: int,
               part: range) -> tuple[float, list[list[torch.Tensor]]]:
        """(this process's sum of KL over the tokens of batches `part`, the layer inputs of those batches under
        `widths`), running layers from `start` on the parent's inputs there (the parent has every batch's)."""
        states = [[layer[b] for b in part] for layer in parent[:start]]
        states += self._run([parent[start][b] for b in part], start, widths)
        total = 0.0
        with torch.no_grad(), frozen_eval(self.adapted.model):
            for b, last in zip(part, states[-1]):
                p, negentropy = self.teacher[b]
                z = self.adapted.head_logits(self.batches[b], last).float().cpu()
                # KL(p || softmax z) = sum p log p - sum p z + logsumexp z   (sum p = 1)
                total += float((negentropy - (p * z).sum(-1) + z.logsumexp(-1)).double().sum())
        return total, states

    def __call__(self, widths: dict[int, int], parent: list[list[torch.Tensor]], start: int) -> tuple[float, list[list[torch.Tensor]]]:
        """(F(widths), the layer inputs under `widths`) on every search window."""
        total, states = self.kl_sum(widths, parent, start, range(len(self.batches)))
        self.evaluations += 1
        return sum_number(total) / self.tokens, states

    def screen(self, widths: dict[int, int], parent: list[list[torch.Tensor]], start: int) -> _Screened:
        """F(widths) on the screening windows alone, kept so `complete` can finish it on the others."""
        total, states = self.kl_sum(widths, parent, start, range(self.screen_batches))
        self.screenings += 1
        return _Screened(sum_number(total) / self.screen_tokens, total, states, start)

    def complete(self, widths: dict[int, int], screened: _Screened, parent: list[list[torch.Tensor]]) -> tuple[float, list[list[torch.Tensor]]]:
        """(F(widths), its layer inputs) on every search window, from a screening and the parent's other batches."""
        rest, states = self.kl_sum(widths, parent, screened.start, range(self.screen_batches, len(self.batches)))
        self.evaluations += 1
        return (sum_number(screened.total + rest) / self.tokens,
                [a + b for a, b in zip(screened.states, states)])


@dataclass
class _Screened:
    fitness: float  # F on the screening windows
    total: float  # this process's KL sum there
    states: list[list[torch.Tensor]]
    start: int


@dataclass
class SearchResult:
    widths: dict[int, int]
    kept: dict[int, torch.Tensor]
    record: dict = field(default_factory=dict)


def search_widths(
    adapted: AdaptedModel,
    scores: Scores,
    space: SearchSpace,
    windows: torch.Tensor,
    config: AllocationConfig,
    *,
    refit_windows: torch.Tensor | None = None,
    lam: float = 1e-3,
    batch_size: int = 4,
    progress: bool = True,
) -> SearchResult:
    """Search the widths of `space` minimising F on `windows` [S, L] (refitting in the loop on `refit_windows`
    when given) for `config.search_generations` generations of `config.search_offspring` children from seed
    `config.search_seed`; returns the widths, the kept neurons per searched layer and the record for pruning.json."""
    generations, offspring, seed = config.search_generations, config.search_offspring, config.search_seed
    start_time = time.perf_counter()
    refits = _Refits(adapted, refit_windows, space.layers, lam, batch_size) if refit_windows is not None else None
    grams_s = time.perf_counter() - start_time
    screen = max(1, len(windows) // 4)
    fitness = _Fitness(adapted, windows, scores, batch_size, refits, screen)
    named = starts(space, scores, config)
    bar = tqdm(total=len(named) + generations * offspring, unit="eval", desc="allocation search",
               disable=not progress or not is_main())

    def as_dict(widths: Widths) -> dict[int, int]:
        return dict(zip(space.layers, widths))

    tried = []
    best = None
    for name, widths in named.items():
        value, states = fitness(as_dict(widths), fitness.dense_inputs, 0)
        bar.update()
        tried.append({"name": name, "fitness": value, "widths": list(widths)})
        if best is None or value < best[1]:
            best = (widths, value, states)
    parent, parent_value, parent_states = best
    bar.set_postfix(kl=f"{parent_value:.4f}")
    rng = random.Random(seed)
    seen = {w for w in named.values()}
    screening = fitness.screen_batches < len(fitness.batches) and offspring > SURVIVORS
    history = []
    for generation in range(1, generations + 1):
        children = []
        for _ in range(offspring):
            child = parent
            for _ in range(20):  # a fresh child; a tiny space may run out of them
                child = space.mutate(parent, rng)
                if child not in seen:
                    break
            bar.update()
            if child in seen:
                continue
            seen.add(child)
            first = min(space.layers[i] for i, (a, b) in enumerate(zip(child, parent)) if a != b)
            # held: the best SURVIVORS screenings, or the best child so far
            if screening:
                children.append((child, fitness.screen(as_dict(child), parent_states, first)))
                children = sorted(children, key=lambda c: c[1].fitness)[:SURVIVORS]
            else:
                children = sorted(children + [(child, *fitness(as_dict(child), parent_states, first))], key=lambda c: c[1])[:1]
        if screening:
            children = [(child, *fitness.complete(as_dict(child), screened, parent_states)) for child, screened in children]
        child_best = min(children, key=lambda c: c[1], default=None)
        accepted = child_best is not None and child_best[1] < parent_value
        if accepted:
            parent, parent_value, parent_states = child_best
            bar.set_postfix(kl=f"{parent_value:.4f}")
        history.append({"generation": generation, "best_child_fitness": None if child_best is None else child_best[1],
                        "accepted": accepted, "fitness": parent_value})  # fitness: the parent's after this generation
        if refits is not None:
            refits.keep_near(as_dict(parent), space.step)
    bar.close()
    widths = as_dict(parent)
    record = {
        "fitness": "mean KL(dense || pruned) per token, nats, on the first search windows",
        "refit_in_loop": None if refits is None else f"parallel ridge refit (dense activations of {len(refit_windows)} windows)",
        "search_tokens": fitness.tokens,
        "step": space.step,
        "seed": seed,
        "generations": generations,
        "offspring": offspring,
        "screening": ({"windows": screen, "tokens": fitness.screen_tokens, "survivors": SURVIVORS, "screenings": fitness.screenings}
                      if screening else None),
        "evaluations": fitness.evaluations,
        "starts": tried,
        "start": min(tried, key=lambda t: t["fitness"])["name"],
        "history": history,
        "widths": [widths[i] for i in space.layers],
        "layers": space.layers,
        "final_fitness": parent_value,
        "seconds": {"grams": grams_s, "total": time.perf_counter() - start_time},
    }
    return SearchResult(widths, {i: fitness.kept(i, w) for i, w in widths.items()}, record)

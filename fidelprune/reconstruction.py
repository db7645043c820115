"""Reconstruction after pruning: refit each pruned MLP's down_proj by least squares (docs/reconstruction.md).

For one MLP with activations A (tokens x I, the input of down_proj), output Y = A W_down^T + b and keep set
K, the refit is the ridge least-squares solution

    [W'_K^T; b'] = argmin ||[A_K, 1] [W'^T; b'] - Y||^2 + lam * mean(diag(A_K^T A_K)) * ||W'||^2

which needs only the Gram matrix G = [A, 1]^T [A, 1] ((I+1) x (I+1)), because [A_K, 1]^T Y = G[K+1, :] [W^T; b]
with the dense weights. The ones column gives an exact, unpenalised refit of the down_proj bias when the model
has one (LLaMA with mlp_bias); without a bias it is unused, so no bias is ever added and the checkpoint stays a
vanilla one of the same architecture. (FLAP adds a down_proj bias anyway: there the refit intercept replaces
FLAP's mean compensation, see `fit_bias`.) Shapes do not change: the refit weights are written into the kept
columns of the dense down_proj (removed columns set to zero, which is function-identical to removing them), and
the usual surgery then slices the MLPs.

Layers are processed one at a time from cached decoder-layer inputs, so only one layer's Gram exists at once:

- parallel:   layer inputs come from the dense model (every Gram is the dense model's);
- sequential: layer inputs come from the already pruned-and-refit earlier layers, so each layer is fitted to the
              inputs it will really see and errors do not add up. The target of layer l is its own dense output on
              those inputs (Y = A W_down^T + b with the dense weights), so the Gram alone still suffices.

Which neurons a layer keeps is the method's choice (`select="scores"`), or, with `select="obs"`, the refit's own:
the layer keeps as many neurons as the method gave it, chosen by greedy structured optimal-brain-surgeon removal on
the same Gram (ZipLM, SlimGPT), so selection and refit minimise the same error (`obs_keep`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import AdaptedModel, MLPView, OutputProjection, adapt
from .calibration import DEFAULT_SAMPLING, CalibrationConfig, record_dict, sample_windows
from .distributed import is_main, shard, sum_, sum_number
from .errors import ConfigError, FidelpruneError, check_int, check_seed
from .utils import batches, frozen_eval, registered

MODES = ("none", "parallel", "sequential")
TARGETS = ("layer", "dense")  # sequential mode's target: the layer's own dense output, or the dense model's
SELECTIONS = ("scores", "obs")  # who picks a layer's kept neurons: the method's scores, or the refit's error (OBS)
# obs: a layer's removals are made in at most this many rounds (SlimGPT's batched greedy): one neuron per round
# while a layer loses at most this many, so every layer is cheap whatever its width
OBS_ROUNDS = 256
DEFAULT_MODE = "sequential"  # see README "Reconstruction" and docs/reconstruction.md for the measurement
DEFAULT_LAMBDA = 1e-3
# A Cholesky failure retries with lam x 10 until this; beyond it the layer's statistics are unusable.
MAX_LAMBDA = 10.0


class ReconstructionError(FidelpruneError, RuntimeError):
    """The least-squares refit could not be computed reliably (non-finite activations, singular system)."""


def check_options(mode: str, lam: float, target: str = "layer", select: str = "scores") -> None:
    """One-line errors for bad input, before any compute."""
    if mode not in MODES:
        raise ConfigError(f"unknown reconstruction mode {mode!r}: choose one of {', '.join(MODES)}")
    if target not in TARGETS:
        raise ConfigError(f"unknown reconstruction target {target!r}: choose one of {', '.join(TARGETS)}")
    if select not in SELECTIONS:
        raise ConfigError(f"unknown reconstruction selection {select!r}: choose one of {', '.join(SELECTIONS)}")
    if select == "obs" and mode == "none":
        raise ConfigError("--reconstruct-select obs chooses neurons by the refit's error: choose --reconstruct parallel or sequential")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ConfigError(f"reconstruction lambda must be a positive number (ridge relative to the mean Gram diagonal), got {lam!r}")


@dataclass
class ReconstructionConfig:
    """How the pruned MLPs are refit (the `reconstruction` section of a PruneConfig). `calibration`, `samples`
    and `seed` draw separate windows for the refit; when all three are None it reuses the scoring windows, and
    giving only `samples` or `seed` draws them from the scoring corpus."""

    mode: str = "none"
    lam: float = DEFAULT_LAMBDA
    target: str = "layer"
    calibration: str | None = None  # "c4" or a file
    samples: int | None = None  # default: the scoring windows' count
    seed: int | None = None  # default: the scoring seed + 1
    select: str = "scores"  # "obs": each layer keeps the neurons its refit reproduces the target with best

    def __post_init__(self) -> None:
        check_options(self.mode, self.lam, self.target, self.select)
        if self.samples is not None:
            check_int("--reconstruct-samples", self.samples, 1)
        if self.seed is not None:
            check_seed("--reconstruct-seed", self.seed)
        if self.mode == "none" and self.separate:
            raise ConfigError("separate reconstruction windows were given but reconstruct is 'none': choose parallel or sequential")

    @property
    def separate(self) -> bool:
        """Whether the refit draws windows of its own rather than reusing the scoring ones."""
        return self.calibration is not None or bool(self.samples) or self.seed is not None

    def own_draw(self, calibration: CalibrationConfig) -> tuple[str, int, int]:
        """(source, samples, seed) that the refit's own windows are drawn with: the scoring corpus, the scoring
        windows' count and the scoring seed + 1, unless given."""
        return (self.calibration or calibration.source, self.samples or calibration.samples,
                calibration.seed + 1 if self.seed is None else self.seed)


@dataclass
class LayerFit:
    """One layer's refit. Errors are ||Y - Y_hat||_F / ||Y||_F over the reconstruction tokens."""

    layer: int
    kept: int
    removed: int
    tokens: int
    lambda_used: float
    error_before: float  # plain removal (kept columns unchanged, removed ones dropped)
    error_after: float  # after the refit
    refit: bool = True  # False when the layer was skipped (see `note`)
    note: str | None = None


@dataclass
class ReconstructionResult:
    mode: str
    lam: float
    layers: list[LayerFit] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    bias_refit: bool = False
    target: str = "layer"
    # fit_bias on a model without down_proj biases: the refit intercept per layer, for the surgery to add as a new
    # bias (zero for layers that were not refit)
    bias_shift: dict[int, torch.Tensor] | None = None
    select: str = "scores"
    # select="obs": the neurons each refit layer keeps instead of the method's (same count, sorted)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: list[LayerFit] = field(default_factory=list)  # the o_proj refits, where heads were pruned

    def to_dict(self) -> dict:
        before = [f.error_before for f in self.layers]
        after = [f.error_after for f in self.layers]
        return {
            "mode": self.mode,
            "lambda": self.lam,
            "target": {"parallel": "dense layer output on the dense model's input",
                       "sequential": "dense layer output on the layer's actual (pruned-upstream) input"}[self.mode]
            if self.target == "layer" else "dense model's MLP output on the dense model's input",
            "numerics": "Gram [A, 1]^T [A, 1] from fp32 per-batch products accumulated in fp64; ridge Cholesky solve in fp64",
            "bias_refit": self.bias_refit,
            "select": {"scores": "the method's scores", "obs": f"greedy structured OBS on each layer's Gram, at most {OBS_ROUNDS} rounds"}[self.select],
            "tokens": self.tokens,
            "seconds": self.seconds,
            "mean_error_before": sum(before) / len(before) if before else None,
            "mean_error_after": sum(after) / len(after) if after else None,
            "layers": [asdict(f) for f in self.layers],
            **({"attention": [asdict(f) for f in self.attention]} if self.attention else {}),
        }


class Gram:
    """Running [A, 1]^T [A, 1] of one down_proj's input. Per-batch products in fp32 (fast on any device, and A
    itself is at most fp32), summed in fp64 so thousands of batches do not lose precision."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.matrix = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)
        self.tokens = 0
        # target="dense": [A, 1]^T Y_dense and ||Y_dense||^2, when the target is not the layer's own output
        self.cross: torch.Tensor | None = None
        self.target_norm = 0.0

    def add(self, a: torch.Tensor, y: torch.Tensor | None = None) -> None:
        a = a.detach().reshape(-1, a.shape[-1]).float()
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], dim=1)
        self.matrix += (a.T @ a).double()
        self.tokens += len(a)
        if y is not None:
            y = y.detach().reshape(len(a), -1).float()
            cross = (a.T @ y).double()
            self.cross = cross if self.cross is None else self.cross + cross
            self.target_norm += float(y.double().square().sum())

    def reduce(self) -> None:
        """Sum over the processes of a data-parallel run (distributed.py), before the solve."""
        sum_(self.matrix, self.cross)
        self.tokens = sum_number(self.tokens, self.matrix.device)
        self.target_norm = sum_number(self.target_norm, self.matrix.device)


def _quadratic(gram: torch.Tensor, coef: torch.Tensor) -> float:
    """||[A, 1] coef||_F^2 = tr(coef^T G coef), without the activations."""
    return max(float((coef * (gram @ coef)).sum()), 0.0)


def dense_coefficients(view: MLPView, device: torch.device) -> torch.Tensor:
    """The dense coefficients on [A, 1]: (I+1) x d, fp64, rows 0..I-1 are W_down^T, row I the bias (zero when
    there is none)."""
    down, width = view.down, view.width
    dense = torch.zeros(width + 1, view.hidden_size, dtype=torch.float64, device=device)
    dense[:width] = down.weight.detach().T.to(device, torch.float64)
    if down.bias is not None:
        dense[width] = down.bias.detach().to(device, torch.float64)
    return dense


def dense_and_target(view: MLPView, gram: Gram) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The dense coefficients on [A, 1] (dense_coefficients), [A, 1]^T Y for the refit's target Y, and ||Y||^2."""
    g = gram.matrix
    dense = dense_coefficients(view, g.device)
    if gram.cross is None:  # the layer's own dense output: [A, 1]^T Y = G [W^T; b]
        return dense, g @ dense, _quadratic(g, dense)
    return dense, gram.cross, gram.target_norm  # another target (the dense model's output), accumulated alongside


def _ridged_solve(system: torch.Tensor, penalised: int, scale: float, lam: float, solve, index: int, what: str,
                  instead: str) -> tuple[torch.Tensor, float]:
    """`solve(factor)` for the Cholesky factor of `system` ridged in place by lam * scale on its first `penalised`
    diagonal entries, and the lambda used. A failed factorisation or a non-finite result retries with lambda x 10
    (with a warning) up to MAX_LAMBDA; beyond it the layer's statistics are unusable and the error names `instead`."""
    used = lam
    system.diagonal()[:penalised] += used * scale
    while True:
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            result = solve(factor)
            if torch.isfinite(result).all():
                return result, used
        del factor
        if used * 10 > MAX_LAMBDA:
            raise ReconstructionError(
                f"layer {index}: the {what} system is singular even with lambda {used:g}; "
                f"use {instead} or check the model's activations"
            )
        warnings.warn(f"{what} of layer {index}: Cholesky failed with lambda {used:g}, retrying with {used * 10:g}",
                      RuntimeWarning, stacklevel=3)
        system.diagonal()[:penalised] += 9 * used * scale
        used *= 10


def obs_keep(view: MLPView, gram: Gram, keep: int, lam: float, fit_bias: bool = False,
             rounds: int | None = None) -> torch.Tensor | None:
    """The `keep` neurons (sorted indices) whose ridge refit reproduces the layer's target best, by greedy
    structured optimal-brain-surgeon removal (ZipLM; SlimGPT's batched form): from the refit with every neuron,
    remove the neuron whose removal raises the squared error least, ||c_i||^2 / [H^-1]_ii (c_i its coefficients,
    H the ridged Gram), update the refit of the others and H^-1 by the matching rank-one downdate, and repeat.
    With more removals than `rounds` (default OBS_ROUNDS), each round removes the ceil(removals / rounds)
    cheapest neurons together (their joint downdate is exact; only their choice is batched). The intercept, when
    there is one, is never removed. None when there is nothing to choose by (no neuron active on the tokens, or
    non-finite statistics, which the refit then reports). Memory: H^-1 ((I+1)^2) and the coefficients
    ((I+1) x d), fp64, on the Gram's device."""
    width, g = view.width, gram.matrix
    n = width + 1 if view.down.bias is not None or fit_bias else width
    _, target, _ = dense_and_target(view, gram)
    scale = float(g.diagonal()[:width].mean())
    remove = width - keep
    if not math.isfinite(scale) or scale <= 0 or not torch.isfinite(target).all():
        return None
    inverse, _ = _ridged_solve(g[:n, :n].clone(), width, scale, lam, torch.cholesky_inverse, view.index,
                               "OBS selection", "--reconstruct-select scores")
    coef = inverse @ target[:n]
    alive = torch.ones(width, dtype=torch.bool, device=g.device)
    block = math.ceil(remove / (rounds or OBS_ROUNDS))
    while remove > 0:
        cost = coef[:width].square().sum(1) / inverse.diagonal()[:width]
        cost.masked_fill_(~alive, math.inf)
        chosen = cost.topk(min(block, remove), largest=False).indices
        columns = inverse[:, chosen]  # n x b
        # The joint downdate for removing `chosen`: x -= H^-1[:, B] (H^-1[B, B])^-1 x[B] for H^-1 and the coefficients.
        step = torch.linalg.solve(columns[chosen], torch.cat([columns.T, coef[chosen]], dim=1))
        inverse -= columns @ step[:, :n]
        coef -= columns @ step[:, n:]
        alive[chosen] = False
        coef[chosen] = 0  # exactly zero (the downdate leaves rounding)
        inverse[chosen, chosen] = 1.0  # their rows and columns are zero now; keeps the cost's division finite
        remove -= len(chosen)
    return alive.nonzero().squeeze(1)


def _refit(view: MLPView, gram: Gram, kept: torch.Tensor, lam: float, fit_bias: bool = False) -> tuple[LayerFit, torch.Tensor | None]:
    """Solve the ridge least squares for `view`'s kept down_proj columns (and bias) and write them in place:
    down_proj keeps its dense shape, removed columns become zero. With `fit_bias` and no down_proj bias, an
    intercept is fitted too and returned (the caller adds it as a new bias); otherwise None is returned."""
    fit, coef = refit_coefficients(view, gram, kept, lam, fit_bias)
    _write(view, coef)
    return fit, (coef[view.width].float().cpu() if fit_bias and view.down.bias is None else None)


def refit_coefficients(view: MLPView, gram: Gram, kept: torch.Tensor, lam: float, fit_bias: bool = False,
                       target: tuple[torch.Tensor, float] | None = None) -> tuple[LayerFit, torch.Tensor]:
    """The refit's coefficients on [A, 1] ((I+1) x d, fp64: rows 0..I-1 are the new W_down^T with removed rows
    zero, row I the bias) and its LayerFit, without touching the model (the allocation search reads them too).
    `target`: ([A, 1]^T Y, ||Y||^2) of `dense_and_target(view, gram)`, from a caller that refits one layer at many
    widths (the allocation search): two products with the Gram, the same for every width."""
    down = view.down
    width = view.width
    g = gram.matrix
    if not torch.isfinite(g).all():
        raise ReconstructionError(
            f"non-finite activations in layer {view.index} during reconstruction: the model overflowed; "
            f"run in float32 (--dtype float32)"
        )
    device = g.device
    kept = kept.to(device=device, dtype=torch.long).sort().values
    removed_mask = torch.ones(width, dtype=torch.bool, device=device)
    removed_mask[kept] = False
    intercept = down.bias is not None or fit_bias
    if target is None:
        dense, target, norm = dense_and_target(view, gram)
    else:
        dense, (target, norm) = dense_coefficients(view, device), target
    plain = dense.clone()
    plain[:width][removed_mask] = 0
    rows = torch.cat([kept, torch.tensor([width], device=device)]) if intercept else kept
    k = len(kept)

    def relative(coef: torch.Tensor) -> float:
        if norm <= 0:
            return 0.0
        if gram.cross is None:
            return math.sqrt(_quadratic(g, coef - dense) / norm)
        # ||Y - [A, 1] coef||^2 = ||Y||^2 - 2 <coef, [A, 1]^T Y> + coef^T G coef
        return math.sqrt(max(norm - 2 * float((coef * target).sum()) + _quadratic(g, coef), 0.0) / norm)

    scale = float(g.diagonal()[kept].mean()) if k else 0.0
    fit = LayerFit(view.index, k, width - k, gram.tokens, lam, relative(plain), relative(plain))
    if k == 0 or scale <= 0:  # nothing active to refit with: plain removal is the only answer
        fit.refit, fit.note = False, "kept neurons never activate on the reconstruction tokens; plain removal"
        return fit, plain

    # ridged in place: the peak is the Gram, this and its factor; the bias (last row, when present) is not penalised
    solution, used = _ridged_solve(g[rows[:, None], rows], k, scale, lam,
                                   lambda factor: torch.cholesky_solve(target[rows], factor), view.index,
                                   "reconstruction", "--reconstruct none")
    refit = torch.zeros_like(dense)
    refit[rows] = solution
    fit.lambda_used, error = used, relative(refit)
    if error > fit.error_before:
        # Only the ridge can make the fit worse than plain removal on its own tokens (the unpenalised least
        # squares never is): it happens in layers whose mean Gram diagonal is dominated by a few huge activations.
        fit.refit, fit.note = False, "the ridge refit was worse than plain removal on these tokens; plain removal kept"
        refit = plain
    else:
        fit.error_after = error
    return fit, refit


def _write(view: MLPView, coef: torch.Tensor) -> None:
    width = view.width
    with torch.no_grad():
        view.down.weight.copy_(coef[:width].T.to(view.down.weight.dtype))
        if view.down.bias is not None:
            view.down.bias.copy_(coef[width].to(view.down.bias.dtype))


def reconstruction_windows(
    source: str | Path | torch.Tensor | None,
    scoring_ids: torch.Tensor | None,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int,
    sampling: str = DEFAULT_SAMPLING,
) -> tuple[torch.Tensor, dict]:
    """The windows the refit uses and their record: by default (`source` None) the scoring windows themselves;
    else given token ids [N, L], or `samples` x `seq_len` windows drawn from a text source ("c4" or a file) with
    `seed` (pass a seed other than the scoring one to get windows disjoint in expectation from the same corpus)."""
    if source is None:
        if scoring_ids is None:
            raise ConfigError("reconstruction needs calibration windows: pass a tokenizer or calibration_ids")
        return scoring_ids, {"same_as_scoring": True, "samples": len(scoring_ids), "seq_len": scoring_ids.shape[1]}
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype != torch.long:
            raise ConfigError(f"reconstruction token ids must be a [N, L] long tensor, got {tuple(source.shape)} {source.dtype}")
        return source, {"same_as_scoring": False, "source": "given token ids", "samples": len(source), "seq_len": source.shape[1]}
    if tokenizer is None:
        raise ConfigError("drawing separate reconstruction windows needs a tokenizer (or pass token ids)")
    ids, record = sample_windows(tokenizer, source, samples, seq_len, seed, sampling, samples_flag="--reconstruct-samples")
    return ids, {"same_as_scoring": False, **record_dict(record)}


def reconstruct(
    model: nn.Module | AdaptedModel,
    kept: dict[int, torch.Tensor],
    windows: torch.Tensor,
    mode: str = DEFAULT_MODE,
    lam: float = DEFAULT_LAMBDA,
    *,
    target: str = "layer",
    select: str = "scores",
    fit_bias: bool = False,
    attention: dict[int, torch.Tensor] | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> ReconstructionResult:
    """Refit the down_proj (and bias) of every layer in `kept` that loses neurons, by ridge least squares on
    `windows` [N, L], in place on the *dense* model: kept columns get the refit, removed columns zero. Remove the
    neurons afterwards (surgery.remove_neurons) to get the smaller model; the function does not change.

    `target` (sequential mode): "layer" fits each layer to its own dense output on the inputs it now gets (the
    Gram alone suffices); "dense" fits it to the dense model's MLP output on the dense model's inputs, which
    also asks it to undo upstream error, at the cost of a second N x L x d cache and a third pass per layer.

    `select="obs"` lets each refit layer keep, instead of the neurons in `kept`, as many chosen by the refit's own
    error (`obs_keep`); they are in `result.kept`, and the caller removes those.

    `fit_bias` also fits an intercept where down_proj has no bias and returns it in `bias_shift` (for a caller
    that adds a bias anyway, i.e. FLAP); models with a down_proj bias always get it refit.

    `attention` ({layer: o_proj input channels kept}, sequential mode): the heads to prune. Each such layer first
    refits its o_proj on the kept channels to its own dense attention output (removed columns zero, the same
    function as the heads removed: surgery.remove_heads afterwards), then its MLP on what that attention passes.

    Memory beyond the model: one layer's Gram ((I+1)^2 fp64) on the model's device, and the N x L x d hidden
    states of the windows in the model's dtype on the CPU (one batch at a time on the device)."""
    check_options(mode, lam, target, select)
    dense_target = mode == "sequential" and target == "dense"
    result = ReconstructionResult(mode, lam, target=target if mode == "sequential" else "layer", select=select)
    adapted = adapt(model)
    views = {v.index: v for v in adapted.mlps()}
    # Layers that lose nothing (protected, or kept whole) are left exactly as they are: a ridge refit would
    # only shrink their weights.
    todo = {i: k for i, k in kept.items() if len(k) < views[i].width}
    heads = dict(attention or {})
    if heads and mode != "sequential":
        raise ConfigError("pruned heads are refit in sequential reconstruction only; use --reconstruct sequential")
    if mode == "none" or not (todo or heads):
        return result
    start = time.perf_counter()
    result.bias_refit = fit_bias or any(views[i].down.bias is not None for i in todo)
    if fit_bias:
        result.bias_shift = {i: torch.zeros(v.hidden_size) for i, v in views.items()}
    store = torch.device("cpu")  # the N x L x d cache lives off the accelerator; batches move over as they run
    last = max([*todo, *heads])  # layers after the last pruned one need no propagation
    passes = sum((2 if mode == "sequential" and i in todo and i < last else 1) + dense_target + (i in heads)
                 for i in range(last + 1))
    result.tokens = windows.numel()
    windows = shard(windows)  # this process's share in a data-parallel run; the Grams are summed before each solve
    bar = tqdm(total=windows.numel() * passes, unit="tok", unit_scale=True, desc=f"reconstruct ({mode})",
               disable=not progress or not is_main())
    hidden, calls = adapted.layer_inputs(windows, batch_size, store)
    with torch.no_grad(), frozen_eval(adapted.model):
        dense_hidden = [h.clone() for h in hidden] if dense_target else []

        def run(index: int, h: torch.Tensor) -> torch.Tensor:
            out = adapted.run_layer(index, h, calls[tuple(h.shape)][index])
            bar.update(h.shape[0] * h.shape[1])
            return out

        def propagate(index: int, hooks: list | None = None, cache: list[torch.Tensor] = hidden) -> None:
            with registered(hooks or []):
                for b, h in enumerate(cache):
                    cache[b] = run(index, h).to(store)

        def accumulate(module: nn.Module, args: tuple) -> None:
            gram.add(args[0])

        for index in range(last + 1):
            with adapted.on_device(index):  # streamed (--offload): this layer's turn on the device
                if index in heads:  # the attention first: the MLP's Gram below then sees the refit attention
                    o_proj = OutputProjection(index, adapted.attention(index).o)
                    gram = Gram(o_proj.width, adapted.layer_device(index))
                    with registered([o_proj.down.register_forward_pre_hook(accumulate)]):
                        for h in hidden:
                            run(index, h)
                    gram.reduce()
                    result.attention.append(_refit(o_proj, gram, heads[index], lam)[0])
                    gram = None
                if index not in todo:
                    propagate(index)
                    if dense_target:
                        propagate(index, cache=dense_hidden)
                    continue
                view = views[index]
                gram = Gram(view.width, adapted.layer_device(index))
                if dense_target:
                    for b, h in enumerate(hidden):
                        # The dense model's MLP output on its own inputs is the target for this batch's tokens.
                        y: list[torch.Tensor] = []
                        with registered([view.down.register_forward_hook(lambda m, args, out: y.append(out))]):
                            dense_hidden[b] = run(index, dense_hidden[b]).to(store)
                        with registered([view.down.register_forward_pre_hook(lambda m, args: gram.add(args[0], y[0]))]):
                            run(index, h)
                elif mode == "parallel" and index < last:
                    propagate(index, [view.down.register_forward_pre_hook(accumulate)])  # dense outputs feed the next layer
                else:
                    with registered([view.down.register_forward_pre_hook(accumulate)]):
                        for h in hidden:
                            run(index, h)
                gram.reduce()
                if select == "obs":
                    bar.set_postfix_str(f"layer {index}: choosing neurons (OBS)")  # no tokens move meanwhile
                    chosen = obs_keep(view, gram, len(todo[index]), lam, fit_bias)
                    if chosen is not None:
                        todo[index] = result.kept[index] = chosen.to(todo[index].device)
                fit, shift = _refit(view, gram, todo[index], lam, fit_bias)
                result.layers.append(fit)
                gram = None  # one layer's Gram at a time
                if shift is not None:
                    result.bias_shift[index] = shift
                if mode == "sequential" and index < last:
                    # The refit layer's outputs feed the next layer, with the fitted intercept the surgery will add.
                    add = [] if shift is None else [view.down.register_forward_hook(lambda m, args, out, s=shift: out + s.to(out.device, out.dtype))]
                    propagate(index, add)
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def mlp_output_errors(reference: nn.Module, model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per layer, ||y_ref - y||_F / ||y_ref||_F of each MLP's output when both models run `windows` end to end
    (so upstream errors count): how far a pruned `model` is from the dense `reference`, layer by layer."""
    views = {"ref": adapt(reference).mlps(), "model": adapt(model).mlps()}
    num = {v.index: 0.0 for v in views["ref"]}
    den = dict(num)
    device = next(model.parameters()).device
    with torch.no_grad(), frozen_eval(reference), frozen_eval(model):
        for batch in batches(windows, batch_size):
            outputs: dict[str, dict[int, torch.Tensor]] = {"ref": {}, "model": {}}
            for name, net in (("ref", reference), ("model", model)):
                handles = [v.module.register_forward_hook(lambda m, args, out, i=v.index, name=name: outputs[name].__setitem__(i, out.detach().double()))
                           for v in views[name]]
                with registered(handles):
                    net(input_ids=batch.to(device), use_cache=False)
            for i, ref in outputs["ref"].items():
                num[i] += float((ref - outputs["model"][i]).square().sum())
                den[i] += float(ref.square().sum())
    return {i: math.sqrt(num[i] / den[i]) if den[i] > 0 else 0.0 for i in num}

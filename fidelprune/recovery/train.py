"""The recovery loop: LoRA or full fine-tuning of a pruned model with CE, distillation, or a mix.

One process on CPU; several GPUs through `accelerate launch` / `torchrun` with no code change (the model is
wrapped by accelerate, each process trains on its own share of every optimizer step's rows, and only the main
process writes files). Batches are a pure function of (seed, step), so a resumed run sees exactly the rows an
uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import ConfigError, FidelpruneError, check_float, check_int, check_seed
from ..evaluation.perplexity import perplexity
from ..layout import manifest_or_none
from ..models import load_model, locate, model_config, parameters_sha256, shape_model
from ..utils import check_finite_weights, eval_mode, library_versions
from .checkpoints import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    remove_checkpoints,
    remove_checkpoints_from,
    save_checkpoint,
)
from .data import Packed, RecoveryData, build_data, load_records
from .losses import teacher_log_probs, token_loss_sums
from .modes import DEFAULT_TARGETS, apply_lora, merge_lora, prepare_full, resolve_target_modules, trainable_parameters

log = logging.getLogger(__name__)


class TrainingError(FidelpruneError, RuntimeError):
    """Training that cannot go on (a non-finite loss); the message says what to change."""

MODES = ("lora", "full")
LOSSES = ("ce", "kd", "mix")
PRECISIONS = ("auto", "bf16", "fp32")
# Seed-method learning rates (docs/methods.md, "Recovery"): LoRA 1e-4..4e-4, full fine-tuning 1e-4.
DEFAULT_LR = {"lora": 2e-4, "full": 1e-4}


@dataclass
class RecoveryConfig:
    """Every setting that changes the trained weights (plus a few that only change reporting)."""

    mode: str = "lora"
    loss: str = "ce"
    alpha: float | None = None  # weight of the KL term; only for loss="mix" (default 0.5). ce = 0, kd = 1
    temperature: float = 1.0  # teacher temperature (teacher only, no tau^2 factor)
    lora_r: int = 8
    lora_alpha: float = 16
    # peft's default. LLM-Pruner used 0.05 (--lora-dropout 0.05): on a CPU its random masks cost a quarter or more
    # of a LoRA step (docs/recovery.md, "Speed"), for a regulariser that short recoveries do not need.
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float | None = None  # default by mode: DEFAULT_LR
    weight_decay: float = 0.0  # applied to matrices only, never to norms and biases
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    seq_len: int = 512
    batch_size: int = 4  # packed rows per micro-batch per process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    data_format: str = "auto"
    max_examples: int | None = None
    val_fraction: float = 0.02
    seed: int = 0
    precision: str = "auto"  # bf16 where the GPU supports it, else fp32
    gradient_checkpointing: bool = False
    # reporting / survival only: changing these does not change the weights, so resume allows it
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2

    REPORTING = ("eval_every", "save_every", "keep_last")

    def resolved(self) -> RecoveryConfig:
        """Fill defaults that depend on other settings and reject impossible values with a one-line message."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.alpha is not None and self.loss != "mix":
            raise ConfigError(f"--alpha weighs CE against KL in --loss mix; --loss {self.loss} takes no --alpha")
        alpha = {"ce": 0.0, "kd": 1.0}.get(self.loss, 0.5 if self.alpha is None else self.alpha)
        check_float("--alpha", alpha, 0, 1)
        check_float("--temperature", self.temperature, 0, low_open=True)
        check_int("--seq-len", self.seq_len, 2)  # a next-token loss needs two tokens
        for name in ("batch_size", "grad_accum", "eval_every", "save_every"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        check_int("--keep-last", self.keep_last, 0)
        check_seed("--seed", self.seed)
        if self.max_steps is not None:
            check_int("--max-steps", self.max_steps, 1)
        check_float("--epochs", self.epochs, 0, low_open=True)
        check_float("--warmup-ratio", self.warmup_ratio, 0, 1, high_open=True)
        if self.lr is not None:
            check_float("--lr", self.lr, 0, low_open=True)
        check_int("--lora-r", self.lora_r, 1)
        check_float("--lora-alpha", self.lora_alpha, 0, low_open=True)
        check_float("--lora-dropout", self.lora_dropout, 0, 1, high_open=True)
        check_float("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        check_float("--weight-decay", self.weight_decay, 0)
        if self.max_examples is not None:
            check_int("--max-examples", self.max_examples, 1)
        if not self.target_modules:
            raise ConfigError("--target-modules is empty: name at least one of q,k,v,o,gate,up,down (or module names)")
        lr = DEFAULT_LR[self.mode] if self.lr is None else self.lr
        return dataclasses.replace(self, alpha=alpha, lr=lr, target_modules=tuple(self.target_modules), betas=tuple(self.betas))

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0

    def fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.REPORTING}


@dataclass
class RecoveryReport:
    """`record` is recovery.json; `pruning_manifest` the input's pruning.json (copied on save), if any."""

    record: dict
    pruning_manifest: dict | None = None
    tokenizer: object = field(default=None, repr=False)  # the one used, so a recovered directory can be saved

    def summary(self) -> dict:
        r = self.record
        ev, tr = r["eval"], r["training"]
        out = {"mode / loss": f'{r["hyperparameters"]["mode"]} / {r["hyperparameters"]["loss"]}',
               "steps": tr["steps"], "tokens": f'{tr["tokens"]:,}', "train s": round(tr["wall_s"], 1),
               "tokens/s": round(tr["tokens_per_s"] or 0, 1), "final loss": tr["final_loss"]}
        if ev.get("before") and ev.get("after"):
            out[f'{ev["corpus"]} ppl'] = f'{ev["before"]["ppl"]:.2f} -> {ev["after"]["ppl"]:.2f}'
        if ev.get("teacher"):
            out["teacher ppl"] = round(ev["teacher"]["ppl"], 2)
        if r["validation"]:
            out["val ppl"] = f'{r["validation"][0]["ppl"]:.2f} -> {r["validation"][-1]["ppl"]:.2f}'
        return out


# ---------------------------------------------------------------------------------------------------- helpers
def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision: bf16 autocast over fp32 master weights where the GPU has bf16."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "no" if precision == "fp32" else precision


@torch.no_grad()
def check_packing(model: nn.Module) -> float:
    """Packed examples must give the logits each gives alone; raise if this model's attention ignores the
    per-example position restarts (a family whose mask code does not detect packing). Returns the max diff."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in (6, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    with eval_mode(model):
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits.float()
        alone = torch.cat([model(input_ids=x, use_cache=False).logits.float() for x in (a, b)], dim=1)
    diff = (together - alone).abs().max().item()
    scale = max(1.0, alone.abs().max().item())
    tolerance = (1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 3e-2) * scale
    if not diff <= tolerance:
        raise ConfigError(f"{type(model).__name__} does not keep packed examples apart (logits differ by {diff:.3g}); "
                         "recovery cannot pack sequences for this model")
    return diff


def _optimizer(model: nn.Module, config: RecoveryConfig) -> torch.optim.Optimizer:
    params = list(trainable_parameters(model).values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) updates every tensor in one call instead of PyTorch's for-loop on a CPU: the
    # same AdamW update, and what lets full fine-tuning beat a bare step (docs/recovery.md, "Speed").
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, fused=fused)


def _forward(model: nn.Module, batch: Packed, device) -> torch.Tensor:
    # No attention mask and no cache: transformers then derives the block-diagonal causal mask from the
    # position restarts (with a cache it would silently attend across examples).
    return model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False).logits


@torch.no_grad()
def validate(model: nn.Module, val: Packed, batch_size: int, accelerator) -> dict:
    """Perplexity on the held-out rows (target tokens only), over all processes."""
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    rows = torch.arange(accelerator.process_index, len(val), accelerator.num_processes)
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = val.select(rows[start : start + batch_size])
            sums = token_loss_sums(_forward(model, batch, accelerator.device), batch.labels.to(accelerator.device))
            totals += torch.tensor([sums.ce.item(), sums.tokens], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(totals[1].item())}


def _eval_ppl(model: nn.Module, tokenizer, corpus: str, windows: int, seq_len: int, progress: bool) -> dict | None:
    if not windows or tokenizer is None:
        return None

    return perplexity(model, tokenizer, corpus, seq_len=seq_len, limit_windows=windows, progress=progress).to_dict()


@dataclass
class _Schedule:
    """Which rows each process trains on at each step: a pure function of (seed, step)."""

    rows: int
    batch_size: int
    grad_accum: int
    processes: int
    rank: int
    seed: int
    _orders: dict = field(default_factory=dict)

    @property
    def global_rows(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_rows

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            seed = (self.seed * 1_000_003 + epoch) % 2**63  # the same for every seed below 9e12; no overflow above
            self._orders = {epoch: torch.randperm(self.rows, generator=torch.Generator().manual_seed(seed))}
        rows = self._orders[epoch][index * self.global_rows : (index + 1) * self.global_rows]
        per_process = self.batch_size * self.grad_accum
        mine = rows[self.rank * per_process : (self.rank + 1) * per_process]
        return list(mine.split(self.batch_size))


def _check_before_load(source_dir: Path, teacher, data, config: RecoveryConfig, manifest: dict | None) -> None:
    """What the configs and files decide, before any weight loads: LoRA targets the model has, rows the model's
    positions hold, a teacher that exists, and data that parses."""
    load_records(data, config.data_format)
    model_cfg = model_config(locate(source_dir))
    if config.mode == "lora":
        resolve_target_modules(shape_model(model_cfg).model, config.target_modules)
    if config.uses_teacher and teacher is None and manifest is None:
        raise ConfigError("distillation needs a teacher: pass one (--teacher), or recover a fidelprune output "
                          "directory whose pruning.json names its source model")
    if config.uses_teacher and isinstance(teacher, (str, Path)):
        locate(teacher)
    positions = getattr(model_cfg, "max_position_embeddings", None)
    if positions and config.seq_len > positions:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds the model's {positions} positions; choose --seq-len "
                          f"{positions} or less")


def _resolve_teacher(teacher, config: RecoveryConfig, manifest: dict | None, device):
    """(teacher module or None, record). The default teacher is the source model in pruning.json."""
    if not config.uses_teacher:
        return None, None
    from_manifest = teacher is None
    if from_manifest:
        if manifest is None:
            raise ConfigError("distillation needs a teacher: pass one (--teacher), or recover a fidelprune output "
                             "directory whose pruning.json names its source model")
        teacher = manifest["source_model"]["name"]
    if not isinstance(teacher, (str, Path)):
        return teacher, {"name": getattr(teacher.config, "_name_or_path", "") or "in-memory", "from": "given module"}
    model, _, source = load_model(teacher, device=str(device))
    record = {**source.to_dict(), "from": "pruning.json" if from_manifest else "given"}
    if manifest is not None and source.sha256 and manifest["source_model"].get("sha256"):
        record["sha256_matches_source"] = source.sha256 == manifest["source_model"]["sha256"]
        if not record["sha256_matches_source"]:
            log.warning("the teacher's weights differ from the model %s was pruned from (sha256 mismatch)", manifest["source_model"]["name"])
    return model, record


def _check_same_vocab(student: nn.Module, teacher: nn.Module) -> None:
    vs, vt = (m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
    if vs != vt:
        raise ConfigError(f"teacher vocabulary ({vt}) differs from the student's ({vs}): distillation needs the same tokenizer")


def _prepare_checkpoint_dir(checkpoint_dir: Path | None, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, after refusing to mix a fresh run into an earlier run's checkpoints."""
    if resume:
        if resume is not True and Path(resume).is_dir() and (Path(resume) / "state.json").is_file():
            return Path(resume)
        if checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} to resume from")
        return found
    if checkpoint_dir is not None and complete_checkpoints(checkpoint_dir):
        if not overwrite:
            raise FileExistsError(f"{checkpoint_dir} holds checkpoints of an earlier run: resume it (--resume) or start over (--overwrite)")

        remove_checkpoints(checkpoint_dir)
    return None


def _check_fingerprint(saved: dict, current: dict, checkpoint: Path) -> None:
    current = json.loads(json.dumps(current, default=str))  # as it was stored: tuples became lists
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        # Often a default that moved between versions (lora_dropout 0.05 -> 0 did): say what brings the run back.
        options = [_as_option(k, saved[k]) if k in saved else None for k in changed]
        fix = ""
        if options and None not in options:
            python = ", ".join(f"{k}={saved[k]!r}" for k in changed)
            fix = f"; to continue it, pass {' '.join(options)} (in Python: {python})"
        else:  # no option brings it back: say which input moved, and what to do instead
            moved = [_UNOPTIONED_INPUTS[k] for k in changed if k in _UNOPTIONED_INPUTS]
            fix = f"; {', and '.join(moved) if moved else 'its inputs changed'}: give the run its own inputs, " \
                  f"or start a new run in another --checkpoint-dir"
        raise ConfigError(f"cannot resume from {checkpoint}: the run differs ({details}){fix}")


# Fingerprint keys that no `recover` option sets back, as a user would recognise them.
_UNOPTIONED_INPUTS = {
    "data": "the training rows differ (the data, --format, --max-examples, --seq-len, the tokenizer, "
            "or the packing of another fidelprune version)",
    "student_sha256": "the model is not the one the run started from",
    "processes": "it started on another number of processes (launch it on as many)",
}


def _as_option(name: str, value) -> str | None:
    """The `fidelprune recover` option that sets a RecoveryConfig field back to a saved value (None: no option
    does, e.g. the data or the student themselves changed)."""
    if name not in {f.name for f in dataclasses.fields(RecoveryConfig)} or name == "betas":
        return None
    flag = {"data_format": "--format"}.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value else None  # a store_true option cannot be passed as off
    if value is None:
        return f"{flag} 0" if name == "max_grad_norm" else None
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


# ---------------------------------------------------------------------------------------------------- recover
def recover(
    model: nn.Module | str | Path,
    teacher: nn.Module | str | Path | None = None,
    data: str | Path | list = "alpaca",
    tokenizer=None,
    *,
    config: RecoveryConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    overwrite_checkpoints: bool = False,
    inplace: bool = False,
    eval_corpus: str = "wikitext2",
    eval_windows: int = 64,
    eval_seq_len: int = 128,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    **options,
) -> tuple[nn.Module, RecoveryReport]:
    """Fine-tune a pruned model to recover quality; return (plain transformers model, report).

    `model`: a module, or a fidelprune output directory (its tokenizer is used, and its pruning.json gives the
    default teacher). `teacher`: a module, a model source for `load_model`, or None (CE only, or the source
    model recorded in pruning.json). `data`: 'alpaca' / 'c4' (bundled), an Alpaca or text file, or a list of
    Alpaca dicts / strings. Settings are `RecoveryConfig` fields, given as `config` or keywords
    (mode='lora'|'full', loss='ce'|'kd'|'mix', lr, seq_len, max_steps, ...). With `checkpoint_dir` a checkpoint
    is written every `save_every` steps, and `resume=True` continues from the newest one exactly. WikiText-2
    perplexity (`eval_windows` windows of `eval_seq_len`; 0 skips) is measured before and after. LoRA is merged
    into the returned model. The input model is left untouched unless `inplace=True`. `on_step(step, metrics)`
    is called after every optimizer step."""
    from accelerate import Accelerator

    config = dataclasses.replace(config or RecoveryConfig(), **options).resolved()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    accelerator = Accelerator(mixed_precision=resolve_precision(config.precision))
    device = accelerator.device
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume_from = _prepare_checkpoint_dir(checkpoint_dir, resume, overwrite_checkpoints)

    source_dir, manifest = None, None
    if isinstance(model, (str, Path)):
        source_dir = Path(model)
        manifest = manifest_or_none(source_dir)
        _check_before_load(source_dir, teacher, data, config, manifest)
        model, loaded_tokenizer, _ = load_model(source_dir, dtype="float32", device=str(device))
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        inplace = True  # freshly loaded: nobody else holds it
    if tokenizer is None:
        raise ConfigError("recovery needs the tokenizer to read its data (tokenizer=...)")
    teacher, teacher_record = _resolve_teacher(teacher, config, manifest, device)
    check_finite_weights(model, "the model to recover")
    if config.mode == "lora":
        resolve_target_modules(model, config.target_modules)  # before the minutes of perplexity and training
    if teacher is not None:
        check_finite_weights(teacher, "the teacher")
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    data_: RecoveryData = build_data(tokenizer, data, config.seq_len, data_format=config.data_format,
                                     val_fraction=config.val_fraction, max_examples=config.max_examples, seed=config.seed)
    schedule = _Schedule(len(data_.train), config.batch_size, config.grad_accum, accelerator.num_processes,
                         accelerator.process_index, config.seed)
    if schedule.steps_per_epoch == 0:
        raise ConfigError(f"the data packs into {len(data_.train)} rows of {config.seq_len} tokens, fewer than one step's "
                         f"batch_size x grad_accum x processes = {schedule.global_rows}: lower them or add data")
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * schedule.steps_per_epoch))
    timings["data"] = time.perf_counter() - start

    student = model if inplace else copy.deepcopy(model)
    student.to(device)
    if teacher is not None:
        _check_same_vocab(student, teacher)
        teacher.to(device).eval().requires_grad_(False)
    student_sha = parameters_sha256(student)
    packing_diff = check_packing(student)
    fingerprint = {**config.fingerprint(), "data": data_.record["train_fingerprint"], "student_sha256": student_sha,
                   "processes": accelerator.num_processes}

    state = {"step": 0, "tokens": 0, "target_tokens": 0, "train_wall_s": 0.0, "history": [], "validation": [],
             "resumed_at": [], "eval": {}, "fingerprint": fingerprint}
    if resume_from is not None:
        saved = read_state(resume_from)
        _check_fingerprint(saved["fingerprint"], fingerprint, resume_from)
    else:
        start = time.perf_counter()
        if accelerator.is_main_process:
            state["eval"]["before"] = _eval_ppl(student, tokenizer, eval_corpus, eval_windows, eval_seq_len, progress)
            if teacher is not None:
                state["eval"]["teacher"] = _eval_ppl(teacher, tokenizer, eval_corpus, eval_windows, eval_seq_len, progress)
        accelerator.wait_for_everyone()
        timings["eval_before"] = time.perf_counter() - start

    # What trains. The seed makes LoRA's random init (and dropout) reproducible; a resume overwrites both.
    torch.manual_seed(config.seed)
    if config.gradient_checkpointing:
        student.activation_checkpointing_enable({"use_reentrant": False})
    lora_targets = resolve_target_modules(student, config.target_modules) if config.mode == "lora" else None
    if config.mode == "lora":
        student = apply_lora(student, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)
    else:
        student = prepare_full(student)
    student.train()
    trainable = sum(p.numel() for p in trainable_parameters(student).values())
    optimizer = _optimizer(student, config)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    # The scheduler stays outside accelerate, which would step it once per process per step.
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(wrapped), optimizer, scheduler, accelerator)
        state["resumed_at"].append(state["step"])
        log.info("resumed from %s at step %d", resume_from, state["step"])

    start_step = state["step"]
    if start_step == 0 and data_.val is not None:
        state["validation"].append({"step": 0, **validate(wrapped, data_.val, config.batch_size, accelerator)})
    bar = tqdm(total=total_steps, initial=start_step, desc=f"recover {config.mode}/{config.loss}", unit="step",
               disable=not (progress and accelerator.is_main_process))
    # Throughput counts the optimizer steps alone; wall time also holds validation and checkpoint writes.
    session_start, session_tokens, session_steps_s = time.perf_counter(), 0, 0.0
    # checkpoints of earlier versions lack steps_s: their wall time stands in for it
    wall_before, steps_before = state["train_wall_s"], state.get("steps_s", state["train_wall_s"])
    metrics: dict = {}
    with bar:  # closed however the loop ends, so that an interrupt's one line is the last thing printed
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            metrics = _train_step(wrapped, teacher, data_.train, schedule.micro_batches(step), optimizer, scheduler,
                                  accelerator, config)
            if not math.isfinite(metrics["loss"]):  # diverged: every later step and the model would be garbage
                raise TrainingError(_diverged(step + 1, metrics["loss"], config, checkpoint_dir, accelerator))
            session_steps_s += time.perf_counter() - step_start
            state["steps_s"] = steps_before + session_steps_s
            state["step"] = step + 1
            state["tokens"] += metrics["tokens"]
            state["target_tokens"] += metrics["target_tokens"]
            session_tokens += metrics["tokens"]
            metrics = {"step": step + 1, **metrics, "tokens_per_s": session_tokens / session_steps_s if session_steps_s > 0 else None}
            state["history"].append(metrics)
            bar.set_postfix(loss=f'{metrics["loss"]:.4f}', tok_s=f'{metrics["tokens_per_s"]:.0f}', lr=f'{metrics["lr"]:.2e}')
            bar.update(1)
            last = step + 1 == total_steps
            if data_.val is not None and ((step + 1) % config.eval_every == 0 or last):
                val = {"step": step + 1, **validate(wrapped, data_.val, config.batch_size, accelerator)}
                state["validation"].append(val)
                if progress and accelerator.is_main_process:
                    bar.write(f'step {step + 1}: val loss {val["loss"]:.4f}, ppl {val["ppl"]:.2f}')
            state["train_wall_s"] = wall_before + time.perf_counter() - session_start
            if checkpoint_dir is not None and (step + 1) % config.save_every == 0 and not last:
                save_checkpoint(checkpoint_dir, step + 1, accelerator.unwrap_model(wrapped), optimizer, scheduler, state,
                                accelerator, config.keep_last)
            if on_step is not None:
                on_step(step + 1, metrics)

    start = time.perf_counter()
    final = accelerator.unwrap_model(wrapped)
    final = merge_lora(final) if config.mode == "lora" else final
    if config.gradient_checkpointing:
        final.activation_checkpointing_disable()
    final.eval().requires_grad_(False)
    timings["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    if accelerator.is_main_process:
        state["eval"]["after"] = _eval_ppl(final, tokenizer, eval_corpus, eval_windows, eval_seq_len, progress)
    accelerator.wait_for_everyone()
    timings["eval_after"] = time.perf_counter() - start

    record = _record(config, state, data_, schedule, total_steps, accelerator, timings, trainable, lora_targets,
                     source_dir, student_sha, teacher_record, eval_corpus, eval_windows, eval_seq_len, packing_diff)
    return final, RecoveryReport(record, manifest, tokenizer)


def _train_step(model, teacher, train: Packed, micro_batches, optimizer, scheduler, accelerator, config) -> dict:
    """One optimizer step over grad_accum micro-batches: the loss is a mean over every target token of the
    step on every process, so the update does not depend on how rows are split into micro-batches."""
    device = accelerator.device
    batches = [train.select(rows) for rows in micro_batches]
    local_targets = sum(b.target_tokens for b in batches)
    # DDP averages gradients over processes, so scale by processes / global target tokens.
    global_targets = accelerator.reduce(torch.tensor(float(local_targets), device=device), reduction="sum").item()
    scale = accelerator.num_processes / max(global_targets, 1.0)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kl
    tokens = 0
    for i, batch in enumerate(batches):
        sync = accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext()
        with sync:
            labels = batch.labels.to(device)
            teacher_log_p = None
            if teacher is not None:
                with torch.inference_mode(), accelerator.autocast():
                    mask = labels[:, 1:] != -100
                    teacher_log_p = teacher_log_probs(_forward(teacher, batch, device), mask, config.temperature)
                teacher_log_p = teacher_log_p.clone()  # a normal tensor: autograd may save it for backward
            out = token_loss_sums(_forward(model, batch, device), labels, teacher_log_p, config.alpha)
            accelerator.backward(out.loss * scale)
        sums += torch.stack([out.loss.detach().double(), out.ce.double(), out.kl.double()])
        tokens += batch.real_tokens
    grad_norm = None
    if config.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = accelerator.reduce(torch.cat([sums, torch.tensor([tokens], dtype=torch.float64, device=device)]), reduction="sum")
    n = max(global_targets, 1.0)
    return {"loss": totals[0].item() / n, "ce": totals[1].item() / n, "kl": totals[2].item() / n if teacher is not None else None,
            "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": int(totals[3].item()), "target_tokens": int(global_targets)}


def _diverged(step: int, loss: float, config: RecoveryConfig, checkpoint_dir: Path | None, accelerator) -> str:
    """The one line for a non-finite loss at `step`. That loss came from the weights after step - 1, so the
    checkpoints from step - 1 on hold diverged weights: they are removed, and the newest one left is named."""
    kept = None
    if checkpoint_dir is not None and accelerator.is_main_process:
        remove_checkpoints_from(checkpoint_dir, step - 1)
        kept = latest_checkpoint(checkpoint_dir)
    advice = "lower --lr" + ("" if config.max_grad_norm else " or clip gradients (--max-grad-norm 1)")
    return (f"step {step}: the training loss is {loss}: training diverged; {advice} (--lr was {config.lr:g}); no model "
            f"was written" + (f"; the last good checkpoint is kept at {kept}" if kept else ""))


def _record(config, state, data_, schedule, total_steps, accelerator, timings, trainable, lora_targets, source_dir,
            student_sha, teacher_record, eval_corpus, eval_windows, eval_seq_len, packing_diff) -> dict:
    history = state["history"]
    wall, steps_s = state["train_wall_s"], state.get("steps_s", state["train_wall_s"])
    return {
        "fidelprune_version": __version__,
        "student": {"path": str(source_dir) if source_dir else "in-memory", "parameters_sha256": student_sha},
        "teacher": teacher_record,
        "data": data_.record,
        "hyperparameters": {
            **asdict(config),
            "lora_target_modules": lora_targets,
            "trainable_parameters": trainable,
            "processes": accelerator.num_processes,
            "rows_per_step": schedule.global_rows,
            "tokens_per_step_max": schedule.global_rows * config.seq_len,
            "schedule": "AdamW, linear warmup then cosine decay to 0",
            "kd_definition": "KL(softmax(z_teacher / T) || softmax(z_student)) per target token, no T^2 factor",
            "packing": "position ids restart per example, attention_mask=None -> block-diagonal causal mask",
        },
        "training": {
            "steps": state["step"],
            "total_steps": total_steps,
            "steps_per_epoch": schedule.steps_per_epoch,
            "epochs": state["step"] / schedule.steps_per_epoch,
            "tokens": state["tokens"],
            "target_tokens": state["target_tokens"],
            "wall_s": wall,
            "steps_s": steps_s,
            "tokens_per_s": state["tokens"] / steps_s if steps_s > 0 else None,
            "final_loss": history[-1]["loss"] if history else None,
            "resumed_at": state["resumed_at"],
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "packing_check_max_diff": packing_diff,
        },
        "losses": history,
        "validation": state["validation"],
        "eval": {"corpus": eval_corpus, "windows": eval_windows, "seq_len": eval_seq_len, **state["eval"]},
        "timings_s": timings,
        "versions": library_versions("peft", "accelerate"),
    }

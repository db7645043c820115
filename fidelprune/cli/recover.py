"""`fidelprune recover PRUNED --data D --mode lora|full --loss ce|kd|mix --output OUT`: flags -> RecoveryConfig
-> recover -> save_recovered -> summary table."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from ..outputs import OutputExistsError, check_output_dir, claimed, overlaps
from ..recovery import recover, save_recovered
from ..recovery.checkpoints import latest_checkpoint, remove_checkpoints
from ..recovery.data import BUNDLED_DATA, FORMATS
from ..recovery.modes import DEFAULT_TARGETS
from ..recovery.train import LOSSES, MODES, PRECISIONS, RecoveryConfig
from .common import add_output_flags, print_summary

DEFAULT_EVAL_WINDOWS = 64


def add_parser(sub) -> None:
    d = RecoveryConfig()
    p = sub.add_parser("recover", help="fine-tune a pruned model (LoRA or full; CE or distillation) into a standard checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="pruned model directory (a fidelprune output, or any HF safetensors directory)")
    add_output_flags(p, None, "default: <model>-recovered-<mode>-<loss>; --overwrite also discards an earlier run's checkpoints")
    p.add_argument("--teacher", default=None, help="teacher for kd/mix (default: the source model in the input's pruning.json)")
    p.add_argument("--data", default="alpaca", help="'alpaca' or 'c4' (bundled), or an Alpaca .json/.jsonl or text .txt/.jsonl/.parquet file")
    p.add_argument("--format", dest="data_format", choices=FORMATS, default=d.data_format, help="data format (auto: from the record fields)")
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help="ce; kd = KL to the teacher; mix = (1-alpha) ce + alpha kd")
    p.add_argument("--alpha", type=float, default=None, help="KL weight for --loss mix (default 0.5)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="teacher temperature")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS), help="LoRA targets: short (q,k,v,o,gate,up,down) or module names")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 lora, 1e-4 full)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="packed rows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N records (after the seeded shuffle)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out examples for validation perplexity")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validation every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept during the run")
    p.add_argument("--checkpoint-dir", default=None, help="default: <output>.checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after a successful save")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="auto: bf16 autocast on GPUs that have it, else fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--eval-corpus", default="wikitext2", help="perplexity before and after: bundled corpus or a file")
    p.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS, help="perplexity windows (0 skips)")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.set_defaults(run=run)


def run(args) -> int:
    from accelerate import PartialState

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"pruned model directory not found: {model_dir}")
    if args.data not in BUNDLED_DATA and not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data} (give a .json/.jsonl/.parquet/.txt file, 'alpaca' or 'c4')")
    options = {k: getattr(args, k) for k in (
        "mode", "loss", "alpha", "temperature", "lora_r", "lora_alpha", "lora_dropout", "lr", "weight_decay",
        "warmup_ratio", "seq_len", "batch_size", "grad_accum", "epochs", "max_steps", "data_format", "max_examples",
        "val_fraction", "seed", "precision", "gradient_checkpointing", "eval_every", "save_every", "keep_last")}
    options["target_modules"] = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    options["max_grad_norm"] = args.max_grad_norm or None
    RecoveryConfig(**options).resolved()  # bad settings stop here, before any model is loaded
    output = Path(args.output or f"{model_dir.name}-recovered-{args.mode}-{args.loss}")
    checkpoint_dir = Path(args.checkpoint_dir or f"{output}.checkpoints")
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise FileExistsError(f"--checkpoint-dir {checkpoint_dir} exists and is not a directory; choose another")
    inputs = [model_dir, *(Path(p) for p in (args.teacher, args.data) if p and Path(p).exists())]
    for source in inputs:  # checkpoints are written into --checkpoint-dir while training
        if overlaps(checkpoint_dir, source):
            raise OutputExistsError(f"--checkpoint-dir {checkpoint_dir} would write into the input {source}; choose "
                                    f"one outside it")
    check_output_dir(output, args.overwrite, [*inputs, checkpoint_dir])  # before any compute
    main_process = PartialState().is_main_process
    with claimed(output) if main_process else nullcontext():  # until saved: a second run to it stops at once
        try:
            model, report = recover(
                model_dir, args.teacher, args.data, checkpoint_dir=checkpoint_dir, resume=args.resume,
                overwrite_checkpoints=args.overwrite, eval_corpus=args.eval_corpus, eval_windows=args.eval_windows,
                eval_seq_len=args.eval_seq_len, **options,
            )
        except KeyboardInterrupt as stop:  # say what an interrupted run keeps
            newest = latest_checkpoint(checkpoint_dir)
            stop.kept = f"checkpoint kept at {newest}: continue with --resume" if newest else None
            raise
        report.record["cli"] = {k: v for k, v in vars(args).items() if k != "run"}
        path = save_recovered(model, None, report, output, overwrite=args.overwrite)
    if not args.keep_checkpoints and main_process:
        remove_checkpoints(checkpoint_dir)
    print_summary(f"fidelprune recover -> {path}", report.summary())
    return 0

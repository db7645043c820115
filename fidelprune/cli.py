"""`fidelprune prune|eval|recover|report`: parse flags, call the Python API, print. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


# ---------------------------------------------------------------------------------------------------- prune
def _add_prune(sub) -> None:
    from .methods import METHODS
    from .pruning import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
    from .reconstruction import DEFAULT_LAMBDA, DEFAULT_MODE, MODES
    from .scoring import FORMS

    p = sub.add_parser("prune", help="prune MLP neurons and save a standard HF checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="hfprune", choices=METHODS)
    p.add_argument("--ratio", type=float, default=None, help="fraction of total parameters to remove (default 0.2)")
    p.add_argument("--keep", type=int, default=None, help="neurons to keep per layer (instead of --ratio)")
    p.add_argument("--round-to", type=int, default=8, help="kept width is a multiple of this (default 8)")
    p.add_argument("--output", "-o", default=None, help="output directory (default: pruned-<model>-<method>-<ratio>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--calibration", default="c4", help="'c4' (bundled C4 train sample) or a .txt/.jsonl/.parquet file")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration windows (default {DEFAULT_SAMPLES}; seeds: 1024)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per window (default {DEFAULT_SEQ_LEN}; seeds: 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per backward (scores do not depend on it)")
    p.add_argument("--objective", choices=["ce", "entropy", "kd"], default=None, help="override the method's objective")
    p.add_argument("--form", choices=FORMS, default=None, help="override the method's score form")
    p.add_argument("--alpha", type=float, default=None, help="kd weight (sdmprune default by ratio: 0.4 / 0.42 / 0.1)")
    p.add_argument("--temperature", type=float, default=None, help="kd teacher temperature (sdmprune default 0.2 / 0.5 / 0.2)")
    p.add_argument("--aggregation", choices=["mean", "l2"], default="mean", help="activation method: mean |a| or L2 norm")
    p.add_argument("--allocation", choices=["uniform", "global"], default="uniform",
                   help="uniform: same width everywhere (vanilla checkpoint); global: rank all layers together (needs fidelprune.load_model)")
    p.add_argument("--min-keep", type=int, default=None, help="global allocation: neurons every layer keeps at least (default: --round-to)")
    p.add_argument("--protect-first", type=int, default=0, help="first N layers keep every neuron (others prune harder)")
    p.add_argument("--protect-last", type=int, default=0, help="last M layers keep every neuron")
    p.add_argument("--scores", default=None, help="re-prune from an earlier run's scores.safetensors (no calibration)")
    p.add_argument("--reconstruct", choices=MODES, default=DEFAULT_MODE,
                   help=f"refit each pruned MLP's down_proj by least squares on calibration activations (default {DEFAULT_MODE})")
    p.add_argument("--reconstruct-lambda", type=float, default=DEFAULT_LAMBDA,
                   help=f"ridge, relative to the mean Gram diagonal (default {DEFAULT_LAMBDA:g})")
    p.add_argument("--reconstruct-calibration", default=None,
                   help="separate reconstruction windows from this source ('c4' or a file; default: the scoring windows)")
    p.add_argument("--reconstruct-samples", type=int, default=None, help="separate reconstruction windows: how many (default --samples)")
    p.add_argument("--reconstruct-seed", type=int, default=None, help="separate reconstruction windows: seed (default --seed + 1)")
    _add_model_flags(p)
    p.set_defaults(run=_run_prune)


def _run_prune(args) -> int:
    from . import load_model, prune, save
    from .calibration import check_source
    from .checkpoint import check_output_dir

    if args.ratio is None and args.keep is None:
        args.ratio = 0.2
    name = Path(args.model or "smollm2").name.removesuffix(".gguf")
    amount = f"keep{args.keep}" if args.keep else f"{args.ratio:g}"
    output = Path(args.output or f"pruned-{name}-{args.method}-{amount}")
    check_output_dir(output, args.overwrite)  # before any compute
    check_source(args.calibration)
    if args.reconstruct_calibration is not None:
        check_source(args.reconstruct_calibration)
    start = time.perf_counter()
    with console.status(f"loading {args.model or 'packaged SmolLM2-135M-Instruct'}"):
        model, tokenizer, source = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    load_s = time.perf_counter() - start
    pruned, report = prune(
        model, tokenizer, args.method, args.ratio, keep=args.keep, round_to=args.round_to,
        calibration=args.calibration, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        batch_size=args.batch_size, objective=args.objective, form=args.form, alpha=args.alpha,
        temperature=args.temperature, aggregation=args.aggregation, allocation=args.allocation,
        protect_first=args.protect_first, protect_last=args.protect_last, min_keep=args.min_keep,
        reconstruct=args.reconstruct, reconstruct_lambda=args.reconstruct_lambda,
        reconstruct_calibration=args.reconstruct_calibration, reconstruct_samples=args.reconstruct_samples,
        reconstruct_seed=args.reconstruct_seed, scores=args.scores, inplace=True, source=source,
    )
    report.manifest["timings_s"]["load"] = load_s
    path = save(pruned, tokenizer, report, output, overwrite=args.overwrite)
    table = Table(title=f"fidelprune prune -> {path}", show_header=False)
    for key, value in report.summary().items():
        table.add_row(key, str(value))
    console.print(table)
    return 0


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fidelprune", description="Prune, recover and evaluate causal LMs.")
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    # Each pipeline stage registers its own subcommands here, one line each.
    from .recovery import add_parser as _add_recover; _add_recover(sub)  # noqa: E702
    from .evaluation.cli import add_parsers as _add_eval; _add_eval(sub)  # noqa: E702
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)  # one line, unwrapped, so scripts can grep it
        return 2


if __name__ == "__main__":
    sys.exit(main())

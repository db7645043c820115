"""`fidelprune eval` and `fidelprune report`: parse flags, call the evaluation API, print. No logic of its own."""

from __future__ import annotations

import gc
from pathlib import Path

SOURCE_BASELINES = ("auto", "source")  # read pruning.json's source_model ("auto": only if there is one)


def add_parsers(sub) -> None:
    _add_eval(sub)
    _add_report(sub)


# ------------------------------------------------------------------------------------------------------ eval
def _add_eval(sub) -> None:
    from .zeroshot import TASKS

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed, model beside its dense baseline",
                       description="Evaluate a model (a pruned output directory, an HF directory, a .gguf file or a "
                                   "hub id; default: the packaged SmolLM2) and its dense baseline with one protocol; "
                                   "writes results.json and results.md.")
    p.add_argument("model", nargs="?", default=None, help="model to evaluate (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--baseline", default="auto",
                   help="dense model to compare with: 'auto' (pruning.json's source_model when there is one, default), "
                        "'source' (the same, required), 'none', or a directory / .gguf / hub id")
    p.add_argument("--ppl", default="wikitext2", help="perplexity corpora: wikitext2, ptb, ptb-test, c4, local files, "
                                                     "comma-separated, or 'none' (default wikitext2)")
    p.add_argument("--tasks", default="all", help=f"zero-shot tasks, comma-separated, from {', '.join(TASKS)}; 'all' = "
                                                  "the six bundled (+ hellaswag with --hellaswag); 'none' to skip")
    p.add_argument("--hellaswag", default=None, help="the original HellaSwag jsonl (e.g. hellaswag_val.jsonl)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="perplexity window in tokens (default 128 as LLM-Pruner; 2048 is the other common choice)")
    p.add_argument("--limit-windows", type=int, default=None,
                   help="perplexity: score only the first N windows (quick runs; recorded)")
    p.add_argument("--limit", type=int, default=None,
                   help="zero-shot: score only the first N documents of each task (recorded)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward for perplexity and zero-shot")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the speed measurement")
    p.add_argument("--speed-devices", default=None,
                   help="devices to time on, comma-separated (default: cpu, and cuda when present)")
    p.add_argument("--prompt-len", type=int, default=128, help="speed: prompt tokens for prefill (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="speed: decode steps (default 32)")
    p.add_argument("--speed-batch", type=int, default=1, help="speed: sequences per batch (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="speed: timed runs, median reported (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="results",
                   help="output directory for results.json / results.md (default results)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide fidelprune's progress bars")
    p.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (GPU default), float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.set_defaults(run=run_eval)


def _manifest(path: str | None) -> dict | None:
    from ..checkpoint import MANIFEST, read_manifest

    if path and Path(path).is_dir() and (Path(path) / MANIFEST).is_file():
        return read_manifest(path)
    return None


def source_location(source: dict) -> str:
    """Where pruning.json's source_model can be loaded from: its GGUF file, its directory, else its name."""
    from ..models import _PACKAGED

    path, gguf, name = source.get("path"), source.get("gguf_file"), source.get("name")
    if gguf and path and (Path(path) / gguf).is_file():
        return str(Path(path) / gguf)
    if name in _PACKAGED:  # the packaged model, installed somewhere else on this machine
        return name
    if path and Path(path).exists():
        return path
    if name:
        return name
    raise ValueError("pruning.json's source_model names no loadable location; pass --baseline PATH")


def resolve_baseline(spec: str, model: str | None) -> tuple[str | None, dict | None]:
    """(what to load, the source record it must match) for a --baseline value."""
    if spec == "none":
        return None, None
    if spec in SOURCE_BASELINES:
        manifest = _manifest(model)
        if manifest is None:
            if spec == "source":
                raise ValueError(f"--baseline source needs a pruning.json in {model}; pass --baseline PATH instead")
            return None, None
        return source_location(manifest["source_model"]), manifest["source_model"]
    return spec, None


def pruning_info(manifest: dict | None) -> dict:
    if manifest is None:
        return {}
    alloc = manifest["allocation"]
    return {"pruning": {"method": manifest["method"]["method"], "objective": manifest["method"].get("objective"),
                        "form": manifest["method"].get("form"), "target_ratio": alloc.get("target_ratio"),
                        "achieved_ratio": alloc.get("achieved_ratio"), "width_before": alloc.get("width_before"),
                        "width_after": alloc.get("width_after"), "source_model": manifest.get("source_model")}}


def _evaluate_one(location: str | None, args, config, info: dict, role: str) -> dict:
    """Load, evaluate and free one model, so that only one is in memory at a time."""
    import torch

    from .. import load_model
    from ..cli import console
    from .suite import evaluate_model

    with console.status(f"loading {role}: {location or 'packaged SmolLM2-135M-Instruct'}"):
        model, tokenizer, source = load_model(location, dtype=args.dtype, device=args.device,
                                              trust_remote_code=args.trust_remote_code)
    info = {"name": source.name, "source": source.to_dict(), **info}
    log = lambda message: console.print(f"[bold]{role}[/]: {message}")  # noqa: E731
    try:
        return evaluate_model(model, tokenizer, config, info, progress=args.progress, verbose=args.verbose, log=log)
    finally:
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_eval(args) -> int:
    from ..checkpoint import check_output_dir
    from ..cli import console
    from .report import combine, rich_table, write_results
    from .suite import EvalConfig

    output = check_output_dir(args.output, args.overwrite)  # before any compute
    config = EvalConfig.build(args.ppl, args.tasks, args.hellaswag, args.speed_devices, seq_len=args.seq_len,
                              limit_windows=args.limit_windows, limit=args.limit, batch_size=args.batch_size,
                              speed=args.speed, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                              speed_batch=args.speed_batch, repeats=args.repeats, seed=args.seed)
    manifest = _manifest(args.model)
    baseline, expected = resolve_baseline(args.baseline, args.model)
    evaluated = _evaluate_one(args.model, args, config, pruning_info(manifest), "model")
    dense = None
    if baseline is not None:
        dense = _evaluate_one(baseline, args, config, {}, "baseline")
        if expected and expected.get("sha256") and dense["model"]["source"]["sha256"] != expected["sha256"]:
            console.print("[yellow]warning:[/] the baseline's weights differ from pruning.json's source_model (sha256)")
            dense["model"]["sha256_matches_source"] = False
        elif expected:
            dense["model"]["sha256_matches_source"] = True
    results = combine(evaluated, dense, config)
    results["cli_args"] = {key: value for key, value in vars(args).items() if key != "run"}
    path = write_results(results, output, overwrite=args.overwrite, run_dir=args.model if manifest else None)
    console.print(rich_table(results))
    console.print(f"wrote {path / 'results.json'} and {path / 'results.md'}")
    return 0


# ---------------------------------------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plot a pruning run (kept width and scores per layer) or show eval results",
                       description="RUN_DIR with pruning.json: write a PNG of kept width and score distribution per "
                                   "layer. RUN_DIR with results.json (a `fidelprune eval` output): print its table.")
    p.add_argument("run_dir", help="a pruning output directory, or a `fidelprune eval` output directory")
    p.add_argument("--output", "-o", default=None, help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(run=run_report)


def run_report(args) -> int:
    from rich.table import Table

    from ..checkpoint import MANIFEST
    from ..cli import console
    from .report import REPORT_PNG, RESULTS_JSON, plot_run, read_results, rich_table, run_summary

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    has_manifest, has_results = (run_dir / MANIFEST).is_file(), (run_dir / RESULTS_JSON).is_file()
    if not (has_manifest or has_results):
        raise FileNotFoundError(f"{run_dir} has neither {MANIFEST} (a pruning run) nor {RESULTS_JSON} (an eval output)")
    if has_results:
        console.print(rich_table(read_results(run_dir)))
    if has_manifest:
        table = Table(title=f"{run_dir}: per layer")
        for column in ("layer", "width before", "kept", "lowest kept score", "median score"):
            table.add_column(column, justify="right")
        for row in run_summary(run_dir):
            scores = sorted(row["scores"] or [])
            median = f"{scores[len(scores) // 2]:.3g}" if scores else "-"
            threshold = f"{row['threshold']:.3g}" if row["threshold"] is not None else "-"
            table.add_row(str(row["layer"]), str(row["width_before"]), str(row["kept"]), threshold, median)
        console.print(table)
        path = plot_run(run_dir, args.output or run_dir / REPORT_PNG)
        console.print(f"wrote {path}")
    return 0

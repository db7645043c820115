"""`fidelprune eval MODEL`: flags -> EvalConfig -> evaluation.evaluate_location -> results.json / results.md."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..evaluation import EvalConfig, evaluate_location
from ..evaluation.report import rich_table, write_results
from ..evaluation.zeroshot import TASKS
from ..outputs import check_output_dir
from .common import add_device_map_flag, add_model_flags, add_output_flags, console


def add_parser(sub) -> None:
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
    add_output_flags(p, "results", "results.json and results.md; default results")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide fidelprune's progress bars")
    add_model_flags(p)
    add_device_map_flag(p)
    p.set_defaults(run=run)



def run(args) -> int:
    if args.device_map and args.speed_devices:
        raise ConfigError("--device-map: speed is measured on the device map; drop --speed-devices")
    inputs = [Path(p) for p in (args.model, args.baseline) if p and Path(p).exists()]
    output = check_output_dir(args.output, args.overwrite, inputs)  # before any compute
    config = EvalConfig.build(args.ppl, args.tasks, args.hellaswag, args.speed_devices, seq_len=args.seq_len,
                              limit_windows=args.limit_windows, limit=args.limit, batch_size=args.batch_size,
                              speed=args.speed, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                              speed_batch=args.speed_batch, repeats=args.repeats, seed=args.seed)
    results = evaluate_location(args.model, config, baseline=args.baseline, dtype=args.dtype, device=args.device,
                                device_map=args.device_map, trust_remote_code=args.trust_remote_code, progress=args.progress,
                                verbose=args.verbose, say=console.print)
    results["cli_args"] = {key: value for key, value in vars(args).items() if key != "run"}
    path = write_results(results, output, overwrite=args.overwrite, run_dir=args.model)
    console.print(rich_table(results))
    console.print(f"wrote {path / 'results.json'} and {path / 'results.md'}")
    return 0

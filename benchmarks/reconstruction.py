"""Reconstruction benchmark: WikiText-2 PPL, held-out per-layer MLP error and wall time of `--reconstruct`
none / parallel / sequential on one pruned model (docs/reconstruction.md quotes its output).

One configuration per invocation, so every run stays short on a small CPU; rows accumulate in the results file.
Scores come from the benchmarks' shared score cache (common.ScoreCache), so every mode prunes the same neurons.

    python benchmarks/reconstruction.py --mode dense
    python benchmarks/reconstruction.py --mode none          # scores hfprune 20 % once (benchmarks/.cache/scores, shared with quality.py)
    python benchmarks/reconstruction.py --mode parallel
    python benchmarks/reconstruction.py --mode sequential
    python benchmarks/reconstruction.py --mode sequential --lam 1e-2
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelprune  # noqa: E402
from fidelprune.calibration import sample_windows
from fidelprune.evaluation import perplexity
from fidelprune.reconstruction import mlp_output_errors
from fidelprune.utils import library_versions

from common import SCORE_CACHE, ScoreCache  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=["dense", "none", "parallel", "sequential"])
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--target", default="layer", choices=["layer", "dense"], help="sequential mode's target")
    p.add_argument("--method", default="hfprune")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=128, help="first N WikiText-2 test windows of 128 tokens")
    p.add_argument("--heldout", type=int, default=16, help="held-out C4 windows (seed 1000) for the per-layer error")
    p.add_argument("--output", type=Path, default=RESULTS / "reconstruction.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer, source = fidelprune.load_model(dtype="float32", device="cpu")
    heldout, _ = sample_windows(tokenizer, "c4", args.heldout, args.seq_len, seed=1000)
    row: dict = {"mode": args.mode, "target": args.target if args.mode == "sequential" else None, "method": args.method, "ratio": args.ratio}
    if args.mode == "dense":
        pruned = model
    else:
        cache = ScoreCache(SCORE_CACHE, "smollm2", " ".join(["python", *map(shlex.quote, sys.argv)]))
        kwargs = {"method": args.method, "ratio": args.ratio, "samples": args.samples, "seq_len": args.seq_len, "seed": 0,
                  "reconstruct": args.mode, "reconstruct_lambda": args.lam, "reconstruct_target": args.target}
        pruned, report, row["scoring_s"] = cache.prune(model, tokenizer, source, kwargs)
        recon = report.manifest["reconstruction"]
        row.update(lam=args.lam if args.mode != "none" else None, achieved_ratio=report.manifest["allocation"]["achieved_ratio"],
                   width=report.manifest["allocation"]["width_after"], reconstruction_s=recon.get("seconds"),
                   calib_error_before=recon.get("mean_error_before"), calib_error_after=recon.get("mean_error_after"),
                   calib_layers=[(f["error_before"], f["error_after"]) for f in recon.get("layers", [])])
        errors = mlp_output_errors(model, pruned, heldout)
        row["heldout_mlp_error"] = list(errors.values())
        row["heldout_mlp_error_mean"] = sum(errors.values()) / len(errors)
    start = time.perf_counter()
    ppl = perplexity(pruned, tokenizer, "wikitext2", seq_len=128, limit_windows=args.ppl_windows)
    row.update(ppl=ppl.ppl, ppl_windows=ppl.windows, ppl_s=time.perf_counter() - start)
    row["command"] = " ".join(["python", *map(shlex.quote, sys.argv)])
    row["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    row["versions"] = library_versions()

    results = json.loads(args.output.read_text()) if args.output.is_file() else {"rows": []}
    results["rows"].append(row)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    summary = {k: v for k, v in row.items() if k not in ("calib_layers", "heldout_mlp_error", "versions", "machine")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

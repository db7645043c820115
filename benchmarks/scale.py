"""Scale: the same `fidelprune prune` in one process and in K data-parallel processes (torchrun): are the scores
the same, and how long does scoring take?

Each run is the CLI itself on the packaged SmolLM2 (or MODEL), without reconstruction, one after the other; the
K-process run is `python -m torch.distributed.run --nproc-per-node K -m fidelprune.cli prune ...` with one torch
thread per process, the one-process run uses every core. Recorded: max relative score difference per stage, whether
the kept neurons are identical, scoring seconds from each pruning.json, wall seconds, and the speed-up. On a CPU
with K cores the processes share the same cores the single process uses, so expect about 1x; on K GPUs, K x.

    python benchmarks/scale.py --processes 2 --method hfprune --samples 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, markdown_table, provenance  # noqa: E402


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def max_relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key, x in a.items():
        y, finite = b[key], torch.isfinite(x)
        worst = max(worst, ((x[finite] - y[finite]).abs().max() / x[finite].abs().max().clamp_min(1e-30)).item())
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--method", default="hfprune")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--output", type=Path, default=RESULTS / "scale.json")
    args = p.parse_args()
    prune = ["prune", *([args.model] if args.model else []), "--method", args.method, "--ratio", str(args.ratio),
             "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--reconstruct", "none"]
    data = header({"method": args.method, "samples": args.samples, "seq_len": args.seq_len, "ratio": args.ratio,
                   "processes": args.processes, "reconstruct": "none"})
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        wall_one = run([sys.executable, "-m", "fidelprune.cli", *prune, "-o", str(one)], {})
        wall_many = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                         "-m", "fidelprune.cli", *prune, "-o", str(many)], {"OMP_NUM_THREADS": "1"})
        manifests = [json.loads((d / "pruning.json").read_text()) for d in (one, many)]
        scores = [load_file(str(d / "fidelprune" / "scores.safetensors")) for d in (one, many)]
    scoring = [m["timings_s"]["scoring"] for m in manifests]
    data["rows"].append({
        "processes": args.processes, "kept_identical": manifests[0]["kept_neurons"] == manifests[1]["kept_neurons"],
        "max_relative_score_difference": max_relative_difference(*scores),
        "scoring_s_one": scoring[0], "scoring_s_many": scoring[1], "scoring_speedup": scoring[0] / scoring[1],
        "wall_s_one": wall_one, "wall_s_many": wall_many, "data_parallel": manifests[1].get("data_parallel"),
    })
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    r = data["rows"][0]
    table = markdown_table(
        ["processes", "kept neurons identical", "max relative score difference", "scoring s (1 process)",
         f"scoring s ({args.processes} processes)", "scoring speed-up", "wall s (1)", f"wall s ({args.processes})"],
        [[r["processes"], "yes" if r["kept_identical"] else "no", f"{r['max_relative_score_difference']:.2e}",
          f"{r['scoring_s_one']:.1f}", f"{r['scoring_s_many']:.1f}", f"{r['scoring_speedup']:.2f}x",
          f"{r['wall_s_one']:.1f}", f"{r['wall_s_many']:.1f}"]])
    markdown = "# Scale: one process vs data-parallel processes\n\n" + provenance(data) + "\n" + table
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

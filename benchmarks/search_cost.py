"""The allocation search's cost against the scoring's, in one process (issue 25: the search must not dominate a
run, at most 2 x the scoring time at the default settings).

The search timed is `--recipe best`'s: hfprune's scores on the calibration windows (64 x 256 C4 spans, the
benchmarks' calibration), then the search on the first 4 of them with the refit in the loop on all of them. Each
row prunes from the scores already computed (so it times the search alone) with `--reconstruct parallel` as the
final refit: the search is the same for every reconstruction mode (pruning._search_widths), and the recipe's
sequential refit on 256 windows of its own, which comes after it, would add minutes without changing it. The
scoring is timed twice, before and after the rows, so a machine that slowed down in between shows.

    python benchmarks/search_cost.py                                   # SmolLM2, 20, 30 and 40 %
    python benchmarks/search_cost.py --model tiny --samples 8 --seq-len 16 --ratios 0.2 --output /tmp/sc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality import kept_digest  # noqa: E402

import fidelprune  # noqa: E402

from common import RESULTS, header, load_model, markdown_table, provenance  # noqa: E402


def scoring_seconds(model, tokenizer, source, calibration: dict) -> tuple[float, dict]:
    """(hfprune's scoring time, its scores), from a run that does nothing after the scoring but cut (no refit)."""
    _, report = fidelprune.prune(model, tokenizer, method="hfprune", ratio=0.2, reconstruct="none", source=source,
                                 progress=False, **calibration)
    return report.manifest["timings_s"]["scoring"], report.scores


def render(data: dict) -> str:
    p = data["protocol"]
    rows = [[r["key"], r["search_s"], r["grams_s"], r["search_s"] / data["scoring_s_mean"], r["evaluations"], r["screenings"],
             r["final_fitness"], r["kept_digest"]] for r in data["rows"]]
    scoring = ", ".join(f"{s:.1f}" for s in data.get("scoring_s", []))
    return (f"# Allocation search cost\n\nhfprune scores on {p['samples']} x {p['seq_len']} {p['source']} windows ({p['sampling']}), "
            f"then `--allocation search` as `--recipe best` runs it (the first {p['search_samples']} windows, the refit in the loop "
            f"on all of them), in one process. Scoring: {scoring} s (before and after the rows); the ratio is over their "
            f"mean.\n\n" + provenance(data) + "\n"
            + markdown_table(["ratio", "search s", "of which Grams s", "search / scoring", "evaluations", "screenings",
                              "final F (nats/token)", "kept digest"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratios", default="0.2,0.3,0.4")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--search-samples", type=int, default=4)
    parser.add_argument("--output", default=str(RESULTS / "search-cost.json"))
    args = parser.parse_args()

    model, tokenizer, source = load_model(args.model)
    calibration = {"samples": args.samples, "seq_len": args.seq_len, "sampling": "spans"}
    protocol = {"model": args.model, "source": "c4", **calibration, "search_samples": args.search_samples}
    data = header(protocol)  # one sitting, written whole: every row is timed against this run's scoring
    first, scores = scoring_seconds(model, tokenizer, source, calibration)
    print(f"scoring {first:.1f} s", flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        _, report = fidelprune.prune(model, tokenizer, method="hfprune", ratio=ratio, source=source, scores=scores,
                                     allocation="search", search_samples=args.search_samples, reconstruct="parallel",
                                     progress=False, **calibration)
        search = report.manifest["allocation"]["search"]
        row = {"key": f"{ratio:.0%}", "ratio": ratio, "search_s": report.manifest["timings_s"]["search"],
               "grams_s": search["seconds"]["grams"], "evaluations": search["evaluations"],
               "screenings": (search["screening"] or {}).get("screenings", 0), "final_fitness": search["final_fitness"],
               "widths": search["widths"], "kept_digest": kept_digest(report.manifest)}
        print(f"{row['key']}: search {row['search_s']:.1f} s ({row['grams_s']:.1f} s Grams)", flush=True)
        data["rows"].append(row)
    last, _ = scoring_seconds(model, tokenizer, source, calibration)
    data.update(scoring_s=[first, last], scoring_s_mean=statistics.mean([first, last]), finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    output = Path(args.output)
    output.with_suffix(".tmp").write_text(json.dumps(data, indent=1) + "\n")
    output.with_suffix(".tmp").rename(output)
    output.with_suffix(".md").write_text(render(data))
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

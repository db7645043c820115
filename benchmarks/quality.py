"""Quality tables: every method x ratio on SmolLM2-135M (packaged), the same calibration windows for every row
(C4 train; never the evaluation text), each row recording its scoring time. Resumable: rows already in the
results file are skipped, so a long table fills across runs.

    python benchmarks/quality.py --table main       # dense, llm-pruner, sdmprune, hfprune, --recipe best at 20/30 %: full sets
    python benchmarks/quality.py --table sweep      # every method x 10/20/30/40 % x reconstruction: fixed subsets
    python benchmarks/quality.py --table ablation   # objective under one form; calibration size N; the recipe's windows
    python benchmarks/quality.py --table full-tasks # the recipe against the rows above it on 300 items: full task sets
    python benchmarks/quality.py --table sweep --only hfprune,flap --ratios 0.2    # a slice of a table
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fidelprune.evaluation import perplexity, zeroshot  # noqa: E402
from fidelprune.pruning import RECIPES  # noqa: E402

from common import RESULTS, SCORE_CACHE, ResultsFile, ScoreCache, load_model, markdown_table, method_arguments, provenance  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa"]
FIVE_TASKS = [t for t in TASKS if t != "boolq"]  # issue 25's zero-shot goal: the five-task mean without BoolQ
SWEEP_METHODS = ["random", "magnitude", "llm-pruner", "llm-pruner-element2", "sdmprune", "hfprune", "wanda-sp", "flap", "activation"]

# table -> evaluation protocol: perplexity (corpus, window, first-N windows or None = all) and zero-shot limit
PROTOCOLS = {
    "main": {"ppl": [["wikitext2", 128, None], ["ptb", 128, None], ["wikitext2", 2048, None]], "tasks": TASKS, "task_limit": None},
    "sweep": {"ppl": [["wikitext2", 512, 64]], "tasks": TASKS, "task_limit": 300},
    "ablation": {"ppl": [["wikitext2", 512, 64]], "tasks": TASKS, "task_limit": 300},
    # sweep rows that the sweep's 300 items cannot tell apart, on the five tasks' full sets (7,153 items)
    "full-tasks": {"ppl": [], "tasks": FIVE_TASKS, "task_limit": None},
}
# The sweep rows whose five-task zero-shot mean (first 300 items) is above --recipe best's at each ratio (by 0.07 to
# 1.60 points, about one standard error or less), each ratio's leader first; tests/test_benchmarks.py recomputes
# the list from results/quality-sweep.json. The recipe's goal is to be at or above all of them.
ZERO_SHOT_CONTENDERS = {
    0.2: ["method=llm-pruner-element2 ratio=0.2 reconstruct=sequential"],
    0.3: ["method=wanda-sp ratio=0.3 reconstruct=sequential", "method=llm-pruner ratio=0.3 reconstruct=sequential",
          "method=llm-pruner-element2 ratio=0.3 reconstruct=sequential"],
    0.4: ["method=hfprune ratio=0.4 reconstruct=sequential", "method=sdmprune ratio=0.4 reconstruct=sequential",
          "method=activation ratio=0.4 reconstruct=sequential", "method=hfprune ratio=0.4 reconstruct=sequential allocation=search",
          "method=hfprune ratio=0.4 reconstruct=sequential steps=4", "method=llm-pruner ratio=0.4 reconstruct=sequential"],
}
MAIN_RATIOS = (0.2, 0.3)  # the main table's: its recipe rows are the sweep's models, on the full sets already


# --recipe best's settings besides the method (fidelprune's RECIPES), in the order of the committed row keys
RECIPE_BEST = {k: RECIPES["best"][k] for k in ("reconstruct", "allocation", "reconstruct_select", "reconstruct_samples")}
# the recipe with its final refit on the 64 scoring windows instead (reconstruct_samples None: the keys name no windows)
RECIPE_BEST_SCORING_WINDOWS = {**RECIPE_BEST, "reconstruct_samples": None}
ITERATIVE_STEPS = 4  # the sweep's iterative rows: each step removes a quarter of the neurons to go, then re-scores


def table_rows(table: str, ratios: list[float], reconstruct: list[str], num_layers: int = 30) -> list[dict]:
    """Row specs: prune() arguments (method None = the dense model)."""
    recipe_best = [{"method": "hfprune", "ratio": r, **RECIPE_BEST} for r in ratios]  # --recipe best: the searched widths, each layer's neurons chosen by the refit (OBS)
    if table == "full-tasks":  # each ratio's contenders (the sweep's specs), and the recipe where the main table has not run it
        sweep = {row_key(spec): spec for spec in table_rows("sweep", ratios, ["none", "sequential"], num_layers)}
        return [spec for i, r in enumerate(ratios)
                for spec in [sweep[key] for key in ZERO_SHOT_CONTENDERS[r]] + ([] if r in MAIN_RATIOS else [recipe_best[i]])]
    if table == "main":
        return [{"method": None}] + [{"method": m, "ratio": r} for r in ratios for m in ("llm-pruner", "sdmprune", "hfprune")] + recipe_best
    if table == "sweep":
        # every method, then the non-uniform allocations on the default method (LLM-Pruner spares its first 4 and
        # last 2 of 32 layers; 3 and 2 of SmolLM2's 30 is the same share), then the searched allocation, which
        # refits in its loop when the row reconstructs, --recipe best's rows, and iterative pruning (--steps 4,
        # LLM-Pruner's iterative option) on the default method
        allocations = [{"allocation": "global"}]
        if num_layers >= 4:
            allocations.append({"protect_first": max(1, num_layers // 10), "protect_last": max(1, num_layers // 15)})
        return ([{"method": None}]
                + [{"method": m, "ratio": r, "reconstruct": mode} for mode in reconstruct for r in ratios for m in SWEEP_METHODS]
                + [{"method": "hfprune", "ratio": r, "reconstruct": "none", **a} for r in ratios for a in allocations]
                + [{"method": "hfprune", "ratio": r, "reconstruct": mode, "allocation": "search"} for mode in reconstruct for r in ratios]
                + (recipe_best if "sequential" in reconstruct else [])
                + [{"method": "hfprune", "ratio": r, "reconstruct": mode, "steps": ITERATIVE_STEPS} for mode in reconstruct for r in ratios])
    # ablation: the three objectives under one score form (activation, the cheapest), then calibration size N,
    # then --recipe best with its final refit on the 64 scoring windows instead of 256 of their own, on the sweep's
    # calibration draw and on two others, then --recipe best itself on those two other draws (its seed spread), then
    # --recipe best on iteratively pruned scores
    return ([{"method": "hfprune", "ratio": 0.2, "objective": o, "form": "activation"} for o in ("ce", "kd", "entropy")]
            + [{"method": "hfprune", "ratio": 0.2, "samples": n} for n in (32, 128, 512)]
            + [{"method": "hfprune", "ratio": r, **RECIPE_BEST_SCORING_WINDOWS} for r in (0.1, 0.2, 0.3, 0.4)]
            + [{"method": "hfprune", "ratio": r, **RECIPE_BEST_SCORING_WINDOWS, "seed": s} for r in (0.2, 0.4) for s in (1, 2)]
            + [{"method": "hfprune", "ratio": r, **RECIPE_BEST, "seed": s} for r in (0.2, 0.4) for s in (1, 2)]
            + [{"method": "hfprune", "ratio": 0.2, **RECIPE_BEST, "steps": ITERATIVE_STEPS}])


def row_key(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items() if v is not None) or "dense"


def chosen_row(spec: dict, only: str | None) -> bool:
    """`--only`: a comma list of methods (every row of each) or whole row keys; None = every row."""
    return not only or spec["method"] in only.split(",") or row_key(spec) in only.split(",")


def kept_digest(manifest: dict) -> str:
    """A short fingerprint of which neurons a pruned model kept in every layer."""
    kept = json.dumps(manifest["kept_neurons"], sort_keys=True).encode()
    return hashlib.sha256(kept).hexdigest()[:16]


def prune_arguments(spec: dict, calibration: dict) -> dict:
    spec = {**spec, **method_arguments(spec["method"])}
    if spec.get("allocation") == "search":  # the default 4 search windows, or all of a smaller calibration (tests)
        spec["search_samples"] = min(4, calibration["samples"])
    return {"sampling": "spans", **calibration, **spec}  # a calibration without "sampling" drew spans


def protocol_metrics(protocol: dict) -> list[str]:
    """The columns a finished row holds; each is filled (and resumed) on its own."""
    return [f"ppl_{c}_{w}" for c, w, _ in protocol["ppl"]] + [f"acc_{t}" for t in protocol["tasks"]]


def chosen_metrics(protocol: dict, wanted: str | None) -> list[str]:
    """`--metrics ppl,acc_piqa`: a group ("ppl", "tasks") or exact column names; None = every column."""
    columns = protocol_metrics(protocol)
    if not wanted:
        return columns
    chosen = []
    for name in wanted.split(","):
        group = {"ppl": [c for c in columns if c.startswith("ppl_")], "tasks": [c for c in columns if c.startswith("acc_")]}
        if name not in group and name not in columns:
            raise SystemExit(f"unknown metric {name!r}; choose from ppl, tasks, {', '.join(columns)}")
        chosen += group.get(name, [name])
    return [c for c in columns if c in chosen]


def evaluate_metrics(model, tokenizer, protocol: dict, metrics: list[str], batch_size: int) -> tuple[dict, dict]:
    """(values, seconds) of the requested columns."""
    values, seconds = {}, {}
    for corpus, window, limit in protocol["ppl"]:
        name = f"ppl_{corpus}_{window}"
        if name in metrics:
            start = time.perf_counter()
            result = perplexity(model, tokenizer, corpus, seq_len=window, limit_windows=limit, batch_size=batch_size, progress=False)
            values[name], values[f"windows_{corpus}_{window}"] = result.ppl, result.windows
            seconds[name] = time.perf_counter() - start
    tasks = [t for t in protocol["tasks"] if f"acc_{t}" in metrics]
    if tasks:
        zs = zeroshot(model, tokenizer, tasks, limit=protocol["task_limit"], batch_size=batch_size, per_item=True)
        for name, task in zs.tasks.items():
            values[f"acc_{name}"], values[f"n_{name}"] = task.reported, task.n
            # each document's 0/1 outcome in doc order, so rows can be compared pairwise (report.py)
            values[f"items_{name}"] = "".join(str(int(v)) for v in task.per_item)
        seconds["tasks " + ",".join(tasks)] = zs.seconds
    return values, seconds


def table_order(data: dict) -> list[dict]:
    """Rows by ratio, then reconstruction, then method in the sweep's order (dense first): files filled across
    several runs list rows in the order they were computed."""
    order = {m: i for i, m in enumerate([None, *SWEEP_METHODS])}
    return sorted(data["rows"], key=lambda r: (r.get("ratio") or 0, r.get("reconstruct") or "", order.get(r.get("method"), 99),
                                             r.get("samples") or 0, r["key"]))


def with_average(row: dict, tasks: list[str]) -> dict:
    if tasks and all(f"acc_{t}" in row for t in tasks):
        return {**row, "average": sum(row[f"acc_{t}"] for t in tasks) / len(tasks)}
    return row


COUNTS = {5: "five", 6: "six"}


def render(data: dict) -> str:
    p = data["protocol"]
    ppl_cols = [f"ppl_{c}_{w}" for c, w, _ in p["ppl"]]
    acc_cols = [f"acc_{t}" for t in p["tasks"]] + (["average"] if p["tasks"] else [])
    searched = any("search_s" in r for r in data["rows"])  # the allocation search's own time, beside the scoring's
    columns = ["row", "achieved ratio", "scoring s", *(["search s"] if searched else []), *ppl_cols, *acc_cols]
    rows = [[r["key"], r.get("achieved_ratio"), r.get("scoring_s"), *([r.get("search_s")] if searched else []),
             *(r.get(c) for c in ppl_cols + acc_cols)] for r in (with_average(r, p["tasks"]) for r in table_order(data))]
    ppl = "; ".join(f"{c} at {w} tokens, {'all' if n is None else f'first {n}'} windows" for c, w, n in p["ppl"]) or "none"
    subset = "full sets" if p["task_limit"] is None else f"first {p['task_limit']} items each"
    tasks = (f"{', '.join(p['tasks'])} ({subset}; acc_norm for ARC, PIQA, OBQA, acc for BoolQ, WinoGrande; "
             f"average = mean of these {COUNTS[len(p['tasks'])]}, not the 7-task average: no HellaSwag is bundled)") if p["tasks"] else "none"
    cal = p["calibration"]
    return (f"# Quality: {p['table']} table, {p['model']}\n\nCalibration: {cal['samples']} windows of {cal['seq_len']} tokens "
            f"from the bundled C4 train sample, seed {cal['seed']}, the same for every row (ablation rows vary N). "
            f"Perplexity: {ppl}. Zero-shot: {tasks}.\n\n" + provenance(data) + "\n" + markdown_table(columns, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=list(PROTOCOLS), default="sweep")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratios", default=None, help="comma list (main: 0.2,0.3; full-tasks: 0.2,0.3,0.4; sweep, ablation: 0.1,0.2,0.3,0.4)")
    parser.add_argument("--reconstruct", default="none,sequential", help="sweep: reconstruction modes, comma list")
    parser.add_argument("--only", default=None, help="comma list of methods, or of row keys, to run now (others stay for a later run)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (C4 train)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling", default="documents", choices=("documents", "spans"),
                        help="calibration windows: one per document (the seeds', default) or spans (the committed "
                             "tables' protocol, which records no sampling)")
    parser.add_argument("--ppl-limit", type=int, default=None, help="override: first N perplexity windows (smoke tests)")
    parser.add_argument("--task-limit", type=int, default=None, help="override: first N items per task (smoke tests)")
    parser.add_argument("--metrics", default=None, help="columns to fill now: ppl, tasks, or names like ppl_ptb_128,acc_piqa "
                        "(default: all; the rest stay for a later run)")
    parser.add_argument("--no-tasks", action="store_true", help="same as --metrics ppl")
    parser.add_argument("--score-cache", default=str(SCORE_CACHE),
                        help="scores shared by rows (and tables) with the same method, objective, form and calibration")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new rows after this long")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    protocol = {k: (list(v) if isinstance(v, list) else v) for k, v in PROTOCOLS[args.table].items()}
    if args.ppl_limit is not None:
        protocol["ppl"] = [[c, min(w, args.seq_len * 2), args.ppl_limit] for c, w, _ in protocol["ppl"]]
    if args.task_limit is not None:
        protocol["task_limit"] = args.task_limit
    # The tables committed before the seeds' document sampling became the default drew spans and record no
    # sampling: their protocol (and score-cache names) stay as they were, so they resume with --sampling spans.
    calibration = {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                   **({"sampling": args.sampling} if args.sampling != "spans" else {})}
    protocol.update(table=args.table, model=args.model, calibration=calibration)
    metrics = chosen_metrics(protocol, "ppl" if args.no_tasks else args.metrics)
    default_ratios = {"main": "0.2,0.3", "full-tasks": "0.2,0.3,0.4"}.get(args.table, "0.1,0.2,0.3,0.4")
    ratios = [float(r) for r in (args.ratios or default_ratios).split(",")]
    output = Path(args.output or RESULTS / f"quality-{args.table}.json")
    results = ResultsFile(output, protocol)
    command = " ".join(["python", *map(shlex.quote, sys.argv)])
    cache = ScoreCache(Path(args.score_cache), args.model, command)

    model, tokenizer, source = load_model(args.model)
    started = time.perf_counter()
    for spec in table_rows(args.table, ratios, args.reconstruct.split(","), model.config.num_hidden_layers):
        key = row_key(spec)
        row = results.get(key) or {"key": key, **spec}
        missing = [m for m in metrics if m not in row]
        if not missing or not chosen_row(spec, args.only):
            continue
        if args.max_minutes and (time.perf_counter() - started) / 60 > args.max_minutes:
            print(f"stopping after {args.max_minutes} minutes; rerun the same command to continue", flush=True)
            break
        if spec["method"] is None:
            subject = model
        else:
            kwargs = prune_arguments(spec, calibration)
            subject, report, scoring_s = cache.prune(model, tokenizer, source, kwargs)
            # every column of a row must come from one pruned model: a refill whose selection differs (new
            # scores, changed code) would pair one model's perplexity with another's accuracy
            kept = kept_digest(report.manifest)
            if row.get("kept_digest", kept) != kept:
                raise SystemExit(f"{key}: this run kept other neurons than the run that filled {sorted(k for k in row if k.startswith(('ppl', 'acc')))}; "
                                 f"remove the row from {output} to measure it afresh")
            row.update(achieved_ratio=report.manifest["allocation"]["achieved_ratio"], kept_digest=kept)
            row.setdefault("scoring_s", scoring_s)  # the first measurement: a refill may run on a busier machine
            if report.manifest["reconstruction"]["mode"] != "none":
                row.setdefault("reconstruction_s", report.manifest["timings_s"]["reconstruction"])
            if "search" in report.manifest["timings_s"]:
                row.setdefault("search_s", report.manifest["timings_s"]["search"])
        values, seconds = evaluate_metrics(subject, tokenizer, protocol, missing, args.batch_size)
        row.update(values)
        row.setdefault("eval_s", {}).update(seconds)
        row.setdefault("filled_by", []).append({"command": command, "at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "metrics": missing})
        print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items() if k.startswith(("ppl", "acc"))}, flush=True)
        results.put(row)
        output.with_suffix(".md").write_text(render(results.data))
        if subject is not model:
            del subject
            gc.collect()
    output.with_suffix(".md").write_text(render(results.data))
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

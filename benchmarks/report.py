"""The "Latest results" tables of benchmarks/RESULTS.md, rendered from results/*.json.

    python benchmarks/report.py           # rewrite the block between the report markers in benchmarks/RESULTS.md
    python benchmarks/report.py --check   # exit 1 if that block no longer matches the results files

Only the tables are generated; the prose around them is written by people. Each table links the results file
whose per-table markdown (written by quality.py, cost.py, speed.py) has every column and the provenance.
The paired comparisons use the per-item outcomes that quality.py keeps (`items_<task>`): every row answers
the same documents, so a paired test is far tighter than comparing two accuracies with their own errors.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cost import FORWARD_METHODS, GRADIENT_METHODS, time_ratios  # noqa: E402
from quality import (  # noqa: E402
    FIVE_TASKS,  # noqa: E402
    SWEEP_METHODS,
    table_order,
)
from quality import TASKS as TASK_NAMES  # noqa: E402

from fidelprune.evaluation.paired import average_difference, paired_difference  # noqa: E402
from fidelprune.evaluation.tasks.loaders import boolq_docs  # noqa: E402
from fidelprune.utils import bundled_path  # noqa: E402

from common import RESULTS  # noqa: E402

PAGE = Path(__file__).parent / "RESULTS.md"  # the generated results page
START, END = "<!-- report:start (python benchmarks/report.py) -->", "<!-- report:end -->"
TITLES = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "piqa": "PIQA", "boolq": "BoolQ", "winogrande": "WinoGrande",
          "openbookqa": "OBQA"}
TASKS = [(task, TITLES[task]) for task in TASK_NAMES]  # (task, column title), in the protocol's order


def number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_stderr(acc: float, n: int) -> float:
    """lm-eval's standard error of a 0/1 mean: sqrt(p(1-p)/(n-1))."""
    return math.sqrt(acc * (1 - acc) / (n - 1))


def task_average(row: dict, tasks: list[tuple[str, str]] = TASKS) -> tuple[float, float] | None:
    """(mean accuracy over `tasks`, its standard error with the tasks taken as independent), once all have run."""
    if not all(f"acc_{t}" in row for t, _ in tasks):
        return None
    se = math.sqrt(sum(accuracy_stderr(row[f"acc_{t}"], row[f"n_{t}"]) ** 2 for t, _ in tasks)) / len(tasks)
    return sum(row[f"acc_{t}"] for t, _ in tasks) / len(tasks), se



@functools.cache
def boolq_labels() -> list[int]:
    return [doc["label"] for doc in boolq_docs(bundled_path("boolq/val.jsonl"))]


def boolq_yes_share(row: dict) -> float | None:
    """Share of BoolQ questions the model answered "yes", from its per-item outcomes: a right answer says the
    label, a wrong one the other choice (label 1 = "yes")."""
    items = row.get("items_boolq")
    if items is None:
        return None
    return sum(label if right == "1" else 1 - label for right, label in zip(items, boolq_labels())) / len(items)


TASK_COLUMNS = [*(title for _, title in TASKS), "average", "without BoolQ", "BoolQ \"yes\" %"]


def task_cells(row: dict) -> list[str]:
    """The TASK_COLUMNS cells, in points: the six accuracies, their average ± its standard error, the average of
    the five without BoolQ, and how often the model answered BoolQ "yes"; blanks for what has not run."""
    accs = [row.get(f"acc_{t}") for t, _ in TASKS]
    average = task_average(row)
    five = [a for a, (t, _) in zip(accs, TASKS) if t != "boolq"]
    five = five if None not in five else None  # shown once the five have run, BoolQ or not
    yes = boolq_yes_share(row)
    return [*(number(100 * a, 1) if a is not None else "" for a in accs),
            f"{100 * average[0]:.2f} ± {100 * average[1]:.2f}" if average else "",
            f"{100 * sum(five) / len(five):.2f}" if five else "", number(100 * yes, 1) if yes is not None else ""]


def has_tasks(row: dict) -> bool:
    return any(f"acc_{t}" in row for t, _ in TASKS)


def main_tables(data: dict) -> list[str]:
    out = ["**Main table** ([`results/quality-main.md`](results/quality-main.md)): perplexity over *all* windows of the "
           "WikiText-2 test set and the PTB validation set (as LLM-Pruner reports it) at 128 tokens, and WikiText-2 test "
           "again at 2048-token windows; calibration 64 x 256 C4-train tokens, seed 0. Empty cells have not run yet (see below).\n",
           table(["row", "achieved ratio", "scoring s", "WikiText-2 PPL @128", "PTB PPL @128", "WikiText-2 PPL @2048"],
                 [[r["key"], number(r.get("achieved_ratio"), 4), number(r.get("scoring_s"), 0), number(r.get("ppl_wikitext2_128"), 2),
                   number(r.get("ppl_ptb_128"), 2), number(r.get("ppl_wikitext2_2048"), 2)] for r in table_order(data)])]
    scored = table_order({"rows": [r for r in data["rows"] if has_tasks(r)]})
    if not scored:
        return out
    rows = [[r["key"], *task_cells(r)] for r in scored]
    out += ["\nZero-shot accuracy of the same rows (lm-evaluation-harness 0.4.13, full sets; acc_norm for ARC, PIQA, OBQA, "
            "acc for BoolQ and WinoGrande; the average is over these six, only where all six exist, ± its standard error). "
            "Rows not listed have not run yet.\n", table(["row", *TASK_COLUMNS], rows)]
    paired = paired_rows(data["rows"])
    if paired:
        out += ["\nPaired against CE Taylor (llm-pruner) at the same ratio, on the same items: accuracy difference in points, "
                "with the exact McNemar p-value in brackets; the averages' ± is the paired standard error of the mean "
                "difference over the six tasks, and over the five without BoolQ (whose answers a pruned model can flip "
                "wholesale). Only rows whose per-item outcomes were kept (zero-shot runs from 2026-11-24 on) can be paired.\n",
                table(PAIRED_COLUMNS, paired)]
    return out


PAIRED_COLUMNS = ["row", "vs", *(title for _, title in TASKS), "average difference", "without BoolQ"]


def points(mean_and_stderr: tuple[float, float]) -> str:
    mean, stderr = mean_and_stderr
    return f"{100 * mean:+.2f} ± {100 * stderr:.2f}"


def paired_rows(rows: list[dict]) -> list[list[str]]:
    """Each objective against CE Taylor at its ratio, where both rows kept every task's per-item outcomes."""
    out = []
    for row in table_order({"rows": rows}):
        base = next((r for r in rows if r.get("method") == "llm-pruner" and r.get("ratio") == row.get("ratio")), None)
        if row.get("method") in (None, "llm-pruner") or base is None:
            continue
        diffs = [paired_difference(row[f"items_{t}"], base[f"items_{t}"]) if f"items_{t}" in row and f"items_{t}" in base else None
                 for t, _ in TASKS]
        five = [d for d, (t, _) in zip(diffs, TASKS) if t != "boolq"]
        if None in five:  # BoolQ alone may be missing: the five-task difference is the one the goals use
            continue
        out.append([row["key"], base["key"], *(f"{100 * d.mean:+.1f} ({d.p_value:.2g})" if d else "" for d in diffs),
                    points(average_difference(diffs)) if None not in diffs else "", points(average_difference(five))])
    return out


def sweep_tables(data: dict) -> list[str]:
    dense = next(r for r in data["rows"] if r["key"] == "dense")
    ratios = sorted({r["ratio"] for r in data["rows"] if r.get("ratio")})
    out = []
    for mode, title in (("none", "no reconstruction"), ("sequential", "sequential reconstruction")):
        variants: dict[str, dict[float, dict]] = {}
        for r in data["rows"]:
            if r["key"] != "dense" and r.get("reconstruct") == mode and "ppl_wikitext2_512" in r:
                name = r["key"].replace(f" ratio={r['ratio']}", "").replace(f" reconstruct={mode}", "").replace("method=", "")
                variants.setdefault(name, {})[r["ratio"]] = r
        if not variants:
            continue
        plain = sorted((n for n in variants if " " not in n), key=lambda n: SWEEP_METHODS.index(n) if n in SWEEP_METHODS else 99)
        names = plain + sorted(n for n in variants if " " in n)
        out += [f"\n**Sweep, {title}** ([`results/quality-sweep.md`](results/quality-sweep.md)): WikiText-2 test PPL over its "
                f"first 64 windows of 512 tokens (dense: {number(dense['ppl_wikitext2_512'], 2)}); same calibration. Scoring "
                "time is the 20 % row's.\n",
                table(["method", "scoring s", *(f"{r:.0%}" for r in ratios)],
                      [[n, number(variants[n].get(0.2, {}).get("scoring_s"), 0),
                        *(number(variants[n].get(r, {}).get("ppl_wikitext2_512"), 2) for r in ratios)] for n in names])]
        if any(has_tasks(r) for v in variants.values() for r in v.values()):
            dense_average = task_average(dense)
            dense_note = f" (dense: {100 * dense_average[0]:.2f})" if dense_average else ""
            out += [f"\nZero-shot, {title}: average of the six tasks over their first 300 items each, in points{dense_note} "
                    "(blank until all six have run).\n",
                    table(["method", *(f"{r:.0%}" for r in ratios)],
                          [[n, *(f"{100 * task_average(variants[n][r])[0]:.2f}" if r in variants[n] and task_average(variants[n][r])
                                 else "" for r in ratios)]
                           for n in names])]
            paired = paired_rows([r for n in plain for r in variants[n].values()])
            if paired:
                out += [f"\nPaired against CE Taylor at the same ratio, {title}, on the same 300 items per task (as in the "
                        "main table's paired comparison; rows whose six tasks all kept per-item outcomes).\n",
                        table(PAIRED_COLUMNS, paired)]
    return out


def ablation_tables(data: dict, sweep: dict) -> list[str]:
    zero_shot = any(has_tasks(r) for r in data["rows"])
    note = " Zero-shot: the first 300 items of each task, in points." if zero_shot else ""

    def cells(row: dict) -> list[str]:
        return [number(row.get("scoring_s"), 0), number(row.get("ppl_wikitext2_512"), 2), *(task_cells(row) if zero_shot else [])]

    columns = ["scoring s", "WikiText-2 PPL", *(TASK_COLUMNS if zero_shot else [])]
    out = ["\n**Ablation** ([`results/quality-ablation.md`](results/quality-ablation.md)): the objective under one score form "
           f"(activation), hfprune's selection, 20 %; same slice as the sweep.{note}\n",
           table(["objective", *columns], [[r["objective"], *cells(r)] for r in data["rows"] if "objective" in r])]
    sized = [(r["samples"], r) for r in data["rows"] if "samples" in r]
    default = next((r for r in sweep["rows"] if r["key"] == "method=hfprune ratio=0.2 reconstruct=none"), None)
    if sized and default:
        out += ["\nCalibration size N (windows of 256 C4-train tokens, seed 0), hfprune (entropy objective, activation form: "
                "its defaults), 20 %; the N = 64 row is the sweep's.\n",
                table(["N", *columns], [[str(n), *cells(r)] for n, r in sorted(sized + [(64, default)], key=lambda x: x[0])])]
    recipe = [r for r in data["rows"] if r.get("reconstruct_select") == "obs"]
    if recipe:
        # the sweep's own recipe rows: the recipe itself (seed 0, 256 refit windows) at each ratio
        recipe += [r for r in sweep["rows"] if r.get("reconstruct_select") == "obs" and r["ratio"] in {x["ratio"] for x in recipe}]
        recipe.sort(key=lambda r: (r["ratio"], r.get("seed", 0), r.get("reconstruct_samples", 0), r.get("steps", 1)))
        out += ["\n`--recipe best` against its calibration windows (C4-train, 256 tokens each): the draw (seed) of the 64 "
                "scoring windows, on which the search runs (its in-loop refit too), and the final refit's windows: 256 "
                "drawn apart (seed + 1; the recipe, whose seed-0 rows are the sweep's) or the 64 scoring windows reused (the "
                "recipe before 2026-12-06); steps 4: iterative scores (`--steps 4`, each step re-scores the model pruned "
                "so far, the search then choosing among the last step's survivors). Seconds are from the sitting that measured each row: compare search and "
                "reconstruction with that row's scoring. Scores are hfprune's on the 64 windows of the row's seed. "
                "Zero-shot: the five tasks without BoolQ, first 300 items each, in points (blank where not run).\n",
                table(["ratio", "seed", "final refit windows", "steps", "scoring s", "search s", "reconstruction s", "WikiText-2 PPL",
                       "zero-shot without BoolQ"],
                      [[f"{r['ratio']:.0%}", str(r.get("seed", 0)),
                        f"{r['reconstruct_samples']} apart" if "reconstruct_samples" in r else "the 64 scoring windows",
                        str(r.get("steps", 1)), number(r.get("scoring_s"), 0), number(r.get("search_s"), 0), number(r.get("reconstruction_s"), 0),
                        number(r.get("ppl_wikitext2_512"), 2),
                        task_cells(r)[TASK_COLUMNS.index("without BoolQ")]]
                       for r in recipe if "ppl_wikitext2_512" in r])]
    return out


def full_task_tables(data: dict, main: dict) -> list[str]:
    """The sweep rows above `--recipe best` on the first 300 items (its contenders), run on the five tasks' full sets
    (no BoolQ), each paired against the recipe: the recipe's row from this table, or from the main table, whose
    recipe rows are the same models."""
    five = [(t, TITLES[t]) for t in FIVE_TASKS]

    def complete(row: dict) -> bool:
        return all(f"items_{t}" in row for t, _ in five)

    contenders = [r for r in table_order(data) if r.get("reconstruct_select") != "obs" and complete(r)]
    recipes = {r["ratio"]: (r, name) for name, d in (("main", main), ("full-tasks", data)) for r in d["rows"]
               if r.get("reconstruct_select") == "obs" and complete(r)}
    # (row, its results file, the recipe it is paired with): each ratio's recipe, then its contenders
    rows = [(*recipes[ratio], None) for ratio in sorted({r["ratio"] for r in contenders}) if ratio in recipes]
    rows += [(row, "full-tasks", recipes.get(row["ratio"], (None,))[0]) for row in contenders]
    if not rows:
        return []

    def cells(row: dict, results: str, recipe: dict | None) -> list[str]:
        mean, se = task_average(row, five)
        paired = "" if recipe is None else points(
            average_difference([paired_difference(recipe[f"items_{t}"], row[f"items_{t}"]) for t, _ in five]))
        return [row["key"], results, *(number(100 * row[f"acc_{t}"], 2) for t, _ in five), f"{100 * mean:.2f} ± {100 * se:.2f}", paired]

    sizes = ", ".join(f"{title} {rows[0][0][f'n_{t}']:,}" for t, title in five)
    return [f"\n**Zero-shot on the full sets** ([`results/quality-full-tasks.md`](results/quality-full-tasks.md)): at each ratio "
            "`--recipe best` and every sweep row whose five-task mean was above it on the first 300 items (its contenders, "
            f"quality.py's `ZERO_SHOT_CONTENDERS`), on every item of the five tasks without BoolQ ({sizes}), in points, with the sweep's prune "
            "settings and calibration (the prose below says how closely they match its models). The mean's ± takes the tasks "
            "as independent; paired: the recipe minus the row on the same items, ± the paired standard error of the five-task mean.\n",
            table(["row", "results", *(title for _, title in five), "mean", "recipe minus row, paired"],
                  [cells(*r) for r in sorted(rows, key=lambda r: (r[0]["ratio"], r[2] is not None))])]


def cost_tables(by_batch: list[tuple[dict, int]]) -> list[str]:
    rows = []
    for data, batch in by_batch:
        cells = {r["key"]: r for r in data["rows"]}
        for method in (*GRADIENT_METHODS, *FORWARD_METHODS):
            ours, ref = cells.get(f"{method}/fidelprune"), cells.get(f"{method}/reference")
            if not ours:
                continue
            floor = cells["forward+backward/floor" if method in GRADIENT_METHODS else "forward/floor"]
            over_floor, ref_over_ours = time_ratios(ours, floor, ref)
            rows.append([method, str(batch), number(ours["tokens_per_s"]), number(over_floor, 2),
                         number(ref_over_ours, 2), number(ours["extra_rss_bytes"] / 2**20, 0),
                         number(floor["extra_rss_bytes"] / 2**20, 0), number(ours["extra_rss_bytes"] / floor["extra_rss_bytes"], 2),
                         number(ref["extra_rss_bytes"] / 2**20, 0), number(ours["extra_rss_bytes"] / ref["extra_rss_bytes"], 2)])
    return ["\n**Scoring cost** ([`results/cost.md`](results/cost.md), batch 4; [`results/cost-batch1.md`](results/cost-batch1.md), "
            "batch 1): 4 x 256 C4 tokens, each cell in its own process; extra MiB = peak RSS during scoring minus RSS before it, "
            "from a second run of the cell with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`) so that freed "
            f"tensors leave RSS; tok/s from a run with the default allocator, the median of {by_batch[0][0]['protocol']['repeats']} passes; "
            "the floor is a bare forward+backward (forward for the forward-only methods) of the same batches at the same batch size, "
            "and memory / floor compares the two peaks; "
            + ("time / floor pairs each pass of a cell with a floor pass just before it in the same process (the median of "
               "the per-pass ratios); " if all(data["protocol"].get("paired_floor") for data, _ in by_batch) else
               "time / floor divides the two cells' times, measured in separate processes; ")
            + "the reference is "
            "`tests/reference.py`, one sequence at a time with full weight gradients.\n",
            table(["method", "batch", "tok/s", "time / floor", "reference time / ours", "extra MiB", "floor extra MiB",
                   "memory / floor", "reference extra MiB", "memory / reference"], rows)]


def speed_tables(data: dict) -> list[str]:
    p = data["protocol"]
    out = []
    for device in sorted({r.get("device", "cpu") for r in data["rows"]}):
        rows = [r for r in data["rows"] if r.get("device", "cpu") == device]
        base = next(r for r in rows if r["ratio"] == 0)
        out += [f"\n**Pruned-model speed** ([`results/speed.md`](results/speed.md)): {device.upper()}, {p['prompt_len']}-token "
                f"prefill and {p['new_tokens']} greedy decode steps at batch 1, median of {p['repeats']}; each model in its "
                "own process loading its saved checkpoint.\n",
                table(["target", "MLP width", "param MiB", "prefill tok/s", "decode tok/s", "peak MiB", "ideal speed-up",
                       "prefill speed-up", "decode speed-up"],
                      [[f"{r['ratio']:.0%}", str(r["width"]), number(r["param_bytes"] / 2**20), number(r["prefill_tokens_per_s"], 0),
                        number(r["decode_tokens_per_s"]), number(r["peak_memory_bytes"] / 2**20, 0),
                        number(base["param_bytes"] / r["param_bytes"], 2),
                        number(r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 2),
                        number(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)] for r in rows])]
    return out


def render(results: Path = RESULTS) -> str:
    def load(name: str) -> dict:
        return json.loads((results / f"{name}.json").read_text())

    sweep = load("quality-sweep")
    parts = [*main_tables(load("quality-main")), *sweep_tables(sweep), *ablation_tables(load("quality-ablation"), sweep),
             *full_task_tables(load("quality-full-tasks"), load("quality-main")),
             *cost_tables([(load("cost"), 4), (load("cost-batch1"), 1)]), *speed_tables(load("speed"))]
    return "\n".join(parts).strip()


def spliced(readme: str, tables: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"{PAGE} lacks the report markers: put {START} and {END} where the tables go")
    head, rest = readme.split(START, 1)
    return f"{head}{START}\n{tables}\n{END}{rest.split(END, 1)[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md's tables differ from the results files")
    args = parser.parse_args()
    readme = PAGE.read_text()
    updated = spliced(readme, render())
    if args.check:
        if updated != readme:
            sys.exit("benchmarks/RESULTS.md is out of date with results/: run python benchmarks/report.py")
        return
    PAGE.write_text(updated)


if __name__ == "__main__":
    main()

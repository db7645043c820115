"""`fidelprune report RUN_DIR`: a pruning run's per-layer table and plot, or an eval output's table."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.report import REPORT_PNG, RESULTS_JSON, plot_run, read_results, rich_table, run_summary
from ..layout import MANIFEST
from .common import console


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="plot a pruning run (kept width and scores per layer, the allocation search) or show eval results",
                       description="RUN_DIR with pruning.json: write a PNG of kept width and score distribution per "
                                   "layer. RUN_DIR with results.json (a `fidelprune eval` output): print its table.")
    p.add_argument("run_dir", help="a pruning output directory, or a `fidelprune eval` output directory")
    p.add_argument("--output", "-o", default=None, help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    from rich.table import Table

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

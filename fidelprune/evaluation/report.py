"""Render evaluation results (results.json -> markdown / rich table) and plot a pruning run (report.png)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import torch

from ..layout import SCORES_FILE, manifest_or_none, read_manifest, side_file
from ..outputs import atomic_directory_write, load_scores
from ..utils import library_versions
from .paired import PairedDifference, average_difference, paired_difference
from .perplexity import EvaluationError
from .zeroshot import lm_eval_version

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_PNG = "report.png"
SCHEMA = "fidelprune-eval/1"


# ------------------------------------------------------------------------------------------------ combine
def versions() -> dict:
    return {**library_versions(), "lm_eval": lm_eval_version()}


def combine(model: dict, baseline: dict | None, config) -> dict:
    """The results.json document: protocol, both models' results, the side-by-side rows, versions, seed."""
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": config.protocol(),
        "seed": config.seed,
        "model": model,
        "baseline": baseline,
        "comparison": comparison_rows(model, baseline),
        "versions": versions(),
    }


def _row(section: str, metric: str, kind: str, value, base, better: str | None = None, paired: dict | None = None) -> dict:
    """kind: ppl | acc | count | bytes | rate; better: lower | higher | None; paired: the delta's paired statistics."""
    both = value is not None and base is not None
    return {"section": section, "metric": metric, "kind": kind, "model": value, "baseline": base,
            "delta": value - base if both else None, "ratio": value / base if both and base else None, "better": better,
            "paired": paired}


def _paired(task: dict, other: dict | None) -> PairedDifference | None:
    """model minus baseline on the same documents, when both kept their per-document outcomes."""
    outcomes, other_outcomes = task.get("per_item"), (other or {}).get("per_item")
    if outcomes is None or other_outcomes is None or len(outcomes) != len(other_outcomes) or len(outcomes) < 2:
        return None
    return paired_difference(outcomes, other_outcomes)


def _speed_by_device(result: dict | None) -> dict:
    return {s["device"]: s for s in (result or {}).get("speed") or []}


def comparison_rows(model: dict, baseline: dict | None) -> list[dict]:
    """One row per number, model beside baseline, with delta and ratio."""
    base = baseline or {}
    rows = []
    for corpus, ppl in model["perplexity"].items():
        other = (base.get("perplexity") or {}).get(corpus)
        label = f"{corpus} PPL (seq {ppl['seq_len']}, {ppl['windows']}/{ppl['windows_available']} windows)"
        rows.append(_row("perplexity", label, "ppl", ppl["ppl"], other and other["ppl"], "lower"))
    zs, zs_base = model.get("zeroshot"), base.get("zeroshot") or {}
    if zs:
        differences = {}
        for task, result in zs["tasks"].items():
            other = (zs_base.get("tasks") or {}).get(task)
            difference = _paired(result, other)
            if difference is not None:
                differences[task] = difference
            for metric in ("acc", "acc_norm"):
                if metric in result["metrics"]:
                    reported = metric == result["reported_metric"]
                    label = f"{task} {metric}{'*' if reported else ''} (n={result['n']}/{result['n_available']})"
                    paired = ({"stderr": difference.stderr, "p_value": difference.p_value, "only_model": difference.only_a,
                               "only_baseline": difference.only_b} if reported and difference is not None else None)
                    rows.append(_row("zero-shot", label, "acc", result["metrics"][metric],
                                     other and other["metrics"].get(metric), "higher", paired))
        average = zs.get("average") or {}
        if average:
            other = (zs_base.get("average") or {}).get("value")
            label = f"{average['label']}* ({', '.join(average['tasks'])})"
            paired = None
            if all(task in differences for task in average["tasks"]):
                paired = {"stderr": average_difference([differences[task] for task in average["tasks"]])[1]}
            rows.append(_row("zero-shot", label, "acc", average["value"], other, "higher", paired))
    m, b = model["model"], base.get("model") or {}
    rows.append(_row("size", "parameters", "count", m["params"], b.get("params"), "lower"))
    rows.append(_row("size", f"parameter bytes ({m['dtype']})", "bytes", m["param_bytes"], b.get("param_bytes"), "lower"))
    if m.get("mlp_widths"):
        rows.append(_row("size", "MLP width, all layers", "count", sum(m["mlp_widths"]),
                         sum(b["mlp_widths"]) if b.get("mlp_widths") else None, "lower"))
    base_speed = _speed_by_device(baseline)
    for device, s in _speed_by_device(model).items():
        o = base_speed.get(device, {})
        rows.append(_row("speed", f"prefill tokens/s ({device}, batch {s['batch_size']} x {s['prompt_len']})", "rate",
                         s["prefill_tokens_per_s"], o.get("prefill_tokens_per_s"), "higher"))
        rows.append(_row("speed", f"decode tokens/s ({device}, batch {s['batch_size']}, {s['new_tokens']} tokens "
                         f"after {s['prompt_len']})", "rate", s["decode_tokens_per_s"], o.get("decode_tokens_per_s"), "higher"))
        if s.get("peak_memory_bytes") is not None:
            rows.append(_row("speed", f"peak memory ({device}, {s['peak_memory_kind']})", "bytes",
                             s["peak_memory_bytes"], o.get("peak_memory_bytes"), "lower"))
    return rows


# ------------------------------------------------------------------------------------------------- format
def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "ppl":
        return f"{value:.2f}"
    if kind == "acc":
        return f"{100 * value:.2f}"
    if kind == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if kind == "rate":
        return f"{value:,.1f}"
    return f"{value:,}"


def _fmt_delta(row: dict) -> str:
    delta = row["delta"]
    if delta is None:
        return "-"
    if row["kind"] == "acc":
        paired = row.get("paired")  # results.json files from before paired statistics have no such key
        return f"{100 * delta:+.2f} ± {100 * paired['stderr']:.2f} pt" if paired else f"{100 * delta:+.2f} pt"
    if row["kind"] == "bytes":
        return f"{delta / 2**20:+,.1f} MiB"
    if row["kind"] == "count":
        return f"{delta:+,}"
    return f"{delta:+,.2f}"


def _fmt_ratio(row: dict) -> str:
    return "-" if row["ratio"] is None else f"{row['ratio']:.3f}x"


def _fmt_p(row: dict) -> str:
    p_value = (row.get("paired") or {}).get("p_value")
    return "-" if p_value is None else f"{p_value:.2g}"


def _has_p_values(results: dict) -> bool:
    return any((r.get("paired") or {}).get("p_value") is not None for r in results["comparison"])


def column_labels(results: dict) -> tuple[str, str]:
    model = results["model"]["model"]
    return ("pruned" if model.get("pruning") else "model"), "dense"


def table_columns(results: dict) -> list[str]:
    """metric, baseline, model, delta, ratio, and the paired p-value where the zero-shot outcomes were paired."""
    model_label, base_label = column_labels(results)
    return ["metric", base_label, model_label, "delta", "ratio", *(["p (paired)"] if _has_p_values(results) else [])]


def table_rows(results: dict) -> list[list[str]]:
    p_values = _has_p_values(results)
    return [[r["metric"], _fmt(r["baseline"], r["kind"]), _fmt(r["model"], r["kind"]), _fmt_delta(r), _fmt_ratio(r),
             *([_fmt_p(r)] if p_values else [])] for r in results["comparison"]]


def _describe(model: dict) -> str:
    text = f"`{model['name']}` ({model['architecture']}, {model['params']:,} parameters, {model['dtype']})"
    pruning = model.get("pruning")
    if pruning:
        ratio = pruning.get("achieved_ratio")
        text += f", pruned by {pruning['method']}" + (f" ({ratio:.1%} of parameters removed)" if ratio is not None else "")
    return text


def protocol_lines(results: dict) -> list[str]:
    p, m = results["protocol"], results["model"]["model"]
    bos = "adds" if m.get("bos_added") else "does not add"
    lines = []
    if p["ppl"]:
        limit = f"first {p['limit_windows']} windows" if p["limit_windows"] else "all windows"
        lines.append(f"Perplexity: {', '.join(p['ppl'])}; non-overlapping {p['seq_len']}-token windows ({limit}); "
                     f"PPL = exp(mean next-token NLL); BOS only where the tokenizer adds one (this one {bos} a BOS).")
    if p["tasks"]:
        limit = f"first {p['limit']} documents of each task" if p["limit"] else "full sets"
        lines.append(f"Zero-shot: lm-evaluation-harness {p['lm_eval']}, 0-shot, lm-eval's prompts and metrics, "
                     f"bundled local data, {limit}; accuracies in %. `*` marks the metric each task reports "
                     "(acc_norm for ARC-e, ARC-c, OBQA, PIQA, HellaSwag; acc for BoolQ, WinoGrande); the average "
                     "covers the tasks listed in its row.")
        if _has_p_values(results):
            lines.append("Paired against the dense model on the same documents: the delta's ± is its paired standard "
                         "error (the average's takes the tasks as independent), and p is the two-sided exact McNemar "
                         "test on the documents exactly one of the two models answers right.")
    if p["speed"]:
        lines.append(f"Speed: median of {p['repeats']} runs after a warm-up; prefill = one forward of "
                     f"{p['speed_batch']} x {p['prompt_len']} tokens; decode = {p['new_tokens']} greedy steps with the "
                     "KV cache. CPU peak memory is the whole process's resident set.")
    lines.append(f"Seed {results['seed']}; versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()
                                                                  if k != "platform"))
    return lines


def to_markdown(results: dict, plot: str | None = None) -> str:
    model_label, base_label = column_labels(results)
    lines = ["# fidelprune eval", "", f"- {model_label}: {_describe(results['model']['model'])}"]
    if results.get("baseline"):
        lines.append(f"- {base_label}: {_describe(results['baseline']['model'])}")
    devices = [f"{s['device']} = {s['device_name']}" for s in results["model"].get("speed") or []]
    if devices:
        lines.append(f"- speed measured on: {'; '.join(devices)}")
    columns = table_columns(results)
    lines += ["", f"| {' | '.join(columns)} |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += [f"| {' | '.join(cells)} |" for cells in table_rows(results)]
    lines += ["", *protocol_lines(results)]
    if plot:
        lines += ["", f"![pruning run: kept width and scores per layer]({plot})"]
    return "\n".join(lines) + "\n"


def rich_table(results: dict):
    from rich.table import Table

    metric, *numbers = table_columns(results)
    table = Table(title="fidelprune eval")
    table.add_column(metric)
    for label in numbers:
        table.add_column(label, justify="right")
    section = None
    for row, cells in zip(results["comparison"], table_rows(results)):
        if section is not None and row["section"] != section:
            table.add_section()
        section = row["section"]
        table.add_row(*cells)
    return table


# ---------------------------------------------------------------------------------------------------- write
def write_results(results: dict, output: str | Path, *, overwrite: bool = False, run_dir: str | Path | None = None) -> Path:
    """results.json + results.md (+ report.png when `run_dir` is a pruning run), written atomically."""
    plot_from = Path(run_dir) if manifest_or_none(run_dir) is not None else None

    def write(tmp: Path) -> None:
        (tmp / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=str) + "\n")
        plot = None
        if plot_from is not None:
            plot_run(plot_from, tmp / REPORT_PNG)
            plot = REPORT_PNG
        (tmp / RESULTS_MD).write_text(to_markdown(results, plot))

    return atomic_directory_write(output, write, overwrite)


def read_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is it a `fidelprune eval` output directory?")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path} is not valid JSON ({err}); it was damaged: evaluate again") from err
    if not isinstance(results, dict) or "model" not in results:
        raise EvaluationError(f"{path} is not a fidelprune results.json (no 'model' section); evaluate again")
    return results


# ----------------------------------------------------------------------------------------------------- plot
def run_summary(run_dir: str | Path) -> list[dict]:
    """Per layer: width before, kept width, and score statistics over the neurons scored (-inf = removed by an
    earlier stage, left out)."""
    manifest = read_manifest(run_dir)
    kept = {int(k): v for k, v in manifest["kept_neurons"].items()}
    before = manifest["allocation"].get("layer_widths_before") or [manifest["allocation"]["width_before"]] * len(kept)
    scores = load_scores(run_dir) if side_file(run_dir, SCORES_FILE).is_file() else {}
    layers = []
    for i in range(len(before)) if manifest["allocation"].get("dropped_layers") else sorted(kept):
        if i not in kept:  # a layer dropped whole (--drop-layers)
            layers.append({"layer": i, "width_before": before[i], "kept": 0, "scores": None, "threshold": None})
            continue
        row = {"layer": i, "width_before": before[i], "kept": len(kept[i]), "scores": None, "threshold": None}
        if i in scores:
            s = scores[i].float()
            finite = torch.isfinite(s)
            row["scores"] = s[finite].tolist()
            kept_scores = s[torch.tensor(kept[i], dtype=torch.long)]
            kept_scores = kept_scores[torch.isfinite(kept_scores)]
            row["threshold"] = kept_scores.min().item() if len(kept_scores) else None
        layers.append(row)
    return layers


def plot_run(run_dir: str | Path, path: str | Path) -> Path:
    """PNG of a pruning run: kept vs original MLP width per layer, the score distribution per layer with the
    lowest kept score marked, and for `--allocation search` the KL of the parent and best child per generation."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    manifest = read_manifest(run_dir)
    layers = run_summary(run_dir)
    index = [row["layer"] for row in layers]
    have_scores = any(row["scores"] for row in layers)
    search = manifest["allocation"].get("search")
    rows = 1 + have_scores + (search is not None)
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.32 * len(layers) + 2), 3.5 * rows), squeeze=False)
    layer_axes = [axes[r][0] for r in range(1 + have_scores)]
    for ax in layer_axes[1:]:
        ax.sharex(layer_axes[0])
    ax = axes[0][0]
    ax.bar(index, [row["width_before"] for row in layers], color="#d9d9d9", label="before")
    ax.bar(index, [row["kept"] for row in layers], color="#3873b3", label="kept")
    ax.set_ylabel("MLP width")
    method, alloc = manifest["method"], manifest["allocation"]
    ax.set_title(f"{method.get('method')}: {alloc['width_before']:,} -> {alloc['width_after']:,} neurons, "
                 f"{alloc['achieved_ratio']:.1%} of parameters removed")
    ax.legend(loc="lower right")
    if have_scores:
        ax = axes[1][0]
        data = [row["scores"] or [math.nan] for row in layers]
        positive = all(v > 0 for row in layers for v in (row["scores"] or []))
        ax.boxplot(data, positions=index, widths=0.6, showfliers=False)
        thresholds = [(row["layer"], row["threshold"]) for row in layers if row["threshold"] is not None]
        if thresholds:
            ax.scatter(*zip(*thresholds), marker="_", s=120, color="#c0392b", label="lowest kept score", zorder=3)
            ax.legend(loc="upper right")
        ax.set_yscale("log" if positive else "symlog")
        ax.set_ylabel(f"score ({method.get('form', 'score')})")
    layer_axes[-1].set_xlabel("layer")
    if search is not None:
        ax = axes[-1][0]
        history = search["history"]
        ax.step([0] + [h["generation"] for h in history],
                [min(s["fitness"] for s in search["starts"])] + [h["fitness"] for h in history], where="post",
                color="#3873b3", label="parent")
        children = [(h["generation"], h["best_child_fitness"]) for h in history if h["best_child_fitness"] is not None]
        if children:
            ax.scatter(*zip(*children), s=14, color="#c0392b", label="best child", zorder=3)
        for start in search["starts"]:
            ax.annotate(start["name"], (0, start["fitness"]), fontsize=7, xytext=(3, 0), textcoords="offset points")
        ax.scatter([0] * len(search["starts"]), [s["fitness"] for s in search["starts"]], marker="x", color="#555555")
        ax.set_xlabel("generation")
        ax.set_ylabel("KL to dense, nats/token")
        ax.set_title(f"allocation search: {search['evaluations']} evaluations, final {search['final_fitness']:.4f}")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Each benchmark script runs end to end on a tiny random model, so none of them rots. No speed is asserted."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(BENCHMARKS / script), "--model", "tiny", *args], check=True, capture_output=True, text=True)


def test_cost_script_compares_fast_floor_and_reference(tmp_path):
    out = tmp_path / "cost.json"
    run("cost.py", "--samples", "2", "--seq-len", "16", "--methods", "hfprune,wanda-sp", "--in-process", "--output", str(out))
    data = json.loads(out.read_text())
    assert {r["key"] for r in data["rows"]} == {"forward+backward/floor", "forward/floor", "hfprune/fidelprune",
                                                "hfprune/reference", "wanda-sp/fidelprune", "wanda-sp/reference"}
    assert data["command"] and data["machine"]["cpu_count"] and data["versions"]["torch"]
    assert "| hfprune |" in out.with_suffix(".md").read_text()


def test_quality_script_fills_columns_across_runs_and_resumes(tmp_path):
    out = tmp_path / "q.json"
    args = ["--table", "sweep", "--samples", "2", "--seq-len", "32", "--ppl-limit", "2", "--task-limit", "2",
            "--ratios", "0.3", "--only", "hfprune", "--reconstruct", "none", "--output", str(out),
            "--score-cache", str(tmp_path / "cache")]
    run("quality.py", *args, "--metrics", "ppl")
    rows = json.loads(out.read_text())["rows"]
    assert [r["key"] for r in rows] == ["method=hfprune ratio=0.3 reconstruct=none",
                                        "method=hfprune ratio=0.3 reconstruct=none allocation=global",
                                        "method=hfprune ratio=0.3 reconstruct=none allocation=search",
                                        "method=hfprune ratio=0.3 reconstruct=none steps=4"]
    assert rows[0]["ppl_wikitext2_64"] > 1 and "acc_piqa" not in rows[0]
    assert rows[1]["scoring_s"] == rows[0]["scoring_s"] > 0  # the global row reused the uniform row's scores
    assert rows[2]["search_s"] > 0 and "search_s" not in rows[0]  # the search's own time, beside the scoring's
    run("quality.py", *args)  # fills the zero-shot columns of the same rows
    rows = json.loads(out.read_text())["rows"]
    assert rows[3]["scoring_s"] > 0 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # iterative scores: their own
    assert len(rows) == 4 and all(0 <= r["acc_piqa"] <= 1 and len(r["filled_by"]) == 2 for r in rows)
    assert all(len(r["items_piqa"]) == 2 and r["items_piqa"].count("1") / 2 == r["acc_piqa"] for r in rows)  # per item, for paired tests
    assert "| method=hfprune ratio=0.3 reconstruct=none |" in out.with_suffix(".md").read_text()
    run("quality.py", *args)  # resumes: nothing left to do, nothing duplicated
    data = json.loads(out.read_text())
    assert [len(r["filled_by"]) for r in data["rows"]] == [2, 2, 2, 2]
    # a refill whose pruned model kept other neurons must not pair its accuracy with the old perplexity
    data["rows"][0]["kept_digest"] = "0" * 16
    del data["rows"][0]["acc_piqa"]
    out.write_text(json.dumps(data))
    with pytest.raises(subprocess.CalledProcessError) as refused:
        run("quality.py", *args)
    assert "kept other neurons" in refused.value.stderr and "acc_piqa" not in json.loads(out.read_text())["rows"][0]


def test_speed_script_reports_dense_and_pruned(tmp_path):
    out = tmp_path / "speed.json"
    run("speed.py", "--repeats", "1", "--prompt-len", "16", "--new-tokens", "2", "--ratios", "0.3", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.3] and rows[1]["param_bytes"] < rows[0]["param_bytes"]


def test_search_cost_script_times_the_search_against_the_scoring_in_one_run(tmp_path):
    out = tmp_path / "sc.json"
    run("search_cost.py", "--samples", "8", "--seq-len", "16", "--ratios", "0.2,0.3", "--output", str(out))
    data = json.loads(out.read_text())
    assert [r["key"] for r in data["rows"]] == ["20%", "30%"] and len(data["scoring_s"]) == 2
    assert all(r["search_s"] > r["grams_s"] > 0 and r["evaluations"] >= 3 for r in data["rows"])  # the three starts at least
    assert "| search / scoring |" in out.with_suffix(".md").read_text()


def test_decode_cost_script_fits_the_fixed_part_over_widths(tmp_path):
    out = tmp_path / "dc.json"
    run("decode_cost.py", "--widths", "128,64", "--rounds", "2", "--steps", "2", "--prompt-len", "8", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["key"] for r in rows] == ["dense 256", "dense 256, aligned copy", "width 128", "width 64"]
    assert [r["width"] for r in rows] == [256, 256, 128, 64] and all(len(r["rounds_step_s"]) == 2 for r in rows)
    assert rows[1]["param_bytes"] > rows[2]["param_bytes"] > rows[3]["param_bytes"]
    assert all(r["contiguous"] and r["aligned_64"] for r in rows[1:])  # fresh copies and surgery's fresh weights
    assert "ms fixed** + parameter bytes" in out.with_suffix(".md").read_text()


def test_packing_script_compares_best_fit_with_in_order_packing(tmp_path):
    out = tmp_path / "packing.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "packing.py"), "--data", "alpaca", "--seq-lens", "64,128",
                    "--output", str(out)], check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["key"] for r in rows] == ["alpaca-64", "alpaca-128"]
    assert all(r["lower_bound_rows"] <= r["rows"] <= r["in_order_rows"] for r in rows)
    assert "best-fit decreasing" in out.with_suffix(".md").read_text()


def test_recovery_speed_script_pairs_each_recover_mode_with_its_bare_step(tmp_path):
    out = tmp_path / "rs.json"
    run("recovery_speed.py", "--steps", "1", "--rounds", "2", "--output", str(out))
    data = json.loads(out.read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"floor", "bare full", "bare lora", "bare full+teacher", "bare lora+teacher", "recover lora/ce",
                         "recover lora/kd", "recover full/ce", "recover full/kd"}
    assert all(len(r["rounds_tokens_per_s"]) == 2 and r["tokens_per_s"] > 0 for r in rows.values())
    assert data["protocol"]["lora_dropout"] == 0.0  # recovery's default, recorded
    line = next(line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| recover lora/kd |"))
    assert float(line.split("|")[3]) > 0  # paired with bare lora+teacher


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recovery_quality_script_follows_perplexity_over_checkpoints(tmp_path, tiny_dir, mode):
    pruned, out = tmp_path / "pruned", tmp_path / "rq.json"
    subprocess.run([sys.executable, "-m", "fidelprune.cli", "prune", str(tiny_dir), "--method", "magnitude", "--ratio", "0.001",
                    "--reconstruct", "none", "-o", str(pruned)], check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, str(BENCHMARKS / "recovery_quality.py"), str(pruned), "--tokens", "640", "--batch-size", "1",
                    "--seq-len", "64", "--eval-every", "4", "--ppl-windows", "2", "--ppl-seq-len", "32", "--data", "alpaca",
                    "--mode", mode, "--output", str(out)], check=True, capture_output=True, text=True)
    row = json.loads(out.read_text())["rows"][0]
    curve = row["curve"]
    assert [c["step"] for c in curve] == [0, 4, 8, 10] and row["finite"]
    assert 0 < curve[1]["tokens"] < curve[2]["tokens"] < curve[3]["tokens"] <= 640
    # every checkpoint's weights were loaded: training moved each point, so no two are the same model
    assert len({c["ppl"] for c in curve}) == 4
    assert "1.5 x dense" in out.with_suffix(".md").read_text()


def test_scale_script_compares_one_process_with_two(tmp_path, tiny_dir):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), str(tiny_dir), "--samples", "5", "--seq-len", "16",
                    "--method", "llm-pruner", "--ratio", "0.001", "--output", str(out)], check=True, capture_output=True, text=True)
    row = json.loads(out.read_text())["rows"][0]
    assert row["kept_identical"] and row["max_relative_score_difference"] < 1e-5
    assert row["data_parallel"]["processes"] == 2 and "| 2 | yes |" in out.with_suffix(".md").read_text()


def test_scale_script_compares_one_device_with_a_device_map(tmp_path, tiny_dir):
    out = tmp_path / "device-map.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), str(tiny_dir), "--part", "device-map", "--samples", "4",
                    "--seq-len", "16", "--ratio", "0.001", "--output", str(out)], check=True, capture_output=True, text=True)
    row = json.loads(out.read_text())["rows"][0]
    assert row["kept_identical"] and row["max_relative_score_difference"] < 1e-5 and row["max_weight_difference"] < 1e-5
    assert row["layers"] == "layers 0-1 on cpu" and row["device_map"]["lm_head"] == "cpu"


def test_scale_script_compares_whole_with_streamed_and_plans_large_models(tmp_path):
    out = tmp_path / "streaming.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), "tiny", "--part", "streaming",
                    "--samples", "2", "--seq-len", "16", "--cells", "hfprune/none", "--output", str(out)],
                   check=True, capture_output=True, text=True)
    row = json.loads(out.read_text())["rows"][0]
    assert row["kept_identical"] and row["max_relative_score_difference"] < 1e-5
    assert row["streamed"]["plan"]["mode"] == "streamed" and row["whole"]["plan"]["mode"] == "whole"
    plans = tmp_path / "plans.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), "--part", "plans", "--output", str(plans)],
                   check=True, capture_output=True, text=True)
    rows = {(r["model"], r["method"], r["mode"]): r for r in json.loads(plans.read_text())["rows"]}
    assert not rows["Llama-3.1-70B", "hfprune", "whole"]["fits_80GB"] and rows["Llama-3.1-70B", "hfprune", "streamed"]["fits_80GB"]


def benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def report_module():
    return benchmark_module("report")


def test_score_cache_keeps_iterative_scores_per_ratio_and_steps(tmp_path):
    cache = benchmark_module("common").ScoreCache(tmp_path, "smollm2", "test")
    row = {"method": "hfprune", "samples": 64, "seq_len": 256, "seed": 0}
    assert cache.path({**row, "ratio": 0.2}).name == "smollm2-hfprune-64-256-0.safetensors"  # the committed caches' name
    assert cache.path({**row, "ratio": 0.2}) == cache.path({**row, "ratio": 0.4}) == cache.path({**row, "ratio": 0.2, "steps": 1})
    iterative = {cache.path({**row, "ratio": r, "steps": k}) for r in (0.2, 0.4) for k in (2, 4)}
    assert len(iterative) == 4 and cache.path({**row, "ratio": 0.2}) not in iterative


def test_only_chooses_rows_by_method_or_by_whole_key():
    quality = benchmark_module("quality")
    spec = {"method": "hfprune", "ratio": 0.2, "steps": 4}
    assert quality.chosen_row(spec, None) and quality.chosen_row(spec, "flap,hfprune")
    assert quality.chosen_row(spec, "flap,method=hfprune ratio=0.2 steps=4")
    assert not quality.chosen_row(spec, "flap,method=hfprune ratio=0.2") and not quality.chosen_row(spec, "hfprune-x")


def test_recipe_rows_are_the_recipes_settings():
    from fidelprune.pruning import RECIPES

    rows = [r for table in ("main", "sweep", "ablation") for r in benchmark_module("quality").table_rows(table, [0.2], ["sequential"])
            if r.get("reconstruct_select")]
    # main, sweep, ablation: the refit on the scoring windows at 4 ratios, seeds 1 and 2 at 2; the recipe on
    # seeds 1 and 2 at 2; the recipe iterative
    assert len(rows) == 1 + 1 + 8 + 4 + 1
    recipe, on_scoring_windows = rows[:2] + rows[-5:], rows[2:-5]
    assert rows[-1]["steps"] == 4 and all("steps" not in r for r in rows[:-1])
    assert [r.get("seed", 0) for r in recipe] == [0, 0, 1, 2, 1, 2, 0]
    assert all({k: r[k] for k in RECIPES["best"]} == RECIPES["best"] for r in recipe)
    assert all({k: r[k] for k in RECIPES["best"]} == {**RECIPES["best"], "reconstruct_samples": None} for r in on_scoring_windows)


def test_full_task_rows_are_sweep_rows_on_the_five_tasks():
    quality = benchmark_module("quality")
    rows = [quality.row_key(r) for r in quality.table_rows("full-tasks", [0.2, 0.3, 0.4], ["none"])]
    sweep = [quality.row_key(r) for r in quality.table_rows("sweep", [0.2, 0.3, 0.4], ["none", "sequential"])]
    recipe = "method=hfprune ratio=0.4 reconstruct=sequential allocation=search reconstruct_select=obs reconstruct_samples=256"
    # each ratio's contenders, and the recipe where the main table (20 and 30 %) has not run it on the full sets
    assert rows == [*(key for r in (0.2, 0.3, 0.4) for key in quality.ZERO_SHOT_CONTENDERS[r]), recipe]
    # the same prune() arguments as sweep rows, so the same models (quality.py's kept_digest shows it)
    assert all(key in sweep for key in rows)
    main = [quality.row_key(r) for r in quality.table_rows("main", [0.2, 0.3], ["none"])]
    assert all(recipe.replace("ratio=0.4", f"ratio={r}") in main for r in quality.MAIN_RATIOS)
    protocol = quality.PROTOCOLS["full-tasks"]
    assert protocol["task_limit"] is None and "boolq" not in protocol["tasks"] and len(protocol["tasks"]) == 5


def test_zero_shot_contenders_are_the_sweep_rows_above_the_recipe():
    quality = benchmark_module("quality")
    sweep = json.loads((BENCHMARKS / "results" / "quality-sweep.json").read_text())["rows"]

    def five_task_correct(row: dict) -> int:  # a sum of correct items: means compared without float ties
        return sum(row[f"items_{t}"].count("1") for t in quality.FIVE_TASKS)

    for ratio, contenders in quality.ZERO_SHOT_CONTENDERS.items():
        rows = {r["key"]: r for r in sweep if r.get("ratio") == ratio and all(f"items_{t}" in r for t in quality.FIVE_TASKS)}
        recipe = rows.pop(quality.row_key({"method": "hfprune", "ratio": ratio, **quality.RECIPE_BEST}))
        above = sorted((k for k, r in rows.items() if five_task_correct(r) > five_task_correct(recipe)), key=lambda k: -five_task_correct(rows[k]))
        assert contenders == above, ratio


def test_readme_tables_match_the_committed_results():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_paired_rows_compare_each_objective_with_ce_at_its_ratio():
    report = report_module()
    items = {t: "1100" for t, _ in report.TASKS}
    rows = [{"key": "ce", "method": "llm-pruner", "ratio": 0.3, **{f"items_{t}": v for t, v in items.items()}},
            {"key": "hf", "method": "hfprune", "ratio": 0.3, **{f"items_{t}": "1111" for t in items}},
            {"key": "hf20", "method": "hfprune", "ratio": 0.2, **{f"items_{t}": "1111" for t in items}},  # no CE at 0.2
            {"key": "sdm", "method": "sdmprune", "ratio": 0.3}]  # no per-item outcomes: not paired
    (row,) = report.paired_rows(rows)
    assert row[:2] == ["hf", "ce"] and row[2] == "+50.0 (0.5)" and row[-1].startswith("+50.00 ± ")


def test_report_adds_zero_shot_columns_once_a_table_has_them(tmp_path):
    report = report_module()
    for path in (BENCHMARKS / "results").glob("*.json"):  # the committed results, less every zero-shot column
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            for column in [c for c in row if c.startswith(("acc_", "n_", "items_"))]:
                del row[column]
        (tmp_path / path.name).write_text(json.dumps(data))
    assert "ARC-e" not in report.render(tmp_path)
    scored = {**{f"acc_{t}": 0.5 for t, _ in report.TASKS}, **{f"n_{t}": 300 for t, _ in report.TASKS}}
    for name, key in (("quality-ablation", "method=hfprune ratio=0.2 objective=kd form=activation"),
                      ("quality-sweep", "method=flap ratio=0.3 reconstruct=none")):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        next(r for r in data["rows"] if r["key"] == key).update(scored)
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    text = report.render(tmp_path)
    assert "| kd | 125 | 85.48 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.00 ± 1.18 | 50.00 |  |" in text
    assert "| flap |  |  | 50.00 |  |" in text and "| ce | 80 | 88.76 |  |  |  |  |  |  |  |  |  |" in text

"""Each benchmark script runs end to end on a tiny random model, so none of them rots. No speed is asserted."""

import json
import subprocess
import sys
from pathlib import Path

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
                                        "method=hfprune ratio=0.3 reconstruct=none allocation=global"]
    assert rows[0]["ppl_wikitext2_64"] > 1 and "acc_piqa" not in rows[0]
    assert rows[1]["scoring_s"] == rows[0]["scoring_s"] > 0  # the global row reused the uniform row's scores
    run("quality.py", *args)  # fills the zero-shot columns of the same rows
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(0 <= r["acc_piqa"] <= 1 and len(r["filled_by"]) == 2 for r in rows)
    assert "| method=hfprune ratio=0.3 reconstruct=none |" in out.with_suffix(".md").read_text()
    run("quality.py", *args)  # resumes: nothing left to do, nothing duplicated
    assert [len(r["filled_by"]) for r in json.loads(out.read_text())["rows"]] == [2, 2]


def test_speed_script_reports_dense_and_pruned(tmp_path):
    out = tmp_path / "speed.json"
    run("speed.py", "--repeats", "1", "--prompt-len", "16", "--new-tokens", "2", "--ratios", "0.3", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.3] and rows[1]["param_bytes"] < rows[0]["param_bytes"]

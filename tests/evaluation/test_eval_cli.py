"""`fidelprune eval` and `fidelprune report` as a user runs them, on tiny models saved with the real tokenizer."""

import json

import pytest

from fidelprune.cli import main

from eval_helpers import save_tiny

QUICK = ["--tasks", "arc_easy,winogrande", "--limit", "2", "--ppl", "wikitext2", "--seq-len", "32", "--limit-windows",
         "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny dense model and a pruning run made from it by the CLI."""
    root = tmp_path_factory.mktemp("eval_cli")
    dense = save_tiny(root / "dense")
    pruned = root / "pruned"
    # 4 x 16 tokens: more than the 49 unknowns of each MLP's refit (the CLI refits by default)
    assert main(["prune", str(dense), "--method", "hfprune", "--keep", "32", "--round-to", "4", "--samples", "4",
                 "--seq-len", "16", "--output", str(pruned)]) == 0
    return dense, pruned


def test_eval_puts_pruned_beside_its_source_model(runs, tmp_path, capsys):
    dense, pruned = runs
    out = tmp_path / "results"
    assert main(["eval", str(pruned), *QUICK, "--output", str(out)]) == 0  # --baseline auto: pruning.json's source
    assert sorted(p.name for p in out.iterdir()) == ["report.png", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"]["model"]["source"]["path"] == str(dense)
    assert results["baseline"]["model"]["sha256_matches_source"] is True
    assert results["model"]["model"]["pruning"]["method"] == "hfprune"
    assert results["model"]["model"]["mlp_widths"] == [32, 32] and results["baseline"]["model"]["mlp_widths"] == [48, 48]
    protocol = results["protocol"]
    assert (protocol["limit"], protocol["limit_windows"], protocol["seq_len"], protocol["tasks"]) == (2, 2, 32, ["arc_easy", "winogrande"])
    for role in ("model", "baseline"):
        assert results[role]["perplexity"]["wikitext2"]["windows"] == 2
        assert results[role]["zeroshot"]["tasks"]["arc_easy"]["n"] == 2
        assert [s["device"] for s in results[role]["speed"]] == ["cpu"]
    rows = {r["metric"]: r for r in results["comparison"]}
    assert rows["MLP width, all layers"]["ratio"] == pytest.approx(32 / 48)
    markdown = (out / "results.md").read_text()
    assert "| metric | dense | pruned | delta | ratio |" in markdown and "![pruning run" in markdown
    assert "fidelprune eval" in capsys.readouterr().err  # the rich table


def test_eval_without_baseline_and_without_speed(runs, tmp_path):
    dense, _ = runs
    out = tmp_path / "alone"
    assert main(["eval", str(dense), *QUICK, "--tasks", "none", "--no-speed", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] is None and results["model"]["zeroshot"] is None and results["model"]["speed"] == []
    assert "report.png" not in [p.name for p in out.iterdir()]  # not a pruning run


@pytest.mark.parametrize("argv,message", [
    (["eval", "{dense}", "--baseline", "source"], "pruning.json"),
    (["eval", "{dense}", "--tasks", "mmlu"], "unknown task"),
    (["eval", "{dense}", "--tasks", "hellaswag"], "--hellaswag"),
    (["eval", "/no/such/model", "--tasks", "none"], "not found"),
    (["report", "{empty}"], "neither"),
])
def test_bad_input_gives_one_line_error(argv, message, runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(dense=runs[0], empty=empty) for a in argv]
    if argv[0] == "eval":
        argv += ["--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused_before_loading(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["eval", str(runs[1]), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_report_plots_a_pruning_run_and_shows_eval_results(runs, tmp_path, capsys):
    _, pruned = runs
    png = tmp_path / "plot.png"
    assert main(["report", str(pruned), "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "width before" in capsys.readouterr().err
    out = tmp_path / "results"
    assert main(["eval", str(pruned), *QUICK, "--tasks", "none", "--no-speed", "--baseline", "none", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "wikitext2 PPL" in capsys.readouterr().err

"""results.json -> side-by-side rows and markdown; a pruning run -> report.png."""

import json
import math

import pytest

import fidelprune
from fidelprune.evaluation import EvalConfig, plot_run, read_results, to_markdown, write_results
from fidelprune.evaluation.report import combine, comparison_rows, run_summary
from fidelprune.outputs import OutputExistsError

from conftest import tiny_model, tiny_windows


def fake_result(ppl: float, acc: float, params: int, rate: float, per_item: list[float] | None = None) -> dict:
    """The shape evaluate_model returns, with made-up numbers (no model is run)."""
    return {
        "model": {"name": "m", "architecture": "LlamaForCausalLM", "params": params, "param_bytes": 4 * params,
                  "dtype": "float32", "mlp_widths": [params // 100, params // 100], "bos_added": False},
        "perplexity": {"wikitext2": {"corpus": "wikitext2", "ppl": ppl, "mean_nll": 0.0, "seq_len": 128, "windows": 8,
                                     "windows_available": 2382, "tokens_scored": 1016}},
        "zeroshot": {"tasks": {"arc_easy": {"task": "arc_easy", "metrics": {"acc": acc, "acc_norm": acc - 0.1},
                                            "reported_metric": "acc_norm", "n": 20, "n_available": 2376,
                                            "per_item": per_item}},
                     "average": {"value": acc - 0.1, "tasks": ["arc_easy"], "label": "average of 1 tasks",
                                 "commonsense7": False}},
        "speed": [{"device": "cpu", "device_name": "cpu", "batch_size": 1, "prompt_len": 128, "new_tokens": 32,
                   "prefill_tokens_per_s": rate, "decode_tokens_per_s": rate / 10, "peak_memory_bytes": 2**20,
                   "peak_memory_kind": "process peak RSS (VmHWM)"}],
        "timings_s": {},
    }


def config() -> EvalConfig:
    return EvalConfig.build("wikitext2", "arc_easy", limit=20, limit_windows=8, speed_devices="cpu")


def test_rows_put_model_beside_baseline_with_delta_and_ratio():
    pruned, dense = fake_result(20.0, 0.5, 800, 300.0), fake_result(16.0, 0.6, 1000, 200.0)
    rows = {r["metric"]: r for r in comparison_rows(pruned, dense)}
    ppl = rows["wikitext2 PPL (seq 128, 8/2382 windows)"]
    assert (ppl["model"], ppl["baseline"], ppl["delta"], ppl["ratio"], ppl["better"]) == (20.0, 16.0, 4.0, 1.25, "lower")
    assert rows["arc_easy acc_norm* (n=20/2376)"]["delta"] == pytest.approx(-0.1)
    assert "arc_easy acc (n=20/2376)" in rows and "average of 1 tasks* (arc_easy)" in rows
    assert rows["parameters"]["ratio"] == 0.8
    assert rows["prefill tokens/s (cpu, batch 1 x 128)"]["ratio"] == 1.5
    alone = comparison_rows(pruned, None)
    assert all(r["baseline"] is None and r["delta"] is None for r in alone)


def test_markdown_states_the_protocol_and_the_numbers():
    results = combine(fake_result(20.0, 0.5, 800, 300.0), fake_result(16.0, 0.6, 1000, 200.0), config())
    results["model"]["model"]["pruning"] = {"method": "hfprune", "achieved_ratio": 0.2}
    text = to_markdown(results, "report.png")
    assert "| metric | dense | pruned | delta | ratio |" in text
    assert "| wikitext2 PPL (seq 128, 8/2382 windows) | 16.00 | 20.00 | +4.00 | 1.250x |" in text
    assert "| arc_easy acc_norm* (n=20/2376) | 50.00 | 40.00 | -10.00 pt | 0.800x |" in text
    assert "128-token windows (first 8 windows)" in text and "first 20 documents of each task" in text
    assert "lm-evaluation-harness 0.4.13" in text and "![pruning run" in text
    assert results["protocol"]["limit"] == 20 and results["seed"] == 0 and "lm_eval" in results["versions"]


def test_zero_shot_deltas_are_paired_on_the_same_documents():
    # 20 documents: the dense model alone right on 6, the pruned alone right on 0, both right on 4
    dense_items, pruned_items = [1.0] * 10 + [0.0] * 10, [0.0] * 6 + [1.0] * 4 + [0.0] * 10
    pruned, dense = fake_result(20.0, 0.3, 800, 300.0, pruned_items), fake_result(16.0, 0.6, 1000, 200.0, dense_items)
    rows = {r["metric"]: r for r in comparison_rows(pruned, dense)}
    reported = rows["arc_easy acc_norm* (n=20/2376)"]["paired"]
    assert (reported["only_model"], reported["only_baseline"]) == (0, 6) and reported["p_value"] == 2 / 2**6
    assert reported["stderr"] == pytest.approx(math.sqrt((6 * 0.7**2 + 14 * 0.3**2) / 19 / 20))
    assert rows["arc_easy acc (n=20/2376)"]["paired"] is None  # per-document outcomes are kept for the reported metric
    assert rows["average of 1 tasks* (arc_easy)"]["paired"]["stderr"] == pytest.approx(reported["stderr"])
    text = to_markdown(combine(pruned, dense, config()))
    assert "| metric | dense | model | delta | ratio | p (paired) |" in text
    assert "| arc_easy acc_norm* (n=20/2376) | 50.00 | 20.00 | -30.00 ± 10.51 pt | 0.400x | 0.031 |" in text
    assert "| wikitext2 PPL (seq 128, 8/2382 windows) | 16.00 | 20.00 | +4.00 | 1.250x | - |" in text
    assert "exact McNemar" in text
    unpaired = to_markdown(combine(fake_result(20.0, 0.5, 800, 300.0), fake_result(16.0, 0.6, 1000, 200.0), config()))
    assert "p (paired)" not in unpaired and "McNemar" not in unpaired  # results without per-document outcomes


def test_write_results_is_atomic_and_refuses_a_full_directory(tmp_path):
    results = combine(fake_result(20.0, 0.5, 800, 300.0), None, config())
    out = write_results(results, tmp_path / "results")
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert read_results(out)["comparison"] == json.loads(json.dumps(results["comparison"]))
    with pytest.raises(OutputExistsError):
        write_results(results, out)
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no temporary directory left behind


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory):
    """A real (tiny) two-stage sdmprune run: its scores hold -inf for neurons stage 1 removed."""
    model = tiny_model("llama")
    pruned, report = fidelprune.prune(model, None, "sdmprune", keep=32, round_to=4, calibration_ids=tiny_windows(4, 16),
                                      progress=False)
    return fidelprune.save(pruned, None, report, tmp_path_factory.mktemp("runs") / "run")


def test_run_summary_and_plot(pruning_run, tmp_path):
    manifest = fidelprune.read_manifest(pruning_run)
    layers = run_summary(pruning_run)
    assert [row["kept"] for row in layers] == [len(v) for v in manifest["kept_neurons"].values()] == [32, 32]
    assert all(row["width_before"] == 48 for row in layers)
    for row in layers:  # the -inf of earlier stages are left out, and the threshold is a kept neuron's score
        assert all(s > float("-inf") for s in row["scores"]) and row["threshold"] in row["scores"]
    png = plot_run(pruning_run, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000

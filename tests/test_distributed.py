"""Data-parallel scoring (fidelprune/distributed.py): two CPU processes on the gloo backend, each scoring a share of
the windows, give the scores, kept neurons and refit weights of one process (to float rounding), for every score
form and objective, the forward statistics and the reconstruction Grams; processes that disagree stop at once;
under torchrun the CLI needs no flag and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fidelprune import prune
from fidelprune.distributed import DistributedError

from conftest import tiny_model, tiny_windows

# 7 windows: an uneven split (4 + 3) must give the single-process result too
CASES = {
    "hfprune (entropy, activation form) + sequential refit": dict(method="hfprune", reconstruct="sequential"),
    "sdmprune (ce, then kd under the stage-1 mask)": dict(method="sdmprune"),
    "llm-pruner element1": dict(method="llm-pruner", form="element1"),
    "llm-pruner element2 + parallel refit": dict(method="llm-pruner", form="element2", reconstruct="parallel"),
    "llm-pruner weight-element": dict(method="llm-pruner", form="weight-element"),
    "flap (means and variances, bias shift)": dict(method="flap"),
    "wanda-sp": dict(method="wanda-sp"),
    "minitron, global allocation + refit to the dense target": dict(
        method="minitron", allocation="global", reconstruct="sequential", reconstruct_target="dense"),
}


def _run_all(windows: torch.Tensor) -> dict:
    out = {}
    for name, options in CASES.items():
        model = tiny_model("llama-bias" if options["method"] == "flap" else "llama")
        pruned, report = prune(model, None, keep=24, calibration_ids=windows, batch_size=2, progress=False, **options)
        out[name] = {"scores": report.scores, "kept": report.manifest["kept_neurons"], "state": pruned.state_dict()}
    return out


def _worker(rank: int, world: int, init_file: str, result_file: str, disagree: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        windows = tiny_windows(7, 12, seed=rank if disagree else 0)
        try:
            result = _run_all(windows)
        except DistributedError as err:
            result = {"error": str(err)}
        if rank == 0 or disagree:
            torch.save(result, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, disagree: bool = False) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result"), disagree), nprocs=2, join=True)


def test_two_processes_give_the_scores_of_one(tmp_path):
    _spawn(tmp_path)
    together = torch.load(tmp_path / "result.0", weights_only=True)
    alone = _run_all(tiny_windows(7, 12, seed=0))
    for name in CASES:
        assert together[name]["kept"] == alone[name]["kept"], name
        for layer, score in alone[name]["scores"].items():
            other = together[name]["scores"][layer]
            finite = torch.isfinite(score)
            assert torch.equal(finite, torch.isfinite(other)), name
            assert torch.allclose(other[finite], score[finite], rtol=1e-5, atol=1e-6 * score[finite].abs().max()), name
        for key, weight in alone[name]["state"].items():
            assert torch.allclose(together[name]["state"][key], weight, rtol=1e-5, atol=1e-6), (name, key)


def test_processes_that_disagree_on_the_windows_stop_with_one_line(tmp_path):
    _spawn(tmp_path, disagree=True)
    for rank in (0, 1):
        error = torch.load(tmp_path / f"result.{rank}", weights_only=True)["error"]
        assert "disagree on the calibration windows" in error and "\n" not in error


def test_torchrun_needs_no_flag_and_only_rank_zero_writes(tiny_dir, tmp_path):
    from fidelprune.cli import main

    argv = ["prune", str(tiny_dir), "--keep", "24", "--samples", "7", "--seq-len", "16", "--method", "llm-pruner",
            "--form", "element2"]
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "fidelprune.cli", *argv, "-o", str(tmp_path / "two")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert main([*argv, "-o", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one output, no leftovers
    manifests = [json.loads((tmp_path / d / "pruning.json").read_text()) for d in ("one", "two")]
    assert manifests[0]["kept_neurons"] == manifests[1]["kept_neurons"]
    assert manifests[1]["data_parallel"]["processes"] == 2 and "data_parallel" not in manifests[0]
    one, two = (load_file(str(tmp_path / d / "fidelprune" / "scores.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(two[k], one[k], rtol=1e-5) for k in one)


@pytest.fixture(autouse=True)
def _single_threaded(monkeypatch):
    """Two processes on two cores: one torch thread each, as torchrun sets by default."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

"""SIGKILL at chosen moments of `prune` and of `recover`'s checkpoint write, in a real subprocess: no output that
looks complete, the input untouched, and the next run (resumed, for recover) ends exactly where an uninterrupted
one does. The child stops at the chosen moment by a wrapper around one function (it touches a marker file and
sleeps), so the kill lands there every time."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import start_stopped, tree_digest


def _kill_at(module: str, function: str, argv: list[str], marker: Path, call: int = 1) -> None:
    child = start_stopped(module, function, argv, marker, call)
    child.send_signal(signal.SIGKILL)
    child.communicate()


@pytest.mark.parametrize("module,function", [
    ("fidelprune.methods.base", "taylor_scores"),  # while scoring
    ("fidelprune.outputs", "save_scores"),  # mid-save: the weights are in the temporary folder already
])
def test_prune_killed_leaves_nothing_and_the_next_run_is_exact(module, function, tiny_dir, tmp_path):
    from fidelprune.cli import main

    before = tree_digest(tiny_dir)
    out = tmp_path / "out"
    argv = ["prune", str(tiny_dir), "--keep", "24", "--samples", "4", "--seq-len", "32", "-o", str(out)]
    _kill_at(module, function, argv, tmp_path / "marker")
    assert not out.exists() and tree_digest(tiny_dir) == before
    assert main(argv) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the leftovers were removed
    assert main([*argv[:-1], str(tmp_path / "clean")]) == 0
    kept = [json.loads((d / "pruning.json").read_text())["kept_neurons"] for d in (out, tmp_path / "clean")]
    assert kept[0] == kept[1]
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(tmp_path / "clean" / "model.safetensors")).keys()


def test_recover_killed_while_writing_a_checkpoint_resumes_exactly(tiny_dir, tmp_path):
    from fidelprune.cli import main

    data = tmp_path / "data.txt"
    data.write_text(" ".join(f"word{i % 37}" for i in range(3000)))
    common = ["recover", str(tiny_dir), "--data", str(data), "--max-steps", "6", "--save-every", "2", "--seq-len", "32",
              "--batch-size", "2", "--eval-windows", "0", "--lr", "1e-3"]
    before = tree_digest(tiny_dir)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = [*common, "-o", str(out), "--checkpoint-dir", str(ckpt)]
    _kill_at("fidelprune.recovery.checkpoints", "save_file", argv, tmp_path / "marker", call=2)  # writing step 4
    assert not out.exists() and tree_digest(tiny_dir) == before
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) == ["step-000002"]
    assert main([*argv, "--resume"]) == 0
    assert main([*common, "-o", str(tmp_path / "clean"), "--checkpoint-dir", str(tmp_path / "ckpt-clean")]) == 0
    resumed, clean = (load_file(str(d / "model.safetensors")) for d in (out, tmp_path / "clean"))
    assert resumed.keys() == clean.keys()
    assert all((resumed[k] == clean[k]).all() for k in clean)
    assert json.loads((out / "recovery.json").read_text())["training"]["resumed_at"] == [2]


def test_prune_killed_in_the_middle_of_an_overwrite_swap_keeps_the_previous_output(tiny_dir, tmp_path):
    """--overwrite moves the previous output aside, then renames the new one in: killed between the two, the next
    run to that output puts the previous one back before anything else (and then replaces it, as asked)."""
    from fidelprune.cli import main

    out = tmp_path / "out"
    argv = ["prune", str(tiny_dir), "--keep", "24", "--samples", "4", "--seq-len", "32", "--reconstruct", "none", "-o", str(out)]
    assert main(argv) == 0
    previous = tree_digest(out)
    _kill_at("fidelprune.outputs", "_rename", [*argv[:-2], "--keep", "16", "-o", str(out), "--overwrite"],
             tmp_path / "marker", call=2)
    assert not out.exists()  # moved aside, the new output not yet in: the moment the test is about
    assert main(["report", str(out)]) == 2  # a run that writes elsewhere leaves it alone...
    assert main([*argv[:-1], str(tmp_path / "other")]) == 0
    assert main([*argv, "--keep", "16"]) == 2  # ...the next run to it puts it back first, and refuses to overwrite
    assert tree_digest(out) == previous
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert main([*argv, "--keep", "16", "--overwrite"]) == 0
    assert json.loads((out / "pruning.json").read_text())["allocation"]["layer_widths_after"] == [16, 16]

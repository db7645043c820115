"""Faults a fair but unlucky user meets (issue 49): two runs to one output, an output that appears meanwhile, saving
over the folder a model came from, a checkpoint folder shared with the user's own files, Ctrl-C and SIGTERM.
Nothing is lost, and each ends with one line. Signals and the concurrent run are real, in subprocesses."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file

import fidelprune
from fidelprune.calibration import TOKENIZER_BYTES_PER_CHAR
from fidelprune.cli import main
from fidelprune.models import packaged_gguf
from fidelprune.outputs import OutputExistsError, OutputWriteError, atomic_directory_write, claimed
from fidelprune.recovery import checkpoints
from fidelprune.recovery.checkpoints import read_state

from conftest import start_stopped, tiny_model, tree_digest

PRUNE = ["prune", "{tiny}", "--keep", "24", "--samples", "4", "--seq-len", "32", "--reconstruct", "none"]


def _argv(template: list[str], tiny_dir: Path, *extra: str) -> list[str]:
    return [a.format(tiny=tiny_dir) for a in template] + list(extra)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_second_run_to_the_same_output_stops_at_once_naming_the_first(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = start_stopped("fidelprune.outputs", "save_scores", _argv(PRUNE, tiny_dir, "-o", str(out)), tmp_path / "m")
    try:
        # even with --overwrite: the first run owns the output until it has saved it
        assert main(_argv(PRUNE, tiny_dir, "-o", str(out), "--overwrite")) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"being written by another run (process {first.pid}" in error, error
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()
    assert main(_argv(PRUNE, tiny_dir, "-o", str(out))) == 0  # the killed run's lock and folder are taken over
    assert (out / "pruning.json").is_file() and _leftovers(tmp_path) == []


def test_claims_nest_in_one_process_and_end_with_the_block(tmp_path):
    out = tmp_path / "out"
    with claimed(out), claimed(out):  # a run claims its output, then its save claims it again
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
    assert _leftovers(tmp_path) == []
    with claimed(tmp_path / "new" / "deeper" / "out"):  # folders made for the lock, left empty: removed again
        assert (tmp_path / "new" / "deeper").is_dir()
    assert not (tmp_path / "new").exists()
    (tmp_path / ".out.lock").write_text("1\n")  # init, alive: another run holds it
    with pytest.raises(OutputExistsError, match="process 1"):
        with claimed(out):
            pass


def test_an_output_that_appears_while_writing_is_never_replaced(tmp_path):
    out = tmp_path / "out"

    def write(tmp: Path) -> None:
        (tmp / "new").write_text("this run")
        out.mkdir()  # someone else's output appears meanwhile
        (out / "theirs").write_text("keep me")

    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        atomic_directory_write(out, write)
    assert (out / "theirs").read_text() == "keep me" and not (out / "new").exists() and _leftovers(tmp_path) == []


def test_save_refuses_the_folder_the_model_was_loaded_from_whatever_loaded_it(tiny_dir, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(tiny_dir, source)
    before = tree_digest(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)  # not fidelprune.load_model: no source record
    pruned, report = fidelprune.prune(model, None, "magnitude", keep=24, progress=False)
    for target in (source, source / "inside"):
        with pytest.raises(OutputExistsError, match="would overwrite the input"):
            fidelprune.save(pruned, None, report, target, overwrite=True)
    assert tree_digest(source) == before
    fidelprune.save(pruned, None, report, tmp_path / "elsewhere")  # anywhere else is fine


def test_the_working_directory_and_a_link_loop_are_refused_as_outputs(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for output, message in ((".", "is the working directory"), (str(tmp_path.parent), "is the working directory"),
                            ("loop", "cannot use output loop")):
        assert main(_argv(PRUNE, tiny_dir, "-o", output, "--overwrite")) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


def test_checkpoint_retention_deletes_only_what_the_run_wrote(tiny_dir, tmp_path):
    checkpoints = tmp_path / "ckpt"
    for name in ("step-1-notes", "step-000001-mine", "notes"):  # the user's, with names like a step's
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "state.json").write_text("{}")
    argv = ["recover", str(tiny_dir), "--data", "c4", "--mode", "full", "--loss", "ce", "--max-steps", "4",
            "--save-every", "1", "--keep-last", "1", "--seq-len", "32", "--batch-size", "1", "--max-examples", "16",
            "--eval-windows", "0", "--checkpoint-dir", str(checkpoints), "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes", "step-000001-mine", "step-1-notes"]


@pytest.mark.parametrize("command,module,function,call,sig,code,kept", [
    ("prune", "fidelprune.methods.base", "taylor_scores", 1, signal.SIGINT, 130, None),  # while scoring
    ("prune", "fidelprune.outputs", "save_scores", 1, signal.SIGTERM, 143, None),  # while saving
    ("recover", "fidelprune.recovery.train", "_train_step", 3, signal.SIGINT, 130, "checkpoint kept at"),
])
def test_an_interrupt_ends_with_one_line_and_leaves_nothing_half_written(command, module, function, call, sig, code,
                                                                         kept, tiny_dir, tmp_path):
    before = tree_digest(tiny_dir)
    out = tmp_path / "out"
    if command == "prune":
        argv = _argv(PRUNE, tiny_dir, "-o", str(out))
    else:
        argv = ["recover", str(tiny_dir), "--data", "c4", "--mode", "full", "--loss", "ce", "--max-steps", "6",
                "--save-every", "1", "--seq-len", "32", "--batch-size", "1", "--max-examples", "16",
                "--eval-windows", "0", "-o", str(out)]
    child = start_stopped(module, function, argv, tmp_path / "m", call)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: interrupted by {signal.Signals(sig).name}; no output was written"), lines[-3:]
    assert "Traceback" not in err
    if kept:
        assert kept in lines[-1] and "--resume" in lines[-1]
        newest = lines[-1].split("checkpoint kept at ")[1].split(":")[0]
        assert json.loads((Path(newest) / "state.json").read_text())["step"] >= 1
    assert not out.exists() and _leftovers(tmp_path) == [] and tree_digest(tiny_dir) == before


def test_an_interrupted_overwrite_puts_the_previous_output_back_at_once(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(PRUNE, tiny_dir, "-o", str(out))) == 0
    before = tree_digest(out)
    argv = _argv(PRUNE, tiny_dir, "--keep", "16", "-o", str(out), "--overwrite")
    child = start_stopped("fidelprune.outputs", "_rename", argv, tmp_path / "m", call=2)  # between the swap's renames
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "Traceback" not in err
    assert tree_digest(out) == before and _leftovers(tmp_path) == []


def test_training_stops_at_the_first_non_finite_loss_keeping_only_good_checkpoints(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["recover", str(tiny_dir), "--data", "c4", "--mode", "full", "--loss", "ce", "--lr", "1e3", "--warmup-ratio",
            "0.5", "--max-grad-norm", "0", "--max-steps", "8", "--save-every", "1", "--keep-last", "8", "--seq-len", "32",
            "--batch-size", "1", "--max-examples", "16", "--eval-windows", "0", "-o", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged; lower --lr or clip gradients" in error and "no model was written" in error, error
    step = int(error.split("error: step ")[1].split(":")[0])
    kept = sorted((tmp_path / "out.checkpoints").iterdir())
    assert kept and all(read_state(p)["step"] <= step - 2 for p in kept)  # the diverged weights are not kept
    assert all(t.isfinite().all() for p in kept for t in load_file(str(p / "trainable.safetensors")).values())
    assert f"the last good checkpoint is kept at {kept[-1]}" in error
    assert not out.exists() and _leftovers(tmp_path) == []


def _damaged(tiny_dir: Path, where: Path, damage: str) -> Path:
    """A copy of the tiny checkpoint with one kind of damage."""
    shutil.copytree(tiny_dir, where)
    weights, config_path = where / "model.safetensors", where / "config.json"
    config = json.loads(config_path.read_text())
    if damage == "truncated":  # an interrupted download
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "more layers":  # config.json says 3 layers, the file holds 2
        config["num_hidden_layers"] = 3
    elif damage == "fewer layers":
        config["num_hidden_layers"] = 1
    elif damage == "other width":
        config["intermediate_size"] = 40
    elif damage == "no width":  # LlamaConfig's default width then disagrees with the file
        del config["intermediate_size"]
    elif damage == "string":
        config["hidden_size"] = "thirty-two"
    config_path.write_text(json.dumps(config))
    return where


@pytest.mark.parametrize("damage,message", [
    ("truncated", "is damaged or incomplete"),
    ("empty", "is damaged or incomplete"),
    ("more layers", "weights lack model.layers.2."),
    ("fewer layers", "that its config.json's model has no place for (1 layers)"),
    ("other width", "down_proj.weight has shape [32, 48], its config.json's model [32, 40]"),
    ("no width", "its config.json's model [32, 11008]"),
    ("string", "Field 'hidden_size' expected int, got str"),
])
def test_a_damaged_or_mismatched_checkpoint_is_one_line_before_any_weight_loads(damage, message, tiny_dir, tmp_path,
                                                                               capsys, monkeypatch):
    model = _damaged(tiny_dir, tmp_path / "model", damage)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded from a damaged checkpoint"))
    for argv in ([*_argv(PRUNE, model), "-o", str(tmp_path / "out")],
                 ["eval", str(model), "--baseline", "none", "--tasks", "none", "--no-speed", "--seq-len", "32",
                  "--limit-windows", "1",
                  "-o", str(tmp_path / "eval")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err), err[-3:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_a_tokenizer_the_embedding_cannot_hold_is_one_line_before_the_load(tmp_path, capsys, monkeypatch):
    gguf, model = packaged_gguf(), tmp_path / "small-vocab"
    tiny_model("llama", vocab_size=1000).save_pretrained(model)  # SmolLM2's 49,152-token tokenizer beside it
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded with a tokenizer they cannot embed"))
    for argv, message in (([*_argv(PRUNE, model), "-o", str(tmp_path / "out")],
                           "the tokenizer gives token id"),
                          (["eval", str(model), "--baseline", "none", "--tasks", "none", "--no-speed", "--seq-len", "32",
                            "-o", str(tmp_path / "eval")], "tokenizer has 49152 tokens and its embedding 1000 rows")):
        assert main(argv) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small-vocab"]


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs: room for one pruned tiny model (16 MiB with its tokenizer), not two. Mounting needs root
    (as on CI and these machines); elsewhere the patched-write tests below cover the same code."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_the_previous_output_survives(tiny_dir, small_disk, capsys, monkeypatch):
    out = small_disk / "out"
    assert main(_argv(PRUNE, tiny_dir, "-o", str(out))) == 0
    before = tree_digest(out)
    # known before the load: the pruned weights do not fit beside the previous output
    assert main(_argv(PRUNE, tiny_dir, "--keep", "16", "-o", str(out), "--overwrite")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: no space for output {out}: it needs about ") and "MiB free" in error, error
    # found while writing (the estimate said it fits): the disk fills, the run ends with one line
    monkeypatch.setattr("fidelprune.outputs.check_output_space", lambda output, needed: None)
    monkeypatch.setattr("fidelprune.pruning.check_output_space", lambda output, needed: None)
    assert main(_argv(PRUNE, tiny_dir, "--keep", "16", "-o", str(out), "--overwrite")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: no space left for output {out}: it needs about "), error
    assert "nothing was written and the previous output is unchanged" in error, error
    assert tree_digest(out) == before and _leftovers(small_disk) == []


@pytest.mark.parametrize("failure,message", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left for output {out}: it needs more than the 5.0 KiB"),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' own
     "no space left for output {out}: it needs more than the 5.0 KiB"),
    (OSError(errno.EIO, "Input/output error", "weights"), "cannot write output {out}: Input/output error (weights)"),
])
def test_the_file_system_refusing_a_write_is_one_line_and_loses_nothing(failure, message, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("keep me")

    def write(tmp: Path) -> None:
        (tmp / "part").write_bytes(bytes(5 * 1024))
        raise failure

    with pytest.raises(OutputWriteError) as caught:
        atomic_directory_write(out, write, overwrite=True)
    assert str(caught.value).startswith(message.format(out=out)) and "\n" not in str(caught.value), caught.value
    assert "the previous output is unchanged" in str(caught.value)
    assert (out / "previous").read_text() == "keep me" and _leftovers(tmp_path) == []


def test_an_output_its_disk_cannot_hold_is_refused_before_the_load(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fidelprune.outputs.free_bytes", lambda path: 1 << 20)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fidelprune.pruning.load_model", no_load)
    assert main(_argv(PRUNE, tiny_dir, "-o", str(tmp_path / "out"))) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "it needs about" in error and "its disk has 1.0 MiB free" in error, error


def test_a_checkpoint_the_disk_cannot_hold_ends_training_with_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    save_file, calls = checkpoints.save_file, []

    def fills_up(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, path)

    monkeypatch.setattr(checkpoints, "save_file", fills_up)
    out = tmp_path / "out"
    argv = ["recover", str(tiny_dir), "--data", "c4", "--mode", "full", "--loss", "ce", "--max-steps", "6",
            "--save-every", "1", "--keep-last", "8", "--seq-len", "32", "--batch-size", "1", "--max-examples", "16",
            "--eval-windows", "0", "-o", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    checkpoint_dir = tmp_path / "out.checkpoints"
    assert error.startswith(f"error: cannot write checkpoint step 3 in {checkpoint_dir}: the disk filled"), error
    assert f"the last complete checkpoint, {checkpoint_dir / 'step-000002'}, is kept" in error, error
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["step-000001", "step-000002"] and not out.exists()


_BOUNDED_CHILD = """
import resource, sys
from transformers import AutoTokenizer
from fidelprune.calibration import sample_windows
from fidelprune.models import packaged_gguf
from fidelprune.recovery.data import TokenStats, tokenize_text
gguf = packaged_gguf()
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
text = open(sys.argv[1], encoding="utf-8").read()
windows, record = sample_windows(tokenizer, sys.argv[1], 8, 64, sampling="documents")
examples = tokenize_text(tokenizer, [text], 256, TokenStats())
print(tuple(windows.shape), len(examples), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_huge_one_line_text_is_tokenized_in_bounded_pieces(tmp_path):
    words = "the model reads a line of calibration text that never ends and "
    big = tmp_path / "one-line.txt"
    big.write_text(words * (12_000_000 // len(words)), encoding="utf-8")  # 12 MB, no newline
    child = subprocess.run([sys.executable, "-c", _BOUNDED_CHILD, str(big)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    shape, examples, grown_mib = child.stdout.split(")")[0] + ")", *map(int, child.stdout.split(")")[1].split())
    assert shape == "(8, 64)" and examples > 8_000, (shape, examples)
    # tokenized whole, the tokenizer alone would hold about 12 MB x 125 bytes = 1.4 GiB
    whole_mib = 12_000_000 * TOKENIZER_BYTES_PER_CHAR / 2**20
    assert grown_mib < whole_mib / 3, (grown_mib, whole_mib)

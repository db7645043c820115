"""The CLI as a user runs it, on a tiny model saved with the real SmolLM2 tokenizer."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fidelprune.cli import main


def test_prune_cli_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", str(tiny_dir), "--method", "sdmprune", "--keep", "40", "--samples", "4", "--seq-len", "32",
                 "--round-to", "4", "--output", str(out)])
    assert code == 0
    manifest = json.loads((out / "pruning.json").read_text())
    assert manifest["calibration"]["samples"] == 4 and manifest["method"]["method"] == "sdmprune"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == manifest["allocation"]["width_after"]
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"]
    # re-prune at another ratio from the saved scores, without calibration
    again = tmp_path / "again"
    assert main(["prune", str(tiny_dir), "--method", "sdmprune", "--keep", "24", "--scores", str(out / "fidelprune" / "scores.safetensors"),
                 "--seq-len", "32", "--output", str(again)]) == 0
    assert set(json.loads((again / "pruning.json").read_text())["kept_neurons"]["0"]) <= set(manifest["kept_neurons"]["0"])


@pytest.mark.parametrize("argv,message", [
    (["prune", "/no/such/model"], "not found"),
    (["prune", "{tiny}", "--ratio", "1.5"], "ratio"),
    (["prune", "{tiny}", "--ratio", "0.05"], "unreachable"),
    (["prune", "{tiny}", "--ratio", "0"], "ratio"),
    (["prune", "{tiny}", "--keep", "40", "--calibration", "/no/such.jsonl"], "not found"),
    (["prune", "{tiny}", "--keep", "40", "--seq-len", "32", "--calibration", "{short}"], "fewer than"),
    (["prune", "{tiny}", "--keep", "40", "--allocation", "search", "--search-samples", "80"], "--search-samples 80 is more than the 64"),
])
def test_bad_input_gives_one_line_error_and_writes_nothing(argv, message, tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "out"
    argv = [a.format(tiny=tiny_dir, short=short) for a in argv] + ["--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["short.txt"]


def test_non_empty_output_is_refused_before_loading(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["prune", str(tiny_dir), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_the_old_method_name_activation_still_prunes(tiny_dir, tmp_path):
    out = tmp_path / "pruned"
    with pytest.warns(FutureWarning, match="minitron"):
        assert main(["prune", str(tiny_dir), "--method", "activation", "--keep", "40", "--samples", "4",
                     "--seq-len", "32", "--reconstruct", "none", "--output", str(out)]) == 0
    assert json.loads((out / "pruning.json").read_text())["method"]["method"] == "minitron"


def test_the_best_recipe_prunes_with_searched_widths_and_the_refit(tiny_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_dir), "--recipe", "best", "--keep", "40", "--round-to", "4", "--samples", "4",
                 "--seq-len", "32", "--search-generations", "1", "--output", str(out)]) == 0
    settings = json.loads((out / "pruning.json").read_text())["settings"]
    assert settings["method"]["method"] == "hfprune" and settings["allocation"]["kind"] == "search"
    assert settings["reconstruction"]["mode"] == "sequential" and settings["reconstruction"]["select"] == "obs"
    assert settings["reconstruction"]["samples"] == 256  # its final refit on windows of its own


def test_prune_location_is_the_cli_run_in_python(tiny_dir, tmp_path):
    """A Python user gets what `fidelprune prune` writes: the same model, the memory plan and the load time in
    pruning.json; a dry run plans and writes nothing; bad settings stop before the load as in the CLI."""
    import warnings

    import fidelprune
    from fidelprune.errors import ConfigError

    flags = ["--keep", "40", "--samples", "4", "--seq-len", "32", "--round-to", "4", "--reconstruct", "parallel"]
    assert main(["prune", str(tiny_dir), *flags, "--output", str(tmp_path / "cli")]) == 0
    config = fidelprune.PruneConfig.from_options(keep=40, samples=4, seq_len=32, round_to=4, reconstruct="parallel")
    run = fidelprune.prune_location(tiny_dir, config, tmp_path / "api", progress=False)
    assert run.output == tmp_path / "api" and len(run.memory_plans) == 1
    cli, api = (json.loads((tmp_path / name / "pruning.json").read_text()) for name in ("cli", "api"))
    assert api["kept_neurons"] == cli["kept_neurons"] and api["settings"] == cli["settings"]
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert api["memory_plan"]["peak_bytes"] == run.memory_plans[0].peak_bytes and api["timings_s"]["load"] > 0
    dry = fidelprune.prune_location(tiny_dir, config, tmp_path / "dry", dry_run=True)
    assert dry.output is None and dry.report is None and dry.memory_plans and not (tmp_path / "dry").exists()
    with pytest.raises(ConfigError, match="choose one"):
        fidelprune.prune_location(tiny_dir, config, tmp_path / "bad", offload="cpu", device_map="auto")
    # names that moved in 0.2 are still found where they were, with a warning that says where they went
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from fidelprune import checkpoint, pruning

        assert checkpoint.read_manifest(tmp_path / "api") == api and pruning.DEFAULT_RATIO == 0.2
    assert any("fidelprune.layout.read_manifest" in str(w.message) for w in caught)

import json

import pytest
import torch
from safetensors.torch import load_file

from fidelprune import OutputExistsError, load_scores, prune, read_manifest, save
from fidelprune.errors import ConfigError
from fidelprune.methods import SDMPRUNE_STAGE1_KEEP, sdmprune_defaults

from conftest import tiny_model, tiny_windows


def test_manifest_records_everything_needed_to_reproduce(tmp_path):
    model, windows = tiny_model("llama"), tiny_windows()
    pruned, report = prune(model, None, "hfprune", 0.2, calibration_ids=windows, round_to=4, progress=False)
    out = save(pruned, None, report, tmp_path / "run")
    manifest = read_manifest(out)
    assert manifest["method"]["objective"] == "entropy" and manifest["method"]["form"] == "activation"
    assert manifest["source_model"]["sha256"] and manifest["architecture"] == "llama"
    alloc = manifest["allocation"]
    assert alloc["target_ratio"] == 0.2 and alloc["width_after"] % 4 == 0
    assert alloc["params_before"] > alloc["params_after"]
    assert all(len(v) == alloc["width_after"] for v in manifest["kept_neurons"].values())
    assert {"torch", "transformers", "fidelprune"} <= manifest["versions"].keys()
    assert torch.equal(load_file(str(out / "fidelprune" / "calibration.safetensors"))["input_ids"], windows)
    assert set(load_scores(out)) == {0, 1}
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".run.tmp-*"))


def test_reprune_from_saved_scores_matches_scoring_afresh(tmp_path):
    model, windows = tiny_model("llama"), tiny_windows()
    pruned, report = prune(model, None, "llm-pruner", keep=40, calibration_ids=windows, progress=False)
    save(pruned, None, report, tmp_path / "a")
    _, fresh = prune(model, None, "llm-pruner", keep=24, calibration_ids=windows, progress=False)
    _, reused = prune(model, None, "llm-pruner", keep=24, scores=tmp_path / "a" / "fidelprune" / "scores.safetensors", progress=False)
    assert fresh.manifest["kept_neurons"] == reused.manifest["kept_neurons"]


def test_sdmprune_schedule_keeps_final_neurons_among_stage1_survivors():
    model, windows = tiny_model("llama", intermediate_size=80), tiny_windows()
    _, report = prune(model, None, "sdmprune", 0.2, calibration_ids=windows, round_to=1, progress=False)
    stage1, stage2 = report.manifest["stages"]
    assert stage1["keep"] == int(SDMPRUNE_STAGE1_KEEP * 80) and stage1["objective"] == "ce"
    alpha, temperature = sdmprune_defaults(report.manifest["allocation"]["achieved_ratio"])
    assert (stage2["alpha"], stage2["temperature"]) == (alpha, temperature) == (0.4, 0.2)
    for layer, kept in report.manifest["kept_neurons"].items():
        survivors = torch.topk(report.extra_scores[f"stage1.layer.{layer}"], stage1["keep"]).indices
        assert set(kept) <= set(survivors.tolist())
        assert torch.isinf(report.scores[int(layer)]).sum() == 80 - stage1["keep"]


def test_objective_and_form_compose_from_the_api():
    model, windows = tiny_model("qwen2"), tiny_windows()
    _, report = prune(model, None, "hfprune", 0.1, objective="ce", form="weight-element", calibration_ids=windows, progress=False)
    assert report.manifest["method"]["objective"] == "ce" and report.manifest["method"]["form"] == "weight-element"
    with pytest.raises(ValueError, match="unknown score form"):
        prune(model, None, "hfprune", 0.1, form="nope", calibration_ids=windows, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        prune(model, None, "nope", 0.1)


def test_refuses_non_empty_output_and_overwrites_only_when_asked(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    pruned, report = prune(model, None, "magnitude", 0.1, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save(pruned, None, report, out)
    assert (out / "keep.txt").read_text() == "user data"
    save(pruned, None, report, out, overwrite=True)
    assert not (out / "keep.txt").exists() and json.loads((out / "pruning.json").read_text())


def test_failed_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = tiny_model("llama")
    pruned, report = prune(model, None, "magnitude", 0.1, progress=False)
    monkeypatch.setattr("fidelprune.outputs.save_scores", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save(pruned, None, report, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_prune_config_and_the_keywords_give_the_same_run():
    from fidelprune import AllocationConfig, CalibrationConfig, MethodConfig, PruneConfig, ReconstructionConfig

    model, windows = tiny_model("llama"), tiny_windows()
    config = PruneConfig(MethodConfig("sdmprune", batch_size=2), CalibrationConfig(samples=6, seq_len=12),
                         AllocationConfig(round_to=4, ratio=0.2), ReconstructionConfig("sequential"))
    _, by_config = prune(model, None, config, calibration_ids=windows, progress=False)
    _, by_keywords = prune(model, None, "sdmprune", 0.2, batch_size=2, round_to=4, reconstruct="sequential",
                           samples=6, seq_len=12, calibration_ids=windows, progress=False)
    assert by_config.manifest["kept_neurons"] == by_keywords.manifest["kept_neurons"]
    assert by_config.manifest["settings"]["method"] == by_keywords.manifest["settings"]["method"]
    with pytest.raises(ConfigError, match="not both"):
        prune(model, None, config, ratio=0.3)


def test_a_recipe_fills_its_settings_and_refuses_contradictions():
    from fidelprune.errors import ConfigError
    from fidelprune.pruning import RECIPES, PruneConfig

    best = PruneConfig.from_options(recipe="best", ratio=0.3)
    assert (best.method.method, best.allocation.kind, best.reconstruction.mode, best.reconstruction.select,
            best.reconstruction.samples) == ("hfprune", "search", "sequential", "obs", 256)
    assert best == PruneConfig.from_options(**RECIPES["best"], ratio=0.3)  # nothing but its named settings
    assert best == PruneConfig.from_options("hfprune", 0.3, recipe="best", reconstruct="sequential")  # agreeing is fine
    plain = PruneConfig.from_options()
    assert (plain.method.method, plain.allocation.kind, plain.reconstruction.mode, plain.reconstruction.select,
            plain.reconstruction.samples) == ("hfprune", "uniform", "none", "scores", None)
    with pytest.raises(ConfigError, match="--recipe best sets --allocation search; drop --allocation uniform"):
        PruneConfig.from_options(recipe="best", allocation="uniform")
    with pytest.raises(ConfigError, match="--recipe best sets --reconstruct-select obs; drop --reconstruct-select scores"):
        PruneConfig.from_options(recipe="best", reconstruct_select="scores")
    with pytest.raises(ConfigError, match="--recipe best sets --reconstruct-samples 256; drop --reconstruct-samples 64"):
        PruneConfig.from_options(recipe="best", reconstruct_samples=64)
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        PruneConfig.from_options(recipe="fast")


def test_the_manifest_settings_rebuild_the_run(tmp_path):
    from fidelprune import PruneConfig

    model, tokenizer = tiny_model("qwen2"), None
    pruned, report = prune(model, tokenizer, "magnitude", keep=24, allocation="global", progress=False)
    save(pruned, None, report, tmp_path / "run")
    settings = read_manifest(tmp_path / "run")["settings"]
    assert settings["method"]["method"] == "magnitude" and settings["allocation"]["keep"] == 24
    _, again = prune(model, tokenizer, PruneConfig.from_dict(settings), progress=False)
    assert again.manifest["kept_neurons"] == report.manifest["kept_neurons"]


def test_prune_resolves_the_model_family_once(monkeypatch):
    """The adapted model is built once and handed to every stage (scoring, selection, refit, surgery)."""
    from fidelprune import adapters

    calls = []
    lookup = adapters.get_adapter
    monkeypatch.setattr(adapters, "get_adapter", lambda model: calls.append(model) or lookup(model))
    prune(tiny_model("llama"), None, "flap", 0.1, calibration_ids=tiny_windows(), reconstruct="sequential", progress=False)
    assert len(calls) == 1


def test_output_top_level_holds_only_what_engines_load(tmp_path):
    """vLLM loads every top-level *.safetensors as weights, and llama.cpp's converter reads the tokenizer with
    transformers 4: side files go to fidelprune/, the tokenizer class is one both transformers read."""
    from transformers import AutoTokenizer

    from fidelprune.models import packaged_gguf

    from conftest import tiny_model

    gguf = packaged_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    pruned, report = prune(model, tokenizer, "hfprune", keep=24, samples=2, seq_len=16, progress=False)
    out = save(pruned, tokenizer, report, tmp_path / "run")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert {p.name for p in (out / "fidelprune").iterdir()} == {"scores.safetensors", "calibration.safetensors"}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "Pruned models, <|im_start|>user\nhello<|im_end|>"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_outputs_of_the_old_layout_are_still_read(tmp_path):
    """Before side files moved to fidelprune/, scores.safetensors sat at the top level; --scores DIR finds both."""
    model = tiny_model("llama")
    pruned, report = prune(model, None, "magnitude", keep=40, progress=False)
    out = save(pruned, None, report, tmp_path / "run")
    (out / "fidelprune" / "scores.safetensors").rename(out / "scores.safetensors")
    (out / "fidelprune").rmdir()
    _, again = prune(model, None, "magnitude", keep=24, scores=out, progress=False)
    _, fresh = prune(model, None, "magnitude", keep=24, progress=False)
    assert again.manifest["kept_neurons"] == fresh.manifest["kept_neurons"]

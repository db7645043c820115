"""Model parallelism (--device-map, placement.py): a model dispatched by accelerate, every module behind the hooks
that move its inputs to its device, scores, refits, prunes, saves and evaluates exactly as the model on one device.

These machines have one device, so the maps put every module on the CPU; the dispatch path (accelerate's hooks on
every module, the layer-by-layer runs through them, the device each accumulator is made on) is the one a split over
GPUs takes. benchmarks/scale.py --part device-map runs the real split (cuda:0 + cpu) where a GPU is lent."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_streaming import CASES  # every score form and objective, as the streaming tests run them

from fidelprune import load_model, prune, save
from fidelprune.adapters import adapt
from fidelprune.cli import main
from fidelprune.errors import ConfigError
from fidelprune.placement import check_device_map, describe, device_map_of, layer_devices, place, resolve_device_map
from fidelprune.planner import plan_device_map, plan_memory
from fidelprune.pruning import PruneConfig

from conftest import tiny_model, tiny_windows, tree_digest


def per_module_map(model) -> dict[str, str]:
    """Every top-level module of the base model and the head as its own entry: the finest split accelerate's
    auto maps make (one hook per decoder layer)."""
    base = model.base_model_prefix
    names = [f"{base}.{name}" for name, _ in getattr(model, base).named_children() if name != "layers"]
    names += [f"{base}.layers.{i}" for i in range(model.config.num_hidden_layers)] + ["lm_head"]
    return dict.fromkeys(names, "cpu")


def placed(family: str = "llama", **overrides):
    model = tiny_model(family, **overrides)
    return place(model, per_module_map(model))


def _prune(model, options: dict):
    return prune(model, None, keep=24, calibration_ids=tiny_windows(5, 12), batch_size=2, progress=False, **options)


def _assert_same_run(run, reference):
    (model, report), (ref_model, ref_report) = run, reference
    assert report.manifest["kept_neurons"] == ref_report.manifest["kept_neurons"]
    for layer, score in ref_report.scores.items():
        finite = torch.isfinite(score)  # sdmprune marks stage 1's removals -inf
        assert torch.equal(torch.isfinite(report.scores[layer]), finite)
        assert torch.allclose(report.scores[layer][finite], score[finite], rtol=1e-5, atol=1e-6 * score[finite].abs().max())
    reference_state = ref_model.state_dict()
    for key, weight in model.state_dict().items():
        assert torch.allclose(weight, reference_state[key], rtol=1e-5, atol=1e-6), key


def test_place_dispatches_through_accelerate_hooks():
    model = placed()
    adapted = adapt(model)
    assert device_map_of(model) == per_module_map(model)
    assert all(hasattr(layer, "_hf_hook") for layer in adapted.layers)
    assert not any(p.device.type == "meta" for p in model.parameters())  # 'cpu' entries run there, never offloaded
    assert describe(device_map_of(model), model) == "layers 0-1 on cpu"
    assert [str(adapted.layer_device(i)) for i in range(adapted.num_layers)] == ["cpu", "cpu"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_placed_model_scores_refits_and_prunes_as_on_one_device(case):
    reference = _prune(tiny_model("llama"), CASES[case])
    model = placed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = _prune(model, CASES[case])
    _assert_same_run(run, reference)
    assert run[1].manifest["execution"]["mode"] == "device map"
    # the input is untouched and still placed: its hooks survive the layer-by-layer runs that replace forwards
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(hasattr(layer, "_hf_hook") and "forward" in vars(layer) for layer in adapt(model).layers)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_other_families_placed(family):
    """Gemma-2's soft-capped head and per-layer masks, Phi-3's fused gate_up, behind the hooks."""
    options = dict(method="hfprune", reconstruct="sequential")
    _assert_same_run(_prune(placed(family), options), _prune(tiny_model(family), options))


def test_flap_placed_with_its_bias_shift():
    _assert_same_run(_prune(placed("llama-bias"), {"method": "flap"}), _prune(tiny_model("llama-bias"), {"method": "flap"}))


def test_pruning_in_place_keeps_the_placement():
    model = placed()
    pruned, report = prune(model, None, "hfprune", keep=24, calibration_ids=tiny_windows(4, 12), inplace=True, progress=False)
    assert pruned is model and device_map_of(pruned) == per_module_map(model)
    logits = pruned(input_ids=tiny_windows(1, 8)).logits  # runs through the hooks after surgery
    assert torch.isfinite(logits).all()


def test_offloaded_weights_are_refused(tmp_path):
    """A model whose weights accelerate offloads (meta tensors between calls) cannot be scored: one line."""
    from accelerate import dispatch_model

    model = tiny_model("llama")
    device_map = {**per_module_map(model), "model.layers.1": "disk"}
    dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    with pytest.raises(ConfigError, match="offloaded by accelerate"):
        prune(model, None, "magnitude", keep=24, progress=False)


def test_streaming_a_placed_model_is_refused():
    model = placed()
    model.hf_device_map = {**model.hf_device_map, "lm_head": "cuda:0"}  # what a real split over two devices records
    with pytest.raises(ConfigError, match="use one or the other"):
        prune(model, None, "magnitude", keep=24, progress=False, stream_on="cpu")


# ------------------------------------------------------------------------------------------- resolving maps
def test_auto_maps_cover_the_model_from_its_shapes_alone():
    """accelerate's maps are made on the meta-device model preflight builds: no weight is needed."""
    from fidelprune.models import shape_model

    shapes = shape_model(tiny_model("llama").config).model
    visible = {f"cuda:{i}" for i in range(torch.cuda.device_count())} or {"cpu"}
    for kind in ("auto", "balanced", "sequential"):
        device_map = resolve_device_map(kind, shapes, torch.float32)
        assert set(device_map.values()) <= visible
        check_device_map(device_map, shapes)


def test_device_values_are_normalised_and_tied_weights_stay_together(monkeypatch):
    """accelerate's ints are CUDA indices; a tied head and the embeddings are one tensor, so one device. Two GPUs
    are pretended here (the map is only checked, never placed)."""
    model = tiny_model("llama", tie_word_embeddings=True)
    given = per_module_map(model)
    assert check_device_map(given, model) == given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device_map({**given, "model.layers.1": 1}, model)["model.layers.1"] == "cuda:1"
    with pytest.raises(ConfigError, match="'cuda:2' does not exist"):
        check_device_map({**given, "model.layers.1": "cuda:2"}, model)
    with pytest.raises(ConfigError, match="one tied weight"):
        check_device_map({**given, "lm_head": "cuda:0"}, model)


def test_layer_devices_follow_the_map():
    model = tiny_model("llama")
    device_map = {"model": "cpu", "lm_head": "cpu"}
    assert layer_devices(device_map, model) == ["cpu", "cpu"]


def test_the_plan_splits_weights_and_logits_by_device(monkeypatch):
    """Per device: the weights it holds, its layers' activations, and the logits on the head's device only. Two
    devices are faked by relabelling one map entry; the plan reads no device but the free memory."""
    from fidelprune import placement, planner

    model = tiny_model("llama")
    config = PruneConfig.from_options("hfprune", keep=24, samples=4, seq_len=32)
    whole = plan_memory(adapt(model), config, torch.float32, "cpu")
    device_map = {**per_module_map(model), "model.layers.1": "cuda:1", "model.norm": "cuda:1", "lm_head": "cuda:1"}
    monkeypatch.setattr(planner, "available_memory", lambda device: None)
    plans = {plan.device: plan for plan in plan_device_map(adapt(model), config, torch.float32, device_map)}
    assert set(plans) == {"cpu", "cuda:1"}
    assert plans["cpu"].parts["weights"] + plans["cuda:1"].parts["weights"] == whole.parts["weights"]
    assert plans["cpu"].parts["logits"] == 0 and plans["cuda:1"].parts["logits"] == whole.parts["logits"]
    assert plans["cpu"].parts["activations"] * 2 == whole.parts["activations"]
    assert all(plan.mode == "device map" for plan in plans.values())
    assert placement.head_device(device_map, model) == "cuda:1"


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.fixture()
def map_file(tmp_path, tiny_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(per_module_map(model)))
    return path


def test_cli_prune_and_eval_with_a_device_map(tiny_dir, map_file, tmp_path, capsys):
    common = "--keep 24 --samples 4 --seq-len 32 --reconstruct sequential"
    before = tree_digest(tiny_dir)
    assert main(f"prune {tiny_dir} {common} -o {tmp_path / 'one'}".split()) == 0
    assert main(f"prune {tiny_dir} {common} --device-map {map_file} -o {tmp_path / 'map'}".split()) == 0
    assert "device map: layers 0-1 on cpu" in capsys.readouterr().err
    assert tree_digest(tiny_dir) == before
    manifest = json.loads((tmp_path / "map" / "pruning.json").read_text())
    assert manifest["execution"]["mode"] == "device map" and manifest["memory_plan"]["mode"] == "device map"
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for key, weight in transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "map").state_dict().items():
        assert torch.allclose(weight, reference[key], rtol=1e-5, atol=1e-6), key
    out = tmp_path / "eval"
    argv = (f"eval {tmp_path / 'map'} --device-map {map_file} --baseline auto --ppl wikitext2 --seq-len 32 "
            f"--limit-windows 2 --tasks none --prompt-len 8 --new-tokens 4 --repeats 1 -o {out}")
    assert main(argv.split()) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["device"] for s in results["model"]["speed"]] == ["device map (cpu)"]


def test_dry_run_prints_one_plan_per_device(tiny_dir, map_file, tmp_path, capsys):
    assert main(f"prune {tiny_dir} --keep 24 --seq-len 32 --device-map {map_file} --dry-run -o {tmp_path / 'out'}".split()) == 0
    err = capsys.readouterr().err
    assert "memory plan (fidelprune prune --dry-run): cpu" in err and "device map on cpu" in err
    assert not (tmp_path / "out").exists()


def test_load_model_places_the_model(tiny_dir, map_file):
    model, _, _ = load_model(tiny_dir, device_map=map_file)
    assert device_map_of(model) == json.loads(map_file.read_text())
    pruned, report = prune(model, None, "magnitude", keep=24, progress=False)
    assert report.manifest["execution"]["layers"] == "layers 0-1 on cpu"


def test_save_writes_a_plain_checkpoint_from_a_placed_model(tmp_path):
    model = placed()
    pruned, report = prune(model, None, "magnitude", keep=24, progress=False)
    save(pruned, None, report, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not hasattr(loaded, "hf_device_map") or not loaded.hf_device_map
    for key, weight in pruned.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], weight), key

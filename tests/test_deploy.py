"""Export: every family's GGUF reads back to the same model (through transformers' own GGUF loader where it knows
the architecture, and through gguf's reader otherwise), per-layer widths become llama.cpp's `deci` architecture,
and `fidelprune export` writes files the engines' loaders take, checked, atomically."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from fidelprune.adapters import adapt
from fidelprune.cli import main
from fidelprune.deploy.check import TRANSFORMERS_GGUF_ARCHS
from fidelprune.deploy.gguf import GGUF_ARCH, ExportError, Template, read_gguf_state, target_arch, write_gguf
from fidelprune.layout import LayerShape, ModelShape

from conftest import FAMILIES, VOCAB, template_fields, tiny_model


def _template(model, path):
    arch = GGUF_ARCH[model.config.model_type]
    return Template(path, arch, template_fields(model.config, arch), not model.config.tie_word_embeddings)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _read_back(path, model):
    candidate = copy.deepcopy(model)
    candidate.load_state_dict(read_gguf_state(path, model), strict=False)
    if model.config.tie_word_embeddings:
        candidate.tie_weights()
    return candidate


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_round_trips_exactly_through_gguf(family, tmp_path):
    model = tiny_model(family)
    path = tmp_path / "model.gguf"
    written = write_gguf(model, _template(model, path), path, "f32")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(_read_back(path, model), ids), _logits(model, ids))
    if written["architecture"] in TRANSFORMERS_GGUF_ARCHS and not getattr(model.config, "mlp_bias", False):
        # an independent reader: transformers undoes llama.cpp's q/k permutation and Gemma's 1 + w norms itself
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        assert torch.equal(_logits(loaded.eval(), ids), _logits(model, ids))


def _uneven(family="llama"):
    """A tiny model whose layers keep 20 and 36 of their 48 neurons."""
    from fidelprune.surgery import remove_neurons

    model = tiny_model(family)
    remove_neurons(model, {0: torch.arange(0, 40, 2), 1: torch.arange(12, 48)})
    return model, adapt(model).widths()


def test_per_layer_widths_become_llama_cpps_deci_architecture(tmp_path):
    from gguf import GGUFReader

    model, widths = _uneven()
    path = tmp_path / "uneven.gguf"
    written = write_gguf(model, _template(model, path), path, "f32")
    reader = GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "deci" == written["architecture"]
    assert reader.fields["deci.feed_forward_length"].contents() == widths
    assert "deci.block_count" in reader.fields and not any(k.startswith("llama.") for k in reader.fields)
    down = {t.name: t.shape.tolist() for t in reader.tensors}["blk.0.ffn_down.weight"]
    assert down == [widths[0], model.config.hidden_size]  # GGUF lists the inner dimension first
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(_read_back(path, model), ids), _logits(model, ids))


def _shape(widths: list[int]) -> ModelShape:
    return ModelShape(32, tuple(LayerShape(w, 4, 2) for w in widths))


def test_families_without_a_per_layer_architecture_are_refused():
    assert target_arch("llama", _shape([8, 16])) == "deci" and target_arch("mistral", _shape([8, 16])) == "deci"
    assert target_arch("qwen2", _shape([16, 16])) == "qwen2"
    for model_type in ("qwen2", "gemma3_text", "phi3"):
        with pytest.raises(ExportError, match="one width for every layer"):
            target_arch(model_type, _shape([8, 16]))
    with pytest.raises(ExportError, match="supports the families"):
        target_arch("gpt2", _shape([8, 8]))


@pytest.mark.parametrize("outtype,types", [("f16", {"F16", "F32"}), ("bf16", {"BF16", "F32"}), ("q8_0", {"Q8_0", "F16", "F32"})])
def test_smaller_types_round_to_what_they_can_hold(outtype, types, tmp_path):
    """1-D tensors stay f32; Q8_0 takes rows that are whole 32-value blocks and f16 the rest (the uneven widths)."""
    model, _ = _uneven()
    path = tmp_path / f"m-{outtype}.gguf"
    written = write_gguf(model, _template(model, path), path, outtype)
    assert set(written["tensor_types"]) == types
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    reference, rounded = _logits(model, ids), _logits(_read_back(path, model), ids)
    error = ((rounded - reference).norm() / reference.norm()).item()
    assert 0 < error < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}[outtype]


def test_template_of_another_model_is_refused(tmp_path):
    model = tiny_model("llama")
    fields = template_fields(model.config, "llama")
    fields["llama.block_count"] = (30, *fields["llama.block_count"][1:])
    with pytest.raises(ExportError, match="30 layers, the model 2"):
        write_gguf(model, Template(tmp_path / "t.gguf", "llama", fields, False), tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="is a 'qwen2' GGUF"):
        write_gguf(model, Template(tmp_path / "t.gguf", "qwen2", template_fields(model.config, "qwen2"), False), tmp_path / "m.gguf")


# --------------------------------------------------------------------------------------------------- the CLI
PRUNE = "prune {src} --keep 24 --samples 4 --seq-len 32 --reconstruct none --method magnitude -o {out}"


@pytest.fixture(scope="module")
def source_gguf(tmp_path_factory, tiny_dir, tiny_template):
    """The tiny LLaMA as a GGUF with SmolLM2's vocabulary: a model pruned from it exports with no --template,
    as the packaged default does."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    path = tmp_path_factory.mktemp("source") / "tiny.gguf"
    write_gguf(model, Template.read(tiny_template), path, "f32")
    return path


@pytest.mark.slow  # ~80 s on two cores: two GGUF tokenizer conversions of SmolLM2's 49k vocabulary
def test_export_of_a_run_pruned_from_a_gguf_reuses_its_vocabulary(source_gguf, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(PRUNE.format(src=source_gguf, out=run).split()) == 0
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["export", str(run), "--outtype", "f32"]) == 0
    out = tmp_path / "run-f32.gguf"
    report = json.loads((tmp_path / "run-f32.gguf.export.json").read_text())
    assert report["written"]["template"] == str(source_gguf) and report["written"]["architecture"] == "llama"
    check = report["check"]
    assert check["passed"] and check["reader"] == "transformers GGUF loader" and check["top1_agreement"] == 1.0
    assert check["max_abs_logit_diff"] == 0.0
    assert "load check" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before  # the input is read only
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    source = GGUFReader(str(source_gguf))
    assert reader.fields["tokenizer.ggml.tokens"].contents() == source.fields["tokenizer.ggml.tokens"].contents()
    assert reader.fields["llama.feed_forward_length"].contents() == 24
    # an existing file is kept unless --overwrite
    assert main(["export", str(run), "--outtype", "f32"]) == 2
    assert main(["export", str(run), "--outtype", "q8_0", "-o", str(out), "--overwrite", "--no-check"]) == 0
    assert GGUFReader(str(out)).fields["general.file_type"].contents() == 7  # llama.cpp's MOSTLY_Q8_0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_of_per_layer_widths_is_checked_through_gguf_reader(tiny_dir, tiny_template, tmp_path):
    run = tmp_path / "run"
    assert main((PRUNE.format(src=tiny_dir, out=run) + " --protect-first 1").split()) == 0
    assert main(["export", str(run), "--template", str(tiny_template), "-o", str(tmp_path / "m.gguf")]) == 0
    report = json.loads((tmp_path / "m.gguf.export.json").read_text())
    assert report["written"]["architecture"] == "deci" and isinstance(report["written"]["feed_forward_length"], list)
    assert report["check"]["passed"] and report["check"]["reader"].startswith("gguf reader")


def test_vllm_export_of_per_layer_widths_is_nemotron_nas_and_loads_back(tiny_dir, tmp_path):
    """vLLM's DeciLMForCausalLM layout: LLaMA weight names, a width per block; fidelprune.load_model reads it back."""
    from fidelprune.deploy.configuration_decilm import DeciLMConfig
    from fidelprune.models import load_model

    run = tmp_path / "run"
    assert main((PRUNE.format(src=tiny_dir, out=run) + " --protect-first 1").split()) == 0
    out = tmp_path / "served"
    assert main(["export", str(run), "--to", "vllm", "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [48, 24]
    assert {b["attention"]["n_heads_in_group"] for b in config["block_configs"]} == {2}  # 4 heads, 2 kv heads
    assert "fidelprune_layer_widths" not in config
    parsed = DeciLMConfig.from_pretrained(out)  # what vLLM reads with trust_remote_code (the file in the folder)
    assert parsed.block_configs[1].ffn.intermediate_size == 24 and not parsed.block_configs[0].attention.no_op
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    served, _, _ = load_model(out)
    pruned, _, _ = load_model(run)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(served, ids), _logits(pruned, ids))


def test_a_failed_load_check_writes_nothing(tiny_dir, tiny_template, tmp_path, monkeypatch, capsys):
    from fidelprune.deploy import check

    run = tmp_path / "run"
    assert main(PRUNE.format(src=tiny_dir, out=run).split()) == 0
    monkeypatch.setitem(check.TOLERANCES, "f16", {"top1_agreement": 1.01, "ppl_ratio": 0.0})
    assert main(["export", str(run), "--template", str(tiny_template), "-o", str(tmp_path / "m.gguf")]) == 2
    assert "failed its load check" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_vllm_export_is_the_model_files_alone(tiny_dir, tmp_path):
    run = tmp_path / "run"
    assert main(PRUNE.format(src=tiny_dir, out=run).split()) == 0
    out = tmp_path / "served"
    assert main(["export", str(run), "--to", "vllm", "-o", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "pruning.json" not in names and "fidelprune" not in names
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # all vLLM globs as weights
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "served.export.json").read_text())["check"]["max_abs_logit_diff"] == 0.0
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    served = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(run).eval()
    assert np.array_equal(_logits(served, ids).numpy(), _logits(pruned, ids).numpy())


@pytest.mark.parametrize("kwargs,message", [
    (dict(to="onnx"), "--to 'onnx'"),
    (dict(outtype="q4_0"), "--outtype 'q4_0'"),
    (dict(check_windows=0), "--check-windows must be at least 1"),
    (dict(check_seq_len="128"), "--check-seq-len must be a whole number"),
])
def test_bad_export_settings_raise_config_error(kwargs, message):
    from fidelprune.deploy import ExportConfig
    from fidelprune.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ExportConfig(**kwargs)

"""The memory planner (fidelprune/planner.py): its activation count against what autograd really keeps, its
streamed plan, and the one-line stop, naming the flag that makes the run fit, before any weight loads."""

from __future__ import annotations

import pytest
import torch

from fidelprune.adapters import adapt
from fidelprune.calibration import text_memory
from fidelprune.cli import main
from fidelprune.planner import plan_memory
from fidelprune.pruning import PruneConfig
from fidelprune.scoring import leaf_embeddings
from fidelprune.utils import frozen_eval

from conftest import tiny_model

SHAPES = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=96)


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of a scoring forward (weights frozen, embedding
    output a leaf), parameters excluded: the reference the planner's per-layer count is checked against."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with frozen_eval(model), leaf_embeddings(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_the_activation_estimate_is_what_autograd_keeps(family):
    extra = {"head_dim": 32} if family in ("qwen3", "gemma2") else {}
    model = tiny_model(family, **SHAPES, **extra)
    batch, seq = 2, 32
    config = PruneConfig.from_options("hfprune", keep=96, samples=batch, seq_len=seq, batch_size=batch)
    planned = plan_memory(adapt(model), config, torch.float32, "cpu").parts["activations"]
    measured = _saved_activation_bytes(model, torch.randint(0, 96, (batch, seq)))
    assert abs(planned - measured) / measured < 0.15, (planned, measured)


def test_streaming_plans_one_layer_of_weights_and_activations_on_a_gpu():
    model = tiny_model("llama", **SHAPES)
    config = PruneConfig.from_options("hfprune", keep=96, samples=8, seq_len=32)
    whole = plan_memory(adapt(model), config, torch.bfloat16, "cuda")
    streamed = plan_memory(adapt(model), config, torch.bfloat16, "cuda", streamed=True)
    layer = sum(p.numel() for p in adapt(model).layers[0].parameters()) * 2
    assert whole.parts["weights"] - streamed.parts["weights"] == 2 * layer  # 3 layers -> 1
    assert streamed.parts["activations"] * 3 == whole.parts["activations"]
    text = whole.host_bytes  # on a GPU, all the whole model's host memory holds is the calibration text
    assert text == text_memory("c4", 32) > 0
    assert streamed.host_bytes - text == whole.parts["weights"] and streamed.peak_bytes < whole.peak_bytes
    assert streamed.scoring_flops > whole.scoring_flops  # each layer runs twice


@pytest.fixture(scope="module")
def smollm2_shapes_dir(tmp_path_factory, tiny_dir):
    """SmolLM2-135M's config.json (read once from the packaged GGUF) with tiny_dir's tokenizer and a placeholder
    weights file: a model the planner sees at full size that the run must never load."""
    import shutil

    from fidelprune.models import locate, model_config

    path = tmp_path_factory.mktemp("smollm2-shapes")
    model_config(locate(None)).save_pretrained(path)
    for file in tiny_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, path)
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("free_gib, message", [
    (3.5, "add --batch-size 2 "),  # a smaller batch first: the scores do not depend on it
    (1.5, "add --offload cpu and --batch-size 1 "),  # then one decoder layer's activations at a time
    (0.75, "add --offload disk and --batch-size 1 "),  # on the CPU, the weights left to the page cache
    (0.5, "even with --offload disk, --batch-size 1"),
])
def test_a_run_that_will_not_fit_stops_before_loading_with_the_flag_that_fits(free_gib, message, smollm2_shapes_dir,
                                                                             tmp_path, monkeypatch, capsys):
    from fidelprune import planner

    monkeypatch.setattr(planner, "available_memory", lambda device: int(free_gib * planner.GiB))
    # SmolLM2's shapes in float32 at 1,024 tokens: 5.4 GiB planned at batch 4, 1.7 at batch 1; streamed 2.4 and 1.0
    argv = ["prune", str(smollm2_shapes_dir), "--samples", "8", "--seq-len", "1024", "--reconstruct", "none",
            "-o", str(tmp_path / "out")]
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the weights were loaded"))
    assert main(argv) != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and message in error, error
    assert not (tmp_path / "out").exists()


def test_the_search_plan_holds_what_the_search_keeps():
    """--allocation search: the planned host part covers the Grams and the refits kept near the parent, the
    teacher's distributions and the four sets of layer inputs (dense, the parent and at most two children) that
    search.py holds, measured on the real objects."""
    from fidelprune.search import _Fitness, _Refits

    model = tiny_model("llama", **SHAPES)
    adapted = adapt(model)
    config = PruneConfig.from_options("wanda-sp", keep=192, allocation="search", search_samples=2, seq_len=16,
                                      reconstruct="parallel")
    windows = torch.randint(0, 96, (2, 16))
    refits = _Refits(adapted, windows, [0, 1, 2], 1e-3, 4)
    scores = {i: torch.arange(384.0) for i in range(3)}
    fitness = _Fitness(adapted, windows, scores, 4, refits, 1)
    refit_bytes = sum(g.matrix.numel() * 8 for g in refits.grams.values())
    for index in range(3):  # the refits kept near a parent of (nearly) whole layers: three widths per layer
        for width in (384, 376, 368):
            refits.weights(index, fitness.kept(index, width))
    refit_bytes += sum(w.numel() * w.element_size() for w, _ in refits.cache.values())
    teacher = sum(p.numel() * 4 for p, _ in fitness.teacher)
    one_set = sum(h.numel() * h.element_size() for state in fitness.dense_inputs[:-1] for h in state)
    held = refit_bytes + teacher + 4 * one_set
    planned = plan_memory(adapt(tiny_model("llama", **SHAPES)), config, torch.float32, "cpu").parts["allocation search"]
    assert held <= planned <= 1.1 * held

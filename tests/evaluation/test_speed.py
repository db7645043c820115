"""Size and speed measurement: what is recorded, never how fast (speeds depend on the machine)."""

import math

import pytest

from fidelprune.evaluation import measure_speed, model_size

from conftest import tiny_model


def test_model_size_counts_tied_weights_once():
    untied, tied = tiny_model("llama"), tiny_model("llama", tie_word_embeddings=True)
    embed = untied.get_input_embeddings().weight.numel()
    assert model_size(untied)["params"] - model_size(tied)["params"] == embed
    size = model_size(untied)
    assert size["param_bytes"] == 4 * size["params"] and size["dtype"] == "float32"
    assert model_size(untied.half())["param_bytes"] == 2 * size["params"]


def test_speed_records_settings_and_finite_rates():
    model = tiny_model("llama").train()
    result = measure_speed(model, "cpu", prompt_len=12, new_tokens=5, batch_size=2, repeats=2)
    assert (result.device, result.batch_size, result.prompt_len, result.new_tokens, result.repeats) == ("cpu", 2, 12, 5, 2)
    for rate in (result.prefill_tokens_per_s, result.decode_tokens_per_s):
        assert math.isfinite(rate) and rate > 0
    assert result.prefill_tokens_per_s == pytest.approx(2 * 12 / result.prefill_s)
    assert result.decode_tokens_per_s == pytest.approx(2 * 5 / result.decode_s)
    assert result.peak_memory_bytes > 0 and "RSS" in result.peak_memory_kind
    assert result.threads >= 1 and result.dtype == "float32"
    assert model.training and next(model.parameters()).device.type == "cpu"  # left as it was found
    assert set(result.to_dict()) >= {"prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "device_name"}


def test_speed_refuses_a_length_beyond_the_model_positions():
    with pytest.raises(ValueError, match="positions"):
        measure_speed(tiny_model("llama"), prompt_len=60, new_tokens=10)  # the tiny config has 64 positions

"""Recovery fine-tuning: masking and packing exactness, losses, modes, LoRA merge, exact resume, CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fidelprune
from fidelprune.recovery import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    IGNORE,
    build_data,
    check_packing,
    pack,
    recover,
    render_alpaca,
)
from fidelprune.recovery.data import Example, TokenStats, load_records, tokenize_alpaca, tokenize_text
from fidelprune.recovery.losses import teacher_log_probs, token_loss_sums
from fidelprune.recovery.modes import apply_lora, merge_lora, resolve_target_modules

from conftest import tiny_model, tree_digest

BYTE_VOCAB = 258  # 256 byte tokens + <eos> + <pad>


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: on a shared 2-core machine, intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer():
    """A byte-level tokenizer built in-process: one token per byte, so expected ids are easy to write by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<eos>": 256, "<pad>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def byte_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


DOCS = [("the cat sat on the mat. a dog ran to the log. " * 3)[: 24 + (i * 7) % 60] for i in range(240)]
ALPACA = [{"instruction": f"Count to {n}.", "input": "" if n % 2 else "digits", "output": " ".join(str(i) for i in range(1, n + 1))}
          for n in range(1, 9)] * 30


def small(model_seed: int = 0, **kw):
    return tiny_model("llama", seed=model_seed, vocab_size=BYTE_VOCAB, max_position_embeddings=512, **kw)


FAST = dict(seq_len=64, batch_size=4, eval_windows=0, progress=False)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    """A tiny model fitted to the test text, so its distribution is sharp and distillation has work to do."""
    model, _ = recover(small(), None, DOCS, tokenizer, mode="full", loss="ce", lr=1e-2, max_steps=40, val_fraction=0, **FAST)
    return model


@pytest.fixture(scope="module")
def pruned(teacher):
    model, _ = fidelprune.prune(teacher, None, "magnitude", 0.2, round_to=1)
    return model


# ---------------------------------------------------------------------------------------------------- data
def test_alpaca_template_is_stanfords():
    with_input = render_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3"
        "\n\n### Response:\n", "5")
    without = render_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert without == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                       "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n", "hi")
    assert ALPACA_PROMPT.format(instruction="x") in render_alpaca({"instruction": "x", "output": "y"})
    assert ALPACA_PROMPT_INPUT.count("{input}") == 1


def test_alpaca_loss_is_on_response_and_eos_only(tokenizer):
    record = {"instruction": "Say hi.", "input": "", "output": "hi there"}
    prompt, response = render_alpaca(record)
    [example] = tokenize_alpaca(tokenizer, [record], 1024, TokenStats())
    prompt_ids, response_ids = byte_ids(tokenizer, prompt), byte_ids(tokenizer, response)
    assert example.ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.prompt_len == len(prompt_ids)
    packed = pack([example], len(example.ids) + 3, tokenizer.pad_token_id)
    expected = [IGNORE] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id] + [IGNORE] * 3
    assert packed.labels[0].tolist() == expected
    assert tokenizer.decode([t for t in packed.labels[0].tolist() if t != IGNORE]) == "hi there<eos>"


def test_alpaca_truncation_and_dropping(tokenizer):
    record = {"instruction": "Say hi.", "input": "", "output": "hi there"}
    n_prompt = len(byte_ids(tokenizer, render_alpaca(record)[0]))
    stats = TokenStats()
    [cut] = tokenize_alpaca(tokenizer, [record], n_prompt + 2, stats)
    assert len(cut.ids) == n_prompt + 2 and stats.truncated == 1  # two response tokens survive, EOS does not
    assert tokenize_alpaca(tokenizer, [record], n_prompt, stats) == [] and stats.dropped == 1  # no target left


def test_packing_boundaries_by_hand():
    a, b, c = Example([10, 11, 12, 13], 2), Example([20, 21, 22], 0), Example([30, 31, 32, 33, 34], 1)
    packed = pack([a, b, c], seq_len=8, pad_id=0)
    # longest first: c opens row 0 (room 3), a does not fit there and opens row 1 (room 4), b fits both and goes
    # where the room is least, row 0
    assert packed.input_ids.tolist() == [[30, 31, 32, 33, 34, 20, 21, 22], [10, 11, 12, 13, 0, 0, 0, 0]]
    assert packed.labels.tolist() == [[IGNORE, 31, 32, 33, 34, IGNORE, 21, 22],
                                      [IGNORE, IGNORE, 12, 13, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1, -1, -1]]
    assert packed.target_tokens == 4 + 2 + 2 and packed.real_tokens == 12


def test_packing_is_best_fit_decreasing_and_keeps_every_example_whole():
    # in the given order, greedy packing needs 4 rows for these 24 tokens (3 | 6 | 5 2 | 4 4); 3 are enough
    lengths = [3, 6, 5, 2, 4, 4]
    examples = [Example(list(range(100 * i + 1, 100 * i + 1 + n)), 0) for i, n in enumerate(lengths)]
    packed = pack(examples, seq_len=8, pad_id=0)
    assert len(packed) == 3 and packed.real_tokens == 24
    rows = [[ids[segments == k].tolist() for k in range(int(segments.max()) + 1)]
            for ids, segments in zip(packed.input_ids, packed.segment_ids)]
    assert rows == [[examples[1].ids, examples[3].ids], [examples[2].ids, examples[0].ids], [examples[4].ids, examples[5].ids]]
    # random lengths: each example once and intact, deterministic, and within a row of the lower bound
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (300,), generator=gen).tolist()
    examples = [Example([i] * n, 0) for i, n in enumerate(lengths)]
    packed = pack(examples, seq_len=64, pad_id=-1)
    found = sorted(tuple(ids[segments == k].tolist()) for ids, segments in zip(packed.input_ids, packed.segment_ids)
                   for k in range(int(segments.max()) + 1))
    assert found == sorted(tuple(ex.ids) for ex in examples)
    assert len(packed) <= math.ceil(sum(lengths) / 64) + 1
    assert pack(examples, seq_len=64, pad_id=-1).fingerprint() == packed.fingerprint()


def test_text_documents_get_eos_and_split_into_chunks(tokenizer):
    stats = TokenStats()
    examples = tokenize_text(tokenizer, ["abcdefghij", "xy"], seq_len=4, stats=stats)
    eos = tokenizer.eos_token_id
    assert [e.ids for e in examples] == [byte_ids(tokenizer, "abcd"), byte_ids(tokenizer, "efgh"),
                                         byte_ids(tokenizer, "ij") + [eos], byte_ids(tokenizer, "xy") + [eos]]
    assert all(e.prompt_len == 0 for e in examples) and stats.truncated == 1


def test_formats_are_detected(tmp_path, tokenizer):
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text("\n".join(json.dumps(r) for r in ALPACA[:5]))
    text = tmp_path / "t.json"
    text.write_text(json.dumps([{"text": d} for d in DOCS[:5]]))
    plain = tmp_path / "p.txt"
    plain.write_text("one document")
    assert load_records(alpaca)[0] == "alpaca"
    assert load_records(text)[:2] == ("text", DOCS[:5])
    assert load_records(plain)[:2] == ("text", ["one document"])
    assert load_records("alpaca")[0] == "alpaca" and len(load_records("alpaca")[1]) == 999
    assert load_records("c4")[0] == "text"
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="instruction"):
        load_records(bad)


def test_validation_examples_are_held_out(tokenizer):
    docs = [f"document {i}: {d}" for i, d in enumerate(DOCS)]  # distinct, so overlap can only come from a leak
    data = build_data(tokenizer, docs, 64, val_fraction=0.1, seed=0)
    assert data.record["val_records"] == 24 and data.record["train_records"] == 216
    assert data.record["train_examples"] > 216  # long documents became several chunks
    def documents(packed):
        return {int(n) for row in packed.input_ids.tolist() for n in re.findall(r"document (\d+):", tokenizer.decode(row))}

    assert len(documents(data.val)) == 24 and len(documents(data.train)) == 216
    assert not documents(data.train) & documents(data.val)
    assert build_data(tokenizer, docs, 64, val_fraction=0.1, seed=0).record["train_fingerprint"] == data.record["train_fingerprint"]


# ---------------------------------------------------------------------------------------------------- packing in the model
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_each_example_its_own_logits(family, attn):
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("gemma2's logit softcap needs eager attention")
    model = tiny_model(family)
    model.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(3, 90, (n,), generator=gen).tolist(), 0) for n in (7, 5, 4)]
    packed = pack(examples, seq_len=18, pad_id=0)
    with torch.no_grad():
        together = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        offset = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.ids]), use_cache=False).logits[0]
            torch.testing.assert_close(together[offset : offset + len(ex.ids)], alone, atol=1e-5, rtol=1e-5)
            offset += len(ex.ids)
    assert check_packing(model) < 1e-4


def test_packed_loss_equals_the_sum_of_per_example_losses(teacher, pruned):
    gen = torch.Generator().manual_seed(2)
    examples = [Example(torch.randint(0, BYTE_VOCAB, (n,), generator=gen).tolist(), p) for n, p in ((9, 3), (6, 0), (8, 5))]
    packed = pack(examples, seq_len=24, pad_id=0)
    with torch.no_grad():
        def run(model, batch):
            return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits

        mask = packed.labels[:, 1:] != IGNORE
        t_log_p = teacher_log_probs(run(teacher, packed), mask, temperature=2.0)
        together = token_loss_sums(run(pruned, packed), packed.labels, t_log_p, alpha=0.3)
        ce = kl = 0.0
        for ex in examples:
            ids = torch.tensor([ex.ids])
            s, t = pruned(input_ids=ids).logits[0, :-1], teacher(input_ids=ids).logits[0, :-1]
            keep = slice(max(ex.prompt_len, 1) - 1, None)  # positions that predict a target token
            targets = ids[0, 1:][keep]
            ce += F.cross_entropy(s[keep], targets, reduction="sum").item()
            kl += F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep] / 2.0, -1), log_target=True, reduction="sum").item()
    assert together.tokens == sum(len(e.ids) - max(e.prompt_len, 1) for e in examples)
    assert together.ce.item() == pytest.approx(ce, rel=1e-5)
    assert together.kl.item() == pytest.approx(kl, rel=1e-4)
    assert together.loss.item() == pytest.approx(0.7 * ce + 0.3 * kl, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("loss", ["ce", "kd", "mix"])
def test_training_loss_falls(mode, loss, tokenizer, teacher, pruned):
    lr = 1e-2 if mode == "lora" else 3e-3
    recovered, report = recover(pruned, teacher, DOCS, tokenizer, mode=mode, loss=loss, lr=lr, max_steps=36, **FAST)
    losses = [h["loss"] for h in report.record["losses"]]
    assert len(losses) == 36
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    val = report.record["validation"]
    assert val[-1]["ppl"] < val[0]["ppl"]
    assert type(recovered).__name__ == "LlamaForCausalLM"  # LoRA merged away
    assert not any("lora" in name for name, _ in recovered.named_parameters())
    assert recovered.config.intermediate_size == pruned.config.intermediate_size
    if loss != "ce":
        assert report.record["losses"][0]["kl"] > 0


def test_throughput_counts_the_optimizer_steps_alone(tokenizer, pruned):
    """Validation passes run inside the loop's wall time, but tokens/s is over the steps' own time."""
    _, report = recover(pruned, None, DOCS, tokenizer, mode="lora", max_steps=4, **{**FAST, "eval_every": 1})
    training = report.record["training"]
    assert 0 < training["steps_s"] < training["wall_s"]  # four validation passes took the rest
    assert training["tokens_per_s"] == pytest.approx(training["tokens"] / training["steps_s"])
    assert report.record["hyperparameters"]["lora_dropout"] == 0.0  # peft's default; LLM-Pruner's 0.05 on request


def test_merged_lora_gives_the_unmerged_logits(pruned):
    model = apply_lora(fidelprune.prune(pruned, None, "magnitude", 0.1, round_to=1)[0], 4, 8, 0.0, ("q", "k", "v", "o", "gate", "up", "down"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # lora_B starts at zero, which would make the check trivial
    ids = torch.randint(0, BYTE_VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = merge_lora(model)
        merged = merged_model(input_ids=ids).logits
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_targets_resolve_for_fused_projections():
    assert resolve_target_modules(tiny_model("llama"), ("q", "k", "v", "o", "gate", "up", "down")) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert resolve_target_modules(tiny_model("phi3"), ("q", "k", "v", "o", "gate", "up", "down")) == [
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(ValueError, match="matches no linear"):
        resolve_target_modules(tiny_model("llama"), ("w1",))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_and_accumulation_keep_the_update(mode, tokenizer, pruned):
    """Checkpointing recomputes activations; accumulation splits rows into micro-batches; the loss is a mean over
    the step's target tokens either way, so the trained weights agree."""
    common = dict(mode=mode, loss="ce", lr=3e-3, lora_dropout=0.0, max_steps=4, val_fraction=0, seq_len=64, eval_windows=0, progress=False)
    plain, _ = recover(pruned, None, DOCS, tokenizer, batch_size=4, **common)
    checkpointed, _ = recover(pruned, None, DOCS, tokenizer, batch_size=4, gradient_checkpointing=True, **common)
    accumulated, _ = recover(pruned, None, DOCS, tokenizer, batch_size=2, grad_accum=2, **common)
    for other in (checkpointed, accumulated):
        for a, b in zip(plain.state_dict().values(), other.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_ends_in_the_uninterrupted_weights(mode, tmp_path, tokenizer, teacher, pruned):
    # LoRA dropout makes the RNG matter; mix uses the teacher; warmup + cosine makes the scheduler state matter.
    options = dict(mode=mode, loss="mix", alpha=0.5, lora_dropout=0.1, lr=5e-3, max_steps=12, warmup_ratio=0.2,
                   save_every=4, eval_every=3, keep_last=2, **FAST)
    reference, ref_report = recover(pruned, teacher, DOCS, tokenizer, checkpoint_dir=tmp_path / "a", **options)

    def interrupt_at_10(step, metrics):
        if step == 10:
            raise Interrupt  # after checkpoint 8: steps 9 and 10 are lost, as in a real crash

    with pytest.raises(Interrupt):
        recover(pruned, teacher, DOCS, tokenizer, checkpoint_dir=tmp_path / "b", on_step=interrupt_at_10, **options)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-000004", "step-000008"]
    resumed, report = recover(pruned, teacher, DOCS, tokenizer, checkpoint_dir=tmp_path / "b", resume=True, **options)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert report.record["training"]["resumed_at"] == [8]
    assert report.record["losses"] == [{**h, "tokens_per_s": report.record["losses"][i]["tokens_per_s"]}
                                       for i, h in enumerate(ref_report.record["losses"])]
    assert [v["step"] for v in report.record["validation"]] == [0, 3, 6, 9, 12]


def test_resume_refuses_a_different_run(tmp_path, tokenizer, pruned):
    options = dict(mode="lora", loss="ce", max_steps=4, save_every=2, **FAST)
    recover(pruned, None, DOCS, tokenizer, checkpoint_dir=tmp_path, max_examples=200, **options)
    # the message names the options that continue the saved run (a default that moved, e.g. --lora-dropout)
    with pytest.raises(ValueError, match=r"lora_dropout: 0.0 -> 0.05; lr: .*pass --lora-dropout 0.0 --lr 0.0002 "
                                         r"\(in Python: lora_dropout=0.0, lr=0.0002\)$"):
        recover(pruned, None, DOCS, tokenizer, checkpoint_dir=tmp_path, resume=True, lr=1e-3, lora_dropout=0.05,
                max_examples=200, **options)
    # other examples are other data, which no option brings back: it says so, and what to do instead
    with pytest.raises(ValueError, match=r"data: .*; max_examples: 200 -> None\); the training rows differ .*"
                                         r"start a new run in another --checkpoint-dir$"):
        recover(pruned, None, DOCS, tokenizer, checkpoint_dir=tmp_path, resume=True, **options)
    with pytest.raises(FileExistsError, match="--resume"):
        recover(pruned, None, DOCS, tokenizer, checkpoint_dir=tmp_path, max_examples=200, **options)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        recover(pruned, None, DOCS, tokenizer, checkpoint_dir=tmp_path / "empty", resume=True, **options)


def test_bad_settings_fail_with_one_line(tokenizer, pruned):
    with pytest.raises(ValueError, match="takes no --alpha"):
        recover(pruned, None, DOCS, tokenizer, loss="kd", alpha=0.3, **FAST)
    with pytest.raises(ValueError, match="needs a teacher"):
        recover(pruned, None, DOCS, tokenizer, loss="kd", **FAST)
    with pytest.raises(ValueError, match="fewer than one step"):
        recover(pruned, None, DOCS[:3], tokenizer, **{**FAST, "batch_size": 8})
    with pytest.raises(ValueError, match="vocabulary"):
        recover(pruned, tiny_model("llama"), DOCS, tokenizer, loss="kd", **FAST)


# ---------------------------------------------------------------------------------------------------- CLI end to end


def test_cli_recovers_a_pruned_directory_into_a_vanilla_checkpoint(tmp_path, tokenizer, teacher):
    from transformers import AutoModelForCausalLM

    from fidelprune.cli import main

    original = tmp_path / "original"
    teacher.save_pretrained(original)
    tokenizer.save_pretrained(original)
    model, tok, source = fidelprune.load_model(original)
    pruned_model, report = fidelprune.prune(model, tok, "magnitude", 0.2, round_to=1, source=source)
    pruned_dir = fidelprune.save(pruned_model, tok, report, tmp_path / "pruned")
    before = tree_digest(pruned_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ALPACA))
    corpus = tmp_path / "eval.txt"
    corpus.write_text(" ".join(DOCS[:40]))
    output = tmp_path / "recovered"
    argv = ["recover", str(pruned_dir), "--data", str(data), "--mode", "lora", "--loss", "kd", "--output", str(output),
            "--max-steps", "6", "--seq-len", "256", "--batch-size", "2", "--save-every", "2", "--lr", "5e-3",
            "--eval-corpus", str(corpus), "--eval-windows", "4", "--eval-seq-len", "32"]
    assert main(argv) == 0

    assert tree_digest(pruned_dir) == before  # the input is never modified
    assert not (tmp_path / "recovered.checkpoints").exists()  # removed after a successful save
    assert (output / "model.safetensors").is_file() and not list(output.glob("adapter*"))
    vanilla = AutoModelForCausalLM.from_pretrained(output)
    assert vanilla.config.intermediate_size == pruned_model.config.intermediate_size
    record = json.loads((output / "recovery.json").read_text())
    assert record["teacher"]["name"] == str(original) and record["teacher"]["from"] == "pruning.json"
    assert record["teacher"]["sha256_matches_source"] is True
    assert record["data"]["format"] == "alpaca" and record["data"]["train_target_tokens"] > 0
    assert record["training"]["steps"] == 6 and record["training"]["tokens"] > 0
    assert len(record["losses"]) == 6 and record["hyperparameters"]["lora_target_modules"][0] == "q_proj"
    assert record["eval"]["before"]["windows"] == 4 and record["eval"]["after"]["ppl"] > 0
    assert {"torch", "transformers", "peft", "accelerate"} <= set(record["versions"])
    manifest = json.loads((output / "pruning.json").read_text())
    assert manifest["recovery"]["file"] == "recovery.json" and manifest["method"]["method"] == "magnitude"
    reloaded, _, _ = fidelprune.load_model(output)
    ids = torch.randint(0, BYTE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, vanilla(input_ids=ids).logits)

    assert main(argv) == 2  # refuses the now non-empty output before any compute


def test_cli_reports_a_missing_data_file(tmp_path, capsys):
    from fidelprune.cli import main

    assert main(["recover", str(tmp_path), "--data", str(tmp_path / "nope.json"), "--output", str(tmp_path / "o")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["recover", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err

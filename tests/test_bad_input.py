"""Bad input, as a hostile-but-fair user gives it: every case must end in one line `error: ...` naming the flag or
file, write nothing, leave the input untouched, and (where the arguments, config.json or file headers decide it)
fail before any weight is loaded. Table-driven: add a row per new case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import fidelprune
from fidelprune import PruneConfig, prune
from fidelprune.cli import main
from fidelprune.errors import FidelpruneError
from fidelprune.outputs import remove_stale_siblings, temporary_sibling

from conftest import tiny_model, tiny_windows, tree_digest

BEFORE_LOAD = True  # the case must fail before any weight loads (False: it can only fail once they are in memory)

# (argv with {tiny} = a 2-layer LLaMA of MLP width 48 and 64 positions, {dir} = a scratch folder), message fragment,
# whether it must fail before the weights load.
PRUNE = "prune {tiny} --samples 4 --seq-len 32 --reconstruct none"
CASES = [
    # the input is never the output
    (PRUNE + " -o {tiny} --overwrite", "would overwrite the input", BEFORE_LOAD),
    (PRUNE + " -o {tiny}/inside --overwrite", "would overwrite the input", BEFORE_LOAD),
    (PRUNE + " -o {models} --overwrite", "would overwrite the input", BEFORE_LOAD),
    (PRUNE + " -o {link} --overwrite", "would overwrite the input", BEFORE_LOAD),
    (PRUNE + " --scores {dir}/run/scores.safetensors -o {dir}/run --overwrite", "would overwrite the input", BEFORE_LOAD),
    # settings out of range
    (PRUNE + " --ratio 0 -o {dir}/out", "ratio", BEFORE_LOAD),
    (PRUNE + " --ratio 1.5 -o {dir}/out", "ratio", BEFORE_LOAD),
    (PRUNE + " --ratio 0.05 -o {dir}/out", "unreachable", BEFORE_LOAD),
    (PRUNE + " --keep 0 -o {dir}/out", "--keep must be at least 1", BEFORE_LOAD),
    (PRUNE + " --keep 48 -o {dir}/out", "keep must be between", BEFORE_LOAD),
    (PRUNE + " --ratio 0.2 --keep 24 -o {dir}/out", "not both", BEFORE_LOAD),
    (PRUNE + " --recipe best -o {dir}/out", "--recipe best sets --reconstruct sequential", BEFORE_LOAD),
    (PRUNE + " --keep 24 --round-to 48 -o {dir}/out", "--round-to 48 is not below", BEFORE_LOAD),
    (PRUNE + " --keep 24 --round-to 0 -o {dir}/out", "--round-to must be at least 1", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method sdmprune --alpha 5 -o {dir}/out", "--alpha", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method sdmprune --temperature 0 -o {dir}/out", "--temperature", BEFORE_LOAD),
    (PRUNE + " --keep 24 --batch-size 0 -o {dir}/out", "--batch-size", BEFORE_LOAD),
    ("prune {tiny} --samples 0 --keep 24 -o {dir}/out", "samples", BEFORE_LOAD),
    ("prune {tiny} --seq-len 1 --keep 24 -o {dir}/out", "seq_len", BEFORE_LOAD),
    ("prune {tiny} --seq-len 128 --keep 24 -o {dir}/out", "exceeds the model's 64 positions", BEFORE_LOAD),
    (PRUNE + " --keep 24 --allocation global --min-keep 1000 -o {dir}/out", "--min-keep", BEFORE_LOAD),
    (PRUNE + " --keep 24 --protect-first 2 -o {dir}/out", "leaves nothing to prune", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method wanda-sp --objective ce -o {dir}/out", "takes no gradients", BEFORE_LOAD),
    ("prune {tiny} --keep 24 --reconstruct sequential --reconstruct-lambda -1 -o {dir}/out", "lambda", BEFORE_LOAD),
    ("prune {tiny} --keep 24 --reconstruct none --reconstruct-seed 3 -o {dir}/out", "reconstruct is 'none'", BEFORE_LOAD),
    ("prune {tiny} --keep 24 --seq-len 32 --samples 4 --reconstruct-calibration {dir}/short.txt -o {dir}/out", "fewer than", BEFORE_LOAD),
    # a refit on no more tokens than neurons reproduces them exactly: an error of 0 that says nothing (issue 49)
    ("prune {tiny} --keep 24 --samples 1 --seq-len 2 -o {dir}/out", "too few to determine the fit", BEFORE_LOAD),
    ("prune {tiny} --keep 24 --samples 4 --seq-len 32 --reconstruct-samples 1 -o {dir}/out", "raise --reconstruct-samples", BEFORE_LOAD),
    ("prune {tiny} --keep 24 --samples 2 --seq-len 16 --sampling spans --reconstruct none --calibration {dir}/blank.txt -o {dir}/out",
     "has 0 tokens", BEFORE_LOAD),
    ("eval {tiny} --baseline none --tasks none --no-speed --seq-len 16 --ppl {dir}/blank.txt -o {dir}/out", "holds no text", BEFORE_LOAD),
    ("recover {tiny} --data c4 --seq-len 128 -o {dir}/out", "exceeds the model's 64 positions", BEFORE_LOAD),
    # --recipe best's 256 refit windows, one per document, from a source with enough documents for the 4 scoring ones
    ("prune {tiny} --recipe best --keep 24 --seq-len 32 --samples 4 --calibration {dir}/few.jsonl -o {dir}/out",
     "fewer than the 256 windows needed (one per document, as the seed methods draw them): use a larger source, lower "
     "--reconstruct-samples", BEFORE_LOAD),
    # whole layers (--drop-layers)
    (PRUNE + " --keep 24 --drop-layers -1 -o {dir}/out", "--drop-layers must be at least 0", BEFORE_LOAD),
    (PRUNE + " --keep 24 --drop-layers 2 -o {dir}/out", "--drop-layers 2 leaves none of the 2 prunable layers", BEFORE_LOAD),
    (PRUNE + " --keep 24 --drop-layers 1 --protect-first 1 -o {dir}/out", "leaves none of the 1 prunable", BEFORE_LOAD),
    (PRUNE + " --keep 24 --drop-layers 1 --method magnitude -o {dir}/out", "magnitude reads no data", BEFORE_LOAD),
    (PRUNE + " --keep 24 --drop-layers 1 --allocation search -o {dir}/out", "--allocation search is not supported yet",
     BEFORE_LOAD),
    (PRUNE + " --keep 24 --drop-layers 1 --scores {dir}/run/scores.safetensors -o {dir}/out", "drop --scores", BEFORE_LOAD),
    (PRUNE + " --keep 49 --drop-layers 1 -o {dir}/out", "keep must be between 1 and 48", BEFORE_LOAD),
    # attention heads (the tiny model: 4 query heads over 2 KV heads)
    (PRUNE + " --keep 24 --keep-heads 0 -o {dir}/out", "--keep-heads must be at least 1", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-heads 3 -o {dir}/out", "each of the model's KV groups has 2 query heads", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-kv-heads 3 -o {dir}/out", "the model has 2 KV heads per layer", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-heads 2 --keep-kv-heads 2 -o {dir}/out", "keep every head", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-heads 1 --method random -o {dir}/out", "random reads no data", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-heads 1 --protect-last 1 -o {dir}/out", "per-layer head counts", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-heads 1 --allocation search -o {dir}/out", "not supported yet", BEFORE_LOAD),
    (PRUNE + " --keep 24 --keep-heads 1 --scores {dir}/run/scores.safetensors -o {dir}/out", "drop --scores", BEFORE_LOAD),
    # files
    (PRUNE + " --keep 24 --calibration {dir}/none.jsonl -o {dir}/out", "not found", BEFORE_LOAD),
    (PRUNE + " --keep 24 --scores {dir}/wide.safetensors -o {dir}/out", "come from another model", BEFORE_LOAD),
    (PRUNE + " --keep 24 --scores {dir}/deep.safetensors -o {dir}/out", "come from another model", BEFORE_LOAD),
    (PRUNE + " --keep 24 --scores {dir}/corrupt.safetensors -o {dir}/out", "not a readable safetensors", BEFORE_LOAD),
    (PRUNE + " --keep 24 --scores {dir}/none.safetensors -o {dir}/out", "scores file not found", BEFORE_LOAD),
    ("prune {dir}/no-config --keep 24 -o {dir}/out", "no config.json", BEFORE_LOAD),
    ("prune {dir}/no-tokenizer --keep 24 -o {dir}/out", "no tokenizer files", BEFORE_LOAD),
    (PRUNE + " --keep 24 --calibration {dir}/latin1.txt -o {dir}/out", "latin1.txt is not UTF-8", BEFORE_LOAD),
    (PRUNE + " --keep 24 --calibration {dir}/broken.jsonl -o {dir}/out", "broken.jsonl is not valid JSONL", BEFORE_LOAD),
    (PRUNE + " --keep 24 --calibration {dir}/untexted.jsonl -o {dir}/out", "no record has a non-empty 'text' field", BEFORE_LOAD),
    ("prune {gpt2} --keep 24 -o {dir}/out", "unsupported architecture", BEFORE_LOAD),
    (PRUNE + " --keep 24 -o /proc/fidelprune-out", "cannot", BEFORE_LOAD),
    (PRUNE + " --keep 24 -o {dir}/file.txt", "is not a directory", BEFORE_LOAD),
    (PRUNE + " --keep 24 --dtype float8 -o {dir}/out", "unknown dtype", BEFORE_LOAD),
    (PRUNE + " --keep 24 --calibration {dir}/empty.txt -o {dir}/out", "empty.txt", BEFORE_LOAD),
    (PRUNE + " --keep 24 --calibration {dir}/no-config -o {dir}/out", "no-config", BEFORE_LOAD),
    ("prune {tiny} --keep 24 --samples 4 --seq-len 32 --reconstruct-samples 0 -o {dir}/out", "--reconstruct-samples", BEFORE_LOAD),
    (PRUNE + " --keep 24 --protect-last 5 -o {dir}/out", "leaves nothing to prune", BEFORE_LOAD),
    (PRUNE + " --keep 24 --protect-first -1 -o {dir}/out", "--protect-first", BEFORE_LOAD),
    (PRUNE + " --keep 24 --allocation global --min-keep 0 -o {dir}/out", "--min-keep must be at least 1", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method sdmprune --alpha -0.1 -o {dir}/out", "--alpha", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method magnitude --objective kd -o {dir}/out", "magnitude", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method random --form element1 -o {dir}/out", "random", BEFORE_LOAD),
    (PRUNE + " --keep 24 --steps 0 -o {dir}/out", "--steps must be at least 1", BEFORE_LOAD),
    (PRUNE + " --keep 24 --method wanda-sp --steps 2 -o {dir}/out", "takes no gradients", BEFORE_LOAD),
    (PRUNE + " --keep 24 --calibration {dir}/short.txt -o {dir}/out", "fewer than", BEFORE_LOAD),
    # a dry run and a streamed run validate as much as a plain one
    (PRUNE + " --ratio 1.5 --dry-run -o {dir}/out", "ratio", BEFORE_LOAD),
    ("prune {tiny} --seq-len 128 --keep 24 --offload cpu -o {dir}/out", "exceeds the model's 64 positions", BEFORE_LOAD),
    # --offload disk maps safetensors weights as they are stored
    ("prune --offload disk --keep 24 --samples 4 --seq-len 32 -o {dir}/out", "is a GGUF file", BEFORE_LOAD),
    (PRUNE + " --keep 24 --offload disk --dtype bfloat16 -o {dir}/out", "pass --dtype float32", BEFORE_LOAD),
    # device maps (--device-map): the file, its modules and devices, and the flags it excludes
    (PRUNE + " --keep 24 --device-map {dir}/none.json -o {dir}/out", "no such file", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/broken-map.json -o {dir}/out", "cannot read it as JSON", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/list-map.json -o {dir}/out", "expected a JSON object", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/gpu-map.json -o {dir}/out", "'cuda:3' does not exist", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/disk-map.json -o {dir}/out", "use --offload cpu instead", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/partial-map.json -o {dir}/out", "lm_head.weight", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/stranger-map.json -o {dir}/out", "'model.layers.7' is not a module", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/twice-map.json -o {dir}/out", "placed twice", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map auto --offload cpu -o {dir}/out", "choose one", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map auto --device cpu -o {dir}/out", "drop --device", BEFORE_LOAD),
    (PRUNE + " --keep 24 --device-map {dir}/gpu-map.json --dry-run -o {dir}/out", "'cuda:3' does not exist", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --no-speed --device-map {dir}/gpu-map.json -o {dir}/out", "'cuda:3' does not exist", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --device-map auto --speed-devices cpu -o {dir}/out", "drop --speed-devices", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --device-map auto --device cpu -o {dir}/out", "drop --device", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --baseline none -o {dir}/out", "--prompt-len + --new-tokens = 160 exceeds", BEFORE_LOAD),
    # eval
    ("eval {tiny} --seq-len 1 -o {dir}/out", "--seq-len must be at least 2", BEFORE_LOAD),
    ("eval {tiny} --limit 0 -o {dir}/out", "--limit must be at least 1", BEFORE_LOAD),
    ("eval {tiny} --limit-windows 0 -o {dir}/out", "--limit-windows must be at least 1", BEFORE_LOAD),
    ("eval {tiny} --batch-size 0 -o {dir}/out", "--batch-size must be at least 1", BEFORE_LOAD),
    ("eval {tiny} -o {tiny}/results", "would overwrite the input", BEFORE_LOAD),
    ("eval {tiny} --ppl {dir}/none.txt -o {dir}/out", "--ppl", BEFORE_LOAD),
    ("eval {tiny} --tasks nosuchtask -o {dir}/out", "unknown task", BEFORE_LOAD),
    ("eval {tiny} --tasks hellaswag -o {dir}/out", "hellaswag needs", BEFORE_LOAD),
    ("eval {tiny} --hellaswag {dir}/none.jsonl -o {dir}/out", "--hellaswag", BEFORE_LOAD),
    ("eval {tiny} --seq-len 128 --baseline none -o {dir}/out", "exceeds the 64 positions", BEFORE_LOAD),
    ("eval {tiny} --prompt-len 0 -o {dir}/out", "--prompt-len must be at least 1", BEFORE_LOAD),
    ("eval {tiny} --new-tokens 0 -o {dir}/out", "--new-tokens must be at least 1", BEFORE_LOAD),
    ("eval {tiny} --repeats 0 -o {dir}/out", "--repeats must be at least 1", BEFORE_LOAD),
    ("eval {tiny} --speed-batch 0 -o {dir}/out", "--speed-batch must be at least 1", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --baseline {dir}/no-config -o {dir}/out", "no config.json", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --baseline {dir}/exists.gguf -o {dir}/out", "is not a GGUF file", BEFORE_LOAD),
    ("eval {tiny} --baseline source -o {dir}/out", "--baseline source needs a pruning.json", BEFORE_LOAD),
    ("eval {dir}/file.txt -o {dir}/out", "neither a model directory", BEFORE_LOAD),
    ("eval {tiny} -o {dir}/file.txt", "is not a directory", BEFORE_LOAD),
    # recover
    ("recover {tiny} --lr -1 -o {dir}/out", "--lr", BEFORE_LOAD),
    ("recover {tiny} --lora-r 0 -o {dir}/out", "--lora-r", BEFORE_LOAD),
    ("recover {tiny} --lora-dropout 1.5 -o {dir}/out", "--lora-dropout", BEFORE_LOAD),
    ("recover {tiny} --val-fraction 1.0 -o {dir}/out", "--val-fraction", BEFORE_LOAD),
    ("recover {tiny} --target-modules , -o {dir}/out", "--target-modules", BEFORE_LOAD),
    ("recover {tiny} --target-modules foo -o {dir}/out", "LoRA target 'foo' matches no linear layer", BEFORE_LOAD),
    ("recover {tiny} --target-modules q,lm_head2 -o {dir}/out", "LoRA target 'lm_head2'", BEFORE_LOAD),
    ("recover {tiny} --mode lora --lora-alpha -2 -o {dir}/out", "--lora-alpha", BEFORE_LOAD),
    ("recover {tiny} --max-steps 0 -o {dir}/out", "--max-steps", BEFORE_LOAD),
    ("recover {tiny} --epochs 0 -o {dir}/out", "--epochs", BEFORE_LOAD),
    ("recover {tiny} --grad-accum 0 -o {dir}/out", "--grad-accum", BEFORE_LOAD),
    ("recover {tiny} --seq-len 1 -o {dir}/out", "--seq-len", BEFORE_LOAD),
    ("recover {tiny} --loss kd --alpha 2 -o {dir}/out", "--loss kd takes no --alpha", BEFORE_LOAD),
    ("recover {tiny} --loss mix --alpha 2 -o {dir}/out", "--alpha must be in [0, 1]", BEFORE_LOAD),
    ("recover {tiny} --loss kd --temperature 0 -o {dir}/out", "--temperature must be in (0", BEFORE_LOAD),
    ("recover {tiny} --warmup-ratio 1 -o {dir}/out", "--warmup-ratio", BEFORE_LOAD),
    ("recover {tiny} --keep-last -1 -o {dir}/out", "--keep-last", BEFORE_LOAD),
    ("recover {tiny} --data {dir}/broken.jsonl -o {dir}/out", "broken.jsonl", BEFORE_LOAD),
    ("recover {dir}/file.txt -o {dir}/out", "not found", BEFORE_LOAD),
    ("recover {tiny} --teacher {dir}/none.gguf --loss kd -o {dir}/out", "GGUF file not found", BEFORE_LOAD),
    ("recover {tiny} --loss kd -o {dir}/out", "distillation needs a teacher", BEFORE_LOAD),
    ("recover {tiny} --loss mix -o {dir}/out", "distillation needs a teacher", BEFORE_LOAD),
    ("recover {tiny} --checkpoint-dir {tiny}/ckpt -o {dir}/out", "would write into the input", BEFORE_LOAD),
    ("recover {tiny} --resume --checkpoint-dir {dir}/run -o {dir}/out", "no complete checkpoint", BEFORE_LOAD),
    ("recover {tiny} -o {tiny} --overwrite", "would overwrite the input", BEFORE_LOAD),
    ("recover {tiny} --checkpoint-dir {dir}/file.txt -o {dir}/out", "not a directory", BEFORE_LOAD),
    ("recover {tiny} --data {dir}/none.json -o {dir}/out", "not found", BEFORE_LOAD),
    # export
    ("export {tiny} -o {dir}/m.gguf", "was not pruned from a GGUF", BEFORE_LOAD),
    ("export {tiny} --template {dir}/none.gguf -o {dir}/m.gguf", "file not found", BEFORE_LOAD),
    ("export {tiny} --template {dir}/file.txt -o {dir}/m.gguf", "not a readable GGUF", BEFORE_LOAD),
    ("export {tiny} --llama-cpp {dir} -o {dir}/m.gguf", "no convert_hf_to_gguf.py", BEFORE_LOAD),
    ("export {tiny} -o {tiny}/m.gguf", "would overwrite the input", BEFORE_LOAD),
    ("export {tiny} --to vllm -o {tiny}/served", "would overwrite the input", BEFORE_LOAD),
    ("export {tiny} -o {dir}/m.bin", "ending in .gguf", BEFORE_LOAD),
    ("export {tiny} -o {dir}/exists.gguf", "exists; choose another --output or pass --overwrite", BEFORE_LOAD),
    ("export {tiny} -o {dir}/run", "ending in .gguf", BEFORE_LOAD),
    ("export {tiny} --to vllm -o {dir}/file.txt", "is not a directory", BEFORE_LOAD),
    ("export {tiny} --to vllm -o {dir}/run", "is not empty", BEFORE_LOAD),
    ("export {dir}/file.txt", "is not a model directory", BEFORE_LOAD),
    ("export {dir}/exists.gguf", "is not a model directory", BEFORE_LOAD),
    ("export {dir}/no-config", "no config.json", BEFORE_LOAD),
    ("export {gpt2} --to vllm -o {dir}/v", "unsupported architecture", BEFORE_LOAD),
    ("export {tiny} --check-windows 0", "--check-windows must be at least 1", BEFORE_LOAD),
    ("export {tiny} --check-seq-len 1", "--check-seq-len must be at least 2", BEFORE_LOAD),
    ("export {tiny} --to vllm --check-windows 0 -o {dir}/v", "--check-windows", BEFORE_LOAD),
    # prune --serve-on
    (PRUNE + " --keep 24 --serve-on vllm --round-to 8 -o {dir}/out", "give one of the two", BEFORE_LOAD),
    (PRUNE + " --ratio 0.2 --serve-on llama.cpp -o {dir}/out", "--round-to 256 is not below", BEFORE_LOAD),
    # report
    ("report {dir}", "has neither", BEFORE_LOAD),
    ("report {dir}/bad-run", "not valid JSON", BEFORE_LOAD),
    ("report {dir}/keyless-run", "is not a fidelprune pruning.json", BEFORE_LOAD),
    ("report {dir}/list-run", "is not a fidelprune pruning.json", BEFORE_LOAD),
    # the right keys with the wrong types (issue 49): named, not a traceback
    ("report {dir}/typeless-run", "but its method is not what fidelprune writes there", BEFORE_LOAD),
    ("report {dir}/stringly-run", "but its allocation.width_before is not", BEFORE_LOAD),
    ("report {dir}/mixed-run", "but its kept_neurons is not", BEFORE_LOAD),
    ("report {dir}/bad-results", "results.json", BEFORE_LOAD),
    ("report {dir}/file.txt", "is not a directory", BEFORE_LOAD),
    # model sources that are not there
    ("prune {dir}/none.gguf --keep 24 -o {dir}/out", "GGUF file not found", BEFORE_LOAD),
    ("prune {dir}/exists.gguf --keep 24 -o {dir}/out", "exists.gguf is not a GGUF file", BEFORE_LOAD),
    ("prune {dir}/half.gguf --keep 24 -o {dir}/out", "cannot read the config of", BEFORE_LOAD),
    ("prune {dir}/a/b/c --keep 24 -o {dir}/out", "model path not found", BEFORE_LOAD),
    ("prune no-such-org/no-such-model --keep 24 -o {dir}/out", "no-such-org/no-such-model", BEFORE_LOAD),
    ("eval {dir}/none.gguf -o {dir}/out", "GGUF file not found", BEFORE_LOAD),
    ("eval {tiny} --seq-len 32 --baseline {dir}/none.gguf -o {dir}/out", "GGUF file not found", BEFORE_LOAD),
]
if not torch.cuda.is_available():
    CASES.append((PRUNE + " --keep 24 --device cuda -o {dir}/out", "no CUDA GPU", BEFORE_LOAD))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_dir):
    """An architecture fidelprune cannot prune (a non-gated MLP), saved with a tokenizer."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_dir / name).is_file():
            shutil.copy(tiny_dir / name, path / name)
    return path


def _scratch(directory: Path) -> dict[str, Path]:
    """The files the cases point at: scores of other shapes, a damaged file, a short text, a folder without a
    config, a previous run that a re-prune reads from, a plain file."""
    save_file({"layer.0": torch.rand(64), "layer.1": torch.rand(64)}, str(directory / "wide.safetensors"))
    save_file({f"layer.{i}": torch.rand(48) for i in range(3)}, str(directory / "deep.safetensors"))
    (directory / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (directory / "short.txt").write_text("too short")
    (directory / "few.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "word " * 60}) + "\n" for i in range(8)))
    (directory / "empty.txt").write_text("")
    (directory / "blank.txt").write_text("  \n\n \t \n")
    (directory / "file.txt").write_text("a plain file")
    (directory / "exists.gguf").write_bytes(b"an earlier export")
    (directory / "half.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # a download cut after its first bytes
    (directory / "no-config").mkdir()
    (directory / "no-config" / "model.safetensors").write_bytes(b"")
    (directory / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory.parent.parent / "tiny-copy" / name, directory / "no-tokenizer" / name)
    (directory / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 400)
    (directory / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (directory / "untexted.jsonl").write_text('{"content": "no text field here"}\n' * 40)
    (directory / "bad-run").mkdir()
    (directory / "bad-run" / "pruning.json").write_text("{not json")
    (directory / "keyless-run").mkdir()
    (directory / "keyless-run" / "pruning.json").write_text('{"method": "hfprune"}')
    (directory / "list-run").mkdir()
    (directory / "list-run" / "pruning.json").write_text("[1, 2]")
    for name, manifest in (("typeless-run", {"method": "hfprune", "allocation": [1, 2], "kept_neurons": {"0": "abc"}}),
                           ("stringly-run", {"method": {"method": "hfprune"}, "allocation": {"width_before": "x"},
                                             "kept_neurons": {"0": [1, 2]}}),
                           ("mixed-run", {"method": {"method": "hfprune"}, "allocation": {}, "kept_neurons": {"0": [1, "a"]}})):
        (directory / name).mkdir()
        (directory / name / "pruning.json").write_text(json.dumps(manifest))
    (directory / "bad-results").mkdir()
    (directory / "bad-results" / "results.json").write_text('{"model": ')
    layers = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu"}
    maps = {"gpu": {**layers, "lm_head": "cuda:3"}, "disk": {**layers, "lm_head": "disk"}, "partial": layers,
            "stranger": {**layers, "lm_head": "cpu", "model.layers.7": "cpu"},
            "twice": {**layers, "lm_head": "cpu", "model.layers.0.mlp": "cpu"}}
    for name, device_map in maps.items():
        (directory / f"{name}-map.json").write_text(json.dumps(device_map))
    (directory / "broken-map.json").write_text('{"lm_head": ')
    (directory / "list-map.json").write_text('["cpu"]')
    (directory / "run").mkdir()
    save_file({"layer.0": torch.rand(48), "layer.1": torch.rand(48)}, str(directory / "run" / "scores.safetensors"))
    return {p.name: p for p in directory.iterdir()}


@pytest.mark.parametrize("argv,message,before_load", CASES, ids=[c[0].replace(PRUNE, "prune").replace("{", "").replace("}", "") for c in CASES])
def test_bad_input_is_one_line_writes_nothing_and_leaves_the_input(argv, message, before_load, tiny_dir, gpt2_dir,
                                                                     tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "work" / "scratch"
    scratch.mkdir(parents=True)
    shutil.copytree(tiny_dir, tmp_path / "tiny-copy")
    before = _scratch(scratch)
    link = tmp_path / "link"
    link.symlink_to(tiny_dir, target_is_directory=True)
    tiny_before = tree_digest(tiny_dir)
    scratch_before = tree_digest(scratch)
    if before_load:
        def no_weights(*args, **kwargs):
            raise AssertionError("the weights were loaded before this bad input was refused")

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    args = argv.format(tiny=tiny_dir, models=tiny_dir.parent, dir=scratch, link=link / "sub", gpt2=gpt2_dir).split()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and message in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err)
    assert tree_digest(tiny_dir) == tiny_before
    assert tree_digest(scratch) == scratch_before and {p.name for p in scratch.iterdir()} == set(before)
    assert not any(p.name.startswith(".") for p in scratch.iterdir())  # no temporary folder left either


# ------------------------------------------------------------------------------------------------- Python API
API_CASES = [
    (dict(method="hfprune", ratio="0.2"), "--ratio must be a finite number"),
    (dict(method="hfprune", ratio=0.2, calibration_ids=torch.arange(12)), "[N, L] tensor of token ids"),
    (dict(method="hfprune", ratio=0.2, calibration_ids=torch.rand(4, 12)), "[N, L] tensor of token ids"),
    (dict(method="hfprune", ratio=0.2, calibration_ids=torch.full((2, 12), 10_000)), "outside the model's vocabulary"),
    (dict(method="magnitude", keep=24, scores={0: torch.rand(64), 1: torch.rand(64)}), "come from another model"),
    (dict(method="magnitude", keep=24, reconstruct="sideways"), "unknown reconstruction mode"),
    (dict(method="nope", ratio=0.2), "unknown method"),
    (dict(method="hfprune", ratio=0.2, allocation="sideways"), "unknown allocation"),
    (dict(method="hfprune", ratio=0.2, keep=24), "not both"),
    (dict(method="sdmprune", ratio=0.2, alpha=3.0), "--alpha"),
    (dict(method="magnitude", keep=0), "--keep must be at least 1"),
    (dict(method="magnitude", keep=24, round_to=0), "--round-to must be at least 1"),
    (dict(method="hfprune", keep=24, form="sideways"), "sideways"),
    (dict(method="hfprune", keep=24, objective="nope"), "nope"),
    (dict(method="hfprune", keep=24, samples=0), "samples"),
    (dict(method="random", keep=24, seed=2**70), "--seed must be at most"),
    (dict(method="random", keep=24, seed=-1), "--seed must be at least 0"),
    (dict(method="hfprune", keep=24, allocation="search", search_seed=2**64), "--search-seed must be at most"),
    (dict(method="hfprune", keep=24, drop_layers=1, reconstruct="sequential", reconstruct_target="dense"),
     "use --reconstruct-target layer"),
    (dict(method="random", keep=24, drop_layers=1), "random reads no data"),
    (dict(method="hfprune", keep=24, keep_heads=1, reconstruct="parallel"), "use --reconstruct sequential"),
    (dict(method="magnitude", keep=24, bogus=1), "prune() has no option 'bogus'"),
    (dict(method="magnitude", keep=24, scores=123), "scores must be a scores.safetensors path"),
    (dict(method=PruneConfig(), keep=24), "either as a PruneConfig or as keywords"),
]


@pytest.mark.parametrize("kwargs,message", API_CASES, ids=[m for _, m in API_CASES])
def test_bad_python_input_raises_fidelprunes_own_error(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(FidelpruneError) as caught:
        prune(model, None, progress=False, **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_path_for_a_model_and_a_missing_report_are_named(tmp_path):
    with pytest.raises(FidelpruneError, match="prune\\(\\) takes a loaded model, got str; .*prune_location"):
        prune("HuggingFaceTB/SmolLM2-135M", None, "magnitude", keep=24)
    with pytest.raises(FidelpruneError, match="save\\(\\) needs the PruneReport that prune\\(\\) returned"):
        fidelprune.save(tiny_model("llama"), None, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_notebooks_grad_mode_does_not_matter_and_a_headless_model_is_named():
    """prune() inside no_grad() or inference_mode() scores exactly as outside; a decoder without its head, or
    weights made under inference_mode, are one-line errors."""
    model, windows = tiny_model("llama"), tiny_windows()
    expected = prune(model, None, "hfprune", keep=24, calibration_ids=windows, progress=False)[1].scores
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = prune(model, None, "hfprune", keep=24, calibration_ids=windows, progress=False)[1].scores
        assert all(torch.equal(expected[i], got[i]) for i in expected), mode.__name__
    with pytest.raises(FidelpruneError, match="LlamaModel has no language-model head"):
        prune(model.model, None, "magnitude", keep=24, progress=False)
    with torch.inference_mode():
        made_inside = tiny_model("llama")
    with pytest.raises(FidelpruneError, match="inference_mode"):
        prune(made_inside, None, "magnitude", keep=24, progress=False)


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path, caplog):
    """A run killed while saving leaves `.OUT.tmp-PID-*`; the next run to the same output removes it and says so,
    and leaves alone the temporary folder of a run that is still alive."""
    output = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999999-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = temporary_sibling(output)  # this process: alive
    model = tiny_model("llama")
    pruned, report = prune(model, None, "magnitude", keep=24, progress=False)
    from fidelprune import save

    with caplog.at_level("WARNING"):
        save(pruned, None, report, output)
    assert not stale.exists() and alive.exists() and (output / "pruning.json").is_file()
    assert "interrupted runs" in caplog.text
    shutil.rmtree(alive)
    assert remove_stale_siblings(output) == []


def test_windows_are_not_touched_by_validation():
    """The checks on given token ids read them; they never change them."""
    windows = tiny_windows()
    copy = windows.clone()
    prune(tiny_model("llama"), None, "minitron", keep=24, calibration_ids=windows, progress=False)
    assert torch.equal(windows, copy)


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory, tiny_dir):
    """The tiny model with one NaN weight, as a damaged checkpoint is."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, path / name)
    return path


@pytest.mark.parametrize("argv,message", [
    ("prune {nan} --keep 24 --samples 4 --seq-len 32 -o {out}", "NaN or inf weights"),
    ("recover {nan} --max-steps 1 --seq-len 32 --eval-windows 0 -o {out}", "NaN or inf weights"),
    ("eval {nan} --tasks none --no-speed --limit-windows 2 --seq-len 32 --baseline none -o {out}", "not finite"),
])
def test_nan_weights_are_an_error_not_a_result(argv, message, nan_dir, tmp_path, capsys):
    assert main(argv.format(nan=nan_dir, out=tmp_path / "out").split()) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()

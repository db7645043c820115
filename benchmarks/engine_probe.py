"""Run one inference engine on an exported model and write what it computed, for benchmarks/deploy.py.

    python engine_probe.py llama.cpp MODEL.gguf REQUEST.json RESULT.json   # a Python that imports llama_cpp
    python engine_probe.py vllm MODEL_DIR REQUEST.json RESULT.json         # a Python with vLLM installed

REQUEST: {"windows": [[token ids]...], "prompt": [token ids], "new_tokens": N, "threads": T}
RESULT: the engine's version, load seconds, per window the top-1 next-token id and the log-probability of the true
next token at every position, its greedy continuation of the prompt (N token ids) and decode tokens/s; llama.cpp
also writes its full logits beside RESULT (RESULT.npy) for the max |logit difference|.
Each engine runs in its own process (and Python), so neither shares state with transformers or with the other.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def probe_llama_cpp(model: str, request: dict, result_path: str) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    windows, prompt, new_tokens = request["windows"], request["prompt"], request["new_tokens"]
    n_ctx = max(max(len(w) for w in windows), len(prompt) + new_tokens) + 8
    start = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=request["threads"], verbose=False)
    load_s = time.perf_counter() - start
    top1, target_logprob, all_logits = [], [], []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: len(window)], dtype=np.float32)
        all_logits.append(logits[:-1])
        top1.append(logits[:-1].argmax(-1).tolist())
        lp = log_softmax(logits[:-1].astype(np.float64))
        target_logprob.append(lp[np.arange(len(window) - 1), window[1:]].tolist())
    np.save(result_path + ".npy", np.stack(all_logits))
    llm.reset()
    greedy, stamps = [], []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        greedy.append(int(token))
        stamps.append(time.perf_counter())
        if len(greedy) == new_tokens:
            break
    return {"engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}", "load_s": load_s, "top1": top1,
            "target_logprob": target_logprob, "greedy": greedy, "logits": result_path + ".npy",
            "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def probe_vllm(model: str, request: dict, result_path: str) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows, prompt, new_tokens = request["windows"], request["prompt"], request["new_tokens"]
    start = time.perf_counter()
    # float32 to compare with the float32 checkpoint; on the CPU backend gpu_memory_utilization is the share of RAM
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.3,
              trust_remote_code=True, seed=0)
    load_s = time.perf_counter() - start
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                           SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0))
    top1, target_logprob = [], []
    for window, output in zip(windows, outputs):
        positions = output.prompt_logprobs[1:]  # entry t holds log p(token t | tokens < t); entry 0 is None
        top1.append([next(tok for tok, lp in entry.items() if lp.rank == 1) for entry in positions])
        target_logprob.append([entry[token].logprob for entry, token in zip(positions, window[1:])])
    start = time.perf_counter()
    generated = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0, max_tokens=new_tokens))
    seconds = time.perf_counter() - start
    greedy = list(generated[0].outputs[0].token_ids)
    return {"engine": "vllm", "version": f"vllm {vllm.__version__}", "load_s": load_s, "top1": top1,
            "target_logprob": target_logprob, "greedy": greedy, "logits": None,
            "decode_tokens_per_s": len(greedy) / seconds, "decode_includes_prefill": True}


def main() -> None:
    engine, model, request_path, result_path = sys.argv[1:5]
    request = json.loads(open(request_path).read())
    result = (probe_llama_cpp if engine == "llama.cpp" else probe_vllm)(model, request, result_path)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()

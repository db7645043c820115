"""Pruned-model speed: dense vs uniformly pruned at 20/30/40 % of parameters, prefill and decode tokens/s and
peak memory, and the achieved speed-up against the ideal one (the parameter-bytes ratio). Speed depends only on
the shapes, so the pruned models come from `magnitude` (no calibration); CPU here, CUDA too when present.
Each model is saved as a checkpoint and measured in a process of its own that loads just it, as a deployment
would: the CPU peak (process RSS) then holds that model alone, not the dense one it was pruned from.

    python benchmarks/speed.py
    python benchmarks/speed.py --model tiny --repeats 1 --output /tmp/speed.json   # smoke test
    python benchmarks/speed.py --model Llama-3.2-1B-random --devices cuda --dtype bfloat16 --output benchmarks/results/speed-cuda.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelprune  # noqa: E402
from fidelprune.evaluation import measure_speed, model_size  # noqa: E402

from common import RESULTS, ResultsFile, load_model, markdown_table, provenance  # noqa: E402


def render(data: dict) -> str:
    p = data["protocol"]
    dense = {r["device"]: r for r in data["rows"] if r["ratio"] == 0}
    rows = []
    for r in data["rows"]:
        base = dense.get(r["device"])
        ideal = base["param_bytes"] / r["param_bytes"] if base else None
        prefill = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"] if base else None
        decode = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
        rows.append([r["device"], r["ratio"], r["achieved_ratio"], r["width"], r["param_bytes"] / 2**20, r["prefill_tokens_per_s"],
                     r["decode_tokens_per_s"], (r["peak_memory_bytes"] or 0) / 2**20, ideal, prefill, decode,
                     prefill / ideal if base else None, decode / ideal if base else None])
    return (f"# Pruned-model speed, {p['model']}\n\nPrefill: one forward of {p['batch']} x {p['prompt_len']} tokens; decode: "
            f"{p['new_tokens']} greedy steps with the KV cache, batch {p['batch']}; median of {p['repeats']} runs after a warm-up"
            f"{'; ' + p['dtype'] + ' weights' if 'dtype' in p else ''}. "
            f"Ideal speed-up = dense parameter bytes / pruned parameter bytes.\n\n" + provenance(data) + "\n" + markdown_table(
                ["device", "target", "achieved", "MLP width", "param MiB", "prefill tok/s", "decode tok/s", "peak MiB",
                 "ideal x", "prefill x", "decode x", "prefill / ideal", "decode / ideal"], rows))


def worker(spec: dict) -> dict:
    """Load one saved checkpoint and measure it: runs in its own process (see the module docstring)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=getattr(torch, spec.get("dtype", "float32")))
    speed = measure_speed(model, spec["device"], prompt_len=spec["prompt_len"], new_tokens=spec["new_tokens"],
                          batch_size=spec["batch"], repeats=spec["repeats"])
    return {"width": model.config.intermediate_size, "param_bytes": model_size(model)["param_bytes"], **speed.to_dict()}


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratios", default="0.2,0.3,0.4")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", default=str(RESULTS / "speed.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    protocol = {"model": args.model, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
                "repeats": args.repeats, "process": "one per model, loading its saved checkpoint"}
    if args.dtype != "float32":  # recorded only when set: the committed float32 table resumes
        protocol["dtype"] = args.dtype
    results = ResultsFile(args.output, protocol)
    model, tokenizer, _ = load_model(args.model)
    devices = args.devices.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        for ratio in [0.0] + [float(r) for r in args.ratios.split(",")]:
            keys = [f"{device} ratio={ratio}" for device in devices]
            if all(results.done(key) for key in keys):
                continue
            subject, achieved = model, 0.0
            if ratio:
                subject, report = fidelprune.prune(model, tokenizer, "magnitude", ratio, progress=False)
                achieved = report.manifest["allocation"]["achieved_ratio"]
            checkpoint = Path(scratch) / f"ratio-{ratio}"
            subject.save_pretrained(checkpoint)
            for device, key in zip(devices, keys):
                if results.done(key):
                    continue
                spec = {"checkpoint": str(checkpoint), "device": device, **protocol}
                row = {"key": key, "device": device, "ratio": ratio, "achieved_ratio": achieved, **measure(spec)}
                print(key, f"prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode {row['decode_tokens_per_s']:.1f} tok/s", flush=True)
                results.put(row)
    Path(args.output).with_suffix(".md").write_text(render(results.data))
    print(Path(args.output).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""Deployment check: does a fidelprune output convert with llama.cpp's own converter as it is, and does the GGUF
compute what the transformers checkpoint computes?

For each output folder: run llama.cpp's `convert_hf_to_gguf.py` (f32) and record success or its error line; read
the GGUF's header (feed_forward_length against the checkpoint's per-layer widths); reload the GGUF with
transformers' own GGUF loader (a reader independent of the converter) and compare next-token logits with the
safetensors checkpoint on WikiText-2 windows: top-1 agreement, max |logit difference|, perplexity ratio.
llama.cpp's runtime and vLLM are not run here (their builds take 15-30 minutes): see issue 22.

The converter pins transformers 4.x, so it runs in its own Python; llama-cpp-python's sdist carries llama.cpp:

    pip download --no-deps --no-binary :all: -d /tmp/sdist llama-cpp-python && tar xzf /tmp/sdist/*.tar.gz -C /tmp
    python3 -m venv /tmp/venv4 && /tmp/venv4/bin/pip install torch==2.13.0 "transformers<5" numpy sentencepiece safetensors protobuf
    python benchmarks/deploy.py --llama-cpp /tmp/llama_cpp_python-*/vendor/llama.cpp --converter-python /tmp/venv4/bin/python \
        pruned-uniform/ pruned-global/
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, markdown_table  # noqa: E402

from fidelprune.evaluation.perplexity import load_corpus  # noqa: E402


def convert(run_dir: Path, llama_cpp: Path, python: str, outfile: Path) -> tuple[bool, str, float]:
    """(converted, the converter's last error line or 'ok', seconds)."""
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    start = time.perf_counter()
    done = subprocess.run([python, str(llama_cpp / "convert_hf_to_gguf.py"), str(run_dir), "--outtype", "f32",
                           "--outfile", str(outfile)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode == 0 and outfile.is_file():
        return True, "ok", seconds
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    return False, (errors or done.stderr.splitlines() or ["no output"])[-1].strip(), seconds


def gguf_ffn_lengths(path: Path) -> list[int] | int | None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields["general.architecture"]
    arch = arch_field.parts[arch_field.data[0]].tobytes().decode()
    field = reader.fields.get(f"{arch}.feed_forward_length")
    if field is None:
        return None
    values = [int(field.parts[i][0]) for i in field.data]
    return values if len(values) > 1 else values[0]


@torch.no_grad()
def compare_logits(run_dir: Path, gguf: Path, windows: int, seq_len: int) -> dict:
    import fidelprune
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = fidelprune.load_model(run_dir, dtype="float32", device="cpu")
    ids = tokenizer(load_corpus("wikitext2"), add_special_tokens=False)["input_ids"][: windows * seq_len]
    batch = torch.tensor(ids).view(windows, seq_len)
    reference = model(batch).logits.float()
    del model
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    logits = loaded(batch).logits.float()

    def ppl(values: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(values[:, :-1].reshape(-1, values.shape[-1]), batch[:, 1:].reshape(-1))
        return math.exp(nll.item())

    return {"windows": windows, "seq_len": seq_len,
            "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (logits - reference).abs().max().item(),
            "ppl_checkpoint": ppl(reference), "ppl_gguf": ppl(logits), "ppl_ratio": ppl(logits) / ppl(reference)}


def check(run_dir: Path, llama_cpp: Path, python: str, windows: int, seq_len: int) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    widths = config.get("fidelprune_layer_widths") or [config["intermediate_size"]] * config["num_hidden_layers"]
    tokenizer_config = json.loads((run_dir / "tokenizer_config.json").read_text())
    row = {"key": str(run_dir), "layout": "uniform" if len(set(widths)) == 1 else "per-layer widths",
           "widths": sorted(set(widths)), "tokenizer_class": tokenizer_config.get("tokenizer_class"),
           "top_level_safetensors": sorted(p.name for p in run_dir.glob("*.safetensors"))}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        row["converted"], row["converter"], row["convert_s"] = convert(run_dir, llama_cpp, python, gguf)
        if row["converted"]:
            row["gguf_feed_forward_length"] = gguf_ffn_lengths(gguf)
            try:
                row["logits"] = compare_logits(run_dir, gguf, windows, seq_len)
            except Exception as err:  # noqa: BLE001 - a GGUF that does not load is a result to record
                row["logits"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return row


def render(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        logits = r.get("logits") or {}
        rows.append([Path(r["key"]).name, r["layout"], r["tokenizer_class"], "yes" if r["converted"] else f"no: {r['converter']}",
                     str(r.get("gguf_feed_forward_length", "-")),
                     f"does not load: {logits['error'][:70]}" if "error" in logits else
                     (f"{logits['top1_agreement']:.4f}" if logits else "-"),
                     f"{logits['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in logits else "-",
                     f"{logits['ppl_ratio']:.6f}" if "ppl_ratio" in logits else "-"])
    return (f"# Deployment check\n\n`{data['command']}`\n\n" +
            markdown_table(["output", "widths", "tokenizer_class", "llama.cpp converter", "GGUF feed_forward_length",
                            "top-1 agreement", "max abs logit diff", "PPL ratio"], rows) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="fidelprune output folders")
    p.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)")
    p.add_argument("--converter-python", default=sys.executable, help="a Python with transformers 4.x for the converter")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--output", type=Path, default=RESULTS / "deploy.json")
    args = p.parse_args()
    data = header({"windows": args.windows, "seq_len": args.seq_len, "outtype": "f32"})
    converter_version = subprocess.run([args.converter_python, "-c", "import transformers; print(transformers.__version__)"],
                                       capture_output=True, text=True).stdout.strip()
    data["converter"] = {"llama_cpp": str(args.llama_cpp), "transformers": converter_version}
    for run in args.runs:
        print(f"checking {run}", file=sys.stderr)
        data["rows"].append(check(run, args.llama_cpp, args.converter_python, args.windows, args.seq_len))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()

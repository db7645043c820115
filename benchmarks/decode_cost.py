"""Where pruned decode falls short of the ideal speed-up (dense parameter bytes / pruned parameter bytes).

Every MLP width is built (magnitude pruning; speed depends on the shapes only) and held in this one process; in
each round every model prefills the same prompt and then decodes --steps tokens, one model after another, the
order rotating from round to round, so a slow spell of the machine lands on all widths alike (speed.py's
one-process-per-model timings drift more than the effects looked for here). A model's step time is its median
over rounds. Then:
  - a least-squares line, step time = fixed + parameter bytes / bandwidth: the ideal speed-up assumes fixed = 0,
    so the line's fixed part is what keeps decode under the ideal (work per token that does not shrink with the
    weights: the Python dispatch of every layer's ops, norms, rotary, attention over the cache, sampling);
  - rounded against unrounded widths (1024 vs 1016 vs 1008; 768 vs 760; 512 vs 496): what `--round-to 128` buys;
  - the weights' layout: contiguous, and where each starts (64-byte alignment), with a row for the dense model's
    weights copied to fresh, aligned memory (the GGUF-loaded ones start wherever the file put them).
Ratios to the dense model are paired within rounds (the median over rounds of dense step / model step), since a
slow spell moves a whole round.

    python benchmarks/decode_cost.py
    python benchmarks/decode_cost.py --model tiny --widths 256,128,64 --rounds 2 --steps 2 --output /tmp/dc.json  # smoke
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelprune  # noqa: E402
from fidelprune.evaluation import model_size  # noqa: E402
from fidelprune.evaluation.speed import cache_keyword, output_cache  # noqa: E402

from common import RESULTS, ResultsFile, load_model, markdown_table, paired_ratio, provenance  # noqa: E402


def layout(model) -> dict:
    """Whether every MLP weight is contiguous and starts on a 64-byte boundary (what vectorised kernels want)."""
    weights = [p for name, p in model.named_parameters() if ".mlp." in name]
    return {"contiguous": all(p.is_contiguous() for p in weights), "aligned_64": all(p.data_ptr() % 64 == 0 for p in weights)}


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per decode step after a prefill of `prompt` (greedy, KV cache, batch 1)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    keyword = cache_keyword(model)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{keyword: cache})
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """(fixed seconds, seconds per byte, largest relative residual) of step time against parameter bytes."""
    x = torch.tensor([r["param_bytes"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["step_s"] for r in rows], dtype=torch.float64)
    slope, fixed = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y.unsqueeze(1)).solution.squeeze(1).tolist()
    return fixed, slope, ((y - fixed - slope * x).abs() / y).max().item()


def render(data: dict) -> str:
    p, rows = data["protocol"], data["rows"]
    dense = rows[0]
    fixed, slope, residual = fit(rows)
    line = lambda b: fixed + slope * b  # noqa: E731
    table = []
    for r in rows:
        ideal = dense["param_bytes"] / r["param_bytes"]
        measured = paired_ratio(dense["rounds_step_s"], r["rounds_step_s"])  # step-time ratio = speed-up
        table.append([r["key"], r["param_bytes"] / 2**20, r["step_s"] * 1e3, 1 / r["step_s"], ideal, measured, measured / ideal,
                      line(dense["param_bytes"]) / line(r["param_bytes"]) / ideal,
                      "yes" if r["contiguous"] and r["aligned_64"] else "no",
                      " ".join(f"{t * 1e3:.1f}" for t in r["rounds_step_s"])])
    return (f"# Decode cost against MLP width, {p['model']}\n\nAll widths in one process; each round prefills {p['prompt_len']} "
            f"tokens and times {p['steps']} greedy decode steps (KV cache, batch 1) for every model in turn; step ms is the median "
            f"of {p['rounds']} rounds, `decode x` the median of the per-round ratios to the dense model's step. The line fitted to every row: one step = **{fixed * 1e3:.2f} ms fixed** + parameter "
            f"bytes at {1 / slope / 2**30:.1f} GiB/s (largest relative residual {residual:.3f}); the fixed part is "
            f"{fixed / line(dense['param_bytes']):.1%} of the dense step. `line / ideal` is the decode / ideal that this line "
            f"predicts: below 1 by the fixed part alone.\n\n" + provenance(data) + "\n" + markdown_table(
                ["model", "param MiB", "step ms", "decode tok/s", "ideal x", "decode x", "decode / ideal", "line / ideal",
                 "contiguous, 64-byte aligned", "per round ms"], table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--widths", default="1024,1016,1008,768,760,512,496,8",
                        help="MLP widths besides the dense one (1016 / 760 / 496 are 20 / 30 / 40 %% of SmolLM2 at --round-to 8)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", default=str(RESULTS / "decode-cost.json"))
    args = parser.parse_args()
    protocol = {"model": args.model, "widths": args.widths, "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds}
    results = ResultsFile(args.output, protocol)
    if results.data["rows"]:
        raise SystemExit(f"{args.output} is complete; pass another --output for a new run")
    dense, tokenizer, _ = load_model(args.model)
    width = dense.config.intermediate_size
    aligned = copy.deepcopy(dense)
    with torch.no_grad():
        for p in aligned.parameters():
            p.data = p.data.clone()  # fresh allocations: 64-byte aligned by PyTorch's CPU allocator
    models = {f"dense {width}": dense, f"dense {width}, aligned copy": aligned}
    for width in (int(w) for w in args.widths.split(",")):
        models[f"width {width}"], _ = fidelprune.prune(dense, tokenizer, "magnitude", keep=width, round_to=1, progress=False)
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {key: [] for key in models}
    order = list(models)
    for model in models.values():  # warm-up: first-call allocations and kernel choices
        decode_seconds(model.eval(), prompt, 2)
    for round_ in range(args.rounds):
        for key in order[round_ % len(order):] + order[: round_ % len(order)]:
            times[key].append(decode_seconds(models[key], prompt, args.steps))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.1f} ms" for k in order), flush=True)
    for key, model in models.items():
        results.put({"key": key, "width": model.config.intermediate_size, "param_bytes": model_size(model)["param_bytes"],
                     "step_s": statistics.median(times[key]), "rounds_step_s": times[key], **layout(model)})
    Path(args.output).with_suffix(".md").write_text(render(results.data))
    print(Path(args.output).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

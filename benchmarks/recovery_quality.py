"""Recovery on a CPU budget: distil a pruned model for a fixed number of tokens and follow its perplexity on the
sweep protocol (WikiText-2, the first 64 windows of 512 tokens), against the dense model it was pruned from.

The run is one `fidelprune.recover` call (LoRA or full fine-tuning) that writes a checkpoint every --eval-every
steps (keeping all); each checkpoint's weights (LoRA: its adapters, merged into a fresh copy of the pruned model)
are then evaluated, so the curve comes from the very run that produced the final weights. The row budget counts
whole rows (padding included), so the tokens trained on (non-padding) are at most --tokens.

    python benchmarks/recovery_quality.py PRUNED_DIR --tokens 200000       # the teacher is pruning.json's source
    python benchmarks/recovery_quality.py PRUNED_DIR --mode full --lr 1e-4 --output benchmarks/results/recovery-quality-full.json
    python benchmarks/recovery_quality.py PRUNED_DIR --tokens 2048 --batch-size 1 --seq-len 64 --eval-every 8 \
        --ppl-windows 2 --ppl-seq-len 64 --output /tmp/rq.json                # a smoke test's scale
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelprune  # noqa: E402
from fidelprune.evaluation import perplexity  # noqa: E402

from common import RESULTS, ResultsFile, machine, markdown_table, provenance  # noqa: E402


def evaluate(model, tokenizer, args) -> float:
    return perplexity(model, tokenizer, "wikitext2", seq_len=args.ppl_seq_len, limit_windows=args.ppl_windows, progress=False).ppl


def checkpoint_model(pruned, checkpoint: Path, config: dict) -> torch.nn.Module:
    """The model a checkpoint holds: a fresh copy of the pruned model prepared as recover() prepared it (LoRA
    adapters, or every weight trainable), its weights loaded, and LoRA's adapters merged."""
    from fidelprune.recovery.checkpoints import load_weights
    from fidelprune.recovery.modes import apply_lora, merge_lora, prepare_full

    if config["mode"] == "full":
        model = prepare_full(copy.deepcopy(pruned))
    else:
        model = apply_lora(copy.deepcopy(pruned), config["lora_r"], config["lora_alpha"], config["lora_dropout"],
                           config["lora_target_modules"])
    load_weights(checkpoint, model)
    return (model if config["mode"] == "full" else merge_lora(model)).eval()


def render(data: dict) -> str:
    p = data["protocol"]
    lines = []
    for row in data["rows"]:
        dense = row["dense_ppl"]
        curve = [[c["step"], c["tokens"], c["ppl"], c["ppl"] / dense] for c in row["curve"]]
        reached = next((c for c in row["curve"] if c["ppl"] <= 1.5 * dense), None)
        own = (f"Command: `{row['command']}`  \nMachine: {row['cpu']}  \nStarted: {row['started']}\n\n"
               if "command" in row else "")
        lines.append(f"## {row['key']}\n\n{own}Dense {dense:.2f}; 1.5 x dense = {1.5 * dense:.2f}: "
                     + (f"reached after {reached['tokens']:,} tokens (step {reached['step']})" if reached else
                        f"not reached within {row['curve'][-1]['tokens']:,} tokens (best {min(c['ppl'] for c in row['curve']):.2f})")
                     + f". Training {row['train_s']:.0f} s at {row['tokens_per_s']:.1f} tokens/s.\n\n"
                     + markdown_table(["step", "tokens trained", f"WikiText-2 PPL ({p['ppl_windows']} x {p['ppl_seq_len']})", "x dense"], curve))
    return (f"# Recovery on a CPU budget\n\n`fidelprune.recover` {p['mode']}/{p['loss']} on the bundled {p['data']} sample, rows of "
            f"{p['seq_len']} tokens, batch {p['batch_size']}, lr {p['lr']}, at most {p['tokens']:,} tokens; the teacher is the "
            f"dense source model. Perplexity on the first {p['ppl_windows']} WikiText-2 windows of {p['ppl_seq_len']} tokens "
            f"(the sweep protocol), at each checkpoint.\n\n" + provenance(data) + "\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pruned", help="a fidelprune output directory (its pruning.json names the teacher)")
    parser.add_argument("--tokens", type=int, default=200_000, help="row budget: steps = tokens // (batch x seq-len)")
    parser.add_argument("--mode", default="lora", choices=("lora", "full"))
    parser.add_argument("--loss", default="kd")
    parser.add_argument("--data", default="c4")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=40, help="steps between perplexity points")
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--output", default=str(RESULTS / "recovery-quality.json"))
    args = parser.parse_args()

    steps = args.tokens // (args.batch_size * args.seq_len)
    protocol = {k: getattr(args, k) for k in ("tokens", "mode", "loss", "data", "seq_len", "batch_size", "lr", "eval_every",
                                               "ppl_windows", "ppl_seq_len")}
    results = ResultsFile(args.output, protocol)
    key = Path(args.pruned).resolve().name
    if results.done(key):
        print(f"{key} is already in {args.output}")
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    pruned, tokenizer, _ = fidelprune.load_model(args.pruned, dtype="float32", device="cpu")
    manifest = fidelprune.read_manifest(Path(args.pruned))
    dense, _, _ = fidelprune.load_model(manifest["source_model"]["name"], dtype="float32", device="cpu")
    dense_ppl = evaluate(dense, tokenizer, args)
    curve = [{"step": 0, "tokens": 0, "ppl": evaluate(pruned, tokenizer, args)}]
    print(f"dense {dense_ppl:.2f}, pruned {curve[0]['ppl']:.2f}; {steps} steps", flush=True)
    tokens_at: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        recovered, report = fidelprune.recover(
            pruned, dense, args.data, tokenizer, mode=args.mode, loss=args.loss, seq_len=args.seq_len,
            batch_size=args.batch_size, lr=args.lr, max_steps=steps, save_every=args.eval_every, keep_last=0,
            checkpoint_dir=Path(scratch) / "checkpoints", eval_windows=0, progress=True,
            on_step=lambda step, metrics: tokens_at.__setitem__(step, tokens_at.get(step - 1, 0) + metrics["tokens"]))
        train_s = time.perf_counter() - start
        config = report.record["hyperparameters"]
        for checkpoint in sorted((Path(scratch) / "checkpoints").glob("step-*")):
            step = int(checkpoint.name.split("-")[1])
            curve.append({"step": step, "tokens": tokens_at[step], "ppl": evaluate(checkpoint_model(pruned, checkpoint, config), tokenizer, args)})
            print(f"step {step}: {curve[-1]['ppl']:.2f}", flush=True)
    curve.append({"step": steps, "tokens": tokens_at[steps], "ppl": evaluate(recovered, tokenizer, args)})
    training = report.record["training"]
    # a row's own provenance: a resumed file's header names the machine and command of its first row only
    results.put({"key": key, "command": " ".join(["python", *map(shlex.quote, sys.argv)]), "started": started,
                 "cpu": machine()["cpu"], "pruned": str(args.pruned), "source": manifest["source_model"]["name"],
                 "allocation": {k: manifest["allocation"][k] for k in ("kind", "achieved_ratio", "layer_widths_after")},
                 "reconstruction": (manifest.get("reconstruction") or {}).get("mode"), "dense_ppl": dense_ppl, "curve": curve, "steps": steps,
                 "train_s": train_s, "tokens_per_s": training["tokens_per_s"], "final_loss": training["final_loss"],
                 "finite": all(math.isfinite(c["ppl"]) for c in curve)})
    Path(args.output).with_suffix(".md").write_text(render(results.data))
    print(Path(args.output).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

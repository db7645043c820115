"""How much of a recovery row is padding: fidelprune's packing (best-fit decreasing) against in-order greedy
packing (each example into the current row if it fits, else a new row: fidelprune's packing until 2026-12-07),
on the bundled recovery data (every record, in the file's order: `recover` shuffles first and holds out a
validation slice, which moves in-order packing's figures a little), tokenized with the packaged SmolLM2 tokenizer.

Padding costs a full forward and backward but trains nothing, and `recover`'s budgets count rows (`--max-steps`
x batch), so the packing efficiency (real tokens / row slots) is the share of training compute that trains. The
lower bound on rows is ceil(real tokens / seq_len).

    python benchmarks/packing.py
    python benchmarks/packing.py --data c4 --seq-lens 64 --output /tmp/packing.json     # smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fidelprune.models import load_tokenizer  # noqa: E402
from fidelprune.recovery.data import Example, TokenStats, load_records, pack, tokenize_alpaca, tokenize_text  # noqa: E402

from common import RESULTS, ResultsFile, markdown_table, provenance  # noqa: E402


def in_order_rows(examples: list[Example], seq_len: int) -> int:
    """Rows that in-order greedy packing needs (the reference: no example is ever placed in an earlier row)."""
    rows, used = 0, seq_len
    for ex in examples:
        if used + len(ex.ids) > seq_len:
            rows, used = rows + 1, 0
        used += len(ex.ids)
    return rows


def render(data: dict) -> str:
    table = [[r["data"], r["seq_len"], r["examples"], f"{r['real_tokens']:,}", r["lower_bound_rows"], r["in_order_rows"],
              f"{r['in_order_efficiency']:.4f}", r["rows"], f"{r['efficiency']:.4f}", f"{r['pack_s']:.2f}"] for r in data["rows"]]
    return ("# Packing efficiency of the recovery rows\n\nThe bundled data, every record in the file's order (tokenized as `recover` does), "
            "packed into rows of seq_len tokens. Efficiency = real tokens / row slots.\n\n" + provenance(data) + "\n"
            + markdown_table(["data", "seq_len", "examples", "real tokens", "rows (lower bound)", "in-order greedy: rows",
                              "efficiency", "best-fit decreasing: rows", "efficiency", "pack s"], table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="c4,alpaca", help="bundled recovery datasets, comma-separated")
    parser.add_argument("--seq-lens", default="256,512,1024")
    parser.add_argument("--output", default=str(RESULTS / "packing.json"))
    args = parser.parse_args()

    results = ResultsFile(args.output, {"data": args.data, "seq_lens": args.seq_lens, "tokenizer": "packaged SmolLM2"})
    tokenizer = load_tokenizer()
    for data in args.data.split(","):
        kind, records, _ = load_records(data)
        tokenize = tokenize_alpaca if kind == "alpaca" else tokenize_text
        for seq_len in (int(s) for s in args.seq_lens.split(",")):
            examples = tokenize(tokenizer, records, seq_len, TokenStats())
            start = time.perf_counter()
            packed = pack(examples, seq_len, pad_id=0)
            pack_s = time.perf_counter() - start
            real = packed.real_tokens
            assert real == sum(len(ex.ids) for ex in examples)
            reference = in_order_rows(examples, seq_len)
            results.put({"key": f"{data}-{seq_len}", "data": data, "seq_len": seq_len, "examples": len(examples),
                         "real_tokens": real, "lower_bound_rows": math.ceil(real / seq_len),
                         "in_order_rows": reference, "in_order_efficiency": real / (reference * seq_len),
                         "rows": len(packed), "efficiency": real / packed.input_ids.numel(), "pack_s": pack_s})
    Path(args.output).with_suffix(".md").write_text(render(results.data))
    print(Path(args.output).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

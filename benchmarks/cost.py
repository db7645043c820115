"""Scoring cost: every method's tokens/s and peak memory against (a) the floor, a bare forward (+ backward)
over the same calibration batches, and (b) tests/reference.py, the straightforward per-sequence
implementation with full weight gradients and [I, d] accumulators that the published code uses. Each
measurement runs in its own process so peak memory is its own.

    python benchmarks/cost.py                       # SmolLM2-135M, 8 x 256 C4 windows
    python benchmarks/cost.py --model tiny --samples 2 --seq-len 16 --output /tmp/cost.json   # smoke test
    python benchmarks/cost.py --model Llama-3.2-1B-random --device cuda --dtype bfloat16 --samples 1024 \
        --seq-len 1024 --repeats 1 --impls fidelprune    # a GPU: results/cost-cuda.{json,md}; memory from torch.cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, ResultsFile, load_model, markdown_table, method_arguments, paired_ratio, provenance  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import reference  # noqa: E402  - the plain implementations the tests pin the fast scores to

GRADIENT_METHODS = ("hfprune", "sdmprune", "llm-pruner", "llm-pruner-element2")
FORWARD_METHODS = ("wanda-sp", "flap", "activation")


class PeakRSS:
    """Peak resident memory of this process while inside the block, sampled every 5 ms from /proc (torch's CPU
    allocations are invisible to tracemalloc, and ru_maxrss cannot be reset after the model load's own peak)."""

    def __enter__(self):
        self.before = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class PeakCuda:
    """PeakRSS's interface on a GPU: torch.cuda's allocated bytes, which are exact (no allocator slack to fix)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def run_floor(model, windows, batch_size, backward: bool) -> None:
    from fidelprune.objectives import ce
    from fidelprune.scoring import leaf_embeddings
    from fidelprune.utils import batches, frozen_eval

    device = next(model.parameters()).device
    with frozen_eval(model), leaf_embeddings(model), torch.set_grad_enabled(backward):
        for batch in batches(windows, batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            if backward:
                ce(logits, batch).sum().backward()


def plan_20_percent(model):
    """20 % of parameters, or (for the tiny smoke-test model, all embeddings) a quarter of each MLP."""
    from fidelprune.allocation import AllocationError, plan_width

    try:
        return plan_width(model, ratio=0.2, round_to=1)
    except AllocationError:
        return plan_width(model, keep=model.config.intermediate_size * 3 // 4, round_to=1)


def run_fast(model, windows, method: str, batch_size: int) -> None:
    from fidelprune.allocation import AllocationConfig
    from fidelprune.methods import MethodConfig, run_method

    plan = plan_20_percent(model)
    config = MethodConfig(**method_arguments(method), batch_size=batch_size).resolved(plan.achieved_ratio)
    run_method(model, windows, config, plan, AllocationConfig(round_to=1), progress=False)


def run_reference(model, windows, method: str) -> None:
    from fidelprune.allocation import select_uniform
    from fidelprune.methods import sdmprune_defaults
    from fidelprune.objectives import KD, ce, entropy
    from fidelprune.surgery import remove_neurons

    if method == "hfprune":
        reference.activation_scores(model, windows, entropy)
    elif method.startswith("llm-pruner"):
        reference.element_scores(model, windows, ce, second_order=method.endswith("element2"))
    elif method == "sdmprune":  # as published: stage-2 student is a pruned copy, the teacher the original
        plan = plan_20_percent(model)
        stage1 = reference.weight_element_scores(model, windows, ce)
        student = copy.deepcopy(model)
        remove_neurons(student, select_uniform(stage1, int(0.975 * plan.width_before)))
        reference.weight_element_scores(student, windows, KD(*sdmprune_defaults(plan.achieved_ratio)), teacher=model)
    else:
        reference.forward_scores(model, windows, method_arguments(method)["method"])


def worker(spec: dict) -> dict:
    """One measurement in this process: load, draw the shared windows, then time and watch memory."""
    from fidelprune.calibration import sample_windows

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(spec["model"])
    device = torch.device(spec.get("device", "cpu"))
    model.to(device=device, dtype=getattr(torch, spec.get("dtype", "float32")))
    windows, _ = sample_windows(tokenizer, "c4", spec["samples"], spec["seq_len"], seed=0)  # scoring moves each batch
    impl, method = spec["impl"], spec["method"]
    with torch.no_grad():  # warm-up: first-call allocations and kernel choices are not scoring cost
        model(input_ids=windows[:1].to(device), use_cache=False)
    on_gpu = device.type == "cuda"

    def timed(run) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    backward = method in GRADIENT_METHODS or method == "forward+backward"
    floor = lambda: run_floor(model, windows, spec["batch_size"], backward=backward)  # noqa: E731
    if impl == "floor":
        cell = floor
    elif impl == "fidelprune":
        cell = lambda: run_fast(model, windows, method, spec["batch_size"])  # noqa: E731
    else:
        cell = lambda: run_reference(model, windows, method)  # noqa: E731
    # With paired_floor, each pass of the cell follows a pass of its floor in this process, and time / floor is the
    # median of the per-pass ratios: on a shared machine the speed moves by 10-30 % between processes and minutes,
    # far more than between two passes a few seconds apart.
    paired = spec.get("paired_floor", False) and impl != "floor"
    runs, floor_runs = [], []
    with PeakCuda() if on_gpu else PeakRSS() as memory:  # the first pass sets the peak; repeats reuse what it freed
        for _ in range(spec.get("repeats", 1)):
            if paired:
                floor_runs.append(timed(floor))
            runs.append(timed(cell))
    seconds = statistics.median(runs)
    out = {"seconds": seconds, "runs_seconds": runs, "tokens": windows.numel(), "tokens_per_s": windows.numel() / seconds,
           "peak_rss_bytes": memory.peak, "extra_rss_bytes": memory.peak - memory.before}
    if paired:
        out.update(floor_runs_seconds=floor_runs, time_over_floor=paired_ratio(runs, floor_runs))
    return out


# glibc keeps freed blocks below its mmap threshold (which it raises itself, up to 32 MiB, after each large free)
# in its heap instead of returning them to the OS, so plain peak RSS counts whatever the allocator happened to
# keep: one unchanged cell measured 423 MiB on one day and 872 on the next. With the threshold fixed at 128 KiB
# every tensor-sized block is its own mapping, unmapped when freed, and RSS follows the live tensors (what a
# GPU's peak-allocated figure shows). That also slows allocation, so every cell runs twice: timed with the
# default allocator, as users run it, and watched for memory with this one.
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_worker(spec: dict, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, **env})
    if out.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(spec: dict, in_process: bool = False) -> dict:
    if in_process:  # smoke tests only: memory figures then include earlier cells' leftovers
        return worker(spec)
    # memory from a run of the cell alone (no floor passes beside it); on a GPU torch.cuda's peak is exact
    exact_memory = {} if spec.get("device", "cpu").startswith("cuda") else EXACT_RSS_ENV
    timed, watched = run_worker(spec, {}), run_worker({**spec, "repeats": 1, "paired_floor": False}, exact_memory)
    return {**timed, "peak_rss_bytes": watched["peak_rss_bytes"], "extra_rss_bytes": watched["extra_rss_bytes"],
            "default_allocator_extra_rss_bytes": timed["extra_rss_bytes"]}


def time_ratios(ours: dict, floor: dict | None, ref: dict | None) -> tuple[float | None, float | None]:
    """(time / floor, reference time / ours) of a method's cells: paired with the floor inside each cell's process
    when the cells have it (protocol paired_floor), else the cells' median times, measured in separate processes."""
    over_floor = ours.get("time_over_floor") or (floor and ours["seconds"] / floor["seconds"])
    if ref is None:
        return over_floor, None
    if "time_over_floor" in ref and "time_over_floor" in ours:
        return over_floor, ref["time_over_floor"] / ours["time_over_floor"]
    return over_floor, ref["seconds"] / ours["seconds"]


def render(data: dict) -> str:
    rows = {(r["method"], r["impl"]): r for r in data["rows"]}
    table = []
    for method in (*GRADIENT_METHODS, *FORWARD_METHODS):
        if (method, "fidelprune") not in rows:
            continue
        fast = rows[(method, "fidelprune")]
        floor = rows.get(("forward+backward" if method in GRADIENT_METHODS else "forward", "floor"))
        ref = rows.get((method, "reference"))
        over_floor, ref_over_ours = time_ratios(fast, floor, ref)
        table.append([
            method, fast["tokens_per_s"], floor and floor["tokens_per_s"], ref and ref["tokens_per_s"],
            over_floor, ref_over_ours,
            fast["extra_rss_bytes"] / 2**20, floor and floor["extra_rss_bytes"] / 2**20,
            floor and fast["extra_rss_bytes"] / max(floor["extra_rss_bytes"], 1), ref and ref["extra_rss_bytes"] / 2**20,
            ref and fast["extra_rss_bytes"] / max(ref["extra_rss_bytes"], 1),
        ])
    p = data["protocol"]
    if p.get("device", "cpu") == "cpu":
        memory = (f"Extra memory = peak RSS during scoring minus RSS before it, from a second run of the cell with glibc's "
                  f"mmap threshold fixed at 128 KiB so that freed tensors leave RSS (tok/s come from the first run, default "
                  f"allocator: the median of {p.get('repeats', 1)} passes in that process).")
    else:
        memory = (f"{p['device']}, {p['dtype']}. Extra memory = torch.cuda.max_memory_allocated during scoring minus what was "
                  f"allocated before it; tok/s the median of {p.get('repeats', 1)} passes.")
    pairing = ("Time / floor: each pass of a cell follows a pass of the floor in the same process, and the column is the "
               "median of the per-pass ratios (reference time / ours: the two cells' such ratios divided). "
               if p.get("paired_floor") else "")
    return (f"# Scoring cost\n\n{p['model']}, {p['samples']} x {p['seq_len']} C4 windows, batch {p['batch_size']}, "
            f"one process per cell. {memory} {pairing}sdmprune runs two scoring passes (stage 1 and 2) over the "
            f"windows.\n\n"
            + provenance(data) + "\n" + markdown_table(
                ["method", "tok/s", "floor tok/s", "reference tok/s", "time / floor", "reference time / ours",
                 "extra MiB", "floor extra MiB", "memory / floor", "reference extra MiB", "memory / reference"], table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per cell in one process; tok/s is their median")
    parser.add_argument("--methods", default=",".join((*GRADIENT_METHODS, *FORWARD_METHODS)))
    parser.add_argument("--impls", default="fidelprune,reference", help="which implementations to time besides the floors")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the results file then gets a -cuda suffix)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (bfloat16 on a GPU)")
    parser.add_argument("--output", help="default: results/cost.json, or cost-cuda.json on a GPU")
    parser.add_argument("--unpaired", action="store_true", help="time / floor across processes, as the tables before "
                        "2026-12-05 were made (default: each pass paired with a floor pass in the cell's process)")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per cell (fast smoke test; memory not isolated)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.output = args.output or str(RESULTS / ("cost.json" if args.device == "cpu" else "cost-cuda.json"))
    protocol = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "repeats": args.repeats, "memory_env": EXACT_RSS_ENV}
    if not args.unpaired:  # recorded only when set, so that the older tables (unpaired) still resume
        protocol["paired_floor"] = True
    if args.device != "cpu" or args.dtype != "float32":  # recorded only when set: the committed CPU tables resume
        protocol.update(device=args.device, dtype=args.dtype)
    results = ResultsFile(args.output, protocol)
    methods = args.methods.split(",")
    cells = [("forward+backward", "floor"), ("forward", "floor")]
    cells += [(m, impl) for m in methods for impl in args.impls.split(",")]
    for method, impl in cells:
        key = f"{method}/{impl}"
        if results.done(key):
            continue
        row = {"key": key, "method": method, "impl": impl, **measure({**protocol, "method": method, "impl": impl}, args.in_process)}
        print(f"{key}: {row['tokens_per_s']:.1f} tok/s, extra {row['extra_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        results.put(row)
    Path(args.output).with_suffix(".md").write_text(render(results.data))
    print(Path(args.output).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

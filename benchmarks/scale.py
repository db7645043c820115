"""Scale: the same `fidelprune prune` in one process and in K data-parallel processes (torchrun), whole-model vs
layer-streamed (--offload cpu) scoring, and the memory planner's estimate against the measured peak.

Part `processes` (results/scale.{json,md}): are the scores of K processes those of one, and how long does scoring take?

Each run is the CLI itself on the packaged SmolLM2 (or MODEL), without reconstruction, one after the other; the
K-process run is `python -m torch.distributed.run --nproc-per-node K -m fidelprune.cli prune ...` with one torch
thread per process, the one-process run uses every core. Recorded: max relative score difference per stage, whether
the kept neurons are identical, scoring seconds from each pruning.json, wall seconds, and the speed-up. On a CPU
with K cores the processes share the same cores the single process uses, so expect about 1x; on K GPUs, K x.

    python benchmarks/scale.py --processes 2 --method hfprune --samples 16

Part `streaming` (results/scale-streaming.{json,md}): each method pruned whole and streamed, each cell in its own
process with glibc's mmap threshold fixed (benchmarks/cost.py explains why): scoring seconds, peak extra RSS over
the loaded model, the planner's estimate of that extra, and whether the kept neurons and scores agree.

    python benchmarks/scale.py --part streaming --samples 8 --seq-len 256

Part `device-map` (results/scale-device-map[-cuda].{json,md}): the same CLI run on one device and with
`--device-map`, the model's modules split between `--device` and `--split-to` (default: the first half of the decoder
layers, the embeddings and rotary embedding on --device, the rest and the head on --split-to): the same kept
neurons, scores and refit weights, and the time each takes. On a GPU machine, cuda:0 + cpu is the real split:

    python benchmarks/scale.py --part device-map --device cuda:0 --split-to cpu --samples 16 --seq-len 256

Part `plans` (results/scale-plans.{json,md}): the planner's estimates for Llama-3.2-1B, Llama-3.1-8B and
Llama-3.1-70B shapes (configs written here, no weights) on an 80 GB GPU, whole and streamed, and 70B with a device
map over four GPUs: docs/scale.md's table.

    python benchmarks/scale.py --part plans
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from cost import EXACT_RSS_ENV, PeakRSS  # noqa: E402

from common import LARGE, RESULTS, ResultsFile, header, load_model, markdown_table, method_arguments, provenance  # noqa: E402

GiB = 2**30
STREAMING_CELLS = [("hfprune", "none"), ("hfprune", "sequential"), ("sdmprune", "none"), ("llm-pruner", "none"),
                   ("wanda-sp", "none")]


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def max_relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key, x in a.items():
        y, finite = b[key], torch.isfinite(x)
        worst = max(worst, ((x[finite] - y[finite]).abs().max() / x[finite].abs().max().clamp_min(1e-30)).item())
    return worst


def streaming_worker(spec: dict) -> dict:
    """One cell in this process: load, prune whole or streamed, watch memory, and save the scores for comparison."""
    from safetensors.torch import save_file

    from fidelprune import prune
    from fidelprune.adapters import adapt
    from fidelprune.calibration import sample_windows
    from fidelprune.planner import plan_memory
    from fidelprune.pruning import PruneConfig

    torch.manual_seed(0)
    device, streamed = spec["device"], spec["streamed"]
    model, tokenizer, _ = load_model(spec["model"])
    windows, _ = sample_windows(tokenizer, "c4", spec["samples"], spec["seq_len"], seed=0)
    options = dict(method_arguments(spec["method"]), ratio=0.2, batch_size=spec["batch_size"], reconstruct=spec["reconstruct"])
    config = PruneConfig.from_options(samples=spec["samples"], seq_len=spec["seq_len"], **options)
    plan = plan_memory(adapt(model), config, torch.float32, device, streamed=streamed)
    model.to(device)
    with torch.no_grad():  # warm-up: first-call allocations are not scoring cost
        model(input_ids=windows[:1].to(device), use_cache=False)
    if streamed:  # the weights start in host memory; prune() moves what the device needs
        model.to("cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu:  # the device's own count: what was allocated beyond what was there before
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as memory:
        _, report = prune(model, None, calibration_ids=windows, inplace=True, progress=False,
                          stream_on=device if streamed else None, **options)
    extra = torch.cuda.max_memory_allocated() - before if on_gpu else memory.peak - memory.before
    # What the plan expects beyond what was already on the device: streamed onto a GPU, nothing was.
    planned = plan.peak_bytes - (0 if streamed and on_gpu else plan.parts["weights"])
    save_file({str(k): v.contiguous() for k, v in report.scores.items()}, spec["scores_file"])
    return {"scoring_s": report.manifest["timings_s"]["scoring"],
            "reconstruction_s": report.manifest["timings_s"].get("reconstruction"),
            "extra_rss_bytes" if not on_gpu else "extra_device_bytes": extra, "extra_bytes": extra,
            "planned_extra_bytes": planned, "plan": plan.to_dict(), "kept": report.manifest["kept_neurons"]}


def run_streaming(args) -> None:
    protocol = {"model": args.model or "smollm2", "samples": args.samples, "seq_len": args.seq_len, "batch_size": 4,
                "memory_env": EXACT_RSS_ENV, "device": args.device}
    suffix = "" if args.device == "cpu" else "-cuda"
    output = args.output or RESULTS / f"scale-streaming{suffix}.json"
    results = ResultsFile(output, protocol)
    with tempfile.TemporaryDirectory() as tmp:
        for method, reconstruct in STREAMING_CELLS:
            key = f"{method}/{reconstruct}"
            if args.cells and key not in args.cells.split(","):
                continue
            if results.done(key):
                continue
            cells = {}
            for streamed in (False, True):
                spec = {**protocol, "method": method, "reconstruct": reconstruct, "streamed": streamed,
                        "scores_file": str(Path(tmp) / f"{streamed}.safetensors")}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                      text=True, env={**os.environ, **EXACT_RSS_ENV})
                if done.returncode != 0:
                    raise SystemExit(f"worker {spec} failed:\n{done.stderr[-3000:]}")
                cells[streamed] = json.loads(done.stdout.strip().splitlines()[-1])
            whole, streamed = cells[False], cells[True]
            scores = [load_file(str(Path(tmp) / f"{s}.safetensors")) for s in (False, True)]
            row = {"key": key, "method": method, "reconstruct": reconstruct,
                   "kept_identical": whole.pop("kept") == streamed.pop("kept"),
                   "max_relative_score_difference": max_relative_difference(*scores),
                   "whole": whole, "streamed": streamed,
                   "scoring_time_ratio": streamed["scoring_s"] / whole["scoring_s"]}
            print(f"{key}: streamed/whole scoring time {row['scoring_time_ratio']:.2f}, extra "
                  f"{whole['extra_bytes'] / GiB:.2f} -> {streamed['extra_bytes'] / GiB:.2f} GiB", flush=True)
            results.put(row)
    table = []
    for r in results.data["rows"]:
        for mode in ("whole", "streamed"):
            cell = r[mode]
            measured = cell.get("extra_bytes", cell.get("extra_rss_bytes"))
            error = cell["planned_extra_bytes"] / measured - 1
            table.append([r["method"], r["reconstruct"], mode, f"{cell['scoring_s']:.1f}",
                          f"{measured / GiB:.3f}", f"{cell['planned_extra_bytes'] / GiB:.3f}", f"{error:+.0%}",
                          "yes" if r["kept_identical"] else "no", f"{r['max_relative_score_difference']:.1e}"])
    markdown = (f"# Whole-model vs layer-streamed scoring, and the planner against measured memory\n\n{protocol['model']}, "
                f"float32, {args.samples} x {args.seq_len} C4 windows, batch 4, 20 %, on {args.device}. " + (
                    "Streamed: --offload cpu with the CPU as the device, so the weights stay put and only activations "
                    "are saved. Extra = peak RSS during prune() minus RSS before it (glibc mmap threshold 128 KiB, as "
                    "benchmarks/cost.py); planned = the planner's peak minus its weights.\n\n" if args.device == "cpu" else
                    "Extra = torch.cuda.max_memory_allocated during prune() minus what was allocated before it (whole: "
                    "the model; streamed: nothing, the weights start in host memory); planned = the planner's peak "
                    "minus what was there before.\n\n") + provenance(results.data) + "\n" + markdown_table(
                    ["method", "refit", "mode", "scoring s", "extra GiB", "planned GiB", "plan error", "kept identical",
                     "max rel. score diff"], table))
    Path(output).with_suffix(".md").write_text(markdown)
    print(markdown)


def split_map(shapes, devices: list[str]) -> dict[str, str]:
    """{module: device}: the decoder layers in equal runs over `devices`, the embeddings (and rotary embedding) on
    the first, the final norm and head on the last (a tied head stays with the embeddings)."""
    model, layers = shapes.model, shapes.num_layers
    base = model.base_model_prefix
    device_map = {f"{base}.{name}": devices[0] for name, _ in getattr(model, base).named_children() if name not in ("layers", "norm")}
    device_map.update({f"{base}.layers.{i}": devices[i * len(devices) // layers] for i in range(layers)})
    device_map.update({f"{base}.norm": devices[-1], "lm_head": devices[0] if model.config.tie_word_embeddings else devices[-1]})
    return device_map


def run_plans(args) -> None:
    import transformers

    from fidelprune.adapters import adapt
    from fidelprune.planner import plan_memory
    from fidelprune.pruning import PruneConfig

    output = args.output or RESULTS / "scale-plans.json"
    data = header({"device": "cuda (80 GB)", "dtype": "bfloat16", "samples": 1024, "seq_len": 1024, "batch_size": 4})
    for name, shape in LARGE.items():
        with torch.device("meta"):
            shapes = adapt(transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, max_position_embeddings=131072)))
        for method in ("hfprune", "sdmprune", "llm-pruner"):
            config = PruneConfig.from_options(method, 0.2, samples=1024, seq_len=1024, batch_size=4, reconstruct="sequential")
            for streamed in (False, True):
                plan = plan_memory(shapes, config, torch.bfloat16, "cuda", streamed=streamed, available_bytes=80 * 10**9)
                data["rows"].append({"model": name, "method": method, "mode": plan.mode, "fits_80GB": plan.fits(),
                                     **plan.to_dict()})
            if name == "Llama-3.1-70B":  # --device-map over four GPUs: the fullest of the four devices
                device_map = split_map(shapes, [f"cuda:{i}" for i in range(4)])
                plans = [plan_memory(shapes, config, torch.bfloat16, device, available_bytes=80 * 10**9, device_map=device_map)
                         for device in dict.fromkeys(device_map.values())]
                plan = max(plans, key=lambda p: p.peak_bytes)
                data["rows"].append({"model": name, "method": method, "fits_80GB": all(p.fits() for p in plans),
                                     **plan.to_dict(), "mode": f"device map, 4 GPUs (fullest: {plan.device})",
                                     "host_bytes": plans[0].host_bytes})
    Path(output).write_text(json.dumps(data, indent=1) + "\n")
    table = [[r["model"], r["method"], r["mode"], f"{r['parts']['weights'] / GiB:.1f}", f"{r['peak_bytes'] / GiB:.1f}",
              f"{r['host_bytes'] / GiB:.1f}", "yes" if r["fits_80GB"] else "no", f"{r['scoring_flops'] / 1e15:.1f}"]
             for r in data["rows"]]
    markdown = ("# The planner's estimates for large models\n\nbfloat16 on one 80 GB GPU, 1,024 x 1,024 calibration "
                "tokens at batch 4, 20 %, sequential reconstruction. Per process: under torchrun with K GPUs every "
                "process plans the same peak and scores 1/K of the windows.\n\n" + provenance(data) + "\n" + markdown_table(
                    ["model", "method", "mode", "weights on GPU GiB", "peak GiB", "host GiB", "fits 80 GB", "scoring PFLOP"],
                    table))
    Path(output).with_suffix(".md").write_text(markdown)
    print(markdown)


def run_device_map(args) -> None:
    from fidelprune.models import locate, model_config, shape_model

    first, second = args.device, args.split_to
    suffix = "-cuda" if "cuda" in first + second else ""
    output = args.output or RESULTS / f"scale-device-map{suffix}.json"
    data = header({"method": args.method, "samples": args.samples, "seq_len": args.seq_len, "ratio": args.ratio,
                   "reconstruct": args.reconstruct, "device": first, "split_to": second})
    prune = ["prune", *([args.model] if args.model else []), "--method", args.method, "--ratio", str(args.ratio),
             "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--reconstruct", args.reconstruct,
             "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        device_map = split_map(shape_model(model_config(locate(args.model))), [first, second])
        map_file = Path(tmp) / "map.json"
        map_file.write_text(json.dumps(device_map))
        one, split = Path(tmp) / "one", Path(tmp) / "split"
        wall_one = run([sys.executable, "-m", "fidelprune.cli", *prune, "--device", first, "-o", str(one)], {})
        wall_split = run([sys.executable, "-m", "fidelprune.cli", *prune, "--device-map", str(map_file), "-o", str(split)], {})
        manifests = [json.loads((d / "pruning.json").read_text()) for d in (one, split)]
        scores = [load_file(str(d / "fidelprune" / "scores.safetensors")) for d in (one, split)]
        weights = [load_file(str(d / "model.safetensors")) for d in (one, split)]
    weight_difference = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    timings = [m["timings_s"] for m in manifests]
    data["rows"].append({
        "device_map": device_map, "layers": manifests[1]["execution"]["layers"],
        "kept_identical": manifests[0]["kept_neurons"] == manifests[1]["kept_neurons"],
        "max_relative_score_difference": max_relative_difference(*scores), "max_weight_difference": weight_difference,
        "scoring_s_one": timings[0]["scoring"], "scoring_s_split": timings[1]["scoring"],
        "reconstruction_s_one": timings[0].get("reconstruction"), "reconstruction_s_split": timings[1].get("reconstruction"),
        "wall_s_one": wall_one, "wall_s_split": wall_split, "memory_plan_split": manifests[1]["memory_plan"],
    })
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(data, indent=1) + "\n")
    r = data["rows"][0]
    table = markdown_table(
        ["split", "kept neurons identical", "max relative score difference", "max weight difference",
         f"scoring s ({first})", "scoring s (split)", "wall s (one)", "wall s (split)"],
        [[r["layers"], "yes" if r["kept_identical"] else "no", f"{r['max_relative_score_difference']:.2e}",
          f"{r['max_weight_difference']:.2e}", f"{r['scoring_s_one']:.1f}", f"{r['scoring_s_split']:.1f}",
          f"{r['wall_s_one']:.1f}", f"{r['wall_s_split']:.1f}"]])
    markdown = (f"# Scale: one device vs a device map ({first} + {second})\n\n" + provenance(data) + "\n" + table)
    Path(output).with_suffix(".md").write_text(markdown)
    print(markdown)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--method", default="hfprune")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--part", choices=("processes", "streaming", "device-map", "plans"), default="processes")
    p.add_argument("--device", default="cpu", help="parts streaming and device-map: cpu, or cuda (results get a -cuda suffix)")
    p.add_argument("--split-to", default="cpu", help="part device-map: the second device of the split")
    p.add_argument("--reconstruct", default="sequential", help="part device-map: the refit mode (default sequential)")
    p.add_argument("--dtype", default="float32", help="part device-map: the dtype of both runs")
    p.add_argument("--cells", default=None, help="part streaming: only these METHOD/REFIT cells, comma-separated")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default: results/scale[-PART].json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(streaming_worker(json.loads(args.worker))))
        return
    if args.part != "processes":
        return {"streaming": run_streaming, "device-map": run_device_map, "plans": run_plans}[args.part](args)
    args.output = args.output or RESULTS / "scale.json"
    prune = ["prune", *([args.model] if args.model else []), "--method", args.method, "--ratio", str(args.ratio),
             "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--reconstruct", "none"]
    data = header({"method": args.method, "samples": args.samples, "seq_len": args.seq_len, "ratio": args.ratio,
                   "processes": args.processes, "reconstruct": "none"})
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        wall_one = run([sys.executable, "-m", "fidelprune.cli", *prune, "-o", str(one)], {})
        wall_many = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                         "-m", "fidelprune.cli", *prune, "-o", str(many)], {"OMP_NUM_THREADS": "1"})
        manifests = [json.loads((d / "pruning.json").read_text()) for d in (one, many)]
        scores = [load_file(str(d / "fidelprune" / "scores.safetensors")) for d in (one, many)]
    scoring = [m["timings_s"]["scoring"] for m in manifests]
    data["rows"].append({
        "processes": args.processes, "kept_identical": manifests[0]["kept_neurons"] == manifests[1]["kept_neurons"],
        "max_relative_score_difference": max_relative_difference(*scores),
        "scoring_s_one": scoring[0], "scoring_s_many": scoring[1], "scoring_speedup": scoring[0] / scoring[1],
        "wall_s_one": wall_one, "wall_s_many": wall_many, "data_parallel": manifests[1].get("data_parallel"),
    })
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    r = data["rows"][0]
    table = markdown_table(
        ["processes", "kept neurons identical", "max relative score difference", "scoring s (1 process)",
         f"scoring s ({args.processes} processes)", "scoring speed-up", "wall s (1)", f"wall s ({args.processes})"],
        [[r["processes"], "yes" if r["kept_identical"] else "no", f"{r['max_relative_score_difference']:.2e}",
          f"{r['scoring_s_one']:.1f}", f"{r['scoring_s_many']:.1f}", f"{r['scoring_speedup']:.2f}x",
          f"{r['wall_s_one']:.1f}", f"{r['wall_s_many']:.1f}"]])
    markdown = "# Scale: one process vs data-parallel processes\n\n" + provenance(data) + "\n" + table
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

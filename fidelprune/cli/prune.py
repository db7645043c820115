"""`fidelprune prune MODEL`: flags -> PruneConfig -> load -> prune -> save -> summary table."""

from __future__ import annotations

import time
from pathlib import Path

from .common import add_device_map_flag, add_model_flags, add_output_flags, console, print_summary


def add_parser(sub) -> None:
    from ..allocation import ALLOCATIONS, ENGINE_GRID
    from ..calibration import DEFAULT_SAMPLES, DEFAULT_SAMPLING, DEFAULT_SEQ_LEN, SAMPLINGS
    from ..methods import AGGREGATIONS, ALIASES, METHODS
    from ..objectives import OBJECTIVES
    from ..reconstruction import DEFAULT_LAMBDA, DEFAULT_MODE, MODES, SELECTIONS
    from ..pruning import RECIPES
    from ..scoring import FORMS

    p = sub.add_parser("prune", help="prune MLP neurons and save a standard HF checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=None, choices=(*METHODS, *ALIASES),
                   help=f"scoring method (default hfprune); {', '.join(f'{old} is now {new}' for old, new in ALIASES.items())}")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="a named combination the benchmarks measured best: " + "; ".join(
                       f"{name} = " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items()) for name, settings in RECIPES.items()))
    p.add_argument("--ratio", type=float, default=None, help="fraction of total parameters to remove (default 0.2)")
    p.add_argument("--keep", type=int, default=None, help="neurons to keep per layer (instead of --ratio)")
    p.add_argument("--round-to", type=int, default=None, help="kept width is a multiple of this (default 8, or --serve-on's grid)")
    p.add_argument("--serve-on", choices=ENGINE_GRID, default=None,
                   help="round widths to the grid this engine's fast kernels want: "
                        + ", ".join(f"{engine} {grid}" for engine, grid in ENGINE_GRID.items()))
    add_output_flags(p, None, "default: pruned-<model>-<method>-<ratio>")
    p.add_argument("--calibration", default="c4", help="'c4' (bundled C4 train sample) or a .txt/.jsonl/.parquet file")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration windows (default {DEFAULT_SAMPLES}; seeds: 1024)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per window (default {DEFAULT_SEQ_LEN}; seeds: 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=SAMPLINGS, default=DEFAULT_SAMPLING,
                   help="documents (default): one window per distinct document, as the seed methods draw them; "
                        "spans: documents drawn with replacement (fidelprune 0.1's sampling; sources of few documents)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per backward (scores do not depend on it)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None, help="override the method's objective")
    p.add_argument("--form", choices=FORMS, default=None, help="override the method's score form")
    p.add_argument("--alpha", type=float, default=None, help="kd weight (sdmprune default by ratio: 0.4 / 0.42 / 0.1)")
    p.add_argument("--temperature", type=float, default=None, help="kd teacher temperature (sdmprune default 0.2 / 0.5 / 0.2)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="mean", help="minitron: mean |a| or L2 norm")
    p.add_argument("--steps", type=int, default=1,
                   help="iterative pruning: remove the neurons in K equal steps, re-scoring the pruned model after each "
                        "(gradient methods; sdmprune: its stage 2; costs K scoring passes)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="uniform (default): same width everywhere (vanilla checkpoint); global: rank all layers together; search: "
                        "choose each layer's width to keep the predictions closest to the dense model's (KL on "
                        "--search-samples windows, refit in the loop when reconstructing). global and search give per-layer "
                        "widths: fidelprune.load_model loads them (README, Allocation)")
    p.add_argument("--min-keep", type=int, default=None,
                   help="global and search allocation: neurons every layer keeps at least (default: --round-to)")
    p.add_argument("--search-samples", type=int, default=4, help="search: the first N calibration windows measure the KL (default 4)")
    p.add_argument("--search-generations", type=int, default=12, help="search: generations of the evolution (default 12)")
    p.add_argument("--search-offspring", type=int, default=8, help="search: children tried per generation (default 8)")
    p.add_argument("--search-step", type=int, default=None,
                   help="search: neurons one mutation moves between two layers (default about 3%% of the width, on --round-to)")
    p.add_argument("--search-seed", type=int, default=0, help="search: seed of the mutations (default 0)")
    p.add_argument("--protect-first", type=int, default=0, help="first N layers keep every neuron (others prune harder)")
    p.add_argument("--protect-last", type=int, default=0, help="last M layers keep every neuron")
    p.add_argument("--scores", default=None, help="re-prune from an earlier run's scores (its folder, or the scores.safetensors file): no calibration")
    p.add_argument("--reconstruct", choices=MODES, default=None,
                   help=f"refit each pruned MLP's down_proj by least squares on calibration activations (default {DEFAULT_MODE})")
    p.add_argument("--reconstruct-lambda", type=float, default=DEFAULT_LAMBDA,
                   help=f"ridge, relative to the mean Gram diagonal (default {DEFAULT_LAMBDA:g})")
    p.add_argument("--reconstruct-calibration", default=None,
                   help="separate reconstruction windows from this source ('c4' or a file; default: the scoring windows)")
    p.add_argument("--reconstruct-samples", type=int, default=None, help="separate reconstruction windows: how many (default --samples)")
    p.add_argument("--reconstruct-seed", type=int, default=None, help="separate reconstruction windows: seed (default --seed + 1)")
    p.add_argument("--reconstruct-select", choices=SELECTIONS, default=None,
                   help="which neurons a refit layer keeps: scores (default): the method's; obs: as many, chosen by "
                        "the refit's own error (greedy structured OBS on the layer's Gram); the method's scores then "
                        "only set the widths of global and search allocation")
    p.add_argument("--offload", choices=("cpu", "disk"), default=None,
                   help="keep the weights in host memory (cpu) or memory-mapped from the safetensors files (disk) and "
                        "run one decoder layer at a time on --device: the same scores for about one layer's device "
                        "memory (models larger than the GPU; disk: host memory holds no copy of the weights)")
    add_device_map_flag(p)
    p.add_argument("--dry-run", action="store_true", help="check the settings, print the memory plan and stop")
    add_model_flags(p)
    p.set_defaults(run=run)


def config_from_args(args):
    """The PruneConfig the flags describe (every flag is one keyword of PruneConfig.from_options)."""
    from ..allocation import ENGINE_GRID
    from ..errors import ConfigError
    from ..pruning import RECIPES, PruneConfig
    from ..reconstruction import DEFAULT_MODE

    if args.serve_on and args.round_to is not None:
        raise ConfigError(f"--serve-on {args.serve_on} sets --round-to {ENGINE_GRID[args.serve_on]}; give one of the two")
    round_to = ENGINE_GRID[args.serve_on or "transformers"] if args.round_to is None else args.round_to
    reconstruct = args.reconstruct
    if reconstruct is None and "reconstruct" not in RECIPES.get(args.recipe, {}):
        reconstruct = DEFAULT_MODE  # the CLI refits by default; the Python API runs the published method as is
    return PruneConfig.from_options(
        args.method, args.ratio, recipe=args.recipe, keep=args.keep, round_to=round_to, calibration=args.calibration,
        samples=args.samples, seq_len=args.seq_len, seed=args.seed, sampling=args.sampling, batch_size=args.batch_size,
        objective=args.objective, form=args.form, alpha=args.alpha, temperature=args.temperature,
        aggregation=args.aggregation, steps=args.steps, allocation=args.allocation, protect_first=args.protect_first,
        protect_last=args.protect_last, min_keep=args.min_keep, search_samples=args.search_samples,
        search_generations=args.search_generations, search_offspring=args.search_offspring,
        search_step=args.search_step, search_seed=args.search_seed, reconstruct=reconstruct,
        reconstruct_lambda=args.reconstruct_lambda, reconstruct_calibration=args.reconstruct_calibration,
        reconstruct_samples=args.reconstruct_samples, reconstruct_seed=args.reconstruct_seed,
        reconstruct_select=args.reconstruct_select,
    )


def default_output(args, config) -> Path:
    name = Path(args.model or "smollm2").name.removesuffix(".gguf")
    alloc = config.allocation
    amount = f"keep{alloc.keep}" if alloc.keep else f"{alloc.ratio:g}"
    return Path(f"pruned-{name}-{config.method.method}-{amount}")


def memory_plan(shapes, config, dtype, device: str, args, device_map=None, mappable: bool = True) -> list:
    """Print the planner's estimate for this run (rank 0; one table per device of a device map) and stop with one
    line when it will not fit."""
    from .. import distributed
    from ..placement import describe
    from ..planner import available_memory, check_device_map_fits, check_fits, plan_device_map, plan_memory

    if device_map:
        plans = plan_device_map(shapes, config, dtype, device_map)
    else:
        plans = [plan_memory(shapes, config, dtype, device, streamed=args.offload is not None,
                             available_bytes=available_memory(device), mapped=args.offload == "disk")]
    title = "memory plan (fidelprune prune --dry-run)" if args.dry_run else "memory plan"
    if distributed.is_main():
        if device_map:
            console.print(f"device map: {describe(device_map, shapes.model)}")
        for plan in plans:
            print_summary(title + (f": {plan.device}" if device_map else ""), dict(plan.rows()))
    if device_map:
        check_device_map_fits(plans, shapes, config, dtype, device_map)
    else:
        check_fits(plans[0], shapes, config, dtype, mappable)
    return plans


def disk_dtype(where, asked: str, resolved):
    """--offload disk computes in the dtype the weights are stored in, so that they stay mapped from the files
    (a conversion would copy them all into memory): that dtype by default, and an error for another one."""
    from ..errors import ConfigError
    from ..models import stored_dtype

    stored = stored_dtype(where)
    if asked not in (None, "auto") and resolved != stored:
        name = str(stored).replace("torch.", "")
        raise ConfigError(f"--offload disk keeps the weights as stored ({name}) so that they stay memory-mapped; "
                          f"pass --dtype {name}, or use --offload cpu to convert them in host memory")
    return stored


def check_execution(args) -> None:
    """Flags that decide where the run computes and exclude each other, before anything is read."""
    from .. import distributed
    from ..errors import ConfigError

    if args.device_map and args.offload:
        raise ConfigError("--device-map spreads the layers over devices and --offload streams them through one; "
                          "choose one")
    if args.device_map and distributed.world_size() > 1:
        raise ConfigError("--device-map under torchrun is not supported yet: each process would place the whole "
                          "model on every GPU; use torchrun with one GPU per process, or one process with --device-map")
    if args.device_map and args.device != "auto":
        raise ConfigError("--device-map places every module itself; drop --device (or drop --device-map)")


def run(args) -> int:
    from .. import distributed, load_model, prune, save
    from ..checkpoint import check_output_dir
    from ..models import load_tokenizer, locate, mapped_share, resolve_device, resolve_dtype
    from ..placement import resolve_device_map
    from ..preflight import check_calibration, check_prune

    distributed.init_from_environment()  # under torchrun: each process scores a share
    # Everything that can fail without the weights fails first: settings, files, output, device, model shapes, memory.
    check_execution(args)
    config = config_from_args(args)
    where = locate(args.model)
    output = Path(args.output) if args.output else default_output(args, config)
    inputs = [*where.input_paths(), *([args.scores] if args.scores else []),
              *(Path(p) for p in (config.calibration.source, config.reconstruction.calibration) if p and Path(p).exists())]
    if not args.dry_run:
        check_output_dir(output, args.overwrite, inputs)  # rank 0 also clears what killed runs left beside the output
    distributed.barrier()
    device = distributed.local_device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    if args.offload == "disk":
        dtype = disk_dtype(where, args.dtype, dtype)
    shapes = check_prune(where, config, args.scores, args.trust_remote_code)
    device_map = resolve_device_map(args.device_map, shapes.model, dtype) if args.device_map else None
    plans = memory_plan(shapes, config, dtype, device, args, device_map, mappable=where.gguf_file is None)
    if args.dry_run:
        return 0
    start = time.perf_counter()
    tokenizer = load_tokenizer(where, args.trust_remote_code)
    check_calibration(tokenizer, config, scores_given=args.scores is not None)
    with console.status(f"loading {args.model or 'packaged SmolLM2-135M-Instruct'}"):
        model, tokenizer, source = load_model(args.model, dtype=dtype, device="cpu" if args.offload else device,
                                              trust_remote_code=args.trust_remote_code, tokenizer=tokenizer,
                                              device_map=device_map)
    load_s = time.perf_counter() - start
    mapped = mapped_share(model) if args.offload == "disk" else None
    if mapped is not None and mapped < 0.9:
        console.print(f"[yellow]warning:[/] only {mapped:.0%} of the weights are memory-mapped from their files "
                      f"(this transformers copied the rest into memory): --offload disk saves little over --offload cpu")
    pruned, report = prune(model, tokenizer, config, scores=args.scores, inplace=True, source=source,
                           progress=distributed.is_main(), stream_on=device if args.offload else None)
    report.manifest["timings_s"]["load"] = load_s
    if mapped is not None:
        report.manifest["execution"].update(offload="disk", weights_on="memory-mapped from the safetensors files",
                                            weights_mapped_share=mapped)
    report.manifest["memory_plan"] = plans[0].to_dict() if len(plans) == 1 else [plan.to_dict() for plan in plans]
    if distributed.is_main():  # every process holds the same pruned model; one writes it
        path = save(pruned, tokenizer, report, output, overwrite=args.overwrite)
        print_summary(f"fidelprune prune -> {path}", report.summary())
    distributed.barrier()
    return 0

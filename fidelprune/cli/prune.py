"""`fidelprune prune MODEL`: flags -> PruneConfig -> prune_location (preflight, memory plan, load, prune, save) ->
summary table."""

from __future__ import annotations

from .. import distributed
from ..allocation import ALLOCATIONS, ENGINE_GRID
from ..calibration import SAMPLINGS
from ..errors import ConfigError
from ..methods import AGGREGATIONS, ALIASES, METHODS
from ..objectives import OBJECTIVES
from ..pruning import prune_location
from ..reconstruction import DEFAULT_MODE, MODES, SELECTIONS
from ..scoring import FORMS
from ..settings import DEFAULT_RATIO, RECIPES, PruneConfig
from .common import add_device_map_flag, add_model_flags, add_output_flags, console, print_summary


def add_parser(sub) -> None:
    d = PruneConfig()  # every default below is its config field's
    method, calibration, allocation, reconstruction = d.method, d.calibration, d.allocation, d.reconstruction
    p = sub.add_parser("prune", help="prune MLP neurons and save a standard HF checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=None, choices=(*METHODS, *ALIASES),
                   help=f"scoring method (default {method.method}); {', '.join(f'{old} is now {new}' for old, new in ALIASES.items())}")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="a named combination the benchmarks measured best: " + "; ".join(
                       f"{name} = " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items()) for name, settings in RECIPES.items()))
    p.add_argument("--ratio", type=float, default=None, help=f"fraction of total parameters to remove (default {DEFAULT_RATIO})")
    p.add_argument("--keep", type=int, default=None, help="neurons to keep per layer (instead of --ratio)")
    p.add_argument("--round-to", type=int, default=None, help=f"kept width is a multiple of this (default {allocation.round_to}, or --serve-on's grid)")
    p.add_argument("--serve-on", choices=ENGINE_GRID, default=None,
                   help="round widths to the grid this engine's fast kernels want: "
                        + ", ".join(f"{engine} {grid}" for engine, grid in ENGINE_GRID.items()))
    add_output_flags(p, None, "default: pruned-<model>-<method>-<ratio>")
    p.add_argument("--calibration", default=calibration.source, help="'c4' (bundled C4 train sample) or a .txt/.jsonl/.parquet file")
    p.add_argument("--samples", type=int, default=calibration.samples, help=f"calibration windows (default {calibration.samples}; seeds: 1024)")
    p.add_argument("--seq-len", type=int, default=calibration.seq_len, help=f"tokens per window (default {calibration.seq_len}; seeds: 1024)")
    p.add_argument("--seed", type=int, default=calibration.seed)
    p.add_argument("--sampling", choices=SAMPLINGS, default=calibration.sampling,
                   help="documents (default): one window per distinct document, as the seed methods draw them; "
                        "spans: documents drawn with replacement (fidelprune 0.1's sampling; sources of few documents)")
    p.add_argument("--batch-size", type=int, default=method.batch_size, help="sequences per backward (scores do not depend on it)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None, help="override the method's objective")
    p.add_argument("--form", choices=FORMS, default=None, help="override the method's score form")
    p.add_argument("--alpha", type=float, default=None, help="kd weight (sdmprune default by ratio: 0.4 / 0.42 / 0.1)")
    p.add_argument("--temperature", type=float, default=None, help="kd teacher temperature (sdmprune default 0.2 / 0.5 / 0.2)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=method.aggregation, help="minitron: mean |a| or L2 norm")
    p.add_argument("--steps", type=int, default=method.steps,
                   help="iterative pruning: remove the neurons in K equal steps, re-scoring the pruned model after each "
                        "(gradient methods; sdmprune: its stage 2; costs K scoring passes)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="uniform (default): same width everywhere (vanilla checkpoint); global: rank all layers together; search: "
                        "choose each layer's width to keep the predictions closest to the dense model's (KL on "
                        "--search-samples windows, refit in the loop when reconstructing). global and search give per-layer "
                        "widths: fidelprune.load_model loads them (README, Allocation)")
    p.add_argument("--min-keep", type=int, default=None,
                   help="global and search allocation: neurons every layer keeps at least (default: --round-to)")
    p.add_argument("--search-samples", type=int, default=allocation.search_samples,
                   help=f"search: the first N calibration windows measure the KL (default {allocation.search_samples})")
    p.add_argument("--search-generations", type=int, default=allocation.search_generations,
                   help=f"search: generations of the evolution (default {allocation.search_generations})")
    p.add_argument("--search-offspring", type=int, default=allocation.search_offspring,
                   help=f"search: children tried per generation (default {allocation.search_offspring})")
    p.add_argument("--search-step", type=int, default=None,
                   help="search: neurons one mutation moves between two layers (default about 3%% of the width, on --round-to)")
    p.add_argument("--search-seed", type=int, default=allocation.search_seed,
                   help=f"search: seed of the mutations (default {allocation.search_seed})")
    p.add_argument("--protect-first", type=int, default=allocation.protect_first, help="first N layers keep every neuron (others prune harder)")
    p.add_argument("--protect-last", type=int, default=allocation.protect_last, help="last M layers keep every neuron")
    p.add_argument("--drop-layers", type=int, default=allocation.drop_layers,
                   help="also drop this many whole decoder layers, those of the lowest importance from the same "
                        "scoring passes (the Taylor term of the layer's residual; Block Influence for forward methods); "
                        "--ratio still counts all parameters, the MLPs of the other layers take the rest")
    p.add_argument("--keep-heads", type=int, default=None,
                   help="attention: query heads each KV group keeps in every layer (Minitron's way; scored in the same "
                        "passes); --ratio counts them")
    p.add_argument("--keep-kv-heads", type=int, default=None,
                   help="attention: KV heads (each with its query heads) every layer keeps; --ratio counts them")
    p.add_argument("--scores", default=None, help="re-prune from an earlier run's scores (its folder, or the scores.safetensors file): no calibration")
    p.add_argument("--reconstruct", choices=MODES, default=None,
                   help=f"refit each pruned MLP's down_proj by least squares on calibration activations (default {DEFAULT_MODE})")
    p.add_argument("--reconstruct-lambda", type=float, default=reconstruction.lam,
                   help=f"ridge, relative to the mean Gram diagonal (default {reconstruction.lam:g})")
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


def config_from_args(args) -> PruneConfig:
    """The PruneConfig the flags describe (every flag is one keyword of PruneConfig.from_options)."""
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
        search_step=args.search_step, search_seed=args.search_seed, drop_layers=args.drop_layers,
        keep_heads=args.keep_heads, keep_kv_heads=args.keep_kv_heads, reconstruct=reconstruct,
        reconstruct_lambda=args.reconstruct_lambda, reconstruct_calibration=args.reconstruct_calibration,
        reconstruct_samples=args.reconstruct_samples, reconstruct_seed=args.reconstruct_seed,
        reconstruct_select=args.reconstruct_select,
    )


def run(args) -> int:
    run = prune_location(args.model, config_from_args(args), args.output, scores=args.scores, overwrite=args.overwrite,
                         dtype=args.dtype, device=args.device, offload=args.offload, device_map=args.device_map,
                         trust_remote_code=args.trust_remote_code, dry_run=args.dry_run, say=console.print,
                         show=print_summary)
    if run.report is not None and distributed.is_main():
        print_summary(f"fidelprune prune -> {run.output}", run.report.summary())
    return 0

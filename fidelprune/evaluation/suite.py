"""The whole evaluation of one model (perplexity, zero-shot, size and speed) and of a model beside its baseline.

    results = fidelprune.evaluate(pruned, tokenizer, baseline=(dense, tokenizer), tasks="arc_easy", limit=100)
    fidelprune.evaluation.write_results(results, "results/")     # results.json + results.md

Both models go through one EvalConfig, so their numbers are comparable by construction. The dict returned is
exactly what results.json holds (report.py renders it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..adapters import adapt
from ..errors import ConfigError, check_int, check_seed
from ..models import resolve_device
from ..placement import device_map_of
from .perplexity import CORPORA, perplexity
from .report import combine
from .speed import default_devices, measure_speed, model_size
from .zeroshot import lm_eval_version, parse_tasks, tokenizer_adds_bos, zeroshot

DEFAULT_PPL = ("wikitext2",)


@dataclass
class EvalConfig:
    """The protocol: every setting that changes a number. Recorded in results.json as `protocol`."""

    ppl: list[str] = field(default_factory=lambda: list(DEFAULT_PPL))  # bundled corpus names or local files
    tasks: list[str] = field(default_factory=lambda: parse_tasks("all"))
    seq_len: int = 128  # perplexity window (LLM-Pruner: 128; the model's context, e.g. 2048, is the other choice)
    limit_windows: int | None = None  # perplexity: first N windows of each corpus
    limit: int | None = None  # zero-shot: first N documents of each task
    batch_size: int = 8
    hellaswag: str | None = None  # path of the original HellaSwag jsonl
    speed: bool = True
    speed_devices: list[str] = field(default_factory=default_devices)
    prompt_len: int = 128
    new_tokens: int = 32
    speed_batch: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("--seq-len", self.seq_len, 2)
        check_seed("--seed", self.seed)
        for flag, value in (("--batch-size", self.batch_size), ("--prompt-len", self.prompt_len),
                            ("--new-tokens", self.new_tokens), ("--speed-batch", self.speed_batch), ("--repeats", self.repeats)):
            check_int(flag, value, 1)
        for flag, value in (("--limit", self.limit), ("--limit-windows", self.limit_windows)):
            if value is not None:
                check_int(flag, value, 1)
        for corpus in self.ppl:  # files are checked here, not after minutes of loading and scoring
            if corpus not in CORPORA and not Path(corpus).is_file():
                raise ConfigError(f"--ppl {corpus}: no such file and not a bundled corpus ({', '.join(CORPORA)})")
        if self.hellaswag and not Path(self.hellaswag).is_file():
            raise ConfigError(f"--hellaswag {self.hellaswag}: file not found (the original hellaswag_val.jsonl)")
        if self.speed:
            for device in self.speed_devices:
                resolve_device(device)

    @classmethod
    def build(cls, ppl: str | list[str] | tuple[str, ...] | None = DEFAULT_PPL, tasks: str | list[str] | None = "all",
              hellaswag: str | Path | None = None, speed_devices: str | list[str] | None = None, **kwargs) -> EvalConfig:
        """From user-facing values: comma lists or lists, 'none' for nothing, 'all' tasks, devices default."""
        if isinstance(ppl, str):
            ppl = [p.strip() for p in ppl.split(",")]
        ppl = [p for p in (ppl or []) if p and p != "none"]
        if isinstance(speed_devices, str):
            speed_devices = [d.strip() for d in speed_devices.split(",") if d.strip()]
        hellaswag = str(hellaswag) if hellaswag else None
        return cls(ppl=ppl, tasks=parse_tasks(tasks, hellaswag), hellaswag=hellaswag,
                   speed_devices=list(speed_devices or default_devices()), **kwargs)

    def protocol(self) -> dict:
        out = asdict(self)
        out.update(num_fewshot=0, lm_eval=lm_eval_version(),
                   ppl_definition="exp(mean next-token NLL) over non-overlapping seq_len windows of the corpus "
                                  "tokenized once; the trailing partial window is dropped",
                   speed_definition="median of `repeats` timed runs after one warm-up; prefill = one forward of "
                                    "speed_batch x prompt_len random ids building the KV cache; decode = new_tokens "
                                    "greedy steps with the KV cache")
        return out


def mlp_widths(model: nn.Module) -> list[int] | None:
    try:
        return adapt(model).widths()
    except ValueError:  # an architecture fidelprune cannot prune is still evaluated, without widths
        return None


def describe_model(model: nn.Module, tokenizer, info: dict | None = None) -> dict:
    config = model.config
    first = next(model.parameters())
    out = {
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "device": str(first.device),
        **model_size(model),
        "mlp_widths": mlp_widths(model),
        "bos_added": tokenizer_adds_bos(tokenizer),
    }
    out.update(info or {})
    return out


def evaluate_model(model: nn.Module, tokenizer, config: EvalConfig, info: dict | None = None, *,
                   progress: bool = True, verbose: bool = False, log=None) -> dict:
    """One model through the protocol: {"model", "perplexity", "zeroshot", "speed", "timings_s"}. Zero-shot keeps
    each document's outcome, so that two results on the same protocol can be compared pairwise (paired.py)."""
    log = log or (lambda message: None)
    result = {"model": describe_model(model, tokenizer, info), "perplexity": {}, "zeroshot": None, "speed": [],
              "timings_s": {}}
    for corpus in config.ppl:
        log(f"perplexity on {corpus} (seq_len {config.seq_len})")
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, corpus, seq_len=config.seq_len, limit_windows=config.limit_windows,
                         batch_size=config.batch_size, progress=progress)
        result["perplexity"][str(corpus)] = ppl.to_dict()
        result["timings_s"][f"ppl:{corpus}"] = time.perf_counter() - start
    if config.tasks:
        log(f"zero-shot: {', '.join(config.tasks)}" + (f" (first {config.limit} of each)" if config.limit else ""))
        start = time.perf_counter()
        result["zeroshot"] = zeroshot(model, tokenizer, config.tasks, limit=config.limit, batch_size=config.batch_size,
                                      hellaswag=config.hellaswag, seed=config.seed, per_item=True,
                                      verbose=verbose).to_dict()
        result["timings_s"]["zeroshot"] = time.perf_counter() - start
    if config.speed:
        # a model spread over devices (a device map) is timed where it is, once
        for device in ["device map"] if device_map_of(model) else config.speed_devices:
            log(f"speed on {device}")
            start = time.perf_counter()
            speed = measure_speed(model, None if device == "device map" else device, prompt_len=config.prompt_len, new_tokens=config.new_tokens,
                                  batch_size=config.speed_batch, repeats=config.repeats, seed=config.seed)
            result["speed"].append(speed.to_dict())
            result["timings_s"][f"speed:{device}"] = time.perf_counter() - start
    return result


def evaluate(
    model: nn.Module,
    tokenizer,
    config: EvalConfig | None = None,
    *,
    baseline: tuple[nn.Module, object] | None = None,
    progress: bool = True,
    verbose: bool = False,
    **options,
) -> dict:
    """Evaluate an in-memory model (and its dense `baseline=(model, tokenizer)`, same protocol) and return the
    results.json dict: perplexity on `ppl` corpora, zero-shot `tasks` through lm-eval, size and speed, and the
    side-by-side comparison. The protocol is an `EvalConfig`, or its fields as keywords (`EvalConfig.build`:
    `ppl`/`tasks` as names, comma lists, or "none"; tasks "all" = the six bundled ones, + hellaswag when
    `hellaswag` gives its jsonl; `limit`, `seq_len`, `speed`, ...). For a model on disk and its source model
    from pruning.json, see `evaluate_location`."""
    if config is None:
        config = EvalConfig.build(**options)
    elif options:
        raise TypeError("pass the protocol either as an EvalConfig or as keywords, not both")
    evaluated = evaluate_model(model, tokenizer, config, progress=progress, verbose=verbose)
    dense = evaluate_model(*baseline, config, progress=progress, verbose=verbose) if baseline is not None else None
    return combine(evaluated, dense, config)

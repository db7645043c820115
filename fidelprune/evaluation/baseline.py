"""Evaluate a model given by location beside its dense baseline: the baseline resolution (`auto` / `source` read
the source model from a fidelprune output's pruning.json) and the check that the baseline loaded is that source."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError
from ..layout import manifest_or_none
from ..models import PACKAGED, load_model, locate, model_config, resolve_device, shape_model
from ..placement import resolve_device_map
from .perplexity import EvaluationError, load_corpus
from .report import combine
from .suite import EvalConfig, evaluate_model

log = logging.getLogger(__name__)
SOURCE_BASELINES = ("auto", "source")  # read pruning.json's source_model ("auto": only if there is one)


def source_location(source: dict) -> str:
    """Where pruning.json's source_model can be loaded from: its GGUF file, its directory, else its name."""
    path, gguf, name = source.get("path"), source.get("gguf_file"), source.get("name")
    if gguf and path and (Path(path) / gguf).is_file():
        return str(Path(path) / gguf)
    if name in PACKAGED:  # the packaged model, installed somewhere else on this machine
        return name
    if path and Path(path).exists():
        return path
    if name:
        return name
    raise ConfigError("pruning.json's source_model names no loadable location; pass --baseline PATH")


def resolve_baseline(spec: str, model: str | Path | None) -> tuple[str | None, dict | None]:
    """(what to load, the source record it must match) for a baseline value: 'auto', 'source', 'none' or a location."""
    if spec == "none":
        return None, None
    if spec in SOURCE_BASELINES:
        manifest = manifest_or_none(model)
        if manifest is None:
            if spec == "source":
                raise ConfigError(f"--baseline source needs a pruning.json in {model}; pass --baseline PATH instead")
            return None, None
        return source_location(manifest["source_model"]), manifest["source_model"]
    return spec, None


def pruning_info(manifest: dict | None) -> dict:
    if manifest is None:
        return {}
    alloc = manifest["allocation"]
    return {"pruning": {"method": manifest["method"]["method"], "objective": manifest["method"].get("objective"),
                        "form": manifest["method"].get("form"), "target_ratio": alloc.get("target_ratio"),
                        "achieved_ratio": alloc.get("achieved_ratio"), "width_before": alloc.get("width_before"),
                        "width_after": alloc.get("width_after"), "source_model": manifest.get("source_model")}}


def _evaluate_location(location: str | None, config: EvalConfig, info: dict, role: str, load_options: dict,
                       progress: bool, verbose: bool, say: Callable[[str], None]) -> dict:
    """Load, evaluate and free one model, so that only one is in memory at a time."""
    say(f"[bold]{role}[/]: loading {location or 'packaged SmolLM2-135M-Instruct'}")
    model, tokenizer, source = load_model(location, **load_options)
    info = {"name": source.name, "source": source.to_dict(), **info}
    try:
        return evaluate_model(model, tokenizer, config, info, progress=progress, verbose=verbose,
                              log=lambda message: say(f"[bold]{role}[/]: {message}"))
    finally:
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_evaluation(sources: list[str | None], config: EvalConfig, device: str | None, trust_remote_code: bool,
                     device_map: str | Path | dict | None = None) -> None:
    """Before any weight loads: every model source exists, the device does, a device map fits each model's modules,
    and the perplexity window fits each model's positions (so a bad baseline does not fail after the model's whole
    evaluation)."""
    if device_map is not None and device not in (None, "auto"):
        raise ConfigError("--device-map places every module itself; drop --device (or drop --device-map)")
    resolve_device(device)
    for corpus in config.ppl:  # a file of white space would fail only after the model's load
        if not load_corpus(corpus).strip():
            raise EvaluationError(f"--ppl {corpus} holds no text (only white space); give a file with text")
    wheres = [locate(source) for source in sources]  # every source exists and is readable before any is checked
    for where, model_cfg in [(where, model_config(where, trust_remote_code)) for where in wheres]:
        if device_map is not None:
            resolve_device_map(device_map, shape_model(model_cfg).model, torch.float32)
        positions = getattr(model_cfg, "max_position_embeddings", None)
        if config.ppl and positions and config.seq_len > positions:
            raise ConfigError(f"--seq-len {config.seq_len} exceeds the {positions} positions of {where.name}; "
                              f"choose --seq-len {positions} or less")
        if config.speed and positions and config.prompt_len + config.new_tokens > positions:
            raise ConfigError(f"--prompt-len + --new-tokens = {config.prompt_len + config.new_tokens} exceeds the "
                              f"{positions} positions of {where.name}; shorten them or pass --no-speed")


def evaluate_location(
    model: str | Path | None,
    config: EvalConfig,
    *,
    baseline: str = "auto",
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | Path | dict | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    verbose: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict:
    """`fidelprune eval` as a function: evaluate the model at `model` (a fidelprune output, an HF directory, a .gguf
    file, a hub id, or None for the packaged default) and its `baseline` with one protocol; return results.json's
    dict. A baseline resolved from pruning.json whose weights differ from the recorded source is flagged
    (`sha256_matches_source`) and warned about."""
    say = say or (lambda message: log.info(message))
    load_options = {"dtype": dtype, "device": device, "device_map": device_map, "trust_remote_code": trust_remote_code}
    model = None if model is None else str(model)
    manifest = manifest_or_none(model)
    location, expected = resolve_baseline(baseline, model)
    check_evaluation([model] + ([location] if location is not None else []), config, device, trust_remote_code, device_map)
    evaluated = _evaluate_location(model, config, pruning_info(manifest), "model", load_options, progress, verbose, say)
    dense = None
    if location is not None:
        dense = _evaluate_location(location, config, {}, "baseline", load_options, progress, verbose, say)
        if expected and expected.get("sha256") and dense["model"]["source"]["sha256"] != expected["sha256"]:
            say("[yellow]warning:[/] the baseline's weights differ from pruning.json's source_model (sha256)")
            dense["model"]["sha256_matches_source"] = False
        elif expected:
            dense["model"]["sha256_matches_source"] = True
    return combine(evaluated, dense, config)

"""Model parallelism (`--device-map`): the model's modules spread over several devices, each computing where its
weights are.

A device map says, for modules of the model (the embeddings, each decoder layer, the final norm, the head), which
device holds and runs them. `resolve_device_map` turns what the user gave into one, from the model's shapes alone
(the meta-device model of preflight.py, before any weight loads): "auto" / "balanced" (accelerate's balanced
split over the visible GPUs), "sequential" (fill the first GPU, then the next), or a JSON file or dict
{module name: device}. `place` dispatches the loaded model with accelerate's own `dispatch_model`: hooks move each
module's inputs to its device, so the model's forward and backward run unchanged across devices, and everything
fidelprune keeps per layer (score accumulators, masks, reconstruction Grams) lives on that layer's device.

One difference from transformers' `from_pretrained(device_map=...)`: a "cpu" entry means the module lives *and
runs* on the CPU, not weights kept in host memory and streamed to a GPU at each call (accelerate's offload, which
replaces the weights by meta tensors between calls; the weight score forms, surgery and the refit read them
then). Weights in host memory computed on a GPU is `--offload cpu`, which scores exactly; "disk" entries are
refused for the same reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .adapters import adapt
from .errors import ConfigError

DEVICE_MAP_KINDS = ("auto", "balanced", "sequential")
DeviceMap = dict[str, str]


def _device_name(where: str, value) -> str:
    """A device map value as a torch device string ('cpu', 'cuda:1'); accelerate's ints are CUDA indices."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: a device must be 'cpu', 'cuda:N' or a GPU index, got {value!r}")
    if isinstance(value, int) or value.isdigit():
        value = f"cuda:{int(value)}"
    if value in ("disk", "meta"):
        raise ConfigError(f"{where}: {value!r} (offloaded weights) is not supported: a module runs where it is; to keep "
                          f"the weights in host memory and compute on the GPU use --offload cpu instead of --device-map")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ConfigError(f"{where}: unknown device {value!r}; use 'cpu' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            seen = f"only {count} CUDA device(s) are visible" if count else "this torch sees no CUDA GPU"
            raise ConfigError(f"{where}: device {value!r} does not exist ({seen}); edit the map or use --device-map auto")
        return f"cuda:{index}"
    if device.type != "cpu":
        raise ConfigError(f"{where}: device {value!r} is not supported; use 'cpu' or 'cuda:N'")
    return "cpu"


def _read_map_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--device-map {path}: cannot read it as JSON ({err}); write {{module name: device}}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--device-map {path}: expected a JSON object {{module name: device}}, e.g. "
                          f'{{"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", ...}}')
    return data


def _infer(kind: str, model: nn.Module, dtype: torch.dtype) -> dict:
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = getattr(model, "_no_split_modules", None) or []
    if kind == "sequential":
        max_memory = get_max_memory()
    else:
        max_memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    if torch.cuda.is_available():  # GPUs only: a layer that fits none goes to 'disk' and is refused below
        max_memory = {k: v for k, v in max_memory.items() if k != "cpu"}
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def resolve_device_map(spec: str | Path | dict, model: nn.Module, dtype: torch.dtype) -> DeviceMap:
    """The checked device map {module name: 'cpu' | 'cuda:N'} for `model` (its shapes suffice: a meta-device model)
    from "auto" / "balanced" / "sequential", a JSON file, or a dict. Every error is one line, before any weight loads."""
    if isinstance(spec, dict):
        where, given = "device_map", spec
    elif str(spec) in DEVICE_MAP_KINDS:
        where, given = f"--device-map {spec}", _infer(str(spec), model, dtype)
        if "disk" in given.values() or "cpu" in given.values() and torch.cuda.is_available():
            raise ConfigError(f"--device-map {spec}: the model does not fit the visible GPUs' memory; add --offload cpu "
                              f"(weights in host memory, one layer at a time on the GPU) instead of --device-map")
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--device-map {spec}: not one of {', '.join(DEVICE_MAP_KINDS)} and no such file")
        where, given = f"--device-map {spec}", _read_map_file(path)
    return check_device_map(given, model, where)


def _owner(device_map: DeviceMap, tensor_name: str, where: str = "device_map") -> str | None:
    """The device map entry that places `tensor_name` (a parameter, buffer or module name), or None."""
    matches = [m for m in device_map if m == "" or tensor_name == m or tensor_name.startswith(m + ".")]
    if len(matches) > 1:
        raise ConfigError(f"{where}: {tensor_name} is placed twice ({' and '.join(repr(m) for m in matches)}); "
                          f"name each module once")
    return matches[0] if matches else None


def check_device_map(given: dict, model: nn.Module, where: str = "device_map") -> DeviceMap:
    """`given` with its devices normalised, if it names modules of `model` only, places every parameter and buffer
    exactly once, and keeps tied weights (the embeddings and a tied head) on one device."""
    modules = dict(model.named_modules())
    device_map: DeviceMap = {}
    for name, value in given.items():
        if not isinstance(name, str) or name not in modules:
            layers = [n for n in modules if n.endswith(".layers.0")]
            hint = f" (decoder layers are named like {layers[0]!r})" if layers else ""
            raise ConfigError(f"{where}: {name!r} is not a module of this model{hint}")
        device_map[name] = _device_name(f"{where}, {name!r}", value)

    owner = lambda tensor_name: _owner(device_map, tensor_name, where)  # noqa: E731
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    missing = [n for n in names if owner(n) is None]
    if missing:
        raise ConfigError(f"{where}: {len(missing)} weight(s) have no device, e.g. {missing[0]}; add its module "
                          f"(or use --device-map auto)")
    by_tensor: dict[int, tuple[str, str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        device = device_map[owner(name)]
        first = by_tensor.setdefault(id(param), (name, device))
        if first[1] != device:
            raise ConfigError(f"{where}: {first[0]} and {name} are one tied weight but are placed on {first[1]} and "
                              f"{device}; put their modules on one device")
    return device_map


def place(model: nn.Module, device_map: DeviceMap) -> nn.Module:
    """Move each module of `model` to its device and attach accelerate's hooks that bring inputs to it. The main
    device is given as 'cpu' so that accelerate reads 'cpu' entries as modules that run on the CPU, never as
    offloaded weights (see the module docstring); the model's outputs come back to where its inputs were."""
    import logging

    from accelerate import dispatch_model

    check_device_map(device_map, model)
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns of weights 'offloaded to the cpu' for every 'cpu' entry; none are here
    try:
        return dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    finally:
        log.setLevel(level)


def device_map_of(model: nn.Module) -> DeviceMap | None:
    """The device map a model was placed with (by `place`, or by transformers / accelerate), or None."""
    device_map = getattr(model, "hf_device_map", None)
    return dict(device_map) if device_map else None


def offloaded(model: nn.Module) -> list[str]:
    """Parameters accelerate keeps off the model (meta tensors, loaded at each call): fidelprune cannot score these."""
    return [name for name, param in model.named_parameters() if param.device.type == "meta"]


def layer_devices(device_map: DeviceMap, model: nn.Module) -> list[str]:
    """The device of each decoder layer under `device_map` (a map that splits a layer is refused by accelerate's
    no-split rule for 'auto'; a hand-written one is read by the layer's first parameter)."""
    adapted = adapt(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [device_map[_owner(device_map, names[id(next(layer.parameters()))])] for layer in adapted.layers]


def head_device(device_map: DeviceMap, model: nn.Module) -> str:
    """The device of the output head (where the logits are made)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return device_map[_owner(device_map, names[id(model.get_output_embeddings().weight)])]


def device_bytes(device_map: DeviceMap, model: nn.Module, bytes_per_value: int) -> dict[str, int]:
    """The weights' bytes each device holds (tied weights once)."""
    held: dict[str, int] = {}
    for name, param in model.named_parameters():  # duplicates (tied weights) are listed once
        device = device_map[_owner(device_map, name)]
        held[device] = held.get(device, 0) + param.numel() * bytes_per_value
    return held


def describe(device_map: DeviceMap, model: nn.Module) -> str:
    """'layers 0-13 on cuda:0, 14-29 on cuda:1' for people."""
    spans: list[list] = []
    for index, device in enumerate(layer_devices(device_map, model)):
        if spans and spans[-1][0] == device:
            spans[-1][2] = index
        else:
            spans.append([device, index, index])
    return "layers " + ", ".join(f"{a}-{b} on {d}" if a != b else f"{a} on {d}" for d, a, b in spans)

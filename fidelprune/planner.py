"""The memory planner: a prune run's peak memory on its compute device and its scoring FLOPs, from the model's
config and the run's settings alone (no weights), printed before any compute (`fidelprune prune --dry-run` prints
it and stops). A run that would not fit stops with one line naming the flag that makes it fit.

The estimate counts what the code below it keeps (docs/scale.md has the measured error):
- weights: every parameter in the model's dtype; streamed (--offload), everything but the decoder layers plus one
  layer, the rest in host memory.
- activations a backward pass keeps, per token and decoder layer, with every weight frozen (a frozen linear keeps
  no input): each norm's input (2 d for LLaMA, 4 d for Gemma-2/3), the attention's q, k, v and output
  (2 q + 2 kv; eager attention also its [H, T, T] scores twice), and the gated MLP's gate, up and act(gate) (3 I);
  the weight-element and element forms' hooks hold the MLP's input too (d). Streamed, only one layer's, plus every
  layer's input (L + 1 hidden states).
- logits: [B, T, V] in the model's dtype, with their gradient for a backward pass and the teacher's for KD.
- the KD teacher's last-layer output for every calibration token (d each), kept for the KD passes (host memory).
- score buffers: the weight-element form's per-sequence [B, I, d] fp32 products, the element forms' [I, d] fp32
  sums per layer (on the device unless streamed), the activation form's [B, T, I] product.
- calibration text: the documents read and one batch of their tokenization (calibration.TOKENIZE_CHARS), before
  scoring begins.
- reconstruction: one layer's fp64 Gram [(I+1)^2] and the solve's copies of it (with --reconstruct-select obs the
  inverse and its downdate take their place, plus the fp64 coefficients [(I+1), d]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .adapters import AdaptedModel
from .calibration import text_memory
from .errors import ConfigError, FidelpruneError
from .placement import DeviceMap, device_bytes, head_device, layer_devices, resolve_device_map
from .settings import DEFAULT_RATIO, PruneConfig

GiB = 1 << 30
HEADROOM = 0.9  # plan to use at most this share of the free memory: allocators fragment, kernels need workspace


class MemoryPlanError(FidelpruneError, ValueError):
    """The run, as configured, needs more memory than the device has."""


@dataclass
class MemoryPlan:
    mode: str  # "whole": the model on the device; "streamed": one decoder layer at a time (--offload cpu);
    # "device map": this device's share of a model spread over devices (--device-map)
    device: str
    dtype: str
    batch: tuple[int, int]  # sequences per pass, tokens per sequence
    parts: dict[str, int] = field(default_factory=dict)  # bytes on the compute device, by what holds them
    host_bytes: int = 0  # off a GPU: streamed weights and element sums, the refit's hidden-state cache, the search's
    mapped_bytes: int = 0  # --offload disk: weights memory-mapped from their files (page cache, not held memory)
    scoring_flops: float = 0.0
    available_bytes: int | None = None  # free memory on the device now; None when unknown

    @property
    def peak_bytes(self) -> int:
        """Weights plus the largest of the scoring, allocation search and reconstruction working sets (they run
        one after the other)."""
        phases = ("weights", "reconstruction", "allocation search", "calibration text")
        scoring = sum(v for k, v in self.parts.items() if k not in phases)
        return self.parts["weights"] + max(scoring, *(self.parts.get(k, 0) for k in phases[1:]))

    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= HEADROOM * self.available_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes}

    def rows(self) -> list[tuple[str, str]]:
        """(what, how much) lines for people."""
        rows = [("mode", f"{self.mode} on {self.device}, {self.dtype}, batch {self.batch[0]} x {self.batch[1]} tokens")]
        rows += [(f"  {name}", gib(value)) for name, value in self.parts.items() if value]
        rows.append(("peak on the device", gib(self.peak_bytes)))
        if self.host_bytes:
            rows.append(("host memory (weights, sums, refit and search caches)", gib(self.host_bytes)))
        if self.mapped_bytes:
            rows.append(("memory-mapped from the weight files", gib(self.mapped_bytes)))
        rows.append(("free on the device", "unknown" if self.available_bytes is None else gib(self.available_bytes)))
        rows.append(("scoring compute", f"{self.scoring_flops / 1e12:,.1f} TFLOP"))
        return rows


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def available_memory(device: str) -> int | None:
    """Free bytes on `device` now: CUDA's own count, or the host's MemAvailable for the CPU."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _layer_params(shapes: AdaptedModel) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in shapes.layers]


def plan_memory(shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype, device: str, streamed: bool = False,
                available_bytes: int | None = None, device_map: DeviceMap | None = None,
                mapped: bool = False) -> MemoryPlan:
    """The plan for pruning the model `shapes` (on the meta device: preflight.shape_model) with `config` (a
    PruneConfig) in `dtype` on `device`. With a `device_map` (placement.py), the plan of `device`'s share: the
    weights it holds, the activations and score sums of its decoder layers, the logits if it holds the head, and
    one layer's transient buffers if it holds any layer (plan_device_map gives every device's). `mapped`
    (--offload disk, streamed): the weights stay memory-mapped from their files, so host memory holds none of them
    and, on the CPU, the working set is the embeddings, head and one layer, like a GPU's."""
    cfg = shapes.config
    b = torch.finfo(dtype).bits // 8
    method = config.method.resolved(config.allocation.ratio or DEFAULT_RATIO)
    kind, form = method.spec.kind, method.form
    stages = method.spec.stage_objectives(method) if kind == "gradient" else []  # sdmprune: ce, then kd
    batch, seq = method.batch_size, config.calibration.seq_len
    tokens = batch * seq  # per pass
    layers, d, vocab = shapes.num_layers, cfg.hidden_size, shapes.model.get_input_embeddings().num_embeddings
    width = max(shapes.widths())
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q_dim = cfg.num_attention_heads * head_dim
    kv_dim = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim
    total = sum(p.numel() for p in shapes.model.parameters())
    per_layer = _layer_params(shapes)
    outside = total - sum(per_layer)

    mode = "device map" if device_map else "streamed" if streamed else "whole"
    plan = MemoryPlan(mode, device, str(dtype).replace("torch.", ""), (batch, seq))
    on_host = device == "cpu"  # host and device memory are one: streaming saves activations, not weights
    plan.parts["weights"] = b * (outside + max(per_layer) if streamed and (mapped or not on_host) else total)
    # this device's decoder layers, and whether the logits (the head's output) are made here
    layers_here, head_here = layers, True
    if device_map:
        layers_here = layer_devices(device_map, shapes.model).count(device)
        head_here = head_device(device_map, shapes.model) == device
        plan.parts["weights"] = device_bytes(device_map, shapes.model, b).get(device, 0)
    plan.host_bytes = b * total if streamed and not on_host and not mapped else 0
    plan.mapped_bytes = b * total if streamed and mapped else 0
    gradient = kind == "gradient"
    uses_data = kind != "data-free"
    # Each norm over the hidden size keeps its input (LLaMA has two per layer, Gemma-2/3 four); eager attention
    # (Gemma-2's soft-capping) keeps its [H, T, T] scores twice (the capped scores and the softmax).
    norms = sum(1 for m in shapes.layers[0].modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None
                and m.weight.numel() == d)
    eager = getattr(cfg, "_attn_implementation", None) == "eager"
    saved_per_token_layer = norms * d + 2 * q_dim + 2 * kv_dim + 3 * width + (2 * cfg.num_attention_heads * seq if eager else 0)
    if gradient:
        kept_layers = 1 if streamed else layers_here
        # the weight forms' hooks also hold each layer's MLP input x until its backward (down_proj's input a comes
        # back from the factors autograd keeps)
        held = d if form != "activation" else 0
        # --drop-layers: the layer scores hold each layer's input until its backward (in a low-precision dtype the
        # norm keeps an fp32 copy instead, so this one is extra)
        held += d if config.allocation.drop_layers else 0
        held += q_dim if config.allocation.prunes_heads else 0  # the head scores hold o_proj's input likewise
        plan.parts["activations"] = b * tokens * (saved_per_token_layer + held) * kept_layers
        if streamed:
            plan.parts["hidden states (streamed)"] = b * tokens * d * (layers + 1)
        teacher = "kd" in stages
        # KD: the student's logits, the teacher's, and at the backward's peak the KL and CE gradients and their sum
        plan.parts["logits"] = b * tokens * vocab * (5 if teacher else 2) if head_here else 0
        if teacher and (stages[0] != "kd" or len(stages) > 1):
            # the original model's last-layer output for every window, kept by the first pass for the KD passes
            # after it (scoring.taylor_scores' teacher_hidden), in host memory
            kept = b * config.calibration.samples * seq * d
            if on_host:
                plan.parts["teacher hidden states"] = kept
            else:
                plan.host_bytes += kept
        if form == "weight-element":
            plan.parts["score buffers"] = 3 * 4 * batch * width * d
        elif form in ("element1", "element2"):
            sums = 4 * 3 * width * d * (1 + (form == "element2"))
            off_device = streamed and not on_host  # streamed onto a GPU, the sums stay in host memory
            plan.parts["score buffers"] = 4 * batch * width * d + (0 if off_device else sums * layers_here)
            plan.host_bytes += sums * layers if off_device else 0
        else:
            plan.parts["score buffers"] = 2 * 4 * tokens * width
    elif uses_data:
        # one layer's transients (nothing is kept without gradients) and the statistics' fp64 copy of its input
        plan.parts["activations"] = b * tokens * (4 * d + 4 * width) + 8 * tokens * width
        plan.parts["logits"] = 0 if streamed or not head_here else b * tokens * vocab
    if config.reconstruction.mode != "none":
        plan.parts["reconstruction"] = 4 * 8 * (width + 1) ** 2 + b * tokens * saved_per_token_layer
        if config.reconstruction.select == "obs":
            plan.parts["reconstruction"] += 8 * (width + 1) * d
        samples = config.reconstruction.samples or config.calibration.samples
        cache = b * samples * seq * d * (2 if config.reconstruction.target == "dense" else 1)  # hidden states, in host memory
        if on_host:
            plan.parts["reconstruction"] += cache
        else:
            plan.host_bytes += cache

    # the calibration documents and one batch of their tokenization (calibration.py), held while windows are drawn
    text = sum(text_memory(source, seq) for source in {config.calibration.source, config.reconstruction.calibration}
               if uses_data and isinstance(source, str))
    if on_host:
        plan.parts["calibration text"] = text
    else:
        plan.host_bytes += text

    alloc = config.allocation
    if alloc.kind == "search":
        # search.py, all in host memory: the dense next-token distributions of the search windows (fp32), the
        # layer inputs of the dense model, the parent and two children, and with reconstruction one fp64 Gram per
        # prunable layer (the refit in the loop) and the refit down_proj of three widths per layer (the parent's
        # and one move either side, search._Refits.keep_near), each at most the whole width
        search_tokens = alloc.search_samples * seq
        searched = layers - len(alloc.protected(layers))
        part = 4 * search_tokens * vocab + 4 * b * layers * search_tokens * d
        if config.reconstruction.mode != "none":
            part += searched * (8 * (width + 1) ** 2 + 3 * b * width * d)
        if on_host:
            plan.parts["allocation search"] = part
        else:
            plan.host_bytes += part
    if device_map and not layers_here:
        for name in ("activations", "score buffers", "reconstruction"):
            plan.parts.pop(name, None)
        if plan.parts.get("logits") == 0 and not gradient:
            plan.parts.pop("logits", None)

    # FLOPs: a forward pass costs 2 per weight per token, plus causal attention (2 matmuls over T/2 keys on average).
    forward = 2 * sum(per_layer) + 2 * d * vocab + 2 * layers * seq * q_dim
    if gradient:
        per_token = 2 * forward  # forward + the backward's activation gradients (no weight gradients)
        if form != "activation":
            per_token += 6 * width * d * layers  # per-sequence weight gradients of the three MLP projections
        if streamed:
            per_token += forward  # each layer runs again from its kept input
        # KD: the teacher's logits. Its layers run only where no pass before kept their output (a first pass with
        # KD runs them; sdmprune's CE stage 1 keeps it); every KD pass runs the head.
        head = 2 * d * vocab
        teacher_layers = forward - head if stages and stages[0] == "kd" else 0
        per_token = per_token * len(stages) + teacher_layers + stages.count("kd") * head
    else:
        per_token = forward if uses_data else 0
    plan.scoring_flops = float(per_token) * config.calibration.samples * seq
    plan.available_bytes = available_bytes
    return plan


def plan_run(shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype, device: str, offload: str | None = None,
             device_map: DeviceMap | None = None) -> list[MemoryPlan]:
    """The plans of a run as configured, against the memory free now: one per device of a device map, else one
    (streamed through `device` with `offload` "cpu" or "disk")."""
    if device_map:
        return plan_device_map(shapes, config, dtype, device_map)
    return [plan_memory(shapes, config, dtype, device, streamed=offload is not None,
                        available_bytes=available_memory(device), mapped=offload == "disk")]


def plan_device_map(shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype, device_map: DeviceMap) -> list[MemoryPlan]:
    """One plan per device of `device_map`, each with that device's free memory now. The host-side refit cache is
    counted once, on the first device's plan."""
    devices = list(dict.fromkeys(device_map.values()))
    plans = [plan_memory(shapes, config, dtype, device, available_bytes=available_memory(device), device_map=device_map)
             for device in devices]
    for plan in plans[1:]:
        plan.host_bytes = 0
    return plans


def check_device_map_fits(plans: list[MemoryPlan], shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype,
                          device_map: DeviceMap) -> None:
    """Stop with one line when a device of the map would overflow: a smaller batch when that is enough, else
    another split or --offload cpu."""
    full = [plan for plan in plans if not plan.fits()]
    if not full:
        return
    worst = full[0]
    where = f"this run needs about {gib(worst.peak_bytes)} on {worst.device} but {gib(worst.available_bytes or 0)} is free"
    for size in range(config.method.batch_size - 1, 0, -1):
        smaller = _with_batch(config, size)
        if all(p.fits() for p in (plan_memory(shapes, smaller, dtype, p.device, available_bytes=p.available_bytes,
                                              device_map=device_map) for p in plans)):
            raise MemoryPlanError(f"{where}: add --batch-size {size} (the same scores)")
    raise MemoryPlanError(f"{where}, even with --batch-size 1: move layers off {worst.device} in a --device-map file, "
                          f"use --device-map balanced, or --offload cpu instead")


def check_fits(plan: MemoryPlan, shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype, mappable: bool = True) -> None:
    """Stop with one line naming the flags that make the run fit, when it does not: first a smaller batch (the
    scores do not depend on it), then streaming (--offload cpu: one more forward per batch; on the CPU also
    --offload disk, whose weights the page cache holds), then both. A run streamed onto a GPU whose weights would
    not fit in host memory names --offload disk. `mappable`: the weights are safetensors files (not a GGUF), which
    --offload disk needs."""
    offload = "disk" if plan.mapped_bytes else "cpu" if plan.mode == "streamed" else None
    if plan.fits():
        _check_host_memory(plan, shapes, config, dtype, mappable)
        return
    batch = config.method.batch_size
    disk = ("disk",) if plan.device == "cpu" and mappable else ()
    later = {None: ("cpu", *disk), "cpu": disk, "disk": ()}[offload]
    tries = [(offload, b) for b in range(batch - 1, 0, -1)] + [(o, b) for o in later for b in range(batch, 0, -1)]
    where = f"this run needs about {gib(plan.peak_bytes)} on {plan.device} but {gib(plan.available_bytes or 0)} is free"
    if offload is None and plan.device.startswith("cuda") and torch.cuda.device_count() > 1:
        _suggest_device_map(where, shapes, config, dtype)
    for mode, size in tries:
        candidate = plan_memory(shapes, _with_batch(config, size), dtype, plan.device, mode is not None,
                                plan.available_bytes, mapped=mode == "disk")
        if candidate.fits():
            flags = " and ".join(f for f in (f"--offload {mode}" if mode != offload else "",
                                             f"--batch-size {size}" if size != batch else "") if f)
            raise MemoryPlanError(f"{where}: add {flags} (about {gib(candidate.peak_bytes)}; the same scores)")
    hint = "".join(f"--offload {o}, " for o in later[-1:])
    smaller_dtype = " or --dtype bfloat16" if dtype == torch.float32 else ""
    raise MemoryPlanError(f"{where}, even with {hint}--batch-size 1: lower --seq-len{smaller_dtype}, or use a device "
                          f"with more memory")


def _check_host_memory(plan: MemoryPlan, shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype, mappable: bool) -> None:
    """Streamed onto a GPU (--offload cpu), the host holds the weights: stop naming --offload disk when they would
    not fit the host's free memory and the memory-mapped plan's host share would."""
    host = available_memory("cpu")
    if not plan.host_bytes or plan.device == "cpu" or host is None or plan.host_bytes <= HEADROOM * host:
        return
    mapped = plan_memory(shapes, config, dtype, plan.device, True, plan.available_bytes, mapped=True)
    fix = ("add --offload disk instead of --offload cpu (the weights stay memory-mapped from their files)"
           if mappable and mapped.host_bytes <= HEADROOM * host else "use a machine with more host memory")
    raise MemoryPlanError(f"this run keeps about {gib(plan.host_bytes)} in host memory but {gib(host)} is free: {fix}")


def _suggest_device_map(where: str, shapes: AdaptedModel, config: PruneConfig, dtype: torch.dtype) -> None:
    """Several GPUs: stop naming --device-map balanced when the visible GPUs hold the run between them."""
    try:
        device_map = resolve_device_map("balanced", shapes.model, dtype)
    except ConfigError:
        return
    if all(p.fits() for p in plan_device_map(shapes, config, dtype, device_map)):
        raise MemoryPlanError(f"{where}: add --device-map balanced (the layers spread over the "
                              f"{torch.cuda.device_count()} visible GPUs; the same scores)")


def _with_batch(config: PruneConfig, batch_size: int) -> PruneConfig:
    from dataclasses import replace

    return replace(config, method=replace(config.method, batch_size=batch_size))

"""Write a (pruned) model as a GGUF file that llama.cpp loads, and read such a file back into torch tensors.

A GGUF holds three things: metadata (architecture hyperparameters), the vocabulary, and the tensors. Pruning
changes only the MLP widths and weights, so fidelprune takes the metadata and vocabulary from a *template* GGUF of
the same base model (the source GGUF a run was pruned from, one the user gives, or what llama.cpp's converter
writes with --vocab-only), sets `feed_forward_length` to the new widths, and writes the model's tensors under
llama.cpp's names (gguf's TensorNameMap) with the two layout conventions llama.cpp's own converter applies:

- LLaMA-layout architectures: llama.cpp rotates interleaved pairs where transformers rotates halves, so the rows of
  W_q and W_k are permuted per head (`permute_qk`, the converter's LlamaModel.permute).
- Gemma: transformers' RMSNorm multiplies by (1 + w), llama.cpp's by w, so norm weights are stored as 1 + w.

Per-layer widths: llama.cpp's `llama` graph uses one scalar width for every layer, but its `deci` architecture
(the LLaMA layout with per-layer `feed_forward_length`, made for NVIDIA's Nemotron-NAS models) builds each layer at
its own width. A LLaMA-layout model with non-uniform widths is therefore written as `deci`; other families have no
such architecture in llama.cpp, and export refuses them with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import FidelpruneError
from ..layout import ModelShape
from ..models import model_shape

# transformers model_type -> llama.cpp architecture (the one llama.cpp's converter writes for that family)
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
# architecture -> the architecture llama.cpp builds with a width per layer (feed_forward_length as an array)
PER_LAYER_ARCH = {"llama": "deci"}
PERMUTED_QK = {"llama", "deci"}  # llama.cpp's interleaved ("normal") rope on these
NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class ExportError(FidelpruneError, ValueError):
    """A model that cannot be exported to the requested format, or an export that failed its load check."""


def gguf_module():
    import gguf

    return gguf


def target_arch(model_type: str, shape: ModelShape) -> str:
    """The llama.cpp architecture to write; decidable from config.json alone."""
    if model_type not in GGUF_ARCH:
        raise ExportError(f"GGUF export supports the families {', '.join(sorted(GGUF_ARCH))}, not {model_type!r}")
    arch = GGUF_ARCH[model_type]
    if shape.uniform:
        return arch
    widths = shape.mlp_widths
    if arch not in PER_LAYER_ARCH:
        raise ExportError(
            f"this model's MLP widths differ per layer ({min(widths)}..{max(widths)}) and llama.cpp builds "
            f"{model_type} models with one width for every layer; prune it with --allocation uniform (and no "
            f"--protect-first/--protect-last) to export it to GGUF"
        )
    return PER_LAYER_ARCH[arch]


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half row order -> llama.cpp's interleaved pairs, per head (rows of W_q / W_k)."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_qk."""
    shape = weight.shape
    return weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _head_counts(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def tensor_names(model: nn.Module, arch: str) -> dict[str, str]:
    """{transformers parameter name: GGUF tensor name} for every tensor the GGUF holds (a tied lm_head is not
    written: llama.cpp reuses token_embd)."""
    gguf = gguf_module()
    config = model.config
    arch_enum = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    names = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportError(f"no GGUF name for tensor {name!r} in llama.cpp's {arch} architecture")
        names[name] = mapped
    return names


def convert_layout(name: str, tensor: torch.Tensor, arch: str, config, to_gguf: bool = True) -> torch.Tensor:
    """A transformers tensor in llama.cpp's layout (see the module docstring), or back (to_gguf=False)."""
    if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads, kv_heads = _head_counts(config)
        n_head = heads if name.endswith("q_proj.weight") else kv_heads
        return (permute_qk if to_gguf else unpermute_qk)(tensor, n_head)
    if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
        return tensor + 1 if to_gguf else tensor - 1
    return tensor


@dataclass
class Template:
    """The metadata and vocabulary of a GGUF of the base model, to which the pruned tensors are added."""

    path: Path
    arch: str
    fields: dict  # key -> (value, value type, array sub-type or None), in file order
    has_output: bool  # whether the template holds an untied output.weight

    @classmethod
    def read(cls, path: str | Path) -> Template:
        gguf = gguf_module()
        path = Path(path)
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as err:  # noqa: BLE001 - the reader raises bare ValueError/struct errors on damage
            raise ExportError(f"{path} is not a readable GGUF file ({err}); give another --template") from err
        fields = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), kind, sub)
        arch = reader.fields["general.architecture"].contents()
        return cls(path, arch, fields, any(t.name == "output.weight" for t in reader.tensors))

    def value(self, key: str):
        return self.fields.get(f"{self.arch}.{key}", (None,))[0]

    def check_fits(self, config, arch: str, dropped_layers: int = 0) -> None:
        """The template must describe the same base model (family, depth less the `dropped_layers` that
        --drop-layers removed, hidden size, vocabulary)."""
        base_arch = {v: k for k, v in PER_LAYER_ARCH.items()}.get(arch, arch)
        if self.arch != base_arch:
            raise ExportError(f"template {self.path} is a {self.arch!r} GGUF, this model needs {base_arch!r}; "
                              f"give the GGUF of the model it was pruned from (--template)")
        # a model with layers dropped (--drop-layers) has fewer than its base; the count written is the model's
        layers = self.value("block_count")
        if layers is not None and layers != config.num_hidden_layers + dropped_layers:
            also = f" and {dropped_layers} dropped" if dropped_layers else ""
            raise ExportError(f"template {self.path} has {layers} layers, the model {config.num_hidden_layers}{also}: "
                              f"it is not this model's base; give the GGUF it was pruned from (--template)")
        if self.value("embedding_length") is not None and self.value("embedding_length") != config.hidden_size:
            raise ExportError(f"template {self.path} has hidden size {self.value('embedding_length')}, the model "
                              f"{config.hidden_size}: it is not this model's base; give the GGUF it was pruned from (--template)")
        tokens = self.fields.get("tokenizer.ggml.tokens", (None,))[0]
        if tokens is None:
            raise ExportError(f"template {self.path} holds no vocabulary (tokenizer.ggml.tokens)")
        if len(tokens) > config.vocab_size:
            raise ExportError(f"template {self.path} has {len(tokens)} tokens, the model's embedding {config.vocab_size} rows")


# general.file_type for each output type (llama.cpp's LlamaFileType)
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _encode(array: np.ndarray, outtype: str):
    """(data, raw ggml type or None) for one tensor: 1-D tensors (norms, biases) stay f32 as in llama.cpp's
    converter; Q8_0 needs rows that are a multiple of its 32-value block, other tensors fall back to f16."""
    gguf = gguf_module()
    types = gguf.GGMLQuantizationType
    if array.ndim < 2 or outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if outtype == "bf16":
        return gguf.quants.quantize(array, types.BF16), types.BF16
    if array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return gguf.quants.quantize(array, types.Q8_0), types.Q8_0
    return array.astype(np.float16), None


def check_attention_pattern(config) -> None:
    """llama.cpp derives which layers use sliding-window attention from the layer number (Gemma-2 every other,
    Gemma-3 five of six); after dropped layers the model's own `layer_types` may no longer follow that rule,
    and llama.cpp would run those layers with the other attention."""
    types = getattr(config, "layer_types", None)
    if not isinstance(types, list) or len(set(types)) < 2 and not any("sliding" in t for t in types):
        return
    fresh = type(config)(**{**config.to_dict(), "layer_types": None}).layer_types
    if fresh is not None and list(fresh) != list(types):
        raise ExportError(f"the layers left after --drop-layers no longer follow {config.model_type}'s sliding/full "
                          f"attention pattern, which llama.cpp derives from the layer number: export to vllm instead "
                          f"(it reads layer_types), or drop layers that keep the pattern")


def write_gguf(model: nn.Module, template: Template, path: str | Path, outtype: str = "f16", progress: bool = False,
               dropped_layers: int = 0) -> dict:
    """Write `model` to `path` with the template's metadata and vocabulary, and the model's per-layer shape;
    returns what was written. `progress` shows the tensor write (minutes for a large model). `dropped_layers`:
    how many layers pruning.json says were dropped, so that the base's template has that many more."""
    gguf = gguf_module()
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF --outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    config = model.config
    shape = model_shape(config)
    arch = target_arch(config.model_type, shape)
    template.check_fits(config, arch, dropped_layers)
    check_attention_pattern(config)
    writer = gguf.GGUFWriter(str(path), arch)
    prefix = f"{template.arch}."
    # the depth and head size are the model's: --drop-layers removes layers, and once heads are pruned the head
    # size no longer follows from the hidden size (llama.cpp's default without these keys)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer = {f"{arch}.{key}": value for key, value in {
        "block_count": config.num_hidden_layers, "attention.key_length": head_dim, "attention.value_length": head_dim,
        **shape.gguf_values()}.items()}
    for key, (value, kind, sub) in template.fields.items():
        if key.startswith(prefix):
            key = f"{arch}.{key[len(prefix):]}"
        if key not in per_layer and key != "general.file_type":  # both set below
            writer.add_key_value(key, value, kind, sub)
    for key, value in per_layer.items():
        if isinstance(value, list):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    writer.add_key_value("general.file_type", int(getattr(gguf.LlamaFileType, FILE_TYPES[outtype])), gguf.GGUFValueType.UINT32)

    state = model.state_dict()
    names = tensor_names(model, arch)
    types = {}
    for name, gguf_name in names.items():
        tensor = convert_layout(name, state[name].detach().float().cpu(), arch, config)
        data, raw_type = _encode(tensor.numpy(), outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        types[gguf_name] = (raw_type.name if raw_type is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    counts = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"architecture": arch, "feed_forward_length": per_layer[f"{arch}.feed_forward_length"],
            "tensors": len(names), "tensor_types": counts, "template": str(template.path)}


def read_gguf_state(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF written for `model`'s architecture, as a transformers state dict (dequantized to
    float32, layouts undone): gguf's own reader, independent of the writer above but for the shared name map."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    by_gguf = {g: h for h, g in tensor_names(model, arch).items()}
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            raise ExportError(f"{path} holds tensor {tensor.name!r}, which {model.config.model_type} has no place for")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists the innermost dimension first
        name = by_gguf[tensor.name]
        values = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
        state[name] = convert_layout(name, values, arch, model.config, to_gguf=False)
    return state

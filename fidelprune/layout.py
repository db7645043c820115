"""The on-disk format of fidelprune's outputs and a pruned model's per-layer shape: the one owner of both.

Files: an output directory holds the model files engines load at its top level, `pruning.json` (MANIFEST) or
`recovery.json` (RECOVERY_FILE), and fidelprune's side files (scores, calibration ids) in SIDE_DIR.

Shapes: `ModelShape` says, per decoder layer, the MLP width and the query and KV heads (0 where the block is
gone), and the hidden size. Every writer and reader of a per-layer shape goes through it and its translations:
- config.json: `intermediate_size` (the widest layer), fidelprune's own key LAYER_WIDTHS_KEY, and transformers'
  forward-compatible `per_layer_config` (sparse per-layer overrides); written only where layers differ;
- Nemotron-NAS `block_configs` (vLLM's DeciLMForCausalLM): `to_block_configs` / `from_block_configs`;
- GGUF per-layer arrays (llama.cpp's `deci`): `gguf_values`.
Adding a structure is one more field of LayerShape and its line in each translation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FidelpruneError

MANIFEST = "pruning.json"  # a pruning run's record
RECOVERY_FILE = "recovery.json"  # a recovery run's record
SIDE_DIR = "fidelprune"  # side files live here, out of the top-level *.safetensors glob engines (vLLM) load as weights
SCORES_FILE = "scores.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
# fidelprune's own records (side files at the top level: outputs of fidelprune 0.1, still read)
RECORDS = frozenset({MANIFEST, RECOVERY_FILE, SCORES_FILE, CALIBRATION_FILE})
# config.json key holding per-layer MLP widths when they differ (no transformers config of these families has one)
LAYER_WIDTHS_KEY = "fidelprune_layer_widths"
# transformers' own key for per-layer overrides (configuration_utils' HeterogeneousConfigMixin); its modeling does
# not build such layers yet, so fidelprune's readers translate it back (`homogeneous_config`)
PER_LAYER_KEY = "per_layer_config"
DECILM_TYPE = "nemotron-nas"
DECILM_CONFIG_MODULE = "configuration_decilm.py"


class ManifestError(FidelpruneError, ValueError):
    """A pruning.json that is damaged or not fidelprune's."""


class LayoutError(FidelpruneError, ValueError):
    """A config whose per-layer shape fidelprune cannot read or load."""


def side_file(directory: str | Path, name: str) -> Path:
    """Where an output's side file (scores, calibration ids) is: SIDE_DIR/NAME, or NAME in 0.1 outputs."""
    directory = Path(directory)
    new, old = directory / SIDE_DIR / name, directory / name
    return old if old.is_file() and not new.is_file() else new


def read_manifest(directory: str | Path) -> dict:
    """pruning.json of a fidelprune output; a missing or damaged one is a one-line error."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a fidelprune output directory?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err}); it was damaged: prune again") from err
    if not isinstance(manifest, dict) or not {"method", "allocation", "kept_neurons"} <= manifest.keys():
        raise ManifestError(f"{path} is not a fidelprune pruning.json (it lacks method / allocation / kept_neurons)")
    wrong = _wrongly_typed(manifest)
    if wrong:
        raise ManifestError(f"{path} has a pruning.json's keys, but its {wrong} is not what fidelprune writes there: "
                            f"the file was edited or damaged; prune again")
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wrongly_typed(manifest: dict) -> str | None:
    """The first field readers rely on (report, eval, export, recover) that has another type than pruning.json's."""
    method, allocation, kept = manifest["method"], manifest["allocation"], manifest["kept_neurons"]
    if not isinstance(method, dict) or not isinstance(method.get("method"), str):
        return "method"
    if not isinstance(allocation, dict):
        return "allocation"
    for key in ("width_before", "width_after", "params_before", "params_after"):
        if key in allocation and not _is_int(allocation[key]):
            return f"allocation.{key}"
    for key in ("layer_widths_before", "layer_widths_after"):
        if key in allocation and not (isinstance(allocation[key], list) and all(map(_is_int, allocation[key]))):
            return f"allocation.{key}"
    if not isinstance(kept, dict) or not all(
            isinstance(layer, str) and layer.isdigit() and isinstance(ids, list) and all(map(_is_int, ids))
            for layer, ids in kept.items()):
        return "kept_neurons"
    if not isinstance(manifest.get("source_model", {}), dict):
        return "source_model"
    return None


def manifest_or_none(directory: str | Path | None) -> dict | None:
    """pruning.json of a fidelprune output directory, or None for any other location (a GGUF, a hub id, a plain
    transformers checkpoint)."""
    if directory is None or not (Path(directory) / MANIFEST).is_file():
        return None
    return read_manifest(directory)


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: its MLP width and attention heads; 0 where the MLP or the attention is removed."""

    mlp_width: int
    query_heads: int
    kv_heads: int

    @property
    def has_attention(self) -> bool:
        return self.query_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.mlp_width > 0


@dataclass(frozen=True)
class ModelShape:
    """Every decoder layer's shape and the hidden size: what a pruned model's config must say."""

    hidden_size: int
    layers: tuple[LayerShape, ...]

    @property
    def mlp_widths(self) -> list[int]:
        return [layer.mlp_width for layer in self.layers]

    @property
    def uniform(self) -> bool:
        """Whether one vanilla config describes every layer."""
        return len(set(self.layers)) <= 1

    def with_mlp_widths(self, widths: list[int]) -> ModelShape:
        if len(widths) != len(self.layers):
            raise LayoutError(f"{len(widths)} MLP widths for a model of {len(self.layers)} layers")
        return ModelShape(self.hidden_size, tuple(LayerShape(int(w), layer.query_heads, layer.kv_heads)
                                                  for layer, w in zip(self.layers, widths, strict=True)))

    # config.json ----------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """The shape a config.json dict describes: transformers' per_layer_config where present, else
        fidelprune's LAYER_WIDTHS_KEY, else every layer as the global keys say."""
        heads = config["num_attention_heads"]
        base = LayerShape(config["intermediate_size"], heads, config.get("num_key_value_heads") or heads)
        layers = [base] * config["num_hidden_layers"]
        per_layer = config.get(PER_LAYER_KEY)
        if per_layer:
            for key, overrides in per_layer.items():
                layers[int(key)] = _apply_overrides(base, overrides, int(key))
        elif config.get(LAYER_WIDTHS_KEY):
            widths = config[LAYER_WIDTHS_KEY]
            if len(widths) != len(layers):
                raise LayoutError(f"config.json's {LAYER_WIDTHS_KEY} has {len(widths)} widths for "
                                  f"{len(layers)} layers: the file is damaged; prune again")
            layers = [LayerShape(w, base.query_heads, base.kv_heads) for w in widths]
        return cls(config["hidden_size"], tuple(layers))

    def to_config(self, config: dict) -> dict:
        """`config` (a config.json dict of the same model) describing this shape: the widest MLP as
        intermediate_size, and for per-layer shapes fidelprune's key and transformers' per_layer_config."""
        out = {key: value for key, value in config.items() if key not in (LAYER_WIDTHS_KEY, PER_LAYER_KEY)}
        if any(layer.query_heads != self.layers[0].query_heads or layer.kv_heads != self.layers[0].kv_heads
               for layer in self.layers):
            raise LayoutError("per-layer attention heads have no config.json translation yet")
        out.update(intermediate_size=max(self.mlp_widths), hidden_size=self.hidden_size)
        if not self.uniform:
            out[LAYER_WIDTHS_KEY] = self.mlp_widths
            out[PER_LAYER_KEY] = {str(i).zfill(len(str(len(self.layers) - 1))): {"intermediate_size": w}
                                  for i, w in enumerate(self.mlp_widths) if w != out["intermediate_size"]}
        return out

    # Nemotron-NAS (vLLM's DeciLMForCausalLM) -------------------------------------------------------------------

    def to_block_configs(self) -> list[dict]:
        """Nemotron-NAS `block_configs`: per layer, the query heads per KV head and the MLP width, or no_op."""
        return [{"attention": {"n_heads_in_group": layer.query_heads // layer.kv_heads if layer.has_attention else None,
                               "no_op": not layer.has_attention, "replace_with_linear": False},
                 "ffn": {"intermediate_size": layer.mlp_width if layer.has_mlp else None,
                         "no_op": not layer.has_mlp, "replace_with_linear": False}}
                for layer in self.layers]

    @classmethod
    def from_block_configs(cls, config: dict) -> ModelShape:
        """The shape of a Nemotron-NAS config.json; blocks replaced by a linear map, or MLP widths given as
        `ffn_mult`, have no shape here and are refused."""
        blocks = config.get("block_configs") or []
        if not blocks:
            raise LayoutError("this Nemotron-NAS config.json has no block_configs")
        heads = config["num_attention_heads"]
        layers = []
        for block in blocks:
            attention, ffn = block["attention"], block["ffn"]
            if attention.get("replace_with_linear") or ffn.get("replace_with_linear"):
                raise LayoutError("this Nemotron-NAS model replaces some blocks with linear maps; fidelprune loads only "
                                  "the layout it exports")
            if not ffn.get("no_op") and "intermediate_size" not in ffn:
                raise LayoutError("this Nemotron-NAS model gives MLP widths as ffn_mult; fidelprune loads only the "
                                  "layout it exports")
            no_attention = attention.get("no_op")
            layers.append(LayerShape(0 if ffn.get("no_op") else ffn["intermediate_size"], 0 if no_attention else heads,
                                     0 if no_attention else heads // attention["n_heads_in_group"]))
        return cls(config["hidden_size"], tuple(layers))

    # GGUF (llama.cpp) -----------------------------------------------------------------------------------------

    def gguf_values(self) -> dict[str, int | list[int]]:
        """The per-layer GGUF keys (under the architecture's prefix): one number where every layer agrees, else
        an array (llama.cpp's `deci` reads arrays; its other architectures one number)."""
        columns = {"feed_forward_length": self.mlp_widths, "attention.head_count": [layer.query_heads for layer in self.layers],
                   "attention.head_count_kv": [layer.kv_heads for layer in self.layers]}
        return {key: values[0] if len(set(values)) == 1 else values for key, values in columns.items()}


def _apply_overrides(base: LayerShape, overrides: dict, index: int) -> LayerShape:
    known = {"intermediate_size", "num_attention_heads", "num_key_value_heads", "skip"}
    if not isinstance(overrides, dict) or set(overrides) - known:
        raise LayoutError(f"config.json's {PER_LAYER_KEY} for layer {index} sets "
                          f"{sorted(set(overrides) - known) if isinstance(overrides, dict) else overrides!r}, which "
                          f"fidelprune cannot shape")
    skip = set(overrides.get("skip", ()))
    heads = overrides.get("num_attention_heads", base.query_heads)
    kv_heads = overrides.get("num_key_value_heads", base.kv_heads if "num_attention_heads" not in overrides else heads)
    return LayerShape(0 if "mlp" in skip else overrides.get("intermediate_size", base.mlp_width),
                      0 if "attention" in skip else heads, 0 if "attention" in skip else kv_heads)


def homogeneous_config(config: dict) -> dict:
    """A config.json dict that transformers builds as one homogeneous model: per_layer_config (which makes
    transformers refuse to read `intermediate_size` globally) and the Nemotron-NAS layout become a LLaMA-family
    config with LAYER_WIDTHS_KEY, the shape fidelprune's loader gives each layer. Per-layer heads or removed
    blocks cannot be loaded yet and are refused."""
    if config.get("model_type") == DECILM_TYPE:
        shape = ModelShape.from_block_configs(config)
        heads = {(layer.query_heads, layer.kv_heads) for layer in shape.layers}
        if len(heads) != 1 or not all(layer.has_attention and layer.has_mlp for layer in shape.layers):
            raise LayoutError("this Nemotron-NAS model skips some blocks or varies its attention heads per block; "
                              "fidelprune loads only the layout it exports")
        out = {key: value for key, value in config.items() if key not in ("block_configs", "auto_map")}
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], num_key_value_heads=heads.pop()[1])
        config = shape.to_config(out)
    elif PER_LAYER_KEY in config:
        config = ModelShape.from_config(config).to_config(config)
    return {key: value for key, value in config.items() if key != PER_LAYER_KEY}


def decilm_config(config: dict) -> dict:
    """A LLaMA config.json with per-layer MLP widths as a Nemotron-NAS one (vLLM's DeciLMForCausalLM, with
    fidelprune's configuration module named in auto_map)."""
    shape = ModelShape.from_config(config)
    out = {key: value for key, value in config.items() if key not in (LAYER_WIDTHS_KEY, PER_LAYER_KEY)}
    out.update(model_type=DECILM_TYPE, architectures=["DeciLMForCausalLM"],
               auto_map={"AutoConfig": f"{DECILM_CONFIG_MODULE[:-3]}.DeciLMConfig"},
               intermediate_size=max(shape.mlp_widths), block_configs=shape.to_block_configs())
    return out

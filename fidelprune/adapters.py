"""The adapted model: the only place that knows where a family keeps its decoder layers and MLP projections.

Every supported family has a gated MLP, `y = W_down (act(W_gate x) * W_up x)`, stored either as separate
`gate_proj` / `up_proj` linears or as one fused `gate_up_proj` (Phi-3, rows [0, I) gate, [I, 2I) up). A family is
one `Adapter(...)` line naming those modules. `adapt(model)` resolves the family once and returns an
`AdaptedModel`, which owns everything that touches those attribute paths: the decoder layers, their MLP views,
slicing neurons out, creating biases, and running one decoder layer on stored inputs. Scoring, allocation,
surgery and reconstruction receive an AdaptedModel (a plain model is adapted on entry, for callers that have one).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FidelpruneError
from .utils import batches, frozen_eval


class UnsupportedModelError(FidelpruneError, ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # attribute path from the CausalLM to the decoder layers
    mlp: str = "mlp"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None  # fused [gate; up] projection
    down: str = "down_proj"
    bias_flag: str | None = None  # config switch that gives every MLP linear a bias, if the family has one
    attention: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None  # fused [q; k; v] projection
    o: str = "o_proj"


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), bias_flag="mlp_bias"),
    Adapter("mistral", ("mistral",)),
    Adapter("qwen2", ("qwen2",)),
    Adapter("qwen3", ("qwen3",)),
    Adapter("gemma", ("gemma", "gemma2", "gemma3_text")),
    Adapter("phi3", ("phi3",), gate=None, up=None, gate_up="gate_up_proj", q=None, k=None, v=None, qkv="qkv_proj"),
)


def supported_families() -> str:
    return ", ".join(sorted(t for a in ADAPTERS for t in a.model_types))


def adapter_for(model_type: str | None) -> Adapter:
    """The family adapter of a config's model_type; decidable from config.json alone, before any weight loads."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: fidelprune prunes dense gated MLPs of the families "
        f"{supported_families()} (MoE and non-gated MLPs are not supported yet)"
    )


def get_adapter(model: nn.Module) -> Adapter:
    return adapter_for(getattr(getattr(model, "config", None), "model_type", None))


class _Columns:
    """A view whose output projection `down` loses input columns: its width (the columns) and hidden size (its
    output): MLPView's down_proj, and OutputProjection's o_proj."""

    down: nn.Linear

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def hidden_size(self) -> int:
        return self.down.out_features


@dataclass
class MLPView(_Columns):
    """One decoder layer's MLP. Neuron i is row i of W_gate and W_up and column i of W_down."""

    index: int
    module: nn.Module
    down: nn.Linear
    gate: nn.Linear | None = None
    up: nn.Linear | None = None
    gate_up: nn.Linear | None = None

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_gate, W_up), each [I, d]; views into the real parameters."""
        if self.gate_up is not None:
            return self.gate_up.weight[: self.width], self.gate_up.weight[self.width :]
        return self.gate.weight, self.up.weight

    def gate_up_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.gate_up is not None:
            b = self.gate_up.bias
            return (None, None) if b is None else (b[: self.width], b[self.width :])
        return self.gate.bias, self.up.bias

    def linears(self) -> list[nn.Linear]:
        """The MLP's linears that hold per-neuron weights (gate and up, or the fused one, and down)."""
        return [linear for linear in (self.gate, self.up, self.gate_up, self.down) if linear is not None]

    def params_per_neuron(self) -> int:
        """Parameters that removing one neuron removes: its gate and up rows (+ biases), its down column."""
        gate_bias, up_bias = self.gate_up_biases()
        return 3 * self.hidden_size + (gate_bias is not None) + (up_bias is not None)


@dataclass
class OutputProjection(_Columns):
    """An attention's o_proj as the refit sees a down_proj: its input channels (each head's hd of them) are the
    columns to keep, and its output is the attention's, so the same Gram, solve and write serve it."""

    index: int
    down: nn.Linear


@dataclass
class AttentionView:
    """One decoder layer's attention. Query head h is rows [h hd, (h+1) hd) of W_q and the same columns of W_o;
    it reads KV head h // group_size (transformers' repeat_kv order), whose rows of W_k and W_v it shares."""

    index: int
    module: nn.Module
    o: nn.Linear
    head_dim: int
    kv_heads: int
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None

    @property
    def query_heads(self) -> int:
        return self.o.in_features // self.head_dim

    @property
    def group_size(self) -> int:
        return self.query_heads // self.kv_heads

    @property
    def hidden_size(self) -> int:
        return self.o.out_features

    def params_removed(self, query_heads: int, kv_heads: int) -> int:
        """Parameters that keeping `query_heads` (of them `query_heads // kv_heads` per group) and `kv_heads` removes:
        each query head's W_q rows (and bias) and W_o columns, each KV head's W_k and W_v rows (and biases)."""
        q_rows = self.qkv if self.qkv is not None else self.q
        kv_rows = self.qkv if self.qkv is not None else self.k
        per_query = self.head_dim * (2 * self.hidden_size + (q_rows.bias is not None))
        per_kv = 2 * self.head_dim * (self.hidden_size + (kv_rows.bias is not None))
        return (self.query_heads - query_heads) * per_query + (self.kv_heads - kv_heads) * per_kv


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias = nn.Parameter((bias.index_select(0, rows) if rows is not None else bias).clone())
    return new


class _Moved:
    """The parameters and buffers of `modules` (each once: tied weights are one tensor) moved to `device`, until
    `restore()` puts back the tensors they had: the originals themselves where the block left them unchanged, so
    nothing is copied back and weights memory-mapped from their files (--offload disk) stay mapped; a copy of the
    device tensor where it changed them in place (the refit writes down_proj), which autograd's version counter
    tells."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.params: list[tuple[nn.Parameter, torch.Tensor, int]] = []
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        seen: set[int] = set()
        for module in modules:
            for param in module._parameters.values():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                host = param.data
                param.data = host.to(device)
                self.params.append((param, host, param._version))
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
                    self.buffers.append((module, name, buffer))

    def restore(self) -> None:
        for param, host, version in self.params:
            param.data = host if param._version == version else param.data.to(host)
        for module, name, buffer in self.buffers:
            module._buffers[name] = buffer
        self.params, self.buffers = [], []


class StopForward(Exception):
    """Raised by the recording stubs to end a forward pass once every decoder layer's call was seen."""


LayerCall = tuple[tuple, dict]  # the (args, kwargs) a decoder layer was called with, besides the hidden states


class AdaptedModel:
    """A causal LM of a supported family, with its adapter resolved once. `model` is the transformers module
    itself (the adapted model changes it only through the methods below)."""

    def __init__(self, model: nn.Module, adapter: Adapter | None = None) -> None:
        self.model = model
        self.adapter = adapter or get_adapter(model)
        if model.get_output_embeddings() is None:  # a bare decoder (LlamaModel): nothing to score predictions with
            raise UnsupportedModelError(f"{type(model).__name__} has no language-model head: fidelprune prunes causal "
                                        f"LMs; load the model with AutoModelForCausalLM (or fidelprune.load_model)")
        self.home: torch.device | None = None  # streamed (--offload): where the decoder layers live between runs
        self._outside: _Moved | None = None  # streamed: everything but the layers, moved to the compute device

    def copy(self) -> AdaptedModel:
        """A deep copy of the model, adapted without looking the family up again (and streamed like this one)."""
        copied = AdaptedModel(copy.deepcopy(self.model), self.adapter)
        copied.home = self.home
        return copied

    # ------------------------------------------------------------------------------------------- structure
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the model computes: the device of the embeddings (and, unless streamed, of every layer)."""
        return self.model.get_input_embeddings().weight.device

    def layer_device(self, index: int) -> torch.device:
        """Where decoder layer `index` computes: the compute device when streamed, else where its weights are (a
        device map, placement.py, spreads the layers over devices; the hooks it installs move each layer's inputs)."""
        return self.device if self.streamed else next(self.layers[index].parameters()).device

    @property
    def layers(self) -> nn.ModuleList:
        layers: object = self.model
        for name in self.adapter.layers.split("."):
            layers = getattr(layers, name)
        return layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def mlp(self, index: int) -> MLPView:
        """A view of decoder layer `index`'s MLP (made afresh: slicing replaces the linears)."""
        a = self.adapter
        mlp = getattr(self.layers[index], a.mlp)
        get = lambda name: getattr(mlp, name) if name else None  # noqa: E731
        return MLPView(index, mlp, get(a.down), get(a.gate), get(a.up), get(a.gate_up))

    def mlps(self) -> list[MLPView]:
        """A view of every decoder layer's MLP."""
        return [self.mlp(index) for index in range(self.num_layers)]

    def widths(self) -> list[int]:
        return [view.width for view in self.mlps()]

    def attention(self, index: int) -> AttentionView:
        """A view of decoder layer `index`'s attention (made afresh: slicing replaces the linears)."""
        a = self.adapter
        module = getattr(self.layers[index], a.attention)
        get = lambda name: getattr(module, name) if name else None  # noqa: E731
        kv_heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        return AttentionView(index, module, get(a.o), module.head_dim, kv_heads, get(a.q), get(a.k), get(a.v), get(a.qkv))

    def slice_attention(self, view: AttentionView, query_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
        """Keep query heads `query_heads` and KV heads `kv_heads` (sorted indices; the same number of query heads
        from each kept group), physically: W_q / W_k / W_v rows, W_o columns, and the module's head counts."""
        a, hd = self.adapter, view.head_dim
        rows = lambda heads: (heads[:, None] * hd + torch.arange(hd)).reshape(-1)  # noqa: E731
        device = view.o.weight.device
        q_rows, kv_rows = rows(query_heads.cpu()).to(device), rows(kv_heads.cpu()).to(device)
        if view.qkv is not None:
            q_size, kv_size = view.query_heads * hd, view.kv_heads * hd
            fused = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
            setattr(view.module, a.qkv, _sliced_linear(view.qkv, rows=fused))
        else:
            setattr(view.module, a.q, _sliced_linear(view.q, rows=q_rows))
            setattr(view.module, a.k, _sliced_linear(view.k, rows=kv_rows))
            setattr(view.module, a.v, _sliced_linear(view.v, rows=kv_rows))
        setattr(view.module, a.o, _sliced_linear(view.o, cols=q_rows))
        view.module.num_key_value_groups = len(query_heads) // len(kv_heads)
        for name, value in (("num_key_value_heads", len(kv_heads)), ("num_heads", len(query_heads))):
            if isinstance(getattr(view.module, name, None), int):
                setattr(view.module, name, value)

    # ----------------------------------------------------------------------------------------------- surgery
    def slice_mlp(self, view: MLPView, keep: torch.Tensor) -> None:
        """Replace the MLP's linears by physically smaller ones holding only the neurons in `keep`."""
        a = self.adapter
        keep = keep.to(view.down.weight.device)
        if view.gate_up is not None:
            fused_rows = torch.cat([keep, keep + view.width])
            setattr(view.module, a.gate_up, _sliced_linear(view.gate_up, rows=fused_rows))
        else:
            setattr(view.module, a.gate, _sliced_linear(view.gate, rows=keep))
            setattr(view.module, a.up, _sliced_linear(view.up, rows=keep))
        setattr(view.module, a.down, _sliced_linear(view.down, cols=keep))

    def replace_linear(self, view: MLPView, linear: nn.Linear, new: nn.Linear) -> None:
        """Put `new` where `linear` (one of the view's linears) is, e.g. a saved weight of another shape."""
        a = self.adapter
        for name, current in ((a.gate, view.gate), (a.up, view.up), (a.gate_up, view.gate_up), (a.down, view.down)):
            if current is linear:
                setattr(view.module, name, new)
                return
        raise ValueError("the linear is not one of this MLP's")

    def can_add_down_bias(self) -> bool:
        return all(v.down.bias is not None for v in self.mlps()) or self.adapter.bias_flag is not None

    def add_down_bias(self, view: MLPView, shift: torch.Tensor) -> None:
        """Add `shift` to the layer's down_proj bias, creating zero gate/up biases and the down bias where the model
        has none (the family's config flag, e.g. LLaMA's mlp_bias, then declares them so transformers reloads them)."""
        weight = view.down.weight
        if view.down.bias is None:
            if self.adapter.bias_flag is None:
                raise UnsupportedModelError(
                    f"{self.adapter.family} models have no MLP bias option in transformers, which FLAP's compensation "
                    f"needs; use another method or a llama-family model"
                )
            setattr(self.config, self.adapter.bias_flag, True)
            for linear in (view.gate, view.up, view.gate_up):
                if linear is not None:
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))
            view.down.bias = nn.Parameter(torch.zeros(view.hidden_size, dtype=weight.dtype, device=weight.device))
        with torch.no_grad():
            view.down.bias += shift.to(weight.device, weight.dtype)

    def set_mlp_width(self, view: MLPView) -> None:
        """Keep the module's own record of its width (some families store intermediate_size on the MLP) in step."""
        if hasattr(view.module, "intermediate_size"):
            view.module.intermediate_size = view.width

    # -------------------------------------------------------------------------------- running layer by layer
    @contextmanager
    def recording(self, hidden: list[torch.Tensor], calls: dict[tuple, list], store: torch.device) -> Iterator[None]:
        """Replace each decoder layer's forward by a stub that records its call and passes the hidden state on.

        The model's own forward thus builds every layer's kwargs (masks per layer type, rotary embeddings, position
        ids) exactly as transformers does for that family, at the cost of an embedding lookup. Windows are
        fixed-length with no padding, so the kwargs depend only on the batch shape: they are recorded once per shape
        and the pass ends at layer 0 for a shape already seen."""
        layers = self.layers
        shape: list[tuple] = []

        def stub(index: int):
            def forward(hidden_states: torch.Tensor, *args, **kwargs):
                if index == 0:
                    hidden.append(hidden_states.detach().to(store))
                    shape[:] = [tuple(hidden_states.shape)]
                    if shape[0] in calls:
                        raise StopForward
                    calls[shape[0]] = [None] * len(layers)
                calls[shape[0]][index] = (args, kwargs)
                if index == len(layers) - 1:
                    raise StopForward  # skip the final norm and the LM head
                return hidden_states

            return forward

        with self._layer_forwards(stub):
            yield

    @contextmanager
    def _layer_forwards(self, stub) -> Iterator[None]:
        """Each decoder layer's forward replaced by `stub(index)` for the block: an instance attribute shadows the
        class's forward. What was there before is put back, so a forward that accelerate's device-map hooks
        installed (placement.py) survives."""
        layers = self.layers
        before = [vars(layer).get("forward") for layer in layers]
        for index, layer in enumerate(layers):
            layer.forward = stub(index)
            layer.forward.is_stub = True  # hooks on the layers that read real outputs skip these calls (LayerScores)
        try:
            yield
        finally:
            for layer, forward in zip(layers, before):
                if forward is None:
                    vars(layer).pop("forward", None)
                else:
                    layer.forward = forward

    def layer_inputs(self, windows: torch.Tensor, batch_size: int, store: torch.device) -> tuple[list[torch.Tensor], dict[tuple, list]]:
        """The first decoder layer's input for each batch of `windows` (kept on `store`), and each layer's call
        arguments per batch shape, from the model's own forward stopped before layer 0 runs."""
        hidden: list[torch.Tensor] = []
        calls: dict[tuple, list] = {}
        with torch.no_grad(), frozen_eval(self.model), self.recording(hidden, calls, store):
            for batch in batches(windows, batch_size):
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except StopForward:
                    pass
        return hidden, calls

    # ------------------------------------------------------------------------------ streaming (--offload)
    def stream(self, device: str | torch.device) -> AdaptedModel:
        """Compute on `device` one decoder layer at a time, the layers' weights staying where they are now (host
        memory) between their turns: everything but the layers (embeddings, final norm, head, rotary buffers)
        moves to `device` until `unstream()`. Peak device memory is then one layer's weights, the embeddings and
        head, and one batch's activations, whatever the depth. Scoring and reconstruction check `streamed` and run
        their passes layer by layer (`run_layers`, `on_device`); the results are those of the whole model."""
        self.home = next(self.layers.parameters()).device
        self._outside = _Moved(self._outside_layers(), torch.device(device))
        return self

    def unstream(self) -> None:
        """Back to one device: the embeddings and head return to the layers' home (nothing happens when not streamed)."""
        if self.home is None:
            return
        if self._outside is not None:
            self._outside.restore()
        else:  # a copy made while streamed has no home tensors of its own: its device tensors go there
            _Moved(self._outside_layers(), self.home)
        self.home, self._outside = None, None

    def _outside_layers(self) -> list[nn.Module]:
        in_layers = {id(m) for m in self.layers.modules()}
        return [m for m in self.model.modules() if id(m) not in in_layers]

    @property
    def streamed(self) -> bool:
        return self.home is not None

    @contextmanager
    def on_device(self, index: int) -> Iterator[None]:
        """Decoder layer `index` on the compute device for the block (streamed), and back home after it."""
        if not self.streamed or self.home == self.device:
            yield
            return
        moved = _Moved(list(self.layers[index].modules()), self.device)
        try:
            yield
        finally:
            moved.restore()

    def run_layers(self, hidden: torch.Tensor, call: list[LayerCall], keep: bool = True) -> list[torch.Tensor]:
        """Every decoder layer in turn from the first layer's input: [input of layer 0, ..., output of the last]
        (only the last when not `keep`). Gradients flow only if the caller enables them."""
        states = [hidden]
        for index in range(self.num_layers):
            with self.on_device(index):
                out = self.run_layer(index, states[-1], call[index])
            states = [*states, out] if keep else [out]
        return states

    def head_logits(self, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """The logits for the last decoder layer's output `last_hidden`, by the model's own forward with every layer
        replaced by a pass-through (the last one returns `last_hidden`): the family's final norm, head and any logit
        soft-capping apply exactly as in a whole-model forward, at the cost of an embedding lookup."""
        last = self.num_layers - 1

        def stub(index: int):
            return lambda hidden_states, *args, **kwargs: last_hidden if index == last else hidden_states

        with self._layer_forwards(stub):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def run_layer(self, index: int, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Decoder layer `index` on stored hidden states, with the call arguments recorded for their shape."""
        args, kwargs = call
        out = self.layers[index](hidden.to(self.layer_device(index)), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def adapt(model: nn.Module | AdaptedModel) -> AdaptedModel:
    """The adapted model (built once per model; passing an AdaptedModel returns it as it is)."""
    return model if isinstance(model, AdaptedModel) else AdaptedModel(model)


def mlp_views(model: nn.Module | AdaptedModel) -> list[MLPView]:
    """Every decoder layer's MLP view; a shorthand for `adapt(model).mlps()`."""
    return adapt(model).mlps()

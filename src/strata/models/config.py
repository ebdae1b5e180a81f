"""The one reader of Hugging Face `config.json` (transformers 4.x and 5.x spellings), for the engine and `strata plan`.

`read_config_json` reads the file. `hf_fields` reads what every user of a config needs (the shapes, experts,
which layers are MoE, tied embeddings, biases, q/k norm), each spelling resolved and each field checked once.
`model_config_from_dict` adds what the engine runs with (rope, eps, token ids, sliding windows) as `ModelConfig`;
`strata.plan.arch.arch_from_config` builds the planner's `Arch` from the same fields. Torch-free: `strata plan`
imports this module and stays light.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from strata.core.errors import ModelLoadError


def read_config_json(path: str) -> dict:
    """The JSON object in the file `path`; ModelLoadError naming the file when it cannot be read."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return cfg


def text_config(d: dict) -> dict:
    """A multimodal config's language-model part (`text_config`, keeping the top-level quantization_config)."""
    if "hidden_size" not in d and isinstance(d.get("text_config"), dict):
        return {**d["text_config"], "quantization_config": d.get("quantization_config")}
    return d


@dataclass(frozen=True)
class HFFields:
    """The fields of a config.json that the engine and the planner both use, as transformers reads them."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int  # dense MLP width (ffn_dim / intermediate_size / n_inner; an MoE-only config: the expert's)
    num_experts: int  # routed experts; 0: dense
    num_experts_per_tok: int  # 0: not given
    moe_intermediate_size: int  # one routed expert's width (Mixtral: the full MLP width); 0: dense
    moe_layer_mask: tuple[bool, ...] | None  # which layers are MoE; None: all of them when num_experts > 0
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q, k, v (Qwen2's default)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    max_position_embeddings: int  # 0: not given


def _is(d: dict, model_types: tuple[str, ...], archs: tuple[str, ...]) -> bool:
    return d.get("model_type") in model_types or any(a in archs for a in d.get("architectures") or [])


def hf_fields(d: dict, source: str = "config.json") -> HFFields:
    """The shared fields of config dict `d`. ModelLoadError naming `source` and every missing field (or the bad
    one): a missing shape, a non-integer or non-positive size."""
    if not isinstance(d, dict):
        raise ModelLoadError(f"{source}: expected a JSON object")
    d = text_config(d)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if not d.get(k)]
    ffn_key = next((k for k in ("ffn_dim", "intermediate_size", "n_inner") if d.get(k)), None)
    try:
        experts = int(d.get("num_local_experts") or d.get("num_experts") or d.get("n_routed_experts") or 0)
        moe_ffn = int(d.get("moe_intermediate_size") or 0) or (int(d[ffn_key]) if ffn_key else 0)
        if ffn_key is None and not (experts and moe_ffn):
            missing.append("intermediate_size")
        if missing:
            raise ModelLoadError(f"{source} lacks {', '.join(missing)} (needed to size the model)")
        hidden, layers, heads = int(d["hidden_size"]), int(d["num_hidden_layers"]), int(d["num_attention_heads"])
        kv = int(d.get("num_key_value_heads") or heads)
        sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=int(d.get("head_dim") or hidden // heads),
                     vocab_size=int(d["vocab_size"]))
        top_k = int(d.get("num_experts_per_tok") or 0) if experts else 0
        step = int(d.get("decoder_sparse_step") or 1)
        first_moe = int(d.get("first_k_dense_replace") or 0)
        max_pos = int(d.get("max_position_embeddings") or 0)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: a shape field is not an integer ({e})") from None
    for k, v in sizes.items():
        if v <= 0:
            raise ModelLoadError(f"{source}: {k} must be positive, got {v}")
    if heads % kv:
        raise ModelLoadError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if top_k > experts:
        raise ModelLoadError(f"{source}: num_experts_per_tok {top_k} > experts {experts}")
    mask = None
    if experts:
        dense_only = set(d.get("mlp_only_layers") or [])
        mask = tuple(i not in dense_only and (i + 1) % step == 0 and i >= first_moe for i in range(layers))
        if all(mask):
            mask = None
    return HFFields(
        **sizes,
        intermediate_size=int(d[ffn_key]) if ffn_key else moe_ffn,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_ffn if experts else 0,
        moe_layer_mask=mask,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", d.get("model_type") == "opt")),
        attention_bias=bool(d.get("attention_bias", _is(d, ("qwen2", "qwen2_moe"), ("Qwen2ForCausalLM",)))),
        qk_norm=_is(d, ("qwen3", "qwen3_moe"), ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")),
        max_position_embeddings=max_pos)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pp_layer_partition: list[int] | None = None
    # MoE (None for dense models)
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    moe_layer_mask: tuple[bool, ...] | None = None  # which layers are MoE; None: all of them when num_experts
    # Sliding-window attention: each query sees its own key and the sliding_window - 1 before it, on the
    # layers in sliding_window_layers (None = every layer). sliding_window None = full attention everywhere.
    sliding_window: int | None = None
    sliding_window_layers: list[int] | None = None
    quantization: "QuantSpec | None" = None  # FP8 linear weights (checkpoint or --quantization fp8)
    raw: dict = field(default_factory=dict, repr=False)

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx` (global index), None for full attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and layer_idx not in self.sliding_window_layers:
            return None
        return self.sliding_window

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (global index) has routed experts (mlp_only_layers, decoder_sparse_step)."""
        return bool(self.num_experts) and (self.moe_layer_mask is None or self.moe_layer_mask[layer_idx])

    @property
    def kv_bytes_per_token(self) -> int:
        """Per layer-stack, for element size 1 (multiply by dtype size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


# transformers' default `sliding_window` where config.json leaves the key out
_WINDOW_DEFAULT = {"MistralForCausalLM": 4096, "Qwen2ForCausalLM": 4096, "Qwen3ForCausalLM": 4096,
                   "Qwen3MoeForCausalLM": 4096}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_window(d: dict, arch: str, num_layers: int) -> tuple[int | None, list[int] | None]:
    """(window, windowed layers or None for all), as transformers 5 reads them. Mistral and Mixtral window
    every layer when `sliding_window` is set (null = off). Qwen2/3/3-MoE only when `use_sliding_window`;
    Qwen2/3 then per layer: `layer_types` when given, else the layers from `max_window_layers` on. A Llama
    config with `sliding_window` (a Mistral converted to GGUF as `llama`) windows every layer."""
    if arch.startswith("Qwen") and not d.get("use_sliding_window", False):
        return None, None
    w = d.get("sliding_window", _WINDOW_DEFAULT.get(arch))
    if w is None:
        return None, None
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ModelLoadError(f"config.json field 'sliding_window' must be a positive integer or null, got {w!r}")
    if arch not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        return w, None
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 28)
        return w, [i for i in range(num_layers) if i >= first]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in _LAYER_TYPES for t in types):
        raise ModelLoadError(f"config.json field 'layer_types' must list one of {_LAYER_TYPES} per layer "
                             f"({num_layers}), got {types!r}")
    return w, [i for i, t in enumerate(types) if t == "sliding_attention"]


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    from strata.models.registry import resolve_architecture

    arch = resolve_architecture(d)
    f = hf_fields(d)
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    eos = d.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    window, window_layers = _sliding_window(d, arch, f.num_hidden_layers)
    return ModelConfig(
        architecture=arch,
        vocab_size=f.vocab_size,
        hidden_size=f.hidden_size,
        intermediate_size=f.intermediate_size,
        num_hidden_layers=f.num_hidden_layers,
        num_attention_heads=f.num_attention_heads,
        num_key_value_heads=f.num_key_value_heads,
        head_dim=f.head_dim,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=f.max_position_embeddings or 2048,
        tie_word_embeddings=f.tie_word_embeddings,
        attention_bias=f.attention_bias,
        qk_norm=f.qk_norm,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        num_experts=f.num_experts or None,
        num_experts_per_tok=f.num_experts_per_tok or None,
        moe_intermediate_size=f.moe_intermediate_size or None,
        moe_layer_mask=f.moe_layer_mask,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)) if arch.startswith("Qwen") else True,
        sliding_window=window,
        sliding_window_layers=window_layers,
        quantization=quant_spec_from_dict(d),
        raw=d,
    )


# ---- quantization_config (docs/QUANTIZATION.md) -----------------------------------------------------------------
QUANTIZATION_METHODS = ("fp8",)  # --quantization values (online quantisation of a 16/32-bit checkpoint)


@dataclass(frozen=True)
class QuantSpec:
    """How a model's linear weights are stored: float8_e4m3fn with float32 scales.

    weight: "tensor" (one scale per checkpoint tensor), "channel" (one per output row) or "block" (one per
    block_size[0] x block_size[1] tile); activation: "dynamic" (scales computed per token, or per token and
    block_size[1] columns with block weights) or "static" (the checkpoint's per-tensor input_scale).
    checkpoint: the weights are FP8 in the checkpoint (else they are quantised at load, per row: online)."""
    method: str  # "fp8" | "compressed-tensors"
    checkpoint: bool
    weight: str
    activation: str
    block_size: tuple[int, int] | None = None
    ignored: tuple[str, ...] = ()  # HF module names (or "re:" patterns) left unquantised

    def quantizes(self, module: str) -> bool:
        """Whether the HF module `module` (e.g. "model.layers.0.self_attn.q_proj") is quantised."""
        import re
        names = {module, module.removeprefix("model."), "model." + module.removeprefix("model.")}
        for ig in self.ignored:
            if ig.startswith("re:"):
                if any(re.fullmatch(ig[3:], n) for n in names):
                    return False
            elif ig in names:
                return False
        return True


def online_quant_spec(method: str) -> QuantSpec:
    """--quantization fp8: per-row weight scales computed at load, dynamic per-token activation scales."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(method)
    return QuantSpec("fp8", checkpoint=False, weight="channel", activation="dynamic")


def quant_spec_from_dict(d: dict) -> QuantSpec | None:
    """The QuantSpec of config.json's `quantization_config`; None when there is none. ModelLoadError naming
    what is not supported (anything but FP8 e4m3 W8A8)."""
    q = text_config(d).get("quantization_config") or d.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise ModelLoadError("config.json: quantization_config must be an object")
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ModelLoadError(f"config.json quantization_config: fp8 format {fmt!r} is not supported (e4m3 only)")
        act = q.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise ModelLoadError(f"config.json quantization_config: activation_scheme {act!r} is not supported "
                                 f"(dynamic, static)")
        block = q.get("weight_block_size")
        if block is not None:
            block = _block(block, "weight_block_size")
            if act != "dynamic":
                raise ModelLoadError("config.json quantization_config: block-wise fp8 needs activation_scheme "
                                     "dynamic")
        ignored = tuple(q.get("ignored_layers") or q.get("modules_to_not_convert") or ())
        return QuantSpec("fp8", True, "block" if block else "tensor", act, block, ignored)
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    raise ModelLoadError(f"config.json quantization_config: quant_method {method!r} is not supported "
                         f"(supported: fp8, compressed-tensors FP8 W8A8)")


def _block(b, what: str) -> tuple[int, int]:
    if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(v, int) and v > 0 for v in b)):
        raise ModelLoadError(f"config.json quantization_config: {what} must be two positive integers, got {b!r}")
    return int(b[0]), int(b[1])


def _compressed_tensors(q: dict) -> QuantSpec:
    """compressed-tensors "float-quantized": one config group targeting Linear, 8-bit float weights (tensor,
    channel or block strategy, symmetric) and 8-bit float input activations (dynamic token/tensor/group, or
    static tensor)."""
    bad = "config.json quantization_config (compressed-tensors): "
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise ModelLoadError(bad + f"{len(groups)} config_groups; only one (targets: Linear) is supported")
    g = next(iter(groups.values()))
    if "Linear" not in (g.get("targets") or []):
        raise ModelLoadError(bad + f"targets {g.get('targets')!r}; only ['Linear'] is supported")
    w, a = g.get("weights") or {}, g.get("input_activations")
    if w.get("num_bits") != 8 or w.get("type") != "float" or not w.get("symmetric", True) or w.get("dynamic"):
        raise ModelLoadError(bad + f"weights {w!r}: only static symmetric 8-bit float (FP8) weights are supported")
    if a is None or a.get("num_bits") != 8 or a.get("type") != "float" or not a.get("symmetric", True):
        raise ModelLoadError(bad + f"input_activations {a!r}: only symmetric 8-bit float activations (W8A8) are "
                                   f"supported")
    strategy = w.get("strategy", "tensor")
    if strategy not in ("tensor", "channel", "block"):
        raise ModelLoadError(bad + f"weight strategy {strategy!r} is not supported (tensor, channel, block)")
    block = _block(w.get("block_structure"), "block_structure") if strategy == "block" else None
    if a.get("dynamic"):
        act = "dynamic"
    elif a.get("strategy", "tensor") == "tensor":
        act = "static"
    else:
        raise ModelLoadError(bad + f"static activation strategy {a.get('strategy')!r} is not supported (tensor)")
    return QuantSpec("compressed-tensors", True, strategy, act, block, tuple(q.get("ignore") or ()))

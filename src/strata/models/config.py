"""Model configuration read from an HF `config.json` dict (transformers 4.x and 5.x spellings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strata.core.errors import ModelLoadError


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
    # Sliding-window attention: each query sees its own key and the sliding_window - 1 before it, on the
    # layers in sliding_window_layers (None = every layer). sliding_window None = full attention everywhere.
    sliding_window: int | None = None
    sliding_window_layers: list[int] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx` (global index), None for full attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and layer_idx not in self.sliding_window_layers:
            return None
        return self.sliding_window

    @property
    def kv_bytes_per_token(self) -> int:
        """Per layer-stack, for element size 1 (multiply by dtype size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


def _req(d: dict, key: str) -> Any:
    if key not in d:
        raise ModelLoadError(f"config.json is missing the field {key!r}")
    return d[key]


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
    heads = _req(d, "num_attention_heads")
    hidden = _req(d, "hidden_size")
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    eos = d.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    is_qwen = arch.startswith("Qwen")
    num_layers = _req(d, "num_hidden_layers")
    window, window_layers = _sliding_window(d, arch, num_layers)
    return ModelConfig(
        architecture=arch,
        vocab_size=_req(d, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=d.get("intermediate_size") or 0,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        num_experts=d.get("num_experts") or d.get("num_local_experts"),
        num_experts_per_tok=d.get("num_experts_per_tok"),
        moe_intermediate_size=d.get("moe_intermediate_size") or (d.get("intermediate_size") if d.get("num_local_experts") else None),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)) if is_qwen else True,
        sliding_window=window,
        sliding_window_layers=window_layers,
        raw=d,
    )

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
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def kv_bytes_per_token(self) -> int:
        """Per layer-stack, for element size 1 (multiply by dtype size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


def _req(d: dict, key: str) -> Any:
    if key not in d:
        raise ModelLoadError(f"config.json is missing the field {key!r}")
    return d[key]


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
    return ModelConfig(
        architecture=arch,
        vocab_size=_req(d, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=d.get("intermediate_size") or 0,
        num_hidden_layers=_req(d, "num_hidden_layers"),
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
        raw=d,
    )

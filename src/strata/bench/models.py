"""Built-in model architectures for benchmarks: `--model qwen3-4b` writes the architecture's config.json to
a temporary directory and the engine runs it with random (dummy) weights. The figures are the published
configurations of those models; `qwen3-4b` is the protocol's reference model."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from strata.models.config import read_config_json
from strata.plan.arch import arch_from_config

_QWEN3_COMMON = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, head_dim=128,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                     attention_dropout=0.0, max_position_embeddings=40960, bos_token_id=151643,
                     eos_token_id=151645, torch_dtype="bfloat16", use_sliding_window=False,
                     initializer_range=0.02)
_LLAMA3_COMMON = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                      rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
                      mlp_bias=False, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001,
                      tie_word_embeddings=False, torch_dtype="bfloat16", initializer_range=0.02)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # The protocol's reference model: 4.022 B parameters.
    "qwen3-4b": {**_QWEN3_COMMON, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "qwen3-0.6b": {**_QWEN3_COMMON, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen3-30b-a3b": {**_QWEN3_COMMON, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                      "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
                      "output_router_logits": False, "tie_word_embeddings": False},
    "llama-3-8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
                         hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
                         attention_bias=False, mlp_bias=False, max_position_embeddings=8192, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=True, torch_dtype="bfloat16",
                         initializer_range=0.02),
}

ALIASES = {"qwen3_4b": "qwen3-4b", "reference": "qwen3-4b", "llama3-8b": "llama-3-8b",
           "llama3-70b": "llama-3-70b", "qwen3-moe": "qwen3-30b-a3b", "smollm2": "smollm2-135m"}


class UnknownModelError(ValueError):
    pass


def arch_names() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_config(name: str) -> dict[str, Any] | None:
    key = ALIASES.get(name.lower(), name.lower())
    cfg = ARCHITECTURES.get(key)
    return dict(cfg) if cfg is not None else None


def count_parameters(cfg: dict[str, Any]) -> int:
    """Parameters of a dense or MoE decoder from its config (embeddings counted once when tied): `strata plan`'s
    count, over the one config.json reader."""
    return arch_from_config(cfg).params_total()


@dataclass
class ResolvedModel:
    path: str | None  # what the engine gets as `model`
    arch: str | None  # built-in architecture name, if one was used
    config: dict[str, Any] | None  # config.json contents (before hf_overrides), None for GGUF / embedded
    has_weights: bool
    kind: str  # "arch" | "hf" | "gguf" | "embedded" | "hub"


def resolve(model: str | None, workdir: str | None = None) -> ResolvedModel:
    """Turn `--model` into something the engine loads. Raises UnknownModelError for a name that is neither
    a path, a hub id (org/name) nor a built-in architecture."""
    if model is None:
        return ResolvedModel(None, None, None, True, "embedded")
    if os.path.isdir(model):
        cfg_path = os.path.join(model, "config.json")
        cfg = read_config_json(cfg_path) if os.path.isfile(cfg_path) else None
        weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(model))
        return ResolvedModel(model, None, cfg, weights, "hf")
    if os.path.isfile(model):
        return ResolvedModel(model, None, None, True, "gguf")
    cfg = arch_config(model)
    if cfg is not None:
        key = ALIASES.get(model.lower(), model.lower())
        d = workdir or tempfile.mkdtemp(prefix=f"strata-bench-{key}-")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        return ResolvedModel(d, key, cfg, False, "arch")
    if model.count("/") == 1 and not model.startswith(("/", ".")) and not model.endswith(".gguf"):
        return ResolvedModel(model, None, None, True, "hub")
    raise UnknownModelError(f"unknown model {model!r}: not a model directory, a .gguf file, a hub id (org/name) "
                            f"or a built-in architecture ({', '.join(arch_names())})")

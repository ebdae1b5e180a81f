"""Architecture registry: `config.json`'s `architectures` picks the model class."""
from __future__ import annotations

import importlib

from strata.core.errors import UnsupportedArchitectureError

# architecture -> "module:Class"
_MODELS = {
    "LlamaForCausalLM": "strata.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "strata.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "strata.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "strata.models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "strata.models.moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "strata.models.moe:MixtralForCausalLM",
}


def register_model(arch: str, target: str) -> None:
    _MODELS[arch] = target


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


# config.json files written from a bare config (no model) have no `architectures`: use model_type.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def resolve_architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in _MODELS:
            return a
    if not archs and _BY_MODEL_TYPE.get(cfg.get("model_type")) in _MODELS:
        return _BY_MODEL_TYPE[cfg["model_type"]]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: {', '.join(supported_architectures())}")


def model_class(arch: str):
    mod, cls = _MODELS[arch].split(":")
    return getattr(importlib.import_module(mod), cls)

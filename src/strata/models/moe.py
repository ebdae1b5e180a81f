"""Mixture-of-experts decoders: Qwen3MoeForCausalLM and MixtralForCausalLM.

The attention half of each layer is the Llama-family one (Qwen3-MoE adds per-head q/k RMSNorm); the MLP half
is a replicated router plus `strata.layers.moe.FusedMoE` (experts, TP-sharded or expert-parallel), or a dense MLP on the
layers Qwen3-MoE keeps dense (`mlp_only_layers`, `decoder_sparse_step`). Routing: softmax over experts, top-k;
Qwen3-MoE renormalises the k weights when `norm_topk_prob`, Mixtral always.

Checkpoint names handled here (everything else goes through LlamaForCausalLM.load_weights):
  Qwen3-MoE  layers.N.mlp.gate.weight                      router
             layers.N.mlp.experts.E.{gate,up,down}_proj.weight
             layers.N.mlp.experts.{gate_up_proj,down_proj}  stacked [E, 2I, H] / [E, H, I] (transformers 5 layout)
  Mixtral    layers.N.block_sparse_moe.gate.weight         router
             layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight

FP8 (docs/QUANTIZATION.md): the experts of a model with a QuantSpec are FP8 (`strata.layers.moe.Fp8Experts`)
unless the spec's ignore list names them. An FP8 checkpoint's expert weights and their `weight_scale` (per tensor
or channel) or `weight_scale_inv` (block-wise) are copied in as they are; `--quantization fp8` quantises each
expert's 16/32-bit matrices per row as they are read. The experts run weight-only (their `input_scale`s are
skipped: activations are not quantised).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from strata.core.errors import ModelLoadError
from strata.layers.linear import ReplicatedLinear
from strata.layers.moe import FP8, FusedMoE
from strata.models.config import ModelConfig
from strata.models.llama import DecoderLayer, LlamaForCausalLM, quant_for

_EXPERT = re.compile(r"^layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\."
                     r"(weight|weight_scale|weight_scale_inv|input_scale)$")
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PART = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}


class MoeDecoderLayer(DecoderLayer):
    """The Llama-family attention half; the MLP half is a router + experts on sparse layers."""

    def __init__(self, cfg: ModelConfig, dtype, layer_idx: int, renormalize: bool):
        self.renormalize = renormalize
        super().__init__(cfg, dtype, layer_idx)

    def build_mlp(self, cfg: ModelConfig, dtype, layer_idx: int) -> None:
        self.sparse = cfg.is_moe_layer(layer_idx)
        if self.sparse:  # router and experts sit on the layer itself: HF's ".mlp." level is dropped on load
            self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype)
            self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                                    cfg.moe_intermediate_size, self.renormalize, dtype,
                                    quant=self.experts_quant(cfg, layer_idx))
        else:
            super().build_mlp(cfg, dtype, layer_idx)

    @staticmethod
    def experts_quant(cfg: ModelConfig, layer_idx: int):
        """The QuantSpec of this layer's experts, None unless quantised: ignoring the experts (HF module
        `mlp.experts`) or the first expert's first projection leaves all of them in the compute dtype."""
        names = ("mlp.experts", "mlp.experts.0.gate_proj", "block_sparse_moe.experts", "block_sparse_moe.experts.0.w1")
        return None if any(quant_for(cfg, layer_idx, n) is None for n in names) else cfg.quantization

    def mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return self.experts(hidden, self.gate(hidden))  # router logits [T, E]
        return super().mlp(hidden)


class MoeForCausalLM(LlamaForCausalLM):
    """Same skeleton as LlamaForCausalLM (embedding, PP layer range, final norm, LM head, forward, logits);
    MoE decoder layers and expert-aware loading."""

    def make_layer(self, cfg: ModelConfig, dtype, i: int) -> nn.Module:
        return MoeDecoderLayer(cfg, dtype, i, self.renormalize(cfg))

    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        fp8_seen: dict = {}  # FP8 experts: (layer, expert, part) -> kinds read ("weight", "scale")

        def rest():
            for name, tensor in weights:
                short = name.removeprefix("model.")
                m = _EXPERT.match(short) or _STACKED.match(short)
                if m is None:  # Mixtral's router: renamed to the Qwen3-MoE spelling the Llama loader maps
                    yield name.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor
                    continue
                idx = int(m.group(1))
                if not self.start_layer <= idx < self.end_layer:
                    continue
                experts = self.layers[str(idx)].experts
                if m.re is _STACKED:
                    expert, part, kind = None, "w13" if m.group(2) == "gate_up_proj" else "w2", "weight"
                else:
                    expert, part, kind = int(m.group(2)), _PART.get(m.group(3)), m.group(4)
                    if part is None:
                        raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
                    if kind == "input_scale":  # the experts run weight-only: activations are not quantised
                        continue
                    kind = "weight" if kind == "weight" else "scale"
                try:
                    experts.load_expert(expert, part, tensor, kind)
                except ValueError as e:
                    raise ModelLoadError(f"checkpoint tensor {name!r}: {e}") from e
                pname = "w2" if part == "w2" else "w13"
                if experts.quant_spec is None:
                    loaded.add(f"layers.{idx}.experts.{pname}")
                elif kind == "scale" or tensor.dtype == FP8:  # an FP8 weight needs its scale, and a scale its weight
                    loaded.add(f"layers.{idx}.experts.{pname}." + ("weight" if kind == "weight" else "weight_scale"))
                    fp8_seen.setdefault((idx, expert, part), set()).add(kind)
                else:  # a 16/32-bit weight quantised as it loads: its scale is computed
                    loaded.update(f"layers.{idx}.experts.{pname}.{p}" for p in ("weight", "weight_scale"))

        loaded |= super().load_weights(rest())
        for key, kinds in fp8_seen.items():
            if len(kinds) < 2:
                raise ModelLoadError(f"FP8 expert {key} (layer, expert, part) has a weight or a scale but not both")
        return loaded


class Qwen3MoeForCausalLM(MoeForCausalLM):
    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return cfg.norm_topk_prob


class MixtralForCausalLM(MoeForCausalLM):
    pass

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

FP8 checkpoints (docs/QUANTIZATION.md): an expert's float8_e4m3fn weight and its `weight_scale` (per tensor or
channel) or `weight_scale_inv` (block-wise) are dequantised at load into the compute-dtype expert weights (correct;
the experts do not keep FP8 bytes yet, and their activations are not quantised). `--quantization fp8` leaves the
experts unquantised (the attention and dense-MLP linears are FP8).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from strata.core.errors import ModelLoadError
from strata.layers.linear import ReplicatedLinear
from strata.layers.moe import FusedMoE
from strata.models.config import ModelConfig
from strata.models.llama import DecoderLayer, LlamaForCausalLM
from strata.ops import ref as ops_ref

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
                                    cfg.moe_intermediate_size, self.renormalize, dtype)
        else:
            super().build_mlp(cfg, dtype, layer_idx)

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

    def _dequantize_expert(self, pending: dict, key: tuple, kind: str, tensor: torch.Tensor):
        """FP8 checkpoints: hold an expert's weight or scale until both are read; then the dequantised weight."""
        slot = pending.setdefault(key, {})
        slot["scale" if kind.startswith("weight_scale") else "weight"] = tensor
        if len(slot) < 2:
            return None
        del pending[key]
        w, s = slot["weight"], slot["scale"].float()
        q = self.cfg.quantization
        if q is not None and q.weight == "block":
            return ops_ref.fp8_dequantize(w, s, q.block_size)
        return ops_ref.fp8_dequantize(w, s.reshape(-1).expand(w.shape[0]) if s.numel() == 1 else s.reshape(-1),
                                      None)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        pending: dict = {}  # FP8 experts: (layer, expert, part) -> weight / scale read so far

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
                if m.re is _EXPERT:
                    part = _PART.get(m.group(3))
                    if part is None:
                        raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
                    kind = m.group(4)
                    if kind == "input_scale":  # the experts' activations are not quantised (dequantised experts)
                        continue
                    if kind != "weight" or tensor.dtype == torch.float8_e4m3fn:
                        tensor = self._dequantize_expert(pending, (idx, int(m.group(2)), part), kind, tensor)
                        if tensor is None:
                            continue
                    pname = "w2" if part == "w2" else "w13"
                    experts.weight_loader(getattr(experts, pname), tensor, (int(m.group(2)), part))
                else:
                    pname = "w13" if m.group(2) == "gate_up_proj" else "w2"
                    experts.weight_loader(getattr(experts, pname), tensor, (None, pname))
                loaded.add(f"layers.{idx}.experts.{pname}")

        loaded |= super().load_weights(rest())
        if pending:
            key = next(iter(pending))
            raise ModelLoadError(f"FP8 expert {key} (layer, expert, part) has a weight or a scale but not both")
        return loaded


class Qwen3MoeForCausalLM(MoeForCausalLM):
    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return cfg.norm_topk_prob


class MixtralForCausalLM(MoeForCausalLM):
    pass

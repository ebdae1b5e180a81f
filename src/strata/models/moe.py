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
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from strata import ops
from strata.attention.backend import Attention
from strata.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from strata.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                  RowParallelLinear)
from strata.layers.moe import FusedMoE
from strata.layers.norm_rotary import RMSNorm, RotaryEmbedding
from strata.models.config import ModelConfig
from strata.models.llama import LlamaForCausalLM
from strata.parallel import state as ps

_EXPERT = re.compile(r"^layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PART = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}


def is_sparse_layer(cfg: ModelConfig, i: int) -> bool:
    raw = cfg.raw or {}
    step = int(raw.get("decoder_sparse_step") or 1)
    return bool(cfg.num_experts) and i not in set(raw.get("mlp_only_layers") or []) and (i + 1) % step == 0


class MoeDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, layer_idx: int, renormalize: bool):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          bias=cfg.attention_bias, dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False, dtype=dtype)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.attn = Attention(self.num_heads, d, self.num_kv_heads, d ** -0.5)
        self.sparse = is_sparse_layer(cfg, layer_idx)
        if self.sparse:  # router and experts sit on the layer itself: HF's ".mlp." level is dropped on load
            self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype)
            self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                                    cfg.moe_intermediate_size, renormalize, dtype)
        else:
            self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, dtype=dtype)
            self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.head_dim = d

    def forward(self, positions, hidden, residual, rotary: RotaryEmbedding):
        # hidden, residual: [T, hidden]
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            T = q.shape[0]
            q = self.q_norm(q.reshape(T, self.num_heads, self.head_dim)).view(T, self.q_size)
            k = self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim)).view(T, self.kv_size)
        q, k = rotary(positions, q, k)
        hidden = self.o_proj(self.attn(q, k, v.contiguous()))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        if self.sparse:
            hidden = self.experts(hidden, self.gate(hidden))  # router logits [T, E]
        else:
            hidden = self.down_proj(ops.silu_and_mul(self.gate_up_proj(hidden)))
        return hidden, residual


class MoeForCausalLM(LlamaForCausalLM):
    """Same skeleton as LlamaForCausalLM (embedding, PP layer range, final norm, LM head, forward, logits);
    MoE decoder layers and expert-aware loading."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.cfg = cfg
        pp = ps.pp()
        n = cfg.num_hidden_layers
        sizes = cfg.pp_layer_partition or [n // pp.size + (1 if i < n % pp.size else 0) for i in range(pp.size)]
        self.start_layer = sum(sizes[: pp.rank_in_group])
        self.end_layer = self.start_layer + sizes[pp.rank_in_group]
        self.is_first, self.is_last = pp.is_first, pp.is_last
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        renorm = self.renormalize(cfg)
        self.layers = nn.ModuleDict({str(i): MoeDecoderLayer(cfg, dtype, i, renorm)
                                     for i in range(self.start_layer, self.end_layer)})
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()

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
                    pname = "w2" if part == "w2" else "w13"
                    experts.weight_loader(getattr(experts, pname), tensor, (int(m.group(2)), part))
                else:
                    pname = "w13" if m.group(2) == "gate_up_proj" else "w2"
                    experts.weight_loader(getattr(experts, pname), tensor, (None, pname))
                loaded.add(f"layers.{idx}.experts.{pname}")

        loaded |= super().load_weights(rest())
        return loaded


class Qwen3MoeForCausalLM(MoeForCausalLM):
    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return cfg.norm_topk_prob


class MixtralForCausalLM(MoeForCausalLM):
    pass

"""Llama-family decoder: LlamaForCausalLM (Llama 2/3, SmolLM2), MistralForCausalLM (sliding window),
Qwen2ForCausalLM (QKV bias) and Qwen3ForCausalLM (per-head q/k RMSNorm). One implementation, several
configurations; pipeline stages hold a contiguous layer range. Sliding-window attention is per layer
(`ModelConfig.layer_sliding_window`)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from strata import ops
from strata.attention.backend import Attention
from strata.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from strata.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from strata.layers.norm_rotary import RMSNorm, RotaryEmbedding
from strata.models.config import ModelConfig
from strata.models.loader import kv_scale_target
from strata.parallel import state as ps


def quant_for(cfg: ModelConfig, layer_idx: int, module: str):
    """The QuantSpec of the linear layer HF calls model.layers.{layer_idx}.{module} (a packed layer: its first
    part), or None when it is not quantised. Embeddings, the LM head, norms and MoE routers never are."""
    q = cfg.quantization
    return q if q is not None and q.quantizes(f"model.layers.{layer_idx}.{module}") else None


class DecoderLayer(nn.Module):
    """Attention half (shared by every family) + an MLP half that subclasses replace (`build_mlp`/`mlp`)."""

    def __init__(self, cfg: ModelConfig, dtype, layer_idx: int = 0):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          bias=cfg.attention_bias, dtype=dtype,
                                          quant=quant_for(cfg, layer_idx, "self_attn.q_proj"))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False, dtype=dtype,
                                        quant=quant_for(cfg, layer_idx, "self_attn.o_proj"))
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.attn = Attention(self.num_heads, d, self.num_kv_heads, d ** -0.5,
                              sliding_window=cfg.layer_sliding_window(layer_idx))
        self.build_mlp(cfg, dtype, layer_idx)
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
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 kvh) d]
        # (q/k norm,) rotary and the K/V cache write: one kernel on CUDA
        attn = self.attn.forward_qkv(qkv, positions, rotary, self.q_norm if self.qk_norm else None,
                                     self.k_norm if self.qk_norm else None)
        hidden = self.o_proj(attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def build_mlp(self, cfg: ModelConfig, dtype, layer_idx: int) -> None:
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, dtype=dtype,
                                                       quant=quant_for(cfg, layer_idx, "mlp.gate_proj"))
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype,
                                           quant=quant_for(cfg, layer_idx, "mlp.down_proj"))

    def mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(hidden)))


# Attention quantisation scales strata does not use: queries and softmax probabilities stay in the compute dtype.
# (KV-cache scales are read: `kv_scale_target`.)
_SKIPPED = (".q_scale", ".prob_scale")


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our parameter name part, shard id)
    packed = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    layer_cls = DecoderLayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        pp = ps.pp()
        n = cfg.num_hidden_layers
        if cfg.pp_layer_partition:
            sizes = cfg.pp_layer_partition
        else:
            sizes = [n // pp.size + (1 if i < n % pp.size else 0) for i in range(pp.size)]
        self.start_layer = sum(sizes[: pp.rank_in_group])
        self.end_layer = self.start_layer + sizes[pp.rank_in_group]
        self.is_first, self.is_last = pp.is_first, pp.is_last
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleDict({str(i): self.make_layer(cfg, dtype, i)
                                     for i in range(self.start_layer, self.end_layer)})
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
            if self.is_first and cfg.tie_word_embeddings:  # one tensor for both (the same vocabulary shard)
                self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def make_layer(self, cfg: ModelConfig, dtype, i: int) -> nn.Module:
        return self.layer_cls(cfg, dtype, i)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.layers.values()]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns final hidden states [T, hidden] on the last stage, else (hidden, residual) to send on."""
        if self.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual, self.rotary)
        if not self.is_last:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into this rank's shards. Returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))  # a tied lm_head is the embedding
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or name.endswith(_SKIPPED):
                continue
            if (kv := kv_scale_target(name)) is not None:  # FP8 KV-cache scales: the layer's, when on this stage
                if self.start_layer <= kv[0] < self.end_layer:
                    for which in kv[1]:
                        self.layers[str(kv[0])].attn.load_kv_scale(which, tensor)
                continue
            name = name.removeprefix("model.").replace(".weight_scale_inv", ".weight_scale")
            if name.startswith("lm_head."):
                if not self.is_last:
                    continue
            elif name.startswith("embed_tokens."):
                targets = []
                if self.is_first:
                    targets.append(name)
                if self.is_last and self.cfg.tie_word_embeddings and not self.is_first:
                    targets.append("lm_head.weight")
                for t in targets:
                    p = params[t]
                    p.weight_loader(p, tensor)
                    loaded.add(t)
                continue
            elif name.startswith("norm."):
                if not self.is_last:
                    continue
            elif name.startswith("layers."):
                idx = int(name.split(".")[1])
                if not self.start_layer <= idx < self.end_layer:
                    continue
                name = name.replace(".self_attn.", ".").replace(".mlp.", ".")
            shard = None
            for hf, (ours, sid) in self.packed.items():
                if f".{hf}." in name:
                    name, shard = name.replace(f".{hf}.", f".{ours}."), sid
                    break
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
            p = params[name]
            loader = getattr(p, "weight_loader", None)
            if loader is None:
                p.data.copy_(tensor)
            elif shard is None:
                loader(p, tensor)
            else:
                loader(p, tensor, shard)
            loaded.add(name)
        return loaded

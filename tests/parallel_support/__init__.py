"""Helpers for the parallel / MoE tests: tiny MoE checkpoints, engine runs that capture logits, and worker
scripts started as separate processes (two "nodes", a killed worker)."""
from __future__ import annotations

import torch

from tests.tiny_models import TINY

MOE = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
}


def moe_config(arch: str, **over):
    import transformers as tf
    kw = {**TINY, **MOE[arch], **over}
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**kw, tie_word_embeddings=False)
    return tf.MixtralConfig(**kw, tie_word_embeddings=False)


def write_tiny_moe(arch: str, path, seed: int = 0, **over):
    """A tiny random MoE checkpoint in `path`; returns the transformers model (float32, eval)."""
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(moe_config(arch, **over), dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif ".gate." in n or n.endswith("gate.weight"):
                p.normal_(0, 0.5)  # a router with clear preferences: top-k ties would make parity flaky
    model.save_pretrained(str(path), safe_serialization=True)
    return model

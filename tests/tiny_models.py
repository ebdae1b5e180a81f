"""Tiny random HF models written to disk, for parity tests against transformers."""
from __future__ import annotations

import torch

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def hf_config(arch: str, **over):
    import transformers as tf
    kw = {**TINY, **over}
    if arch == "llama":
        return tf.LlamaConfig(**kw, tie_word_embeddings=False)
    if arch == "llama3":  # tied embeddings + llama3 rope scaling
        return tf.LlamaConfig(**kw, tie_word_embeddings=True, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "mistral":
        return tf.MistralConfig(**kw, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**kw, head_dim=32, tie_word_embeddings=True)
    raise ValueError(arch)


def write_tiny_model(arch: str, path, seed: int = 0, **over):
    """Returns the transformers model (float32, eval) after saving it to `path`."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = hf_config(arch, **over)
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random init of norms too, so that they are tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return model

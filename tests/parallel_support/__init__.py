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


def engine_args(path, **kw):
    """Small CPU engines: float32, a fixed KV pool, one thread per process, short collective timeouts."""
    from strata.config.engine import EngineArgs
    base = dict(model=str(path), device="cpu", dtype="float32", num_gpu_blocks_override=64,
                max_num_batched_tokens=32, num_threads=1, dist_timeout=60.0, enable_prefix_caching=False)
    base.update(kw)
    return EngineArgs(**base)


def capture_logits(engine) -> list:
    """Every logits block the engine samples from, in sampling order (one process or a mesh)."""
    seen: list = []
    executor = engine.runner
    executor.logits_hook = lambda logits: seen.append(logits.detach().clone())
    executor.collective_rpc("greedy_on_last_stage", False)  # PP: logits come back, not argmax ids, to compare
    return seen


PROMPT_LENS = (5, 17, 33, 2)


def prompts(vocab: int = 384, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def run_greedy(engine, prompt_ids, steps: int = 8, tag: str = "r"):
    """Greedy generation of every prompt at once: ({index: token ids}, [logits rows, concatenated])."""
    from strata.core.sampling_params import SamplingParams
    seen = capture_logits(engine)
    start = len(seen)
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompt_ids):
        engine.add_request(f"{tag}{i}", p, params)
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[int(o.request_id[len(tag):])] = o.outputs[0].token_ids
    return out, torch.cat(seen[start:])

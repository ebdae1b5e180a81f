"""The embedded SmolLM2-135M-Instruct: our greedy output equals transformers' greedy `generate`, token
for token (first 32 tokens), on several chat prompts run as one batch."""
from __future__ import annotations

import pytest
import torch

from strata import LLM, SamplingParams
from strata.models.embedded import default_model_path
from strata.models.gguf_loader import load_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "Explain tensor parallelism in one sentence."}],
    [{"role": "system", "content": "Summarize the post in one very short sentence."},
     {"role": "user", "content": "Hello world, the GPU is fast. We bought eight of them last week and training is 3x faster."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 17 times 23?"}],
    [{"role": "user", "content": "List three uses of Python, briefly."}],
]


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", dtype="float32", kv_cache_memory=256 << 20, check_invariants=True)


def test_greedy_equals_transformers(llm):
    import transformers as tf
    g = load_gguf(default_model_path())
    cfg = tf.LlamaConfig(**{k: v for k, v in g.config.items() if k not in ("architectures",)})
    hf = tf.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(g.tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    params = SamplingParams(max_tokens=32, temperature=0.0)
    outs = llm.chat(CONVERSATIONS, params, use_tqdm=False)
    for conv, out in zip(CONVERSATIONS, outs):
        ids = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              eos_token_id=llm.tokenizer.eos_token_ids, pad_token_id=2)[0, len(ids):].tolist()
        ours = out.outputs[0].token_ids
        if ref and ref[-1] in llm.tokenizer.eos_token_ids:
            assert out.outputs[0].finish_reason == "stop"
        assert ours == ref, f"diverged on {conv[-1]['content']!r}:\n ours {ours}\n ref  {ref}"
        assert out.outputs[0].text == llm.tokenizer.decode(ours, skip_special_tokens=True)

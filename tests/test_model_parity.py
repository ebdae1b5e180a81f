"""Our models' logits match transformers' on the same random weights (float32), through a batched
prefill of prompts of different lengths and 20 decode steps."""
from __future__ import annotations

import pytest
import torch

from tests.parallel_support import capture_logits as _capture_logits
from tests.tiny_models import write_tiny_model
from strata.config.engine import EngineArgs
from strata.core.sampling_params import SamplingParams
from strata.engine.llm_engine import LLMEngine

ARCHS = ["llama", "llama3", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path):
    hf = write_tiny_model(arch, tmp_path)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tmp_path), device="cpu", dtype="float32",
                                                   check_invariants=True, max_num_batched_tokens=64,
                                                   num_gpu_blocks_override=64))
    g = torch.Generator().manual_seed(1)
    lens = [5, 17, 33, 2]
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in lens]
    steps = 20
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    logits_by_req: dict[str, list[torch.Tensor]] = {str(i): [] for i in range(len(prompts))}
    seen = _capture_logits(engine)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs = {}
    while engine.has_unfinished_requests():
        n_before = len(seen)
        outs = engine.step()
        # map each logits row to its request: rows follow the order of sampling chunks (decodes first)
        for o in outs:
            if o.finished:
                outputs[o.request_id] = o
        assert len(seen) - n_before <= 1
    # Recompute with transformers on the full sequences and compare every generated position.
    refs = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            toks = outputs[str(i)].outputs[0].token_ids
            assert len(toks) == steps
            full = torch.tensor([p + toks])
            ref = hf(full).logits[0][len(p) - 1: len(p) - 1 + steps]  # [steps, V]: the rows that sampled
            # greedy tokens must be the argmax of transformers' logits at each step
            assert toks == ref.argmax(-1).tolist(), f"{arch}: prompt {i} diverged"
            refs.append(ref)
    # Every logits row the engine sampled from equals the transformers row of one (request, step), each
    # (request, step) exactly once. Rows come in scheduling order, so pair them by nearest reference row.
    ours, ref = torch.cat(seen), torch.cat(refs)
    assert ours.shape == ref.shape == (len(prompts) * steps, ref.shape[1])
    nearest = torch.cdist(ours, ref).argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(len(ref))), f"{arch}: rows do not pair one to one"
    torch.testing.assert_close(ours, ref[nearest], atol=1e-4, rtol=1e-4)

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logit_values_tight(arch, tmp_path):
    """Row-by-row logits of one request through prefill and decode equal transformers' (atol 1e-4)."""
    hf = write_tiny_model(arch, tmp_path)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tmp_path), device="cpu", dtype="float32",
                                                   num_gpu_blocks_override=32, max_num_batched_tokens=8))
    seen = _capture_logits(engine)
    prompt = list(range(10, 31))  # 21 tokens: three prefill chunks of 8 (chunked prefill on)
    engine.add_request("a", prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    toks = out.outputs[0].token_ids
    ours = torch.cat(seen)  # [20, V]: one row per sampled token
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + toks])).logits[0][len(prompt) - 1: len(prompt) - 1 + 20]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

"""The whole engine on the Triton kernels (CPU, TRITON_INTERPRET=1) against the torch twins: a tiny Qwen3
(q/k norm: the fused qkv epilogue's norm path) and a tiny Llama, greedy tokens equal and logits within float32
rounding, through chunked prefill, a cached prefix and decodes."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

try:
    import triton  # noqa: F401
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _TRITON_ERR = e

from strata.engine.llm_engine import LLMEngine
from tests.parallel_support import engine_args, prompts, run_greedy
from tests.tiny_models import write_tiny_model

pytestmark = pytest.mark.skipif(_TRITON_ERR is not None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs triton in interpreter mode")


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_engine_on_triton_kernels_matches_twins(arch, tmp_path, monkeypatch):
    write_tiny_model(arch, tmp_path, num_hidden_layers=2)
    ps = prompts()[:3]
    ps.append(ps[0][:20] + [7, 8, 9])  # shares a cached prefix with the first prompt
    kw = dict(enable_prefix_caching=True, max_num_batched_tokens=16)  # chunked prefill
    ref_tokens, ref_logits = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path, **kw)), ps, steps=5)
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    from strata.ops import triton_kernels as tk
    calls = []
    real = tk.qkv_epilogue
    monkeypatch.setattr(tk, "qkv_epilogue", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens, logits = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path, **kw)), ps, steps=5)
    assert calls  # the fused epilogue kernel ran
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_moe_engine_on_triton_kernels_matches_twins(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE (8 experts, top-2) on the routing kernel, the sorted grouped GEMM (prefill chunks) and the
    alignment-free decode path (one decoding sequence), against the torch twins."""
    from tests.parallel_support import write_tiny_moe
    write_tiny_moe("qwen3_moe", tmp_path, num_hidden_layers=2)
    ps = prompts()[:2]
    kw = dict(max_num_batched_tokens=16, max_num_seqs=1)  # one sequence per decode step: T=1 takes the decode path
    ref_tokens, ref_logits = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path, **kw)), ps, steps=4)
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    from strata.ops.triton_kernels import fused_moe as fm
    seen = {"decode": 0, "sorted": 0, "route": 0}
    real_decode, real_align, real_route = fm.fused_moe_decode, fm.moe_align, fm.select_experts

    def decode(*a, **kw):
        seen["decode"] += 1
        return real_decode(*a, **kw)

    def align(*a, **kw):
        seen["sorted"] += 1
        return real_align(*a, **kw)

    def route(*a):
        seen["route"] += 1
        return real_route(*a)

    monkeypatch.setattr(fm, "fused_moe_decode", decode)
    monkeypatch.setattr(fm, "moe_align", align)
    monkeypatch.setattr(fm, "select_experts", route)
    tokens, logits = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path, **kw)), ps, steps=4)
    assert seen["decode"] and seen["sorted"] and seen["route"]
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)

"""The four- and eight-GPU layouts of issues 8 and 9, as CPU processes over gloo: TP=4, EP=4 against TP-sharded
experts, the seeds' hybrid TP=2 x PP=4 and EP=8 (8 processes). Same checks as tests/test_parallel.py: greedy
tokens equal to the single-process engine's, logits equal to float32 rounding. The GPU runs of these layouts
need machines of 4 and 8 GPUs (not lent so far); these tests show the layouts themselves are right.
"""
from __future__ import annotations

import pytest
import torch

from strata.engine.llm_engine import LLMEngine
from tests.parallel_support import engine_args, prompts, run_greedy, write_tiny_moe
from tests.tiny_models import write_tiny_model

TOL = dict(atol=3e-5, rtol=1e-5)
HEADS8 = dict(num_attention_heads=8, num_key_value_heads=2)  # head_dim 32 (qwen3 tiny): q is 256 wide


@pytest.fixture(scope="module")
def qwen3_8h(tmp_path_factory):
    """8 query heads / 2 KV heads (KV heads replicated beyond TP=2), 4 layers: PP=4 puts one on each stage."""
    path = tmp_path_factory.mktemp("qwen3_8h")
    write_tiny_model("qwen3", path, num_hidden_layers=4, **HEADS8)
    return path, run_greedy(LLMEngine.from_engine_args(engine_args(path)), prompts())


@pytest.fixture(scope="module")
def moe_8h(tmp_path_factory):
    """Qwen3-MoE, 8 experts top-2, one dense layer between two sparse ones, 8 query heads."""
    path = tmp_path_factory.mktemp("moe_8h")
    write_tiny_moe("qwen3_moe", path, mlp_only_layers=[1], num_hidden_layers=3, **HEADS8)
    return path, run_greedy(LLMEngine.from_engine_args(engine_args(path)), prompts())


def _check(path, ref, **kw):
    engine = LLMEngine.from_engine_args(engine_args(path, **kw))
    try:
        tokens, logits = run_greedy(engine, prompts())
        info = (engine.runner.collective_rpc("memory"), engine.runner.collective_rpc("layer_range"))
    finally:
        engine.shutdown()
    assert tokens == ref[0]
    torch.testing.assert_close(logits, ref[1], **TOL)
    return info


def test_tp4_matches_single(qwen3_8h):
    path, ref = qwen3_8h
    mem, _ = _check(path, ref, tensor_parallel_size=4)
    assert len(mem) == 4 and len({m["weights_bytes"] for m in mem}) == 1


@pytest.mark.parametrize("ep", [True, False], ids=["ep4", "tp4_experts"])
def test_ep4_and_tp4_experts_match_single(moe_8h, ep):
    path, ref = moe_8h
    mem, _ = _check(path, ref, tensor_parallel_size=4, enable_expert_parallel=ep)
    assert len(mem) == 4


def test_tp2_pp4_eight_processes_match_single(qwen3_8h):
    """The seeds' hybrid layout (their 175B example on 8 GPUs): TP=2 inside each of 4 pipeline stages."""
    path, ref = qwen3_8h
    mem, ranges = _check(path, ref, tensor_parallel_size=2, pipeline_parallel_size=4)
    assert ranges == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]


def test_ep8_eight_processes_matches_single(moe_8h):
    path, ref = moe_8h
    mem, _ = _check(path, ref, tensor_parallel_size=8, enable_expert_parallel=True)
    assert len(mem) == 8

"""`strata plan`'s communication formulas against the bytes our collectives really move.

Tiny Qwen3-MoE (3 layers: sparse, dense, sparse) on gloo processes. Every collective in strata.parallel.state
counts its calls and payload per (group, op) on each rank; here they are summed over the replica the way
`strata.plan.comm_per_token` sums them (one copy per all-reduce / all-gather, every rank's sends) and compared
with the plan's formulas for the same Layout. Activations are float32 here and bf16 in the plan, so the plan's
bytes are scaled by 4/2.

  - exact, per token: TP all-reduce calls and bytes (attention, dense MLP, embedding; the MoE MLP too when its
    experts are TP-sharded), the logits gather, the EP all-gather, the PP activation bytes;
  - statistical: EP all-to-all bytes depend on where the router sends each token; the plan assumes uniform
    routing ((EP-1)/EP of the rows leave their rank), checked within 25% over a 64-token prefill.
  - not in the plan, reported apart: the all-to-all of per-expert row counts (EP metadata), the TP all-gather
    that rebuilds the hidden size after a PP boundary (each TP rank sends 1/TP of it), and what the last stage
    returns to the driver (8-byte token ids when every row is greedy).
"""
from __future__ import annotations

import json

import pytest

from strata.core.sampling_params import SamplingParams
from strata.engine.llm_engine import LLMEngine
from strata.plan import Layout, Setup, arch_from_config, comm_per_token, get_gpu
from tests.parallel_support import engine_args, write_tiny_moe

SCALE = 4 / 2  # float32 here, bf16 in the plan
N = 64  # prefill tokens


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan_moe")
    write_tiny_moe("qwen3_moe", path, num_hidden_layers=3, mlp_only_layers=[1])
    return path


def _measure(path, **kw):
    """Per-rank comm stats of (a 64-token prefill step, then a 1-sequence decode step)."""
    engine = LLMEngine.from_engine_args(engine_args(path, max_num_batched_tokens=N, **kw))
    try:
        ex = engine.runner
        engine.add_request("a", list(range(3, 3 + N)), SamplingParams(max_tokens=3, temperature=0.0,
                                                                      ignore_eos=True))
        ex.collective_rpc("reset_comm_stats")
        engine.step()  # the whole prompt in one step
        prefill = ex.collective_rpc("comm_stats")
        ex.collective_rpc("reset_comm_stats")
        engine.step()  # one decode token
        decode = ex.collective_rpc("comm_stats")
    finally:
        engine.shutdown()
    return prefill, decode


def _get(stats, key, field="bytes"):
    return stats.get(key, {}).get(field, 0)


def _once_per_stage(per_rank, key, tp, pp, field="bytes"):
    """A TP collective: every TP rank of a stage counts the same call; take TP rank 0 of each stage."""
    return sum(_get(per_rank[s * tp], key, field) for s in range(pp))


def _all_ranks(per_rank, key, field="bytes"):
    return sum(_get(r, key, field) for r in per_rank)


def _plan(path, layout):
    with open(path / "config.json") as f:
        arch = arch_from_config(json.load(f))
    return arch, comm_per_token(Setup(arch, get_gpu("h100-80gb")), layout)


def test_tp2_pp2_ep2_bytes_match_plan(moe_dir):
    tp, pp = 2, 2
    arch, plan = _plan(moe_dir, Layout(tp=2, pp=2, dp=1, ep=2, ep_dispatch="all_to_all"))
    prefill, decode = _measure(moe_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                               enable_expert_parallel=True, expert_parallel_dispatch="all_to_all",
                               pp_layer_partition="2,1")
    d = arch.hidden * 4
    for stats, tokens in ((decode, 1), (prefill, N)):
        assert _once_per_stage(stats, "tp.all_reduce", tp, pp, "calls") == plan.tp_allreduce_calls == 5  # 3 attention, 1 dense MLP, embedding
        assert _once_per_stage(stats, "tp.all_reduce", tp, pp) == tokens * plan.tp_allreduce_bytes * SCALE
        assert _once_per_stage(stats, "tp.all_gather", tp, pp) == plan.tp_logits_gather_bytes * SCALE  # 1 row
        assert _once_per_stage(stats, "ep.all_gather", tp, pp) == tokens * plan.tp_allgather_bytes * SCALE
        assert _all_ranks(stats, "pp.send") == tokens * plan.pp_bytes * SCALE
        assert _once_per_stage(stats, "ep.all_to_all", tp, pp, "calls") == plan.ep_alltoall_calls
        # outside the plan's formulas
        assert _once_per_stage(stats, "tp.pp_gather", tp, pp) == tokens * d * (pp - 1)
        assert _all_ranks(stats, "pp.return") == 8  # one greedy token id
    measured = _all_ranks(prefill, "ep.all_to_all") / N
    assert measured == pytest.approx(plan.ep_alltoall_bytes * SCALE, rel=0.25), (measured, plan.ep_alltoall_bytes)


def test_tp2_sharded_experts_bytes_match_plan(moe_dir):
    arch, plan = _plan(moe_dir, Layout(tp=2))
    prefill, decode = _measure(moe_dir, tensor_parallel_size=2)
    # 3 attention + 1 dense MLP + 2 TP-sharded MoE MLPs + the embedding
    assert plan.tp_allreduce_calls == 7 and plan.ep_alltoall_bytes == 0 and plan.tp_allgather_bytes == 0
    for stats, tokens in ((decode, 1), (prefill, N)):
        assert [_get(r, "tp.all_reduce", "calls") for r in stats] == [plan.tp_allreduce_calls] * 2
        assert [_get(r, "tp.all_reduce") for r in stats] == [tokens * plan.tp_allreduce_bytes * SCALE] * 2
        assert [_get(r, "tp.all_gather") for r in stats] == [plan.tp_logits_gather_bytes * SCALE] * 2
        assert not any(k.startswith(("ep.", "pp.")) for r in stats for k in r)

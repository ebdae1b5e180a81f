"""The planner's model of one layout: memory per GPU, and every figure of a layout together (`estimate`).

The building blocks live beside it: `strata.plan.layout` (inputs, per-stage structure, feasibility) and
`strata.plan.timing` (communication per token, the roofline-plus-communication time model). Their names used
elsewhere are re-exported here, so `strata.plan.estimate` stays the one import for the planner's model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from strata.plan.layout import ACT_BYTES, Layout, Setup, StageWeights, Workload, dtype_bytes, enumerate_layouts, \
    kv_heads_per_gpu, stage_layer_counts, stage_weights, structural_problem
from strata.plan.timing import CommPerToken, Timer, comm_per_token

__all__ = [
    "Estimate", "Layout", "Memory", "Setup", "StageWeights", "Timer", "Workload", "activation_bytes", "check_fits",
    "comm_per_token", "dtype_bytes", "enumerate_layouts", "estimate", "memory", "stage_layer_counts",
    "stage_weights", "structural_problem",
]


# ---- memory -------------------------------------------------------------------------------------------------
def activation_bytes(setup: Setup, layout: Layout, workload: Workload) -> float:
    """Peak activation workspace per GPU for one prefill chunk, plus fp32 logits for a full decode batch."""
    a = setup.arch
    tp = layout.tp
    chunk = setup.constants.prefill_chunk_tokens
    qkv = (a.heads // tp + 2 * kv_heads_per_gpu(a, tp)) * a.head_dim
    mlp = 2 * a.intermediate / tp if a.dense_layers else 0.0
    if a.is_moe:
        mlp = max(mlp, 2 * a.moe_intermediate * a.experts_per_token / tp)
    per_token = 4 * a.hidden + qkv + mlp
    logits = workload.max_num_seqs * a.vocab / tp * 4.0
    return chunk * per_token * ACT_BYTES + logits


@dataclass
class Memory:
    budget: float  # gpu_mem_util * device memory
    weights: float  # largest stage
    weights_by_stage: list[float]
    activations: float
    reserve: float
    kv_free: float  # smallest over stages
    kv_tokens: int  # tokens of context one replica can hold
    max_batch: int  # sequences of prompt_len + output_len one replica can hold (also capped by max_num_seqs)


def memory(setup: Setup, layout: Layout, workload: Workload, stages: list[StageWeights] | None = None) -> Memory:
    stages = stages or stage_weights(setup, layout)
    budget = setup.gpu.memory_bytes * setup.gpu_mem_util
    act = activation_bytes(setup, layout, workload)
    reserve = setup.constants.runtime_reserve_gib * 2**30
    free = [budget - st.held_bytes - act - reserve for st in stages]
    tokens = min(max(0.0, f) // st.kv_bytes_per_token for f, st in zip(free, stages))
    seq = workload.prompt_len + workload.output_len
    return Memory(budget, max(st.held_bytes for st in stages), [st.held_bytes for st in stages], act, reserve,
                  min(free), int(tokens), int(min(workload.max_num_seqs, tokens // seq)))


# ---- one layout, all figures -----------------------------------------------------------------------------------
@dataclass
class Estimate:
    gpu: str
    layout: Layout
    weights_per_gpu: float
    kv_tokens: int
    max_batch: int
    batch_per_replica: int
    comm: CommPerToken
    ttft_s: float
    tpot_s: float  # under the workload's load (continuous batching, prefill mixed in)
    tpot_batch1_s: float  # one sequence alone on its replica
    output_tok_s: float  # whole deployment
    cost_per_mtok: float | None  # USD per million output tokens
    request_latency_s: float  # ttft + output_len * tpot
    comm_fraction: float  # share of a loaded decode step spent in collectives and hops
    bound: str  # "memory" | "compute": the decode part of a loaded step on the slowest stage
    step_breakdown: dict = field(default_factory=dict)  # shares of TPOT on the slowest stage: decode, prefill
    # (of the other requests in flight), comm, overhead
    memory_detail: Memory = field(repr=False, default=None)

    def to_dict(self) -> dict:
        c = self.comm
        m = self.memory_detail
        return {
            "gpu": self.gpu, "layout": self.layout.to_dict(), "label": self.layout.label,
            "gpus": self.layout.gpus,
            "memory": {"weights_per_gpu_bytes": self.weights_per_gpu,
                       "weights_by_stage_bytes": m.weights_by_stage if m else None,
                       "activation_bytes": m.activations if m else None,
                       "reserve_bytes": m.reserve if m else None, "budget_bytes": m.budget if m else None,
                       "kv_free_bytes": m.kv_free if m else None,
                       "kv_tokens_per_replica": self.kv_tokens, "max_batch_per_replica": self.max_batch},
            "batch_per_replica": self.batch_per_replica,
            "comm_per_token": {**dataclasses.asdict(c), "total_bytes": c.total_bytes},
            "ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3, "tpot_batch1_ms": self.tpot_batch1_s * 1e3,
            "output_tok_s": self.output_tok_s, "request_latency_s": self.request_latency_s,
            "cost_per_mtok_usd": self.cost_per_mtok, "comm_fraction": self.comm_fraction, "bound": self.bound,
            "step_breakdown": self.step_breakdown,
        }


def estimate(setup: Setup, layout: Layout, workload: Workload, *, batch: int | None = None,
             stages: list[StageWeights] | None = None, mem: Memory | None = None) -> Estimate:
    """All figures for one layout. `batch` overrides the per-replica batch derived from the workload."""
    stages = stages or stage_weights(setup, layout)
    mem = mem or memory(setup, layout, workload, stages)
    timer = Timer(setup, layout, stages)
    if batch is not None:
        in_flight = batch * layout.dp
    else:
        in_flight = min(workload.concurrency, layout.dp * mem.max_batch)
    B = max(1, math.ceil(in_flight / layout.dp))
    tpot = timer.tpot(B, workload)
    tpot1 = timer.cycle(1, workload, 0)[0]
    ttft = timer.ttft(workload.prompt_len)
    _, steps = timer.cycle(B, workload)
    tput = in_flight * timer.token_rate(B, workload) / B
    cost = None
    if setup.gpu.cost_per_hour > 0:
        cost = layout.gpus * setup.gpu.cost_per_hour / (tput * 3600) * 1e6
    # Diagnostics on the slowest stage of a loaded step: where its time goes, and what bounds the decode part.
    m = max(1, min(layout.pp, B))
    b = B / m
    slow = max(range(len(stages)), key=lambda i: steps[i])
    st = stages[slow]
    ctx = workload.prompt_len + workload.output_len / 2
    P = workload.prompt_len
    seqs = max(0, B - 1)  # the other requests in flight, whose prefill shares this request's steps (TPOT basis)
    n_pf = seqs / m * P / workload.output_len
    chunk = timer.prefill_chunk(P, seqs)
    parts = timer.stage_parts(st, b, ctx, n_pf, P, chunk)
    parts["comm"] += (timer.hop_time(b) + (n_pf / chunk * timer.hop_time(chunk) if n_pf else 0.0)) / m
    total = sum(parts.values()) or 1e-12
    breakdown = {k: v / total for k, v in parts.items()}
    a = setup.arch
    nbytes = st.read_bytes_nonexpert + timer._expert_bytes(st, b) + b * ctx * st.kv_bytes_per_token
    flops = 2.0 * b * (st.matmul_params + st.lm_head_params) + timer._expert_flops(st, b) \
        + 4.0 * b * ctx * (a.heads / layout.tp) * a.head_dim * st.layers
    g, c = setup.gpu, setup.constants
    bound = "memory" if nbytes / (g.hbm_bw * c.hbm_efficiency) >= flops / (g.flops * c.flops_efficiency) \
        else "compute"
    return Estimate(
        gpu=setup.gpu.name, layout=layout, weights_per_gpu=mem.weights, kv_tokens=mem.kv_tokens,
        max_batch=mem.max_batch, batch_per_replica=B, comm=comm_per_token(setup, layout), ttft_s=ttft,
        tpot_s=tpot, tpot_batch1_s=tpot1, output_tok_s=tput, cost_per_mtok=cost,
        request_latency_s=ttft + workload.output_len * tpot, comm_fraction=breakdown["comm"],
        bound=bound, step_breakdown=breakdown, memory_detail=mem)


def check_fits(setup: Setup, layout: Layout, workload: Workload, mem: Memory) -> str | None:
    """Why a layout's memory does not work (None if it does)."""
    gib = setup.gpu.memory_bytes / 2**30
    usable = mem.budget - mem.activations - mem.reserve
    if mem.weights > usable:
        return (f"weights need {mem.weights / 1e9:.1f} GB per GPU but only {usable / 1e9:.1f} GB is usable "
                f"({setup.gpu_mem_util:.0%} of {gib:.1f} GiB, less {(mem.activations + mem.reserve) / 1e9:.1f} GB "
                f"activations and runtime)")
    seq = workload.prompt_len + workload.output_len
    if mem.max_batch < 1:
        return (f"only {mem.kv_free / 1e9:.2f} GB per GPU is left for KV cache: {mem.kv_tokens} tokens, fewer "
                f"than one {seq}-token sequence")
    return None

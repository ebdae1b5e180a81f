"""The planner's empirical constants: the ONE place where the performance model meets reality.

Everything else in `strata.plan` is arithmetic on the architecture, the layout and the GPU's data sheet.
These numbers say how much of the data sheet a real engine gets. Each carries its source: "fitted" values come
from end-to-end strata runs on one H200 (benchmarks/results/2026-11-21-h200-*.json, fitted by
benchmarks/plan_vs_measured.py --fit), "anchor" values from single-operation measurements in
BENCHMARK-PROTOCOL.md (one H200; two H200s over NVLink), "assumed" values are not yet measured. Every recorded run
is TP=PP=DP=1 on one H200 with the Qwen3-4B reference model: the link, collective-latency and InfiniBand
constants are not touched by any of them (no run is sensitive to them) and stay anchors or assumptions.
FLOOR holds the physical floor (anchor efficiencies, no host overhead) for comparisons with the protocol. `benchmarks/plan_vs_measured.py --fit --write-constants FILE` refits them from the recorded runs in
benchmarks/results/, and `strata plan --constants FILE` uses the fitted file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

from strata.plan.errors import PlanError


@dataclass(frozen=True)
class Constants:
    # Fraction of the data-sheet HBM bandwidth a decode step achieves.
    hbm_efficiency: float = 0.88
    # Fraction of the data-sheet dense bf16 FLOP/s a prefill step achieves end to end (not a lone GEMM: the fit
    # folds attention, norms and the per-step host work of a prefill into it).
    flops_efficiency: float = 0.30
    # Fraction of the per-direction NVLink (intra-node link) bandwidth a large all-reduce achieves (bus bandwidth).
    link_efficiency: float = 0.64
    # Fraction of the per-GPU InfiniBand (inter-node) bandwidth achieved.
    ib_efficiency: float = 0.80
    # Fixed latency of one collective call, seconds (inside a CUDA graph; eager launches cost 45-75 us).
    allreduce_latency_s: float = 9.5e-6
    allreduce_latency_ib_s: float = 30e-6
    alltoall_latency_s: float = 15e-6
    alltoall_latency_ib_s: float = 40e-6
    p2p_latency_s: float = 10e-6
    p2p_latency_ib_s: float = 20e-6
    # Host/launch cost per engine step (scheduler, sampling, graph launch), seconds. 0 = physical floor.
    step_overhead_s: float = 1.8e-3
    # Memory a running engine keeps besides weights, KV cache and activations (CUDA context, NCCL buffers,
    # CUDA-graph pools), GiB per GPU.
    runtime_reserve_gib: float = 1.5
    # Tokens in one prefill chunk; sizes the activation workspace reserved per GPU.
    prefill_chunk_tokens: int = 8192
    # Tensors of [tokens, hidden] shipped between pipeline stages (1: the residual stream; 2 if an engine ships
    # hidden state and residual separately, as vLLM does).
    pp_activation_tensors: int = 1

    @classmethod
    def from_json(cls, path: str) -> "Constants":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read constants file {path}: {e}") from None
        data = data.get("constants", data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"constants file {path} has unknown fields {unknown}; known: {sorted(known)}")
        return dataclasses.replace(cls(), **data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Where each default comes from. Printed in --json output and in docs/PARALLELISM.md.
SOURCES = {
    "hbm_efficiency": "fitted: 20 single-H200 Qwen3-4B runs of 2026-11-21 (bench latency/throughput, serving); "
                      "agrees with the anchor 4.27 TB/s device copy / 4.8 TB/s = 0.89",
    "flops_efficiency": "fitted: same runs, an effective figure for a whole prefill step (the lone-GEMM "
                        "ceiling is 687-803 TFLOP/s = 0.69-0.81 of 989); set by TTFT and prefill-heavy steps",
    "link_efficiency": "anchor: 286 GB/s bus bandwidth, 128 MB NCCL all-reduce on 2 x H200 / 450 GB/s NVLink",
    "ib_efficiency": "assumed (no multi-node run recorded)",
    "allreduce_latency_s": "anchor: 9.5 us per 5-8 KB NCCL all-reduce inside a CUDA graph, 2 x H200",
    "allreduce_latency_ib_s": "assumed",
    "alltoall_latency_s": "assumed",
    "alltoall_latency_ib_s": "assumed",
    "p2p_latency_s": "assumed",
    "p2p_latency_ib_s": "assumed",
    "step_overhead_s": "fitted: same runs (batch-1 TPOT 3.5-3.9 ms measured vs 1.9 ms of weight reads)",
    "runtime_reserve_gib": "assumed",
    "prefill_chunk_tokens": "engine setting (vLLM's default max_num_batched_tokens for large GPUs)",
    "pp_activation_tensors": "design choice: the residual stream only",
}

DEFAULT = Constants()
# The physical floor: data-sheet fractions measured by single operations, no per-step host cost.
FLOOR = Constants(hbm_efficiency=0.89, flops_efficiency=0.81, step_overhead_s=0.0)

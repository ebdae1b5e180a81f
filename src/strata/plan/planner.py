"""Enumerate layouts, estimate each, pick one for an objective and say why."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from strata.plan.arch import Arch
from strata.plan.constants import SOURCES, Constants
from strata.plan.errors import PlanError
from strata.plan.estimate import (
    Estimate, Layout, Setup, Workload, check_fits, enumerate_layouts, estimate, memory, stage_weights,
    structural_problem,
)
from strata.plan.hardware import GPU

OBJECTIVES = ("latency", "throughput", "cost")


@dataclass
class Infeasible:
    gpu: str
    layout: Layout
    reason: str

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "layout": self.layout.to_dict(), "label": self.layout.label, "reason": self.reason}


@dataclass
class Plan:
    arch: Arch
    setups: list[Setup]
    n_gpus: int
    workload: Workload
    objective: str
    feasible: list[Estimate] = field(default_factory=list)  # sorted best-first for the objective
    infeasible: list[Infeasible] = field(default_factory=list)
    best: Estimate | None = None
    why: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        s0 = self.setups[0]
        return {
            "model": self.arch.summary(),
            "gpus": self.n_gpus,
            "gpu": [_gpu_dict(s.gpu) for s in self.setups],
            "dtype": s0.dtype, "kv_dtype": s0.kv_dtype, "gpu_mem_util": s0.gpu_mem_util,
            "workload": vars(self.workload),
            "objective": self.objective,
            "constants": s0.constants.to_dict(), "constant_sources": SOURCES,
            "layouts": [e.to_dict() for e in self.feasible],
            "infeasible": [i.to_dict() for i in self.infeasible],
            "recommendation": None if self.best is None else {
                "gpu": self.best.gpu, "layout": self.best.layout.to_dict(), "label": self.best.layout.label,
                "why": self.why},
            "notes": self.notes,
        }


def _gpu_dict(g: GPU) -> dict:
    return {"name": g.name, "memory_bytes": g.memory_bytes, "hbm_bw": g.hbm_bw, "flops": g.flops,
            "intra_bw": g.intra_bw, "inter_bw": g.inter_bw, "gpus_per_node": g.gpus_per_node,
            "cost_per_hour": g.cost_per_hour, "intra_link": g.intra_link}


def sort_key(objective: str):
    if objective == "latency":
        return lambda e: (e.request_latency_s, e.ttft_s, -e.output_tok_s)
    if objective == "throughput":
        return lambda e: (-e.output_tok_s, e.request_latency_s)
    if objective == "cost":
        return lambda e: (e.cost_per_mtok if e.cost_per_mtok is not None else math.inf, -e.output_tok_s)
    raise PlanError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")


def evaluate(setup: Setup, layout: Layout, workload: Workload, total_gpus: int) -> Estimate | Infeasible:
    problem = structural_problem(setup.arch, layout, setup.gpu.gpus_per_node, total_gpus)
    if problem:
        return Infeasible(setup.gpu.name, layout, problem)
    stages = stage_weights(setup, layout)
    mem = memory(setup, layout, workload, stages)
    problem = check_fits(setup, layout, workload, mem)
    if problem:
        return Infeasible(setup.gpu.name, layout, problem)
    return estimate(setup, layout, workload, stages=stages, mem=mem)


def make_plan(arch: Arch, gpus: list[GPU], n_gpus: int, workload: Workload, *, objective: str = "throughput",
              constants: Constants = Constants(), dtype: str | None = None, kv_dtype: str = "bf16",
              gpu_mem_util: float = 0.9, tp: int | None = None, pp: int | None = None, dp: int | None = None,
              ep: int | None = None) -> Plan:
    key = sort_key(objective)
    setups = [Setup(arch, g, constants, dtype or arch.dtype, kv_dtype, gpu_mem_util) for g in gpus]
    layouts = enumerate_layouts(arch, n_gpus, tp=tp, pp=pp, dp=dp, ep=ep)
    plan = Plan(arch, setups, n_gpus, workload, objective)
    for setup in setups:
        for layout in layouts:
            r = evaluate(setup, layout, workload, n_gpus)
            (plan.infeasible if isinstance(r, Infeasible) else plan.feasible).append(r)
    plan.feasible.sort(key=key)
    seq = workload.prompt_len + workload.output_len
    if arch.max_position and seq > arch.max_position:
        plan.notes.append(f"prompt + output = {seq} tokens exceeds the model's max_position_embeddings "
                          f"{arch.max_position}")
    if plan.feasible:
        plan.best = plan.feasible[0]
        plan.why = explain(plan.best, plan.feasible, objective, workload)
    else:
        plan.why = no_fit_advice(plan, setups)
    return plan


def explain(best: Estimate, ranked: list[Estimate], objective: str, workload: Workload) -> str:
    """One line: the winning figure, the margin over the runner-up, and what limits the step."""
    runner = next((e for e in ranked[1:] if (e.layout, e.gpu) != (best.layout, best.gpu)), None)
    br = best.step_breakdown
    seqs = "sequence" if best.batch_per_replica == 1 else "sequences"
    shape = (f"{best.batch_per_replica} {seqs} per replica; a token's time is {br.get('decode', 0):.0%} decode "
             f"({best.bound}-bound), {br.get('prefill', 0):.0%} other requests' prefill, "
             f"{br.get('comm', 0):.0%} communication")
    if objective == "latency":
        head = (f"lowest request latency {_dur(best.request_latency_s)} (TTFT {best.ttft_s * 1e3:.0f} ms + "
                f"{workload.output_len} x {best.tpot_s * 1e3:.2f} ms)")
        if runner:
            head += f"; next best {_name(runner, best)} takes {_pct(runner.request_latency_s, best.request_latency_s)} longer"
    elif objective == "throughput":
        head = f"highest throughput {best.output_tok_s:,.0f} output tok/s"
        if runner:
            head += f", {_pct(best.output_tok_s, runner.output_tok_s)} above next best {_name(runner, best)}"
    else:
        if best.cost_per_mtok is None:
            return "no GPU price known: give --cost-per-gpu-hour"
        head = f"cheapest at ${best.cost_per_mtok:.3f} per million output tokens"
        if runner and runner.cost_per_mtok:
            head += f"; next best {_name(runner, best)} costs {_pct(runner.cost_per_mtok, best.cost_per_mtok)} more"
    return f"{head}; {shape}"


def _pct(worse: float, better: float) -> str:
    if better <= 0:
        return "n/a"
    x = (worse / better - 1) * 100
    return f"{x:.1f}%" if x < 10 else f"{x:.0f}%"


def _dur(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds * 1e3:.0f} ms"


def _name(e: Estimate, best: Estimate) -> str:
    return e.layout.label + (f" on {e.gpu}" if e.gpu != best.gpu else "")


def no_fit_advice(plan: Plan, setups: list[Setup]) -> str:
    parts = []
    for s in setups:
        one = stage_weights(s, Layout())[0].held_bytes
        usable = s.gpu.memory_bytes * s.gpu_mem_util - s.constants.runtime_reserve_gib * 2**30
        need = math.ceil(one / max(usable * 0.9, 1))  # leave ~10% for activations and KV
        parts.append(f"{s.arch.params_total() / 1e9:.0f}B params = {one / 1e9:.0f} GB of weights; about {need}+ "
                     f"{s.gpu.name} GPUs are needed")
    return "no layout fits: " + "; ".join(parts)

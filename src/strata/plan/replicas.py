"""--replicas: size a fleet. Given request rates per region and a latency target, how many replicas of which
layout in each region, and what they cost in GPU-hours per day.

For each replica layout (TP x PP, one replica) the planner finds the largest batch whose loaded time per output
token meets --tpot-target-ms and whose time to first token (unloaded TTFT plus one loaded step of waiting)
meets --ttft-target-ms. A replica then serves (output tokens/s at that batch) / output_len requests/s;
regions get ceil(rate / (capacity x headroom)) replicas, each region its cheapest layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from strata.plan.arch import Arch
from strata.plan.constants import Constants
from strata.plan.errors import PlanError
from strata.plan.estimate import Layout, Setup, Timer, Workload, check_fits, memory, stage_weights, \
    structural_problem
from strata.plan.hardware import GPU


def parse_rates(text: str) -> dict[str, float]:
    """'us-east=40,eu-west=12' -> {'us-east': 40.0, 'eu-west': 12.0} (requests per second)."""
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise PlanError(f"--rate {text!r}: expected region=requests_per_second pairs, e.g. us=40,eu=12")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            r = float(v.removesuffix("/s"))
        except ValueError:
            raise PlanError(f"--rate: {v!r} for region {k!r} is not a number of requests per second") from None
        if r < 0 or not k:
            raise PlanError(f"--rate: region {k!r} needs a name and a rate >= 0")
        rates[k] = r
    if not rates:
        raise PlanError("--replicas needs --rate region=requests_per_second[,region=...]")
    return rates


@dataclass
class ReplicaOption:
    gpu: GPU
    layout: Layout
    batch: int  # sequences per replica at the target
    tpot_s: float
    ttft_s: float
    capacity_rps: float  # requests per second one replica serves at the target

    @property
    def cost_per_hour(self) -> float:
        return self.layout.replica_gpus * self.gpu.cost_per_hour

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.name, "layout": self.layout.to_dict(), "label": self.layout.label,
                "gpus_per_replica": self.layout.replica_gpus, "batch": self.batch, "tpot_ms": self.tpot_s * 1e3,
                "ttft_ms": self.ttft_s * 1e3, "capacity_rps": self.capacity_rps,
                "cost_per_replica_hour_usd": self.cost_per_hour}


@dataclass
class RegionPlan:
    region: str
    rate: float
    option: ReplicaOption | None
    replicas: int

    @property
    def gpus(self) -> int:
        return self.replicas * (self.option.layout.replica_gpus if self.option else 0)

    @property
    def gpu_hours_per_day(self) -> float:
        return self.gpus * 24.0

    @property
    def cost_per_day(self) -> float:
        return self.replicas * self.option.cost_per_hour * 24.0 if self.option else 0.0

    def to_dict(self) -> dict:
        return {"region": self.region, "rate_rps": self.rate, "replicas": self.replicas, "gpus": self.gpus,
                "gpu_hours_per_day": self.gpu_hours_per_day, "cost_per_day_usd": self.cost_per_day,
                "replica": self.option.to_dict() if self.option else None}


@dataclass
class Fleet:
    arch: Arch
    workload: Workload
    tpot_target_s: float | None
    ttft_target_s: float | None
    headroom: float
    regions: list[RegionPlan] = field(default_factory=list)
    options: list[ReplicaOption] = field(default_factory=list)  # cheapest per served request first
    rejected: list[tuple[str, Layout, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "mode": "replicas", "model": self.arch.summary(), "workload": vars(self.workload),
            "tpot_target_ms": None if self.tpot_target_s is None else self.tpot_target_s * 1e3,
            "ttft_target_ms": None if self.ttft_target_s is None else self.ttft_target_s * 1e3,
            "headroom": self.headroom,
            "regions": [r.to_dict() for r in self.regions],
            "total": {"replicas": sum(r.replicas for r in self.regions), "gpus": sum(r.gpus for r in self.regions),
                      "gpu_hours_per_day": sum(r.gpu_hours_per_day for r in self.regions),
                      "cost_per_day_usd": sum(r.cost_per_day for r in self.regions)},
            "options": [o.to_dict() for o in self.options],
            "rejected": [{"gpu": g, "label": lay.label, "reason": why} for g, lay, why in self.rejected],
        }


def replica_layouts(arch: Arch, gpu: GPU, max_gpus: int) -> list[Layout]:
    """One replica: TP (a divisor of the node size) x PP, at most max_gpus GPUs."""
    return [Layout(tp, pp, 1, 1) for tp in range(1, gpu.gpus_per_node + 1) if gpu.gpus_per_node % tp == 0
            for pp in range(1, max_gpus // tp + 1)]


def best_batch(timer: Timer, workload: Workload, max_batch: int, tpot_target: float | None,
               ttft_target: float | None) -> tuple[int, float, float] | None:
    """Largest batch meeting both targets, as (batch, tpot, ttft), or None. Time per token grows with the batch,
    so a binary search finds it."""
    ttft0 = timer.ttft(workload.prompt_len)

    def check(b: int):
        tpot = timer.tpot(b, workload)
        ok = (tpot_target is None or tpot <= tpot_target) and (ttft_target is None or ttft0 + tpot <= ttft_target)
        return ok, (b, tpot, ttft0 + tpot)

    ok, res = check(1)
    if not ok:
        return None
    lo, hi = 1, max_batch  # check(lo) holds
    ok_hi, res_hi = check(hi)
    if ok_hi:
        return res_hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, r = check(mid)
        if ok:
            lo, res = mid, r
        else:
            hi = mid
    return res


def size_fleet(arch: Arch, gpus: list[GPU], rates: dict[str, float], workload: Workload, *,
               tpot_target_ms: float | None, ttft_target_ms: float | None, max_gpus_per_replica: int = 16,
               headroom: float = 0.8, constants: Constants = Constants(), dtype: str | None = None,
               kv_dtype: str = "bf16", gpu_mem_util: float = 0.9) -> Fleet:
    if tpot_target_ms is None and ttft_target_ms is None:
        raise PlanError("--replicas needs a latency target: --tpot-target-ms and/or --ttft-target-ms")
    if not 0 < headroom <= 1:
        raise PlanError(f"--headroom must be in (0, 1], got {headroom}")
    tpot_t = tpot_target_ms / 1e3 if tpot_target_ms is not None else None
    ttft_t = ttft_target_ms / 1e3 if ttft_target_ms is not None else None
    fleet = Fleet(arch, workload, tpot_t, ttft_t, headroom)
    for gpu in gpus:
        setup = Setup(arch, gpu, constants, dtype or arch.dtype, kv_dtype, gpu_mem_util)
        for layout in replica_layouts(arch, gpu, max_gpus_per_replica):
            why = structural_problem(arch, layout, gpu.gpus_per_node, layout.gpus)
            stages = mem = None
            if not why:
                stages = stage_weights(setup, layout)
                mem = memory(setup, layout, workload, stages)
                why = check_fits(setup, layout, workload, mem)
            if why:
                fleet.rejected.append((gpu.name, layout, why))
                continue
            timer = Timer(setup, layout, stages)
            found = best_batch(timer, workload, mem.max_batch, tpot_t, ttft_t)
            if found is None:
                tpot1 = timer.tpot(1, workload)
                fleet.rejected.append((gpu.name, layout, f"misses the target even at batch 1 (TPOT "
                                       f"{tpot1 * 1e3:.1f} ms, TTFT {(timer.ttft(workload.prompt_len) + tpot1) * 1e3:.0f} ms)"))
                continue
            b, tpot, ttft = found
            cap = timer.token_rate(b, workload) / workload.output_len
            fleet.options.append(ReplicaOption(gpu, layout, b, tpot, ttft, cap))

    def unit_cost(o: ReplicaOption) -> tuple:
        price = o.cost_per_hour if o.gpu.cost_per_hour > 0 else o.layout.replica_gpus
        return (price / o.capacity_rps, o.layout.replica_gpus, o.tpot_s)

    fleet.options.sort(key=unit_cost)
    for region, rate in rates.items():
        if not fleet.options:
            fleet.regions.append(RegionPlan(region, rate, None, 0))
            continue
        best = None
        for o in fleet.options:
            n = math.ceil(rate / (o.capacity_rps * headroom)) if rate > 0 else 0
            price = o.cost_per_hour if o.gpu.cost_per_hour > 0 else o.layout.replica_gpus
            key = (n * price, n * o.layout.replica_gpus, o.tpot_s)
            if best is None or key < best[0]:
                best = (key, RegionPlan(region, rate, o, n))
        fleet.regions.append(best[1])
    return fleet

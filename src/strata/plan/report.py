"""Plain-text rendering of a Plan and a Fleet."""
from __future__ import annotations

from strata.plan.estimate import Estimate, dtype_bytes
from strata.plan.hardware import GPU
from strata.plan.planner import Plan
from strata.plan.replicas import Fleet
from strata.plan.units import fmt_bytes, fmt_count


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header)] + [line(r) for r in rows]


def gpu_line(g: GPU) -> str:
    cost = f", ${g.cost_per_hour:.2f}/GPU-h" if g.cost_per_hour else ""
    return (f"{g.name}: {g.memory_gib:.1f} GiB, HBM {fmt_bytes(g.hbm_bw)}/s, {g.flops / 1e12:.0f} TFLOP/s bf16, "
            f"{g.intra_link} {fmt_bytes(g.intra_bw)}/s, ib {fmt_bytes(g.inter_bw)}/s, "
            f"{g.gpus_per_node} per node{cost}")


def model_line(plan_arch, dtype: str, kv_dtype: str) -> str:
    a = plan_arch
    w = a.params_total() * dtype_bytes(dtype)
    active = f", {fmt_count(a.params_active())} active ({a.experts} experts, top-{a.experts_per_token})" \
        if a.is_moe else ""
    return (f"{a.name}: {fmt_count(a.params_total())} params{active}, {a.layers} layers, hidden {a.hidden}, "
            f"{a.heads} heads / {a.kv_heads} KV heads; {dtype} weights ~{fmt_bytes(w)}; "
            f"KV cache {fmt_bytes(a.kv_bytes_per_token(dtype_bytes(kv_dtype)))}/token ({kv_dtype})")


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if x < 1 else f"{x * 1e3:,.0f}"


def render_plan(plan: Plan, top: int | None = None, detail: bool = False) -> str:
    s0 = plan.setups[0]
    w = plan.workload
    multi = len(plan.setups) > 1
    out = [f"strata plan: {plan.n_gpus} GPUs, objective {plan.objective}",
           "model   " + model_line(plan.arch, s0.dtype, s0.kv_dtype)]
    out += ["gpu     " + gpu_line(s.gpu) for s in plan.setups]
    out.append(f"load    prompt {w.prompt_len} + output {w.output_len} tokens, {w.concurrency} request{'s' if w.concurrency != 1 else ''} in flight, "
               f"at most {w.max_num_seqs} sequences per replica, {s0.gpu_mem_util:.0%} of GPU memory")
    out += [f"note    {n}" for n in plan.notes]
    out.append("")
    if plan.feasible:
        header = (["gpu"] if multi else []) + [
            "layout", "weights/GPU", "KV tokens", "max batch", "batch", "TP bytes/tok", "PP bytes/tok",
            "EP bytes/tok", "TTFT ms", "TPOT ms", "TPOT@1 ms", "out tok/s", "$/Mtok"]
        rows = []
        shown = plan.feasible if top is None else plan.feasible[:top]
        for e in shown:
            c = e.comm
            tp_b = c.tp_allreduce_bytes + c.tp_logits_gather_bytes + c.tp_allgather_bytes
            rows.append(([e.gpu] if multi else []) + [
                e.layout.label, fmt_bytes(e.weights_per_gpu), fmt_count(e.kv_tokens), str(e.max_batch),
                str(e.batch_per_replica), fmt_bytes(tp_b) if tp_b else "-", fmt_bytes(c.pp_bytes) if c.pp_bytes else "-",
                fmt_bytes(c.ep_alltoall_bytes) if c.ep_alltoall_bytes else "-", _ms(e.ttft_s), _ms(e.tpot_s),
                _ms(e.tpot_batch1_s), f"{e.output_tok_s:,.0f}",
                f"{e.cost_per_mtok:.2f}" if e.cost_per_mtok is not None else "-"])
        off = 1 if multi else 0
        out += _table(header, rows, set(range(1 + off, len(header))))
        if top is not None and len(plan.feasible) > top:
            out.append(f"... {len(plan.feasible) - top} more feasible layouts (--top 0 shows all)")
        out.append("KV tokens and batch are per replica; bytes/tok: what one generated token moves, whole replica "
                   "(TP: all-reduce payload + logits gather; PP: activations between stages; EP: all-to-all);"
                   " TPOT under the stated load, TPOT@1 for one sequence alone")
    else:
        out.append("no feasible layout")
    if plan.infeasible:
        out.append("")
        out.append("infeasible:")
        width = max(len(i.layout.label) for i in plan.infeasible)
        for i in plan.infeasible:
            prefix = f"{i.gpu} " if multi else ""
            out.append(f"  {prefix}{i.layout.label.ljust(width)}  {i.reason}")
    if plan.best is not None and (detail or len(plan.feasible) == 1):
        out.append("")
        out += render_detail(plan.best, plan)
    out.append("")
    if plan.best is not None:
        where = f" on {plan.best.gpu}" if multi else ""
        out.append(f"recommendation ({plan.objective}): {plan.best.layout.label}{where}: {plan.why}")
    else:
        out.append(f"recommendation ({plan.objective}): none; {plan.why}")
    return "\n".join(out)


def render_detail(e: Estimate, plan: Plan) -> list[str]:
    """Everything behind one layout's row: memory budget, collectives per token, where a step's time goes."""
    m, c, w, lay = e.memory_detail, e.comm, plan.workload, e.layout
    a = plan.arch
    seq = w.prompt_len + w.output_len
    stages = ", ".join(fmt_bytes(x) for x in m.weights_by_stage) if lay.pp > 1 else fmt_bytes(m.weights)
    cap = " (capped by --max-num-seqs)" if e.max_batch == w.max_num_seqs else ""
    out = [f"detail: {lay.label} on {e.gpu}",
           f"  memory per GPU  weights {stages}; activations {fmt_bytes(m.activations)}; runtime "
           f"{fmt_bytes(m.reserve)}; KV cache {fmt_bytes(m.kv_free)} (budget {fmt_bytes(m.budget)})",
           f"                  -> {e.kv_tokens:,} KV tokens per replica = {e.max_batch} sequences of {seq} tokens{cap}"]
    msg = a.hidden * 2
    if lay.tp > 1:
        out.append(f"  per token, TP   {c.tp_allreduce_calls} all-reduces x {fmt_bytes(msg)} = "
                   f"{fmt_bytes(c.tp_allreduce_bytes)} payload; each GPU sends {fmt_bytes(c.tp_allreduce_wire_per_gpu)}"
                   f" (ring, 2(p-1)/p); logits gather {fmt_bytes(c.tp_logits_gather_bytes)}"
                   + (f"; expert outputs all-gather {fmt_bytes(c.tp_allgather_bytes)}" if c.tp_allgather_bytes else ""))
    if lay.pp > 1:
        out.append(f"  per token, PP   {c.pp_hops} hops x {fmt_bytes(c.pp_bytes / c.pp_hops)} = {fmt_bytes(c.pp_bytes)}")
    if lay.ep > 1 and not lay.a2a:
        out.append("  per token, EP   experts whole on each rank; MoE layers all-reduce their outputs over TP")
    if lay.a2a:
        out.append(f"  per token, EP   {c.ep_alltoall_calls} all-to-alls (dispatch + combine), "
                   f"{fmt_bytes(c.ep_alltoall_bytes)} leave their GPU")
    if lay.tp == 1 and lay.pp == 1 and lay.ep == 1:
        out.append("  per token       no collectives (each replica is one GPU)")
    br = e.step_breakdown
    out.append(f"  one token       decode {br.get('decode', 0):.0%} ({e.bound}-bound), other requests' prefill "
               f"{br.get('prefill', 0):.0%}, communication {br.get('comm', 0):.0%}, overhead {br.get('overhead', 0):.0%}")
    seqs = "sequence" if e.batch_per_replica == 1 else "sequences"
    out.append(f"  time            TTFT {_ms(e.ttft_s)} ms; TPOT {_ms(e.tpot_s)} ms with {e.batch_per_replica} {seqs} "
               f"per replica, {_ms(e.tpot_batch1_s)} ms alone; {e.output_tok_s:,.0f} output tok/s; request "
               f"{e.request_latency_s:.2f} s")
    return out


def render_fleet(fleet: Fleet, gpus: list[GPU], dtype: str, kv_dtype: str, top: int | None = 10) -> str:
    w = fleet.workload
    targets = []
    if fleet.tpot_target_s is not None:
        targets.append(f"TPOT <= {fleet.tpot_target_s * 1e3:g} ms")
    if fleet.ttft_target_s is not None:
        targets.append(f"TTFT <= {fleet.ttft_target_s * 1e3:g} ms")
    out = ["strata plan --replicas: " + " and ".join(targets) + f", replicas loaded to {fleet.headroom:.0%}",
           "model   " + model_line(fleet.arch, dtype, kv_dtype)]
    out += ["gpu     " + gpu_line(g) for g in gpus]
    out.append(f"load    prompt {w.prompt_len} + output {w.output_len} tokens per request")
    out.append("")
    if fleet.options:
        rows = []
        shown = fleet.options if not top else fleet.options[:top]
        for o in shown:
            rows.append([o.gpu.name, o.layout.label, str(o.layout.replica_gpus), str(o.batch), _ms(o.tpot_s),
                         _ms(o.ttft_s), f"{o.capacity_rps:.2f}",
                         f"{o.cost_per_hour / o.capacity_rps * 1000 / 3600:.4f}" if o.gpu.cost_per_hour else "-"])
        out.append("replica options meeting the target (cheapest per request first):")
        out += ["  " + l for l in _table(["gpu", "layout", "GPUs", "batch", "TPOT ms", "TTFT ms", "req/s",
                                          "$/1k req"], rows, {2, 3, 4, 5, 6, 7})]
        if top and len(fleet.options) > top:
            out.append(f"  ... {len(fleet.options) - top} more")
        out.append("")
        rows = []
        for r in fleet.regions:
            o = r.option
            rows.append([r.region, f"{r.rate:g}", f"{o.gpu.name} {o.layout.label}", str(r.replicas), str(r.gpus),
                         f"{r.gpu_hours_per_day:,.0f}", f"{r.cost_per_day:,.0f}" if o.gpu.cost_per_hour else "-"])
        rows.append(["total", f"{sum(r.rate for r in fleet.regions):g}", "", str(sum(r.replicas for r in fleet.regions)),
                     str(sum(r.gpus for r in fleet.regions)),
                     f"{sum(r.gpu_hours_per_day for r in fleet.regions):,.0f}",
                     f"{sum(r.cost_per_day for r in fleet.regions):,.0f}"])
        out += _table(["region", "req/s", "replica", "replicas", "GPUs", "GPU-h/day", "$/day"], rows,
                      {1, 3, 4, 5, 6})
    else:
        out.append("no replica layout meets the target")
    if fleet.rejected and not fleet.options:
        out.append("")
        out.append("rejected:")
        for g, lay, why in fleet.rejected:
            out.append(f"  {g} {lay.label}: {why}")
    elif fleet.rejected:
        out.append(f"({len(fleet.rejected)} replica layouts cannot meet the target or do not fit; --json lists them)")
    return "\n".join(out)


__all__ = ["render_plan", "render_fleet", "Estimate"]

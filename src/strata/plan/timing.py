"""Communication per token (bytes a layout moves) and the roofline-plus-communication time model (`Timer`).

Time of one engine step on one pipeline stage (every GPU of a stage does the same work):
    compute = max(bytes_read / (HBM_bw * hbm_efficiency), flops / (peak_flops * flops_efficiency))
    comm    = sum over collectives of  latency + bytes_on_the_wire / (link_bw * link_efficiency)
    step    = compute(decode part) + compute(prefill part) + comm + step_overhead
with ring all-reduce wire bytes 2(p-1)/p * n, all-gather (p-1)/p * n, all-to-all the bytes a GPU sends.
A decode step reads the weights the step touches and the live KV cache; a prefill step is usually FLOP-bound.
Under load each decode step also carries the prefill of the requests that replace finished ones
(batch * prompt_len / output_len tokens per step: continuous batching in steady state).
Pipeline: m = min(PP, batch) micro-batches; a token cycle is max(sum of stage steps + hops, m * slowest stage).
"""
from __future__ import annotations

from dataclasses import dataclass

from strata.plan.arch import Arch
from strata.plan.layout import ACT_BYTES, Layout, Setup, StageWeights, Workload, ep_link, pp_hop_links, \
    stage_weights


# ---- communication volume -----------------------------------------------------------------------------------
@dataclass
class CommPerToken:
    """Bytes moved to generate one token (decode, one sequence), whole replica.

    payload: sum of the message sizes (what one would count by hand); wire_per_gpu: what one GPU sends through
    its links for that (ring all-reduce: 2(p-1)/p x payload)."""
    tp_allreduce_calls: int = 0
    tp_allreduce_bytes: float = 0.0
    tp_allreduce_wire_per_gpu: float = 0.0
    tp_logits_gather_bytes: float = 0.0
    tp_allgather_bytes: float = 0.0  # EP with TP > 1: expert outputs gathered back to every TP rank
    pp_hops: int = 0
    pp_bytes: float = 0.0
    ep_alltoall_calls: int = 0
    ep_alltoall_bytes: float = 0.0  # expected bytes that leave their GPU (dispatch + combine)

    @property
    def total_bytes(self) -> float:
        return self.tp_allreduce_bytes + self.tp_logits_gather_bytes + self.tp_allgather_bytes + self.pp_bytes \
            + self.ep_alltoall_bytes


def tp_allreduce_calls(arch: Arch, layout: Layout, layers: int, dense: int, moe: int, first: bool) -> int:
    if layout.tp == 1:
        return 0
    return layers + dense + (0 if layout.a2a else moe) + (1 if first else 0)


def comm_per_token(setup: Setup, layout: Layout) -> CommPerToken:
    a, tp, ep = setup.arch, layout.tp, layout.ep
    d = a.hidden * ACT_BYTES
    c = CommPerToken()
    c.tp_allreduce_calls = tp_allreduce_calls(a, layout, a.layers, a.dense_layers, a.moe_layers, True)
    c.tp_allreduce_bytes = c.tp_allreduce_calls * d
    c.tp_allreduce_wire_per_gpu = c.tp_allreduce_bytes * 2 * (tp - 1) / tp
    if tp > 1:
        c.tp_logits_gather_bytes = a.vocab * ACT_BYTES
        if layout.a2a:
            c.tp_allgather_bytes = a.moe_layers * d
    c.pp_hops = layout.pp - 1
    c.pp_bytes = c.pp_hops * d * setup.constants.pp_activation_tensors
    if layout.a2a:
        c.ep_alltoall_calls = 2 * a.moe_layers
        c.ep_alltoall_bytes = 2 * a.moe_layers * a.experts_per_token * d * (ep - 1) / ep
    return c


# ---- time ---------------------------------------------------------------------------------------------------
class Timer:
    """Roofline + alpha-beta collectives for one setup and layout."""

    def __init__(self, setup: Setup, layout: Layout, stages: list[StageWeights] | None = None):
        self.s, self.l = setup, layout
        self.c = setup.constants
        self.stages = stages or stage_weights(setup, layout)
        self.hops = pp_hop_links(layout, setup.gpu.gpus_per_node)
        self.ep_link = ep_link(layout, setup.gpu.gpus_per_node)

    # links
    def _bw(self, link: str) -> float:
        g = self.s.gpu
        return g.inter_bw * self.c.ib_efficiency if link == "ib" else g.intra_bw * self.c.link_efficiency

    def allreduce(self, nbytes: float, p: int, link: str = "nvlink") -> float:
        if p <= 1:
            return 0.0
        alpha = self.c.allreduce_latency_ib_s if link == "ib" else self.c.allreduce_latency_s
        return alpha + 2 * (p - 1) / p * nbytes / self._bw(link)

    def allgather(self, nbytes: float, p: int, link: str = "nvlink") -> float:
        if p <= 1:
            return 0.0
        alpha = self.c.allreduce_latency_ib_s if link == "ib" else self.c.allreduce_latency_s
        return alpha + (p - 1) / p * nbytes / self._bw(link)

    def alltoall(self, send_bytes: float, link: str) -> float:
        alpha = self.c.alltoall_latency_ib_s if link == "ib" else self.c.alltoall_latency_s
        return alpha + send_bytes / self._bw(link)

    def p2p(self, nbytes: float, link: str) -> float:
        alpha = self.c.p2p_latency_ib_s if link == "ib" else self.c.p2p_latency_s
        return alpha + nbytes / self._bw(link)

    def _roof(self, nbytes: float, flops: float) -> float:
        g = self.s.gpu
        return max(nbytes / (g.hbm_bw * self.c.hbm_efficiency), flops / (g.flops * self.c.flops_efficiency))

    # pieces
    def _expert_bytes(self, st: StageWeights, tokens: float) -> float:
        a = self.s.arch
        if not st.moe_layers or tokens <= 0:
            return 0.0
        pooled = tokens * (self.l.ep / self.l.tp if self.l.ep > 1 else 1)
        touched = 1.0 - (1.0 - a.experts_per_token / a.experts) ** pooled
        return st.expert_held_params * touched * self.s.w_bytes

    def _expert_flops(self, st: StageWeights, tokens: float) -> float:
        a = self.s.arch
        return 2.0 * tokens * a.experts_per_token * a.expert_params * st.moe_layers / self.l.tp if a.is_moe else 0.0

    def decode_compute(self, st: StageWeights, b: float, ctx: float) -> float:
        if b <= 0:
            return 0.0
        a, tp = self.s.arch, self.l.tp
        nbytes = st.read_bytes_nonexpert + self._expert_bytes(st, b) + b * ctx * st.kv_bytes_per_token
        flops = 2.0 * b * (st.matmul_params + st.lm_head_params) + self._expert_flops(st, b) \
            + 4.0 * b * ctx * (a.heads / tp) * a.head_dim * st.layers
        return self._roof(nbytes, flops)

    def prefill_compute(self, st: StageWeights, n: float, prompt_len: float) -> float:
        if n <= 0:
            return 0.0
        a, tp = self.s.arch, self.l.tp
        prompts = n / prompt_len
        nbytes = st.read_bytes_nonexpert + self._expert_bytes(st, n) + n * st.kv_bytes_per_token
        flops = 2.0 * n * st.matmul_params + 2.0 * prompts * st.lm_head_params + self._expert_flops(st, n) \
            + 2.0 * n * prompt_len * (a.heads / tp) * a.head_dim * st.layers
        return self._roof(nbytes, flops)

    def stage_comm(self, st: StageWeights, tokens: float, sampled: float) -> float:
        """Collectives of one step on one stage for `tokens` tokens, `sampled` of which produce logits."""
        if tokens <= 0:
            return 0.0
        a, tp, ep = self.s.arch, self.l.tp, self.l.ep
        msg = tokens * a.hidden * ACT_BYTES
        t = tp_allreduce_calls(a, self.l, st.layers, st.dense_layers, st.moe_layers, st.first) \
            * self.allreduce(msg, tp)
        if st.last and tp > 1:
            t += self.allgather(sampled * a.vocab * ACT_BYTES, tp)
        if self.l.a2a and st.moe_layers:
            send = tokens / tp * a.experts_per_token * a.hidden * ACT_BYTES * (ep - 1) / ep
            t += 2 * st.moe_layers * self.alltoall(send, self.ep_link)
            t += st.moe_layers * self.allgather(msg, tp)
        return t

    def prefill_chunk(self, prompt_len: float, prompts: float) -> float:
        """Tokens in one prefill pass: whole prompts, as many as are waiting, up to the engine's chunk budget."""
        return min(float(self.c.prefill_chunk_tokens), max(prompt_len, prompts * prompt_len))

    def stage_parts(self, st: StageWeights, b: float, ctx: float, n_prefill: float, prompt_len: float,
                    chunk: float) -> dict[str, float]:
        """Time of one decode step of `b` sequences on one stage, plus its share (`n_prefill` tokens) of prefill
        passes of `chunk` tokens, split into decode compute, prefill compute, communication and overhead."""
        parts = {"decode": self.decode_compute(st, b, ctx), "prefill": 0.0,
                 "comm": self.stage_comm(st, b, b), "overhead": self.c.step_overhead_s}
        if n_prefill > 0:
            share = n_prefill / chunk
            parts["prefill"] = share * self.prefill_compute(st, chunk, prompt_len)
            parts["comm"] += share * self.stage_comm(st, chunk, chunk / prompt_len)
            parts["overhead"] += share * self.c.step_overhead_s
        return parts

    def stage_step(self, st: StageWeights, b: float, ctx: float, n_prefill: float, prompt_len: float,
                   chunk: float | None = None) -> float:
        chunk = chunk or self.prefill_chunk(prompt_len, 1)
        return sum(self.stage_parts(st, b, ctx, n_prefill, prompt_len, chunk).values())

    def hop_time(self, tokens: float) -> float:
        nbytes = tokens * self.s.arch.hidden * ACT_BYTES * self.c.pp_activation_tensors
        return sum(self.p2p(nbytes, link) for link in self.hops)

    # results
    def ttft(self, prompt_len: int) -> float:
        """Unloaded time to first token: one prompt alone on its replica (prefill + first sample)."""
        t = sum(self.prefill_compute(st, prompt_len, prompt_len) + self.stage_comm(st, prompt_len, 1)
                + self.c.step_overhead_s for st in self.stages)
        return t + self.hop_time(prompt_len)

    def cycle(self, batch: int, workload: Workload, prefill_seqs: float | None = None) -> tuple[float, list[float]]:
        """(token cycle, per-stage step times) for `batch` sequences on one replica whose steps also carry the
        prefill of `prefill_seqs` other requests spread over output_len steps (default: `batch`, the steady
        state of continuous batching; 0 for a sequence alone)."""
        m = max(1, min(self.l.pp, batch))
        b = batch / m
        P = workload.prompt_len
        ctx = P + workload.output_len / 2
        seqs = batch if prefill_seqs is None else max(0.0, prefill_seqs)
        n_pf = seqs / m * P / workload.output_len
        chunk = self.prefill_chunk(P, seqs)
        steps = [self.stage_step(st, b, ctx, n_pf, P, chunk) for st in self.stages]
        hops = self.hop_time(b) + (n_pf / chunk * self.hop_time(chunk) if n_pf else 0.0)
        return max(sum(steps) + hops, m * max(steps)), steps

    def tpot(self, batch: int, workload: Workload) -> float:
        """Time per output token of one request among `batch`: its steps carry the other requests' prefills."""
        return self.cycle(batch, workload, batch - 1)[0]

    def token_rate(self, batch: int, workload: Workload) -> float:
        """Output tokens/s of one replica holding `batch` requests (each step carries the prefill that replaces
        finished requests)."""
        return batch / self.cycle(batch, workload)[0]

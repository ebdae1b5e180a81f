"""The planner's model: memory per GPU, communication per token, and a roofline-plus-communication time model.

Layout: TP x PP x DP GPUs (x EP for MoE). GPU g of the deployment holds replica g // (TP*PP), pipeline stage
(g // TP) % PP and TP rank g % TP; nodes are consecutive blocks of gpus_per_node GPUs. EP is 1 (every expert
split by TP, like every other linear) or TP*DP (attention data-parallel, whole experts spread over all the GPUs
of a pipeline stage, tokens moved by all-to-all).

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

import dataclasses
import math
from dataclasses import dataclass, field

from strata.plan.arch import Arch
from strata.plan.constants import Constants
from strata.plan.errors import LayoutError, PlanError
from strata.plan.hardware import GPU

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
ACT_BYTES = 2.0  # activations and collectives move bf16


def dtype_bytes(name: str) -> float:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise PlanError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        s = f"TP{self.tp} PP{self.pp} DP{self.dp}"
        return s + (f" EP{self.ep}" if self.ep > 1 else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 1024
    output_len: int = 128
    concurrency: int = 64  # requests in flight over the whole deployment
    max_num_seqs: int = 256  # engine cap on sequences per replica

    def __post_init__(self):
        for k in ("prompt_len", "output_len", "concurrency", "max_num_seqs"):
            if getattr(self, k) < 1:
                raise PlanError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")


@dataclass(frozen=True)
class Setup:
    """What is fixed across layouts: model, GPU, model constants, dtypes, memory fraction."""
    arch: Arch
    gpu: GPU
    constants: Constants = Constants()
    dtype: str = "bf16"  # linear weights
    kv_dtype: str = "bf16"
    gpu_mem_util: float = 0.9

    def __post_init__(self):
        if not 0 < self.gpu_mem_util <= 1:
            raise PlanError(f"--gpu-mem-util must be in (0, 1], got {self.gpu_mem_util}")
        dtype_bytes(self.dtype), dtype_bytes(self.kv_dtype)

    @property
    def w_bytes(self) -> float:
        return dtype_bytes(self.dtype)

    @property
    def other_bytes(self) -> float:
        """Embeddings, norms, biases, router: kept 16-bit when linear weights are quantized."""
        return 2.0 if self.w_bytes < 2 else self.w_bytes

    @property
    def kv_bytes(self) -> float:
        return dtype_bytes(self.kv_dtype)


# ---- structure ----------------------------------------------------------------------------------------------
def stage_layer_counts(layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: even split; the remainder goes to the stages just before the last (the first
    holds the embedding and the last the lm_head, so they get the short share)."""
    base, rem = divmod(layers, pp)
    counts = [base] * pp
    order = list(range(pp - 2, -1, -1)) + [pp - 1] if pp > 1 else [0]
    for i in range(rem):
        counts[order[i % len(order)]] += 1
    return counts


def kv_heads_per_gpu(arch: Arch, tp: int) -> int:
    return max(1, arch.kv_heads // tp)


def _shard_factor(arch: Arch, layout: Layout, shard: str) -> float:
    if shard in ("col", "row", "vocab"):
        return layout.tp
    if shard == "kv":
        return arch.kv_heads / kv_heads_per_gpu(arch, layout.tp)
    if shard == "expert":
        return layout.ep if layout.ep > 1 else layout.tp
    return 1.0


@dataclass
class StageWeights:
    index: int
    layers: int
    dense_layers: int
    moe_layers: int
    first: bool
    last: bool
    held_bytes: float = 0.0  # weights stored on one GPU of this stage
    held_params: float = 0.0
    read_bytes_nonexpert: float = 0.0  # weights a decode step reads (not the embedding table: only its rows)
    expert_held_params: float = 0.0  # routed-expert parameters on one GPU
    matmul_params: float = 0.0  # per GPU, per token, non-expert linear weights except lm_head
    lm_head_params: float = 0.0  # per GPU; applied once per sampled token
    kv_bytes_per_token: float = 0.0  # per GPU


def stage_weights(setup: Setup, layout: Layout) -> list[StageWeights]:
    arch = setup.arch
    out = []
    start = 0
    for s, n in enumerate(stage_layer_counts(arch.layers, layout.pp)):
        idx = range(start, start + n)
        start += n
        moe = sum(arch.is_moe_layer(i) for i in idx)
        st = StageWeights(s, n, n - moe, moe, s == 0, s == layout.pp - 1)
        counts = {"layer": n, "dense": n - moe, "moe": moe, "first": int(st.first), "last": int(st.last)}
        for t in arch.tensors():
            c = counts[t.where]
            if not c:
                continue
            per_gpu = t.numel * c / _shard_factor(arch, layout, t.shard)
            nbytes = per_gpu * (setup.w_bytes if t.linear else setup.other_bytes)
            # A tied lm_head shares the embedding's storage when both sit on the same GPU (PP = 1).
            stored = not (t.name == "lm_head" and arch.tie_embeddings and layout.pp == 1)
            if stored:
                st.held_bytes += nbytes
                st.held_params += per_gpu
            if t.shard == "expert":
                st.expert_held_params += per_gpu
            elif not t.name.startswith("embed_"):
                st.read_bytes_nonexpert += nbytes
            if t.linear and t.shard != "expert":
                if t.name == "lm_head":
                    st.lm_head_params += per_gpu
                else:
                    st.matmul_params += per_gpu
        st.kv_bytes_per_token = n * 2 * kv_heads_per_gpu(arch, layout.tp) * arch.head_dim * setup.kv_bytes
        out.append(st)
    return out


def gpu_index(layout: Layout, replica: int, stage: int, rank: int) -> int:
    return replica * layout.replica_gpus + stage * layout.tp + rank


def _node(gpu: int, gpus_per_node: int) -> int:
    return gpu // gpus_per_node


def pp_hop_links(layout: Layout, gpus_per_node: int) -> list[str]:
    """Link kind of each stage-to-stage hop, worst replica (most inter-node hops)."""
    worst: list[str] = []
    for r in range(layout.dp):
        hops = ["ib" if _node(gpu_index(layout, r, s, layout.tp - 1), gpus_per_node)
                != _node(gpu_index(layout, r, s + 1, 0), gpus_per_node) else "nvlink"
                for s in range(layout.pp - 1)]
        if hops.count("ib") > worst.count("ib") or not worst:
            worst = hops
    return worst


def ep_link(layout: Layout, gpus_per_node: int) -> str:
    """EP = TP*DP spans the GPUs of one stage in every replica; inter-node if they sit on more than one node."""
    if layout.ep <= 1:
        return "nvlink"
    nodes = {_node(gpu_index(layout, r, 0, t), gpus_per_node) for r in range(layout.dp) for t in range(layout.tp)}
    return "ib" if len(nodes) > 1 else "nvlink"


# ---- feasibility --------------------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structural_problem(arch: Arch, layout: Layout, gpus_per_node: int, total_gpus: int) -> str | None:
    """Why a layout cannot exist for this model and node shape (None if it can)."""
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    if tp > gpus_per_node:
        return f"TP={tp} would span nodes ({gpus_per_node} GPUs per node); TP is kept inside a node"
    if total_gpus > gpus_per_node and gpus_per_node % tp:
        return f"TP={tp} groups would straddle node boundaries ({gpus_per_node} GPUs per node)"
    if arch.heads % tp:
        return f"{arch.heads} attention heads do not split evenly over TP={tp}"
    if arch.kv_heads % tp and tp % arch.kv_heads:
        return f"{arch.kv_heads} KV heads do not split over (or replicate evenly across) TP={tp}"
    if arch.dense_layers and arch.intermediate % tp:
        return f"MLP width {arch.intermediate} does not split evenly over TP={tp}"
    if pp > arch.layers:
        return f"PP={pp} exceeds the model's {arch.layers} layers"
    if arch.is_moe:
        if ep > 1 and arch.experts % ep:
            return f"{arch.experts} experts do not split evenly over EP={ep}"
        if ep == 1 and arch.moe_intermediate % tp:
            return f"expert width {arch.moe_intermediate} does not split evenly over TP={tp}"
    elif ep > 1:
        return "EP needs a mixture-of-experts model"
    return None


def enumerate_layouts(arch: Arch, n_gpus: int, *, tp: int | None = None, pp: int | None = None,
                      dp: int | None = None, ep: int | None = None) -> list[Layout]:
    """Every TP x PP x DP (x EP) factorization of n_gpus matching the fixed degrees. Raises LayoutError when
    the fixed degrees cannot divide n_gpus."""
    if n_gpus < 1:
        raise LayoutError(f"--gpus must be >= 1, got {n_gpus}")
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep)):
        if v is not None and v < 1:
            raise LayoutError(f"--{name} must be >= 1, got {v}")
    fixed = [(n, v) for n, v in (("TP", tp), ("PP", pp), ("DP", dp)) if v is not None]
    prod = math.prod(v for _, v in fixed)
    if n_gpus % prod or (len(fixed) == 3 and prod != n_gpus):
        desc = " x ".join(f"{n}={v}" for n, v in fixed)
        raise LayoutError(f"{n_gpus} GPUs cannot be divided into {desc} (product {prod}); "
                          f"TP x PP x DP must equal --gpus")
    out = []
    for t in divisors(n_gpus):
        if tp is not None and t != tp:
            continue
        for p in divisors(n_gpus // t):
            if pp is not None and p != pp:
                continue
            d = n_gpus // (t * p)
            if dp is not None and d != dp:
                continue
            eps = [1]
            if arch.is_moe and d > 1:
                eps.append(t * d)
            if ep is not None:
                if ep not in (1, t * d):
                    if tp is not None and pp is not None:
                        raise LayoutError(f"EP must be 1 (experts split by TP) or TP x DP = {t * d}, got {ep}")
                    continue
                eps = [ep]
            out.extend(Layout(t, p, d, e) for e in eps)
    if not out:
        raise LayoutError(f"no TP x PP x DP layout of {n_gpus} GPUs matches the requested degrees"
                          + (f" (EP={ep} must be 1 or TP x DP)" if ep is not None else ""))
    return out


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
    return layers + dense + (moe if layout.ep == 1 else 0) + (1 if first else 0)


def comm_per_token(setup: Setup, layout: Layout) -> CommPerToken:
    a, tp, ep = setup.arch, layout.tp, layout.ep
    d = a.hidden * ACT_BYTES
    c = CommPerToken()
    c.tp_allreduce_calls = tp_allreduce_calls(a, layout, a.layers, a.dense_layers, a.moe_layers, True)
    c.tp_allreduce_bytes = c.tp_allreduce_calls * d
    c.tp_allreduce_wire_per_gpu = c.tp_allreduce_bytes * 2 * (tp - 1) / tp
    if tp > 1:
        c.tp_logits_gather_bytes = a.vocab * ACT_BYTES
        if ep > 1:
            c.tp_allgather_bytes = a.moe_layers * d
    c.pp_hops = layout.pp - 1
    c.pp_bytes = c.pp_hops * d * setup.constants.pp_activation_tensors
    if ep > 1:
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
        if ep > 1 and st.moe_layers:
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

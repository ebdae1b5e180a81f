"""What the planner's model takes in, and how a layout places the model on GPUs.

Inputs: `Setup` (model, GPU, constants, dtypes), `Layout` (TP x PP x DP x EP) and `Workload`. Structure: the
weights, parameters and KV bytes of each pipeline stage (`stage_weights`) and the link kind of each hop.
Feasibility: which layouts can exist for a model and node shape (`structural_problem`, `enumerate_layouts`).

Layout: TP x PP x DP GPUs (x EP for MoE). GPU g of the deployment holds replica g // (TP*PP), pipeline stage
(g // TP) % PP and TP rank g % TP; nodes are consecutive blocks of gpus_per_node GPUs. EP is 1 (every expert
split by TP, like every other linear) or TP*DP (attention data-parallel, whole experts spread over all the GPUs
of a pipeline stage, tokens moved by all-to-all).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from strata.plan.arch import Arch
from strata.plan.constants import Constants
from strata.plan.errors import LayoutError, PlanError
from strata.plan.hardware import GPU

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
ACT_BYTES = 2.0  # activations and collectives move bf16


DTYPE_ALIASES = {"fp8_e4m3": "fp8", "float8_e4m3fn": "fp8", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def dtype_bytes(name: str) -> float:
    try:
        return DTYPE_BYTES[DTYPE_ALIASES.get(name.lower(), name.lower())]
    except KeyError:
        raise PlanError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}") from None


def resolve_kv_dtype(kv_dtype: str, dtype: str) -> str:
    """The KV-cache dtype name the planner uses for the engine's --kv-cache-dtype value: auto = the model's compute
    dtype (the weight dtype when it is 16/32-bit, else bf16: FP8 or int4 weights compute in bf16, as the engine
    does), fp8_e4m3 = fp8; plain names (bf16, fp16, fp8, ...) pass through."""
    k = kv_dtype.lower()
    if k == "auto":
        d = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        return d if d in ("bf16", "fp16", "fp32") else "bf16"
    k = DTYPE_ALIASES.get(k, k)
    dtype_bytes(k)  # an unknown name: PlanError
    return k


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    # How EP = TP layers exchange tokens (--expert-parallel-dispatch): the engine's default all-reduces each MoE
    # layer's partial outputs (tokens are replicated over TP); "all_to_all" dispatches and combines.
    ep_dispatch: str = "all_reduce"

    @property
    def a2a(self) -> bool:
        """Expert parallelism over all-to-all dispatch and combine: always when EP spans DP replicas (their
        tokens differ), by choice when EP = TP; otherwise MoE layers all-reduce like dense ones."""
        return self.ep > 1 and (self.ep > self.tp or self.ep_dispatch == "all_to_all")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        s = f"TP{self.tp} PP{self.pp} DP{self.dp}"
        chosen_a2a = self.ep_dispatch == "all_to_all" and self.ep <= self.tp  # (EP over DP is always all-to-all)
        return s + (f" EP{self.ep}" + (" a2a" if chosen_a2a else "") if self.ep > 1 else "")

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

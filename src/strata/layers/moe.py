"""Mixture-of-experts layer: router, top-k selection, experts TP-sharded or expert-parallel.

Two placements (chosen by `--enable-expert-parallel`, read from the parallel state's "ep" group):

  TP-sharded (default)  every rank holds every expert, each split like a dense MLP: w13 by output rows
                        (its 1/TP of gate and of up), w2 by input columns. Each rank computes partial sums for
                        all of the step's tokens; one all-reduce over TP, like a dense MLP.
  expert-parallel       rank r of the EP group (= the TP group) holds experts [r*E/EP, (r+1)*E/EP) whole.
                        The step's tokens are replicated on the TP ranks after attention. Two ways to use that
                        (--expert-parallel-dispatch):
    all_reduce (default)  every rank runs its own experts on the (token, choice) pairs routed to them, for all
                        of the step's tokens (other pairs are skipped by the kernel), and one all-reduce over
                        the group sums the partial outputs: T x H per rank on the wire, like a dense TP MLP,
                        static shapes, so decode steps run as CUDA graphs.
    all_to_all          each rank takes
                        its contiguous 1/EP slice of them, sends each (token, choice) row to the rank owning the
                        expert (all-to-all dispatch), runs its experts on what it received, sends the results
                        back (all-to-all combine), weights and sums them, and the slices are all-gathered so
                        every rank again holds every token. No all-reduce; only rows whose expert lives on
                        another rank leave a rank ((EP-1)/EP of them with uniform routing). With tokens
                        replicated this moves top_k times the all-reduce's bytes per direction, and the
                        message sizes come from the routing on the host, so steps run eagerly; it is the
                        layout for when attention is not replicated (not built: DP attention).

The expert math is `strata.ops.moe_ref.fused_moe` (torch twin) or the Triton grouped GEMM on CUDA
(`strata.ops.triton_kernels.fused_moe`), dispatched like the other ops.

FP8 experts (an FP8 checkpoint, or `--quantization fp8`; docs/QUANTIZATION.md): w13 and w2 are `Fp8Experts`,
float8_e4m3fn weights with float32 scales, sharded like the 16-bit experts; the kernels run them weight-only
(W8A16: each tile converted to the activation dtype in registers, activations not quantised).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from strata import ops
from strata.ops import moe_ref
from strata.ops.ref import fp8_quantize_rows
from strata.parallel import state as ps

FP8 = torch.float8_e4m3fn


def fused_moe(x, w13, w2, topk_weights, topk_ids, expert_offset: int = 0, **fp8):
    """fp8: w13_scale, w2_scale, w13_block, w2_block for FP8 experts (see `moe_ref.fused_moe`)."""
    if ops.use_triton(x):
        from strata.ops.triton_kernels.fused_moe import fused_moe as kernel
        return kernel(x, w13, w2, topk_weights, topk_ids, expert_offset=expert_offset, **fp8)
    return moe_ref.fused_moe(x, w13, w2, topk_weights, topk_ids, expert_offset, **fp8)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax over experts in fp32, top-k, optional renormalisation: (weights fp32 [T, k], ids [T, k])."""
    if ops.use_triton(router_logits):
        from strata.ops.triton_kernels import fused_moe as fm
        return fm.select_experts(router_logits, top_k, renormalize)
    return moe_ref.select_experts(router_logits, top_k, renormalize)


def _pow2_part(n: int) -> int:
    """The largest power of two dividing n (> 0)."""
    return n & -n


class Fp8Experts(nn.Module):
    """One stacked expert weight in FP8: `weight` [E, N, K] float8_e4m3fn and `weight_scale` float32, per output
    row [E, N] (`block_size` None) or per block [E, ceil(N / gn), ceil(K / gk)] (`block_size` (gn, gk), powers of
    two). `quant` carries the QuantSpec as on the FP8 linear layers, so that the model loader treats this module as
    one of them (random FP8 weights for --load-format dummy; online scales are computed at load)."""

    def __init__(self, spec, experts: int, n: int, k: int, block_size: tuple[int, int] | None):
        super().__init__()
        self.quant = SimpleNamespace(spec=spec)
        self.block_size = block_size
        self.input_scale = None  # weight-only: the activations are not quantised
        self.weight = nn.Parameter(torch.empty(experts, n, k, dtype=FP8), requires_grad=False)
        shape = (experts, n) if block_size is None else \
            (experts, -(-n // block_size[0]), -(-k // block_size[1]))
        self.weight_scale = nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)


class FusedMoE(nn.Module):
    """Experts of one layer: w13 [E_local, 2 I_local, H] (gate rows, then up rows) and w2 [E_local, H, I_local]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype=None, quant=None):
        """quant: the model's QuantSpec when the experts are FP8 (`Fp8Experts`), else None."""
        super().__init__()
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden_size
        self.renormalize = renormalize
        self.ep = ps.ep()
        self.tp = ps.tp()
        self.dispatch = ps.ep_dispatch() if self.ep.size > 1 else "none"
        if self.ep.size > 1:
            if num_experts % self.ep.size:
                raise ValueError(f"{num_experts} experts do not split over {self.ep.size} expert-parallel ranks")
            self.local_experts = num_experts // self.ep.size
            self.expert_start = self.ep.rank_in_group * self.local_experts
            self.inter = intermediate_size
        else:
            if intermediate_size % self.tp.size:
                raise ValueError(f"moe_intermediate_size ({intermediate_size}) is not divisible by "
                                 f"tensor_parallel_size ({self.tp.size})")
            self.local_experts, self.expert_start = num_experts, 0
            self.inter = intermediate_size // self.tp.size
        self.shard = self.tp.rank_in_group if self.ep.size == 1 else 0  # which 1/TP of each expert's width
        self.quant_spec = quant
        El, n, H = self.local_experts, self.inter, hidden_size
        if quant is not None:
            b13 = b2 = None
            if quant.weight == "block":  # scale blocks that never straddle a gate/up part or a TP shard edge
                bn, bk = quant.block_size
                b13 = (_pow2_part(math.gcd(bn, n)), _pow2_part(bk))
                b2 = (_pow2_part(bn), _pow2_part(math.gcd(bk, n)))
            self.w13 = Fp8Experts(quant, El, 2 * n, H, b13)
            self.w2 = Fp8Experts(quant, El, H, n, b2)
            return
        self.w13 = nn.Parameter(torch.empty(El, 2 * n, H, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(El, H, n, dtype=dtype), requires_grad=False)

    # ---- loading: (expert, part) of a checkpoint tensor -> this rank's shard
    def local_index(self, expert: int) -> int | None:
        i = expert - self.expert_start
        return i if 0 <= i < self.local_experts else None

    def load_expert(self, expert: int | None, part: str, loaded: torch.Tensor, kind: str = "weight") -> bool:
        """One checkpoint tensor: part "w1" (gate) | "w3" (up) | "w2" (down) of expert `expert`, an [I, H] / [H, I]
        matrix; or expert None with part "w13" | "w2": a stacked [E, 2I, H] / [E, H, I] tensor. kind: "weight", or
        "scale" (an FP8 weight's `weight_scale` / `weight_scale_inv`). Returns whether anything was copied."""
        if expert is None:
            copied = False
            for e in range(loaded.shape[0]):
                if part == "w13":
                    I = loaded.shape[1] // 2
                    copied |= self.load_expert(e, "w1", loaded[e, :I], kind)
                    copied |= self.load_expert(e, "w3", loaded[e, I:], kind)
                else:
                    copied |= self.load_expert(e, "w2", loaded[e], kind)
            return copied
        i = self.local_index(expert)
        if i is None:
            return False
        n, r = self.inter, self.shard
        if self.quant_spec is None:
            if kind != "weight" or loaded.dtype == FP8:
                raise ValueError(f"an FP8 expert {kind} for experts that are not FP8")
            if part in ("w1", "w3"):  # [I, H] rows
                dst = self.w13.data[i, :n] if part == "w1" else self.w13.data[i, n:]
                dst.copy_(loaded.narrow(0, r * n, n))
            else:  # w2 [H, I] columns
                self.w2.data[i].copy_(loaded.narrow(1, r * n, n))
            return True
        # FP8: the module, the part's first local row, this rank's (start, size) of the checkpoint tensor's rows
        # and columns, and that tensor's shape
        width = n * self.tp.size if self.ep.size == 1 else n  # the checkpoint's expert width
        if part == "w2":
            mod, row0, rows, cols, full = self.w2, 0, (0, self.hidden), (r * n, n), (self.hidden, width)
        else:
            mod, row0, rows, cols, full = self.w13, 0 if part == "w1" else n, (r * n, n), (0, self.hidden), \
                (width, self.hidden)
        if kind == "weight":
            self._load_fp8_weight(mod, i, row0, loaded.narrow(0, *rows).narrow(1, *cols))
        else:
            self._load_fp8_scale(mod, i, row0, loaded.float(), rows, cols, full)
        return True

    @staticmethod
    def _load_fp8_weight(mod: Fp8Experts, i: int, row0: int, w: torch.Tensor) -> None:
        dst = mod.weight.data[i].narrow(0, row0, w.shape[0])
        if w.dtype == FP8:
            dst.copy_(w)
            return
        if mod.block_size is not None:
            raise ValueError(f"a {w.dtype} expert weight among block-wise FP8 experts (expected float8_e4m3fn)")
        q, s = fp8_quantize_rows(w.to(dst.device))  # online: per row (over this rank's columns for w2)
        dst.copy_(q)
        mod.weight_scale.data[i].narrow(0, row0, w.shape[0]).copy_(s)

    def _load_fp8_scale(self, mod: Fp8Experts, i: int, row0: int, s: torch.Tensor, rows: tuple[int, int],
                        cols: tuple[int, int], full: tuple[int, int]) -> None:
        """A checkpoint scale of the part whose weight rows / columns (start, size) are this rank's: per tensor
        ([] or [1]) or per row ([N] or [N, 1]) into a per-row layout; block-wise [ceil(N / bn), ceil(K / bk)]
        (`QuantSpec.block_size`) into this module's blocks, each inside one checkpoint block."""
        if mod.block_size is None:
            dst = mod.weight_scale.data[i].narrow(0, row0, rows[1])
            if s.numel() == 1:
                dst.fill_(s.reshape(()).item())
            else:
                dst.copy_(s.reshape(-1).narrow(0, *rows))
            return
        (bn, bk), (gn, gk) = self.quant_spec.block_size, mod.block_size
        want = (-(-full[0] // bn), -(-full[1] // bk))
        if tuple(s.shape) != want:
            raise ValueError(f"block-wise expert scale of shape {tuple(s.shape)} (expected {want})")
        rb = (rows[0] + torch.arange(0, rows[1], gn)) // bn  # the checkpoint block of each of our row blocks
        cb = (cols[0] + torch.arange(0, cols[1], gk)) // bk
        mod.weight_scale.data[i].narrow(0, row0 // gn, rb.numel()).copy_(s[rb][:, cb])

    # ---- forward
    def run_experts(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, expert_offset: int = 0) -> torch.Tensor:
        """This rank's experts on x [T, H] with routing weights / ids [T, k]: the partial sum [T, H]."""
        if self.quant_spec is None:
            return fused_moe(x, self.w13, self.w2, w, ids, expert_offset=expert_offset)
        return fused_moe(x, self.w13.weight, self.w2.weight, w, ids, expert_offset=expert_offset,
                         w13_scale=self.w13.weight_scale, w2_scale=self.w2.weight_scale,
                         w13_block=self.w13.block_size, w2_block=self.w2.block_size)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] (same on every TP rank), router_logits [T, E] -> [T, H] (reduced, same on every rank)."""
        w, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if self.ep.size == 1:
            return ps.all_reduce(self.run_experts(hidden, w, ids), self.tp)
        if self.dispatch == "all_reduce":
            # this rank's experts only: the kernels skip ids outside [expert_start, expert_start + E_local)
            out = self.run_experts(hidden, w, ids, expert_offset=self.expert_start)
            return ps.all_reduce(out, self.tp)  # same ranks as ep
        return self._forward_ep(hidden, w, ids)

    def _forward_ep(self, hidden: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        g, P, r = self.ep, self.ep.size, self.ep.rank_in_group
        T, k, E, El = hidden.shape[0], self.top_k, self.num_experts, self.local_experts
        share = [T // P + (1 if i < T % P else 0) for i in range(P)]  # tokens per rank
        s = sum(share[:r])
        h, w, ids = hidden[s:s + share[r]], w[s:s + share[r]], ids[s:s + share[r]]  # this rank's tokens
        flat = ids.reshape(-1)  # [n*k]
        order = torch.argsort(flat, stable=True)  # rows grouped by expert, hence by owning rank
        send = h[order // k]  # [n*k, H]
        per_expert = torch.bincount(flat, minlength=E)  # [E]: rows this rank sends to each expert
        got = ps.all_to_all_counts(per_expert, g).view(P, El)  # [src, local expert]: rows it sends me
        send_counts = per_expert.view(P, El).sum(1).tolist()
        recv_counts = got.sum(1).tolist()
        recv = ps.all_to_all_rows(send, send_counts, recv_counts, g)  # [R, H], by source, then expert
        local_ids = torch.arange(El, device=hidden.device).repeat(P).repeat_interleave(got.reshape(-1))
        ones = torch.ones(recv.shape[0], 1, dtype=torch.float32, device=hidden.device)
        y = self.run_experts(recv, ones, local_ids[:, None])  # [R, H]
        back = ps.all_to_all_rows(y, recv_counts, send_counts, g)  # [n*k, H] in `order`
        rows = torch.empty_like(back)
        rows[order] = back
        mine = (rows.view(-1, k, self.hidden).float() * w[..., None]).sum(dim=1).to(hidden.dtype)  # [n, H]
        return ps.all_gather_rows(mine, share, g)

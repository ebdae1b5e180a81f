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
"""
from __future__ import annotations

import torch
from torch import nn

from strata import ops
from strata.ops import moe_ref
from strata.parallel import state as ps


def fused_moe(x, w13, w2, topk_weights, topk_ids, expert_offset: int = 0):
    if ops.use_triton(x):
        from strata.ops.triton_kernels.fused_moe import fused_moe as kernel
        return kernel(x, w13, w2, topk_weights, topk_ids, expert_offset=expert_offset)
    return moe_ref.fused_moe(x, w13, w2, topk_weights, topk_ids, expert_offset)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax over experts in fp32, top-k, optional renormalisation: (weights fp32 [T, k], ids [T, k])."""
    if ops.use_triton(router_logits):
        from strata.ops.triton_kernels import fused_moe as fm
        return fm.select_experts(router_logits, top_k, renormalize)
    return moe_ref.select_experts(router_logits, top_k, renormalize)


class FusedMoE(nn.Module):
    """Experts of one layer: w13 [E_local, 2 I_local, H] (gate rows, then up rows) and w2 [E_local, H, I_local]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype=None):
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
        self.w13 = nn.Parameter(torch.empty(self.local_experts, 2 * self.inter, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.local_experts, hidden_size, self.inter, dtype=dtype),
                               requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    # ---- loading: (expert, part) of a checkpoint tensor -> this rank's shard
    def local_index(self, expert: int) -> int | None:
        i = expert - self.expert_start
        return i if 0 <= i < self.local_experts else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> bool:
        """shard_id: (expert, "w1" | "w3" | "w2") for one expert's [I, H] / [H, I] matrix, or
        (None, "w13" | "w2") for a stacked [E, 2I, H] / [E, H, I] tensor. Returns whether anything was copied."""
        expert, part = shard_id
        if expert is None:
            copied = False
            for e in range(loaded.shape[0]):
                if part == "w13":
                    I = loaded.shape[1] // 2
                    copied |= self.weight_loader(self.w13, loaded[e, :I], (e, "w1"))
                    copied |= self.weight_loader(self.w13, loaded[e, I:], (e, "w3"))
                else:
                    copied |= self.weight_loader(self.w2, loaded[e], (e, "w2"))
            return copied
        i = self.local_index(expert)
        if i is None:
            return False
        n = self.inter
        r = self.tp.rank_in_group if self.ep.size == 1 else 0
        if part in ("w1", "w3"):  # [I, H] rows
            dst = param.data[i, :n] if part == "w1" else param.data[i, n:]
            dst.copy_(loaded.narrow(0, r * n, n))
        else:  # w2 [H, I] columns
            param.data[i].copy_(loaded.narrow(1, r * n, n))
        return True

    # ---- forward
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] (same on every TP rank), router_logits [T, E] -> [T, H] (reduced, same on every rank)."""
        w, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if self.ep.size == 1:
            out = fused_moe(hidden, self.w13, self.w2, w, ids)
            return ps.all_reduce(out, self.tp)
        if self.dispatch == "all_reduce":
            # this rank's experts only: the kernels skip ids outside [expert_start, expert_start + E_local)
            out = fused_moe(hidden, self.w13, self.w2, w, ids, expert_offset=self.expert_start)
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
        y = fused_moe(recv, self.w13, self.w2, ones, local_ids[:, None])  # [R, H]
        back = ps.all_to_all_rows(y, recv_counts, send_counts, g)  # [n*k, H] in `order`
        rows = torch.empty_like(back)
        rows[order] = back
        mine = (rows.view(-1, k, self.hidden).float() * w[..., None]).sum(dim=1).to(hidden.dtype)  # [n, H]
        return ps.all_gather_rows(mine, share, g)

"""Where this rank sits in the TP x PP mesh, and what it sends and receives around its share of a step.

A pipeline stage is the model runner with a layer range plus these transfers:
  - a stage after the first receives the residual stream of each micro-batch from the stage before, and a stage
    before the last sends its own on (one tensor, hidden + residual: the next layer's add-then-norm is that sum);
    with TP > 1 each TP rank sends only its 1/TP slice of the hidden size and the receiving stage all-gathers it
    over its (fast, intra-node) TP group, so the boundary carries one copy;
  - TP rank 0 of the last stage sends the driver the sampled rows of each micro-batch (argmax ids when every row
    is greedy, else logits), after every micro-batch's receive has been posted;
  - with overlapped steps (one stage), the driver's sampled ids go to every TP rank on the device.
Outside a mesh (one process) every size is 1 and nothing is sent.
"""
from __future__ import annotations

import torch

from strata.core.plan import ScheduledChunk
from strata.parallel import state as ps

RETURN_TAG = 1 << 20  # tags of the last stage's replies to the driver (activations use the micro-batch index)
DRIVER_RANK = 0


class StageLink:
    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype, device: torch.device):
        pp, tp = ps.pp(), ps.tp()
        self.pp_size, self.is_first, self.is_last = pp.size, pp.is_first, pp.is_last
        self.prev_rank = pp.ranks[pp.rank_in_group - 1] if not pp.is_first else None
        self.next_rank = pp.ranks[pp.rank_in_group + 1] if not pp.is_last else None
        self.tp = tp
        self.rank = ps.world().ranks[ps.world().rank_in_group] if ps.is_initialized() else DRIVER_RANK
        self.is_driver = self.rank == DRIVER_RANK
        self.last_stage_rank = (pp.size - 1) * tp.size  # TP rank 0 of the last stage
        self.returns_rows = pp.size > 1 and self.rank == self.last_stage_rank
        self.hidden, self.vocab, self.dtype, self.device = hidden_size, vocab_size, dtype, device
        self.slice_boundary = tp.size > 1 and hidden_size % tp.size == 0

    def recv_hidden(self, n: int, tag: int) -> torch.Tensor:
        if self.slice_boundary:
            part = ps.recv((n, self.hidden // self.tp.size), self.dtype, self.device, self.prev_rank, tag)
            return ps.all_gather(part, dim=-1, group=self.tp, what="pp_gather")
        return ps.recv((n, self.hidden), self.dtype, self.device, self.prev_rank, tag)

    def send_hidden(self, x: torch.Tensor, tag: int):
        """Returns (work, tensor): the tensor must stay referenced until the work completes."""
        if self.slice_boundary:
            w = self.hidden // self.tp.size
            x = x[:, self.tp.rank_in_group * w:(self.tp.rank_in_group + 1) * w]
        x = x.contiguous()
        return ps.send(x, self.next_rank, tag, what="send"), x

    def send_rows(self, rows: torch.Tensor, tag: int):
        """Last stage: one micro-batch's sampled rows (argmax ids [n] or logits [n, V]) to the driver."""
        rows = rows.contiguous()
        return ps.send(rows, DRIVER_RANK, RETURN_TAG + tag, what="return"), rows

    def recv_rows(self, n: int, greedy_ids: bool, tag: int) -> torch.Tensor:
        shape, dtype = ((n,), torch.int64) if greedy_ids else ((n, self.vocab), self.dtype)
        return ps.recv(shape, dtype, self.device, self.last_stage_rank, RETURN_TAG + tag)

    def share_sampled(self, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
        """Overlapped steps: the driver's sampled ids [n] to every TP rank, on the device (workers pass None)."""
        if tokens is None:
            tokens = torch.empty(n, dtype=torch.int64, device=self.device)
        return ps.broadcast(tokens, src=DRIVER_RANK, group=self.tp, what="sampled_ids")


def split_microbatches(chunks: list[ScheduledChunk], m: int) -> list[tuple[int, int]]:
    """Contiguous slices with about equal token counts (at most m, none empty)."""
    n = len(chunks)
    m = max(1, min(m, n))
    if m == 1:
        return [(0, n)]
    total = sum(c.num_tokens for c in chunks)
    out, a, acc = [], 0, 0
    for i, c in enumerate(chunks):
        acc += c.num_tokens
        left_chunks = n - (i + 1)
        left_groups = m - len(out) - 1
        if left_groups and (acc * m >= total * (len(out) + 1) or left_chunks == left_groups):
            out.append((a, i + 1))
            a = i + 1
        if len(out) == m - 1:
            break
    out.append((a, n))
    return out

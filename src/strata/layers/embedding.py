"""Vocab-parallel embedding and LM head: each TP rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.parallel import state as ps


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype=None):
        super().__init__()
        self.tp_rank, self.tp_size = ps.tp().rank_in_group, ps.tp().size
        self.vocab_size = vocab_size
        self.shard = (vocab_size + self.tp_size - 1) // self.tp_size
        self.start = self.tp_rank * self.shard
        self.end = min(self.start + self.shard, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        n = self.end - self.start
        param.data[:n].copy_(loaded[self.start:self.end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids >= self.start) & (ids < self.end)
        local = torch.where(mask, ids - self.start, torch.zeros_like(ids))
        y = F.embedding(local, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return ps.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] (gathered across TP ranks)."""
        logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = ps.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]

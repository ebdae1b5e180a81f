"""The runner's side of the step message: its mirror of every request, and the one input builder.

`Requests.apply(plan)` brings the mirror up to date from a plan's diff (forget finished requests, take new ones
in full, append the new tokens and blocks of the scheduled ones). Every rank and pipeline stage applies the same
plans in the same order, so every mirror is the same.

`build_inputs` turns an ordered list of chunks into the model's inputs: token ids, positions, the slot mapping
(`block_id * block_size + offset`) of every scheduled token, the attention metadata (a decode part and a varlen
prefill part), and the rows whose logits are sampled. A decode whose input token is not known on the host yet
(async scheduling: the step in flight is sampling it) is marked pending; the runner reads it on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.attention.backend import AttentionMetadata
from strata.core.plan import ScheduledChunk, StepPlan


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the device: on CUDA through pinned memory and a
    non-blocking copy (a plain torch.tensor(..., device="cuda") synchronizes the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class RunnerRequest:
    """One request as a runner knows it: what it needs for inputs, and for sampling on the rank that samples."""
    __slots__ = ("request_id", "slot", "token_ids", "num_prompt_tokens", "block_ids", "params", "seed",
                 "generator")

    def __init__(self, new, generator=None):
        self.request_id, self.slot = new.request_id, new.slot
        self.token_ids = list(new.token_ids)  # known on the host; a pending token is not here yet
        self.num_prompt_tokens = new.num_prompt_tokens
        self.block_ids = list(new.block_ids)
        self.params, self.seed = new.params, new.seed
        self.generator = generator

    # the sampler's view of a request
    @property
    def all_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class Requests(dict):
    """request id -> RunnerRequest. `device`: where seeded requests' generators live (None: no generators, a
    rank that does not sample)."""

    def __init__(self, generator_device: torch.device | None):
        super().__init__()
        self.generator_device = generator_device

    def apply(self, plan: StepPlan) -> None:
        for rid in plan.finished_ids:
            self.pop(rid, None)
        for new in plan.new_requests:
            old = self.get(new.request_id)  # back after a preemption: its generator goes on where it was
            gen = old.generator if old is not None else self._generator(new.seed)
            self[new.request_id] = RunnerRequest(new, gen)
        for c in plan.chunks:
            if c.new_token_ids or c.new_block_ids:
                r = self[c.request_id]
                r.token_ids.extend(c.new_token_ids)
                r.block_ids.extend(c.new_block_ids)

    def _generator(self, seed: int | None):
        if seed is None or self.generator_device is None:
            return None
        return torch.Generator(device=self.generator_device).manual_seed(seed)


def decode_first(chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], int]:
    """The order a step is computed and sampled in: decodes first (the attention metadata splits the batch).
    Returns (the ordered chunks, how many are decodes)."""
    decodes, rest = [], []
    for c in chunks:
        (decodes if c.num_tokens == 1 and c.start > 0 else rest).append(c)
    return decodes + rest, len(decodes)


def is_pending(c: ScheduledChunk, r: RunnerRequest) -> bool:
    """Async scheduling: the chunk's input token is still being sampled by the step in flight."""
    return c.start >= len(r.token_ids)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]; pending ids are 0 here (the runner fills them on the device)
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    pending: list[tuple[int, int]]  # (index into input_ids, slot) of the ids still on the device
    sample_rows: list[int]  # index of the last token of each chunk that samples


def build_inputs(chunks: list[ScheduledChunk], num_decodes: int, reqs: Requests, block_size: int,
                 device: torch.device) -> StepInputs:
    """Inputs of chunks ordered decodes first, the first `num_decodes` of them decodes (`decode_first`, or a
    contiguous slice of that order)."""
    bs = block_size
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    pending: list[tuple[int, int]] = []
    rows: list[int] = []
    for c in chunks:
        r = reqs[c.request_id]
        end = c.start + c.num_tokens
        if is_pending(c, r):
            assert c.num_tokens == 1, f"{c}: a chunk of {c.num_tokens} tokens starts at a pending token"
            pending.append((len(ids), r.slot))
            ids.append(0)
        else:
            ids.extend(r.token_ids[c.start:end])
        rng = range(c.start, end)
        pos.extend(rng)
        bt = r.block_ids
        slots.extend(bt[p // bs] * bs + p % bs for p in rng)
        if c.sample:
            rows.append(len(ids) - 1)
    meta = _metadata(chunks[:num_decodes], chunks[num_decodes:], reqs, slots, device)
    return StepInputs(to_device(ids, torch.int64, device), to_device(pos, torch.int64, device), meta, pending,
                      rows)


def _block_table(chunks: list[ScheduledChunk], reqs: Requests, device: torch.device) -> torch.Tensor:
    tables = [reqs[c.request_id].block_ids for c in chunks]
    width = max(len(t) for t in tables)
    return to_device([t + [0] * (width - len(t)) for t in tables], torch.int32, device)


def _metadata(decodes: list[ScheduledChunk], prefills: list[ScheduledChunk], reqs: Requests, slots: list[int],
              device: torch.device) -> AttentionMetadata:
    meta = AttentionMetadata(
        slot_mapping=to_device(slots, torch.int64, device), num_decode_tokens=len(decodes),
        decode_block_tables=None, decode_seq_lens=None, decode_max_seq_len=0,
        prefill_block_tables=None, prefill_query_start_loc=None, prefill_seq_lens=None)
    if decodes:
        lens = [c.start + 1 for c in decodes]
        meta.decode_block_tables = _block_table(decodes, reqs, device)
        meta.decode_seq_lens = to_device(lens, torch.int32, device)
        meta.decode_max_seq_len = max(lens)
    if prefills:
        qsl = [0]
        for c in prefills:
            qsl.append(qsl[-1] + c.num_tokens)
        meta.prefill_block_tables = _block_table(prefills, reqs, device)
        meta.prefill_query_start_loc = to_device(qsl, torch.int32, device)
        meta.prefill_seq_lens = to_device([c.start + c.num_tokens for c in prefills], torch.int32, device)
    return meta

"""The one step message: the scheduler emits a `StepPlan`, every rank and pipeline stage runs it, and the rank that
samples returns a `StepResult`.

A plan is a diff against what the runners already hold (as vLLM's SchedulerOutput): a request is sent in full
once (`NewRequest`: its known tokens, blocks, slot and sampling parameters), when it is first scheduled or comes
back after a preemption; after that each scheduled chunk carries only what changed (`new_token_ids`: tokens
sampled since, `new_block_ids`: blocks appended since), and `finished_ids` tells the runners which requests
to forget. Each runner keeps its own mirror of every request (`strata.runner.inputs.RunnerRequest`) and builds
its inputs from it, on one GPU or on every rank of a TP x PP mesh alike.

`ScheduledChunk.request` is the scheduler's own back-reference to the `Request` (the engine and the scheduler
use it when the step's result is applied). It is not part of the message: a plan that is pickled for other
ranks leaves it out, and runners never read it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple

from strata.core.request import Request
from strata.core.sampling_params import SamplingParams


@dataclass
class NewRequest:
    """Everything a runner needs to know about a request, sent once."""
    request_id: str
    slot: int  # stable index into the runners' per-slot device state while the request runs
    token_ids: list[int]  # every token known now: the prompt, and the outputs after a preemption
    num_prompt_tokens: int
    block_ids: list[int]
    params: SamplingParams
    seed: int | None  # the seed of the request's own generator (seeded sampling), else None

    @classmethod
    def of(cls, req: Request) -> "NewRequest":
        seed = req.params.seed + req.index if req.params.seed is not None else None
        return cls(req.request_id, req.slot, req.all_token_ids, req.num_prompt_tokens, list(req.block_ids),
                   req.params, seed)


class ScheduledChunk(NamedTuple):
    """Positions [start, start + num_tokens) of one request are computed this step. (A tuple: plans of hundreds
    of chunks are built and pickled every step, and tuples are the cheapest to build.)"""
    request_id: str
    start: int  # == the request's num_computed_tokens at schedule time
    num_tokens: int
    # True when this chunk reaches the end of the known (and pending) tokens, so the step samples a next token.
    sample: bool
    new_token_ids: Sequence[int] = ()  # tokens the runners were not sent yet (running requests)
    new_block_ids: Sequence[int] = ()  # blocks appended since the last plan (running requests)
    request: Request | None = None  # the scheduler's back-reference; not sent to other ranks

    @property
    def is_decode(self) -> bool:
        """One token after the first: the decode part of the attention metadata (and of CUDA graph steps)."""
        return self.num_tokens == 1 and self.start > 0

    @property
    def input_pending(self) -> bool:
        """Async scheduling (scheduler side): this decode's input token is still being sampled by the step in
        flight, so the runner reads it on the device. Valid right after scheduling."""
        return self.start >= self.request.num_tokens


_SENT = len(ScheduledChunk._fields) - 1  # every field but the back-reference


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # in scheduling order
    new_requests: list[NewRequest] = field(default_factory=list)  # first scheduled (or resumed) this step
    finished_ids: list[str] = field(default_factory=list)  # ended since the previous plan: runners forget them
    preempted: list[str] = field(default_factory=list)  # request ids preempted this step
    num_batched_tokens: int = 0
    # Async scheduling: blocks ran out while a step was in flight (no preemption then), so scheduling stopped
    # early; the engine finishes the step in flight and schedules the next step synchronously.
    blocked: bool = False

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def new_slots(self) -> list[int]:
        return [n.slot for n in self.new_requests]

    # Sent as columns (one tuple per chunk field, no back-references): a fraction of the pickling time and bytes
    # of a list of objects, which matters at hundreds of decodes per step.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["chunks"] = tuple(zip(*self.chunks))[:_SENT]
        return state

    def __setstate__(self, state):
        cols = state["chunks"]
        state["chunks"] = list(map(tuple.__new__, repeat(ScheduledChunk), zip(*cols, repeat(None)))) if cols else []
        self.__dict__.update(state)


@dataclass
class StepResult:
    # One entry per chunk with sample=True, in plan order.
    sampled_token_ids: list[int] = field(default_factory=list)
    # Per sampled chunk: (chosen token logprob, [(token_id, logprob) top-N]) or None when not asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)

"""The one contract between scheduler and model runner: a StepPlan goes in, a StepResult comes out."""
from __future__ import annotations

from dataclasses import dataclass, field

from strata.core.request import Request


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (== request.num_computed_tokens at schedule time)
    num_tokens: int  # tokens computed this step
    # True when this chunk reaches the end of the known (and pending) tokens, so the step samples a next token.
    sample: bool

    @property
    def input_pending(self) -> bool:
        """Async scheduling: this decode's input token is still being sampled by the step in flight, so the
        runner reads it on the device (its slot's last sampled token). Valid right after scheduling."""
        return self.start >= self.request.num_tokens


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Diff for persistent per-slot device state (runner may ignore it and rebuild from chunks):
    new_slots: list[int] = field(default_factory=list)  # slots first used (or re-used) this step
    freed_slots: list[int] = field(default_factory=list)  # slots released since the previous plan
    preempted: list[str] = field(default_factory=list)  # request ids preempted this step
    num_batched_tokens: int = 0
    # Async scheduling: blocks ran out while a step was in flight (no preemption then), so scheduling stopped
    # early; the engine finishes the step in flight and schedules the next step synchronously.
    blocked: bool = False

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def num_decode(self) -> int:
        return sum(1 for c in self.chunks if c.num_tokens == 1 and c.sample)


@dataclass
class StepResult:
    # One entry per chunk with sample=True, in plan order.
    sampled_token_ids: list[int] = field(default_factory=list)
    # Per sampled chunk: (chosen token logprob, [(token_id, logprob) top-N]) or None when not asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)

"""One `Request` per sequence carries its state end to end.

Scheduling is "computed tokens catch up to known tokens": `num_computed_tokens` advances toward
`num_tokens` (prompt + outputs so far). Prefill, chunked prefill, prefix hits, recompute after
preemption and decode are all the same arithmetic.

With async scheduling a step is scheduled while the previous one still runs on the device: the tokens
that step will sample are `num_pending` (counted when a sampling chunk is scheduled, dropped when the step's
result is applied), and the scheduler works toward `num_tokens + num_pending`. `num_computed_tokens`
advances when a chunk is scheduled, so it may include tokens of a step still in flight.
"""
from __future__ import annotations

import enum
import time

from strata.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, blocks freed, will recompute
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        max_tokens: int,
        parent_id: str | None = None,
        index: int = 0,
        cache_salt: str | None = None,
    ):
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index  # which of the parent's n samples this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.max_tokens = max_tokens  # resolved: never more than max_model_len - prompt length
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.priority = params.priority
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # KV positions scheduled (computed or being computed)
        self.num_pending = 0  # tokens sampled by scheduled steps whose results are not applied yet
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        # Owned by the KV manager: physical block ids in logical order, and the chained hashes of
        # this request's full blocks (prefix of all_token_ids), computed incrementally.
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained SHA-256 of each full block (kvcache/manager.py)
        self.cache_salt = cache_salt  # hashed into the first block: requests with other salts share no blocks
        self.num_registered_blocks = 0  # leading block_ids already offered to the prefix cache
        # Stable per-running-request index into the runner's persistent device state (None when not running).
        self.slot: int | None = None
        self.stop_reason: int | str | None = None
        self.generator = None  # torch.Generator of a seeded request (set by the engine)
        # Structured outputs: the request's grammar state (`strata.structured.RequestGrammar`, set by the engine):
        # admitted once `grammar.ready`; every appended output token is accepted into it.
        self.grammar = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    # ---- token views ----
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.value}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens}, blocks={len(self.block_ids)})")

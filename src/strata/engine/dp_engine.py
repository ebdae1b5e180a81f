"""Data parallelism for serving: `strata serve --data-parallel-size N`.

`DataParallelEngine` has the part of LLMEngine's interface that the server's engine thread (`AsyncLLM`) uses:
`add_request`, `abort_request`, `has_unfinished_requests`, `step`, `get_stats`, `config`, `tokenizer`,
`model_name`, `shutdown`. Behind it run N replica processes (`strata.engine.dp`), each a whole LLMEngine with
its own scheduler, KV cache and GPUs (a replica may itself be TP x PP).

- A request is checked here first (tokenised, vocabulary, length against max_model_len: the same checks and
  errors as one engine, `llm_engine.prompt_ids`), so that bad input fails the caller at once, then goes to the
  replica with the fewest outstanding tokens (prompt + max_tokens of its unfinished requests).
- Each replica streams every step's outputs back with its stats; `step()` returns whatever has arrived from
  any replica, waiting up to 50 ms for something when requests are in flight. Streaming, `n`, stop strings,
  logprobs and aborts therefore behave as on one engine; greedy and seeded outputs are the same.
- A replica that dies makes `step()` raise EngineDeadError: the server then fails the requests in flight
  with a clear error instead of hanging.
"""
from __future__ import annotations

import multiprocessing.connection
from types import SimpleNamespace

from strata.config.engine import EngineArgs
from strata.core.errors import EngineDeadError
from strata.core.outputs import CompletionOutput, RequestOutput
from strata.core.sampling_params import ParameterError, SamplingParams
from strata.engine.dp import DataParallelLLM
from strata.engine.llm_engine import EngineStats, prompt_ids

WAIT_S = 0.05


class DataParallelEngine(DataParallelLLM):
    _stream = True  # replicas send every step's outputs and their stats

    def __init__(self, args: EngineArgs):
        kw = {k: v for k, v in vars(args).items() if k != "model"}
        super().__init__(args.model, **kw)
        self.model_name = self.config.served_model_name
        self.model_config = SimpleNamespace(vocab_size=self.vocab_size)
        self.owner: dict[str, tuple[int, int]] = {}  # request id -> (replica, outstanding-token cost)
        self.stats = [EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0) for _ in range(self.size)]
        self.failed: list[RequestOutput] = []  # requests a replica refused after the checks here

    # ---- requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    arrival_time: float | None = None) -> None:
        if request_id in self.owner:
            raise ParameterError("request_id", f"request id {request_id!r} is already in use")
        ids = prompt_ids(self.tokenizer, self.vocab_size, self.max_model_len, prompt, params)
        r = self.pick()
        cost = (len(ids) + (params.max_tokens or self.max_model_len - len(ids))) * params.n
        self._send(r, ("add", [(request_id, prompt, params, arrival_time)]))
        self.load[r] += cost
        self.dispatched[r] += 1
        self.owner[request_id] = (r, cost)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        by: dict[int, list[str]] = {}
        for rid in ids:
            if rid in self.owner:
                by.setdefault(self.owner[rid][0], []).append(rid)
        for r, xs in by.items():
            self._send(r, ("abort", xs))

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner) or bool(self.failed)

    # ---- the step
    def step(self) -> list[RequestOutput]:
        outs, self.failed = self.failed, []
        busy = sorted({r for r, _ in self.owner.values()})
        if not busy:
            return outs
        waitables = [self._conns[i] for i in busy] + [self._procs[i].sentinel for i in busy]
        ready = multiprocessing.connection.wait(waitables, timeout=0 if outs else WAIT_S)
        for i in busy:
            conn = self._conns[i]
            if conn not in ready and self._procs[i].sentinel not in ready:
                continue
            if not conn.poll() and not self._procs[i].is_alive():
                raise EngineDeadError(f"data-parallel replica {i} died (exit code {self._procs[i].exitcode})")
            while conn.poll():
                msg = self._recv(i)
                if msg[0] == "out":
                    _, got, self.stats[i] = msg
                    for o in got:
                        if o.finished:
                            self._release(o.request_id)
                    outs.extend(got)
                elif msg[0] == "error":  # refused by the replica after passing the checks here (unexpected)
                    _, rid, name, text, _param = msg
                    self._release(rid)
                    outs.append(RequestOutput(rid, None, [], [CompletionOutput(0, finish_reason="error")],
                                              finished=True, error=f"{name}: {text}"))
        return outs

    def _release(self, rid: str) -> None:
        r, cost = self.owner.pop(rid, (None, 0))
        if r is not None:
            self.load[r] -= cost

    def _send(self, r: int, msg) -> None:
        try:
            self._conns[r].send(msg)
        except (OSError, EOFError, BrokenPipeError):
            raise EngineDeadError(f"data-parallel replica {r} died (exit code {self._procs[r].exitcode})") from None

    # ---- what the server reads
    def get_stats(self) -> EngineStats:
        s = self.stats
        return EngineStats(sum(x.num_running for x in s), sum(x.num_waiting for x in s),
                           sum(x.kv_cache_usage for x in s) / len(s), sum(x.num_preemptions_total for x in s),
                           sum(x.prompt_tokens_total for x in s), sum(x.generation_tokens_total for x in s),
                           sum(x.prefix_cache_queries_total for x in s), sum(x.prefix_cache_hits_total for x in s))

"""Data parallelism for the offline API: N independent replicas behind a least-loaded dispatcher.

    llm = DataParallelLLM(model, data_parallel_size=2, tensor_parallel_size=1, ...)   # LLM's arguments
    outs = llm.generate(prompts, params)       # same outputs, same order as LLM(...).generate
    llm.shutdown()

Each replica is a process with its own LLMEngine (its own scheduler and KV cache; TP x PP > 1 replicas start
their own workers), its own block of GPUs (CUDA_VISIBLE_DEVICES) or share of the CPU cores (`placement.py`, the
rule `strata batch --data-parallel-size` uses too), and its own rendezvous port. The parent tokenizes nothing but the load estimate: a request goes to the replica with the
fewest outstanding tokens (prompt + max_tokens of its unfinished requests), ties to the lowest index, so a
batch of prompts is spread evenly by work, not by count; each replica gets its share of a call in one message
(so that its first step sees all of it, as one engine would). Replicas send back finished outputs only.

Greedy and seeded requests give exactly the outputs of one engine. Unseeded random sampling draws from each
replica's own generator, so those differ from a single engine's (as they would between two runs of it with a
different batch composition).
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import time
from typing import Sequence

from strata.config.engine import EngineArgs
from strata.core.errors import EngineDeadError, ParameterError, StrataError
from strata.core.outputs import RequestOutput
from strata.core.sampling_params import SamplingParams
from strata.engine.builder import load_tokenizer, pick_device, resolve_source
from strata.engine.llm_engine import LLMEngine
from strata.engine.placement import place_replicas


def _replica_main(args: EngineArgs, conn, env: dict, stream: bool = False) -> None:
    """One replica's loop. stream=False (DataParallelLLM): finished outputs only. stream=True
    (DataParallelEngine): every step's outputs and the engine's stats."""
    os.environ.update(env)
    try:
        engine = LLMEngine.from_engine_args(args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("fatal", type(e).__name__, str(e), getattr(e, "param", None)))
        return
    conn.send(("ready", engine.config.max_model_len, engine.config, engine.model_config.vocab_size))
    try:
        while True:
            busy = engine.has_unfinished_requests()
            if busy and not conn.poll():
                cmds = []
            else:
                cmds = [conn.recv()]
                while conn.poll():
                    cmds.append(conn.recv())
            for cmd in cmds:
                if cmd[0] == "stop":
                    return
                if cmd[0] == "add":  # a whole call's share at once: the first step sees all of it
                    for rid, prompt, params, *arrival in cmd[1]:
                        try:
                            engine.add_request(rid, prompt, params, arrival_time=arrival[0] if arrival else None)
                        except Exception as e:  # noqa: BLE001 - the caller's bad input
                            conn.send(("error", rid, type(e).__name__, str(e), getattr(e, "param", None)))
                elif cmd[0] == "abort":
                    engine.abort_request(cmd[1])
            if engine.has_unfinished_requests():
                outs = engine.step()
                if stream:
                    conn.send(("out", outs, engine.get_stats()))
                else:
                    done = [o for o in outs if o.finished]
                    if done:
                        conn.send(("out", done))
    finally:
        close = getattr(engine, "shutdown", None)
        if callable(close):
            close()


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class DataParallelLLM:
    _stream = False  # replicas send finished outputs only

    def __init__(self, model: str | None = None, **kwargs):
        args = EngineArgs(model=model, **kwargs)
        n = int(args.data_parallel_size)
        if n < 1:
            raise ParameterError("data_parallel_size", f"data_parallel_size must be >= 1, got {n}")
        if args.nnodes > 1:
            raise ParameterError("nnodes", "DataParallelLLM runs its replicas on this node; for several nodes run "
                                           "one engine per node (or use strata batch / the router)")
        self.size = n
        group = args.tensor_parallel_size * args.pipeline_parallel_size
        self.tokenizer = load_tokenizer(args, resolve_source(args)[0])
        place = place_replicas(n, group, pick_device(args.device), args.num_threads)
        per = {"device": "cuda"} if place.on_gpu else {"device": "cpu", "num_threads": place.num_threads}
        ports = [args.master_port + i for i in range(n)] if args.master_port else _free_ports(n) if group > 1 \
            else [None] * n
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        try:
            for i in range(n):
                a = args.replace(data_parallel_size=1, master_port=ports[i], seed=args.seed, **per)
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_replica_main, args=(a, child, place.env(i), self._stream), name=f"strata-dp{i}")
                p.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(p)
            self.max_model_len = None
            for i, c in enumerate(self._conns):
                msg = self._recv(i)
                if msg[0] == "fatal":
                    _, name, text, param = msg
                    raise ParameterError(param, text) if param else StrataError(f"replica {i}: {name}: {text}")
                self.max_model_len, self.config, self.vocab_size = msg[1], msg[2], msg[3]
        except BaseException:
            self.shutdown()
            raise
        self.load = [0] * n  # outstanding tokens per replica
        self.dispatched = [0] * n  # requests sent to each replica so far
        self._ids = itertools.count()
        self.assigned: dict[str, int] = {}

    def _recv(self, i: int):
        try:
            return self._conns[i].recv()
        except (EOFError, OSError):
            self._procs[i].join(timeout=5)
            raise EngineDeadError(f"data-parallel replica {i} died (exit code {self._procs[i].exitcode})") from None

    def _cost(self, prompt, params: SamplingParams) -> int:
        n = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        return (n + (params.max_tokens or self.max_model_len or 0)) * params.n

    def pick(self) -> int:
        """The least-loaded replica (outstanding tokens), lowest index on ties."""
        return min(range(self.size), key=lambda i: (self.load[i], i))

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [p.get("prompt_token_ids", p.get("prompt")) if isinstance(p, dict) else p for p in prompts]
        sampling_params = sampling_params or SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids, cost = [], {}
        share: list[list] = [[] for _ in range(self.size)]
        for p, sp in zip(prompts, params):
            rid = f"dp-{next(self._ids)}"
            r = self.pick()
            cost[rid] = self._cost(p, sp)
            self.load[r] += cost[rid]
            self.assigned[rid] = r
            self.dispatched[r] += 1
            share[r].append((rid, p, sp))
            ids.append(rid)
        # One message per replica: a replica that started stepping on the first few requests of a call would
        # admit the rest in dribs (admission batching holds late arrivals), unlike one engine given the call.
        for r, items in enumerate(share):
            if items:
                self._conns[r].send(("add", items))
        done: dict[str, RequestOutput] = {}
        pending = set(ids)
        error: Exception | None = None
        while pending:
            live = range(self.size)
            ready = multiprocessing.connection.wait([self._conns[i] for i in live] +
                                                    [self._procs[i].sentinel for i in live])
            for i in live:
                conn = self._conns[i]
                if conn not in ready and self._procs[i].sentinel not in ready:
                    continue
                if not conn.poll() and not self._procs[i].is_alive():
                    code = self._procs[i].exitcode
                    self.shutdown()
                    raise EngineDeadError(f"data-parallel replica {i} died (exit code {code})")
                while conn.poll():
                    msg = self._recv(i)
                    if msg[0] == "out":
                        finished = msg[1]
                    elif msg[0] == "error":
                        _, rid, name, text, param = msg
                        if error is None:  # fail the call as LLM.generate does: abort the rest, then raise
                            error = ParameterError(param, text) if param else StrataError(f"{name}: {text}")
                            self._abort(sorted(pending - {rid}))
                        finished = [rid]
                    else:
                        continue
                    for o in finished:
                        rid = o if isinstance(o, str) else o.request_id
                        if rid in self.assigned:
                            self.load[self.assigned.pop(rid)] -= cost.get(rid, 0)
                        if rid in pending:
                            pending.discard(rid)
                            if not isinstance(o, str):
                                done[rid] = o
        if error is not None:
            raise error
        return [done[i] for i in ids]

    def _abort(self, rids: list[str]) -> None:
        by: dict[int, list[str]] = {}
        for rid in rids:
            if rid in self.assigned:
                by.setdefault(self.assigned[rid], []).append(rid)
        for r, xs in by.items():
            self._conns[r].send(("abort", xs))

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = False, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                      **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def shutdown(self) -> None:
        for c in getattr(self, "_conns", []):
            try:
                c.send(("stop",))
            except (OSError, EOFError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 30
        for p in getattr(self, "_procs", []):
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._conns, self._procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001
            pass

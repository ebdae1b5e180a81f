"""Multiprocess executor: one model replica over TP x PP ranks, behind ModelRunner's interface.

    executor.execute(plan) -> StepResult        executor.device        executor.shutdown()

The engine process is global rank 0, the driver. Per step it turns the StepPlan into a picklable StepMsg
(strata.parallel.stage; block tables travel as per-slot diffs), broadcasts it (through a shared-memory ring when
every rank is a process it spawned on this node, else on the gloo control group), runs its own stage like every other
rank, and samples: the logits are its own (PP = 1: the driver is TP rank 0 of the only stage) or come back from
TP rank 0 of the last stage (PP > 1; argmax ids only, when every row is greedy). Only the driver holds
Request objects, so penalties, seeds and logprobs work exactly as in ModelRunner.

Startup, in order: model config read and the layout checked against it (strata.parallel.launch: heads, layers,
world size, master address), tokenizer loaded; only then workers are spawned, the process groups made and each
rank loads its own shards. A rank that fails to load reports its error to all (the driver raises it); the KV pool
is the smallest any rank can hold, so every rank's cache has the same block count.

Failure: a worker that dies (its process sentinel fires, or a collective fails because its sockets closed)
marks the executor dead: the step in flight and every later one raise EngineDeadError, the other workers are
killed, and nothing waits for them. Collectives between ranks time out after --dist-timeout; the control group
does not (an idle engine waits for requests), but fails at once when a peer dies.

Diagnostics: STRATA_HANG_DUMP_S=N makes every rank print all its threads' Python stacks when its startup or
one step takes longer than N seconds (faulthandler), to see where a hung collective sits.
"""
from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import multiprocessing.connection
import os
import threading
import time
import traceback
from dataclasses import fields

import torch

from strata.config.engine import EngineArgs, EngineConfig
from strata.core.errors import EngineDeadError, ModelLoadError, ParameterError, StrataError
from strata.core.plan import StepPlan, StepResult
from strata.layers.sampler import Sampler, SamplingBatch
from strata.runner.model_runner import StepHandle
from strata.parallel import state as ps
from strata.parallel.launch import ParallelSpec, check_master, needs_executor, resolve_spec  # noqa: F401
from strata.parallel.stage import MsgEncoder, StageRunner, runner_order

log = logging.getLogger("strata.executor")
_HANG_S = float(os.environ.get("STRATA_HANG_DUMP_S") or 0)  # diagnostics: stacks of a rank stuck this long


def _arm(what: str) -> None:
    """With STRATA_HANG_DUMP_S set, print every thread's stack if `what` (startup, a step) takes longer."""
    if _HANG_S > 0:
        faulthandler.dump_traceback_later(_HANG_S, exit=False)


def _disarm() -> None:
    if _HANG_S > 0:
        faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------------------------------- every rank
class _Rank:
    """What one rank holds after startup."""

    def __init__(self, spec: ParallelSpec, rank: int, model_cfg, model, stage: StageRunner, device, dtype,
                 num_blocks: int, max_model_len: int, max_num_batched_tokens: int):
        self.spec, self.rank, self.model_cfg, self.model, self.stage = spec, rank, model_cfg, model, stage
        self.device, self.dtype = device, dtype
        self.num_blocks, self.max_model_len, self.max_num_batched_tokens = (num_blocks, max_model_len,
                                                                            max_num_batched_tokens)
        self.chan = None  # ShmBroadcast for step messages (one node, spawned ranks), else gloo


def _open_channel(spec: ParallelSpec, rank: int):
    """The step-message channel: shared memory when every rank is a process this node's driver spawned (they
    exit with it), else None (gloo broadcasts). Rank 0 creates it and tells the others its name over gloo."""
    if spec.world_size == 1 or spec.nnodes != 1 or spec.launcher != "spawn" or os.environ.get("STRATA_CTRL") == "gloo":
        return None
    from strata.parallel.shm_channel import ShmBroadcast
    chan = None
    if rank == 0:
        try:
            chan = ShmBroadcast.create(readers=spec.world_size - 1)
        except Exception as e:  # noqa: BLE001 - no /dev/shm: stay on gloo
            log.warning("shared-memory control channel unavailable (%s); using gloo", e)
    name = ps.broadcast_object(chan.name if chan is not None else None)
    if rank != 0 and name is not None:
        chan = ShmBroadcast.attach(name, readers=spec.world_size - 1, index=rank - 1)
    return chan


def _recv_ctrl(r: "_Rank"):
    """A worker's next control message (from the driver's `_send_ctrl`)."""
    if r.chan is not None:
        obj, ok = r.chan.recv()
        if ok:
            return obj
    return ps.broadcast_object(None)


class _Handler:
    """Methods the driver may call on every rank at once (`MultiprocExecutor.collective_rpc`)."""

    def __init__(self, r: _Rank):
        self.r = r

    def pid(self) -> int:
        return os.getpid()

    def comm_stats(self) -> dict:
        return ps.comm_stats()

    def reset_comm_stats(self) -> None:
        ps.reset_comm_stats()

    def set_comm_overlap(self, enabled: bool, chunks: int | None = None, min_tokens: int | None = None) -> int:
        from strata.parallel.overlap import apply_comm_overlap
        return apply_comm_overlap(self.r.model, enabled, chunks=chunks, min_tokens=min_tokens)

    def stage_graph_runs(self) -> int:
        """Decode micro-batches this rank ran through its stage graphs (STRATA_PP_GRAPHS=1), -1 if off."""
        sg = self.r.stage.stage_graphs
        return -1 if sg is None else sg.runs

    def layer_range(self) -> tuple[int, int]:
        return getattr(self.r.model, "start_layer", 0), getattr(self.r.model, "end_layer", 0)

    def memory(self) -> dict:
        params = sum(p.numel() * p.element_size() for p in self.r.model.parameters())
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in self.r.stage.runner.kv_caches)
        out = {"weights_bytes": params, "kv_cache_bytes": kv}
        if self.r.device.type == "cuda":
            out["max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.r.device)
        return out


def _err_info(e: BaseException) -> tuple[str, str, str | None]:
    return type(e).__name__, str(e), getattr(e, "param", None)


def _raise_remote(rank: int, info) -> None:
    name, msg, param = info
    text = msg if rank == 0 else f"rank {rank}: {msg}"
    if param is not None:
        raise ParameterError(param, text)
    if name in ("ModelLoadError", "UnsupportedArchitectureError", "FileNotFoundError"):
        raise ModelLoadError(text)
    raise StrataError(f"{name}: {text}")


def _resolve(args: EngineArgs):
    from strata.models.config import model_config_from_dict
    from strata.models.loader import resolve_model
    overrides = json.loads(args.hf_overrides) if isinstance(args.hf_overrides, str) else args.hf_overrides
    source = resolve_model(args.model, overrides)
    return source, model_config_from_dict(source.config)


def _init_rank(args: EngineArgs, spec: ParallelSpec, rank: int, source, model_cfg) -> _Rank:
    """Join the process groups, load this rank's shards, agree on the KV pool. Raises the first rank's error."""
    from strata.engine.llm_engine import _pick_dtype, build_model
    from strata.runner.memory import plan_memory

    if spec.device_type == "cuda":
        torch.cuda.set_device(spec.local_rank_of(rank))
    if spec.nnodes == 1 and not os.environ.get("GLOO_SOCKET_IFNAME"):
        # gloo (CPU data plane, and the control group everywhere) otherwise binds to the address the hostname
        # resolves to, which in some VMs and containers is not reachable; one node talks over loopback.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ps.init_parallel(tensor_parallel_size=spec.tp, pipeline_parallel_size=spec.pp, rank=rank,
                     world_size=spec.world_size, backend=spec.backend, init_method=spec.init_method,
                     timeout_s=spec.timeout_s, enable_expert_parallel=spec.enable_expert_parallel,
                     ep_dispatch=spec.ep_dispatch)
    if spec.pp_layer_partition:
        model_cfg.pp_layer_partition = list(spec.pp_layer_partition)
    device = spec.device_of(rank)
    err, model, mem, dtype = None, None, None, None
    try:
        dtype = _pick_dtype(args.dtype, device, model_cfg)
        model = build_model(device, dtype, args.load_format, model_cfg, source)
        if spec.tp_comm_overlap:
            from strata.parallel.overlap import apply_comm_overlap
            apply_comm_overlap(model)
        if ps.enable_fast_allreduce(torch.device(device), dtype):
            log.info("rank %d: TP all-reduces up to 8 MiB through symmetric memory", rank)
        mem = plan_memory(args, model_cfg, device, dtype, model)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        if rank != 0:
            log.error("rank %d failed to load:\n%s", rank, traceback.format_exc())
        err = e
    infos = ps.all_gather_objects(None if err is None else _err_info(err))
    bad = [(r, i) for r, i in enumerate(infos) if i is not None]
    if bad:
        if err is not None and rank == 0:
            raise err
        _raise_remote(*bad[0])
    nb, mml, mnbt = ps.all_reduce_min_ints([mem.num_blocks, mem.max_model_len, mem.max_num_batched_tokens])
    stage = StageRunner(model, device=torch.device(device), dtype=dtype, block_size=args.block_size,
                        hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, driver_rank=0,
                        last_stage_rank=spec.last_stage_driver_rank, max_num_seqs=args.max_num_seqs,
                        max_model_len=mml,
                        # all-to-all EP dispatch sizes its messages from the routing on the host: not capturable
                        enforce_eager=args.enforce_eager or (spec.enable_expert_parallel and
                                                             spec.ep_dispatch == "all_to_all" and
                                                             bool(model_cfg.num_experts)))
    stage.allocate_kv_cache(nb)
    r = _Rank(spec, rank, model_cfg, model, stage, torch.device(device), dtype, nb, mml, mnbt)
    r.chan = _open_channel(spec, rank)
    return r


def _serve(r: _Rank) -> None:
    """A worker's loop: run what the driver broadcasts until it says stop."""
    handler = _Handler(r)
    while True:
        msg = _recv_ctrl(r)
        kind = msg[0]
        if kind == "step":
            _arm("step")
            r.stage.run(msg[1])
            _disarm()
        elif kind == "rpc":
            ps.gather_objects(getattr(handler, msg[1])(*msg[2]))
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"unknown control message {kind!r}")


def _watch_parent(parent_pid: int) -> None:
    """A spawned worker whose engine process is gone exits (NCCL peers may not notice a dead driver)."""
    def loop():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(1.0)
    threading.Thread(target=loop, name="strata-parent-watch", daemon=True).start()


def _worker_main(args: EngineArgs, spec: ParallelSpec, rank: int, parent_pid: int | None = None) -> int:
    if parent_pid is not None:
        _watch_parent(parent_pid)
    if spec.device_type == "cpu":
        torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 1) // spec.ranks_per_node))
    try:
        _arm("startup")
        source, model_cfg = _resolve(args)
        r = _init_rank(args, spec, rank, source, model_cfg)
        _disarm()
    except Exception as e:  # noqa: BLE001 - the driver reports it
        log.debug("rank %d startup failed: %s", rank, e)
        return 1
    try:
        _serve(r)
    except Exception as e:  # noqa: BLE001 - a peer died or a step failed: this rank is done
        log.error("rank %d stopped: %s: %s", rank, type(e).__name__, e)
        return 1
    r.stage.release_graphs()
    if r.chan is not None:
        r.chan.close()
    _teardown(True)
    return 0


def _spawned_worker(args: EngineArgs, spec: ParallelSpec, rank: int, parent_pid: int, ready) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s")
    ready.send(os.getpid())
    ready.close()
    os._exit(_worker_main(args, spec, rank, parent_pid))


def _spawn(args: EngineArgs, spec: ParallelSpec, ranks: list[int], timeout_s: float = 120.0) -> list:
    """Start the given ranks; return once each has started running (or raise if one dies first)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    procs, pending = [], {}
    try:
        for rank in ranks:
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_spawned_worker, args=(args, spec, rank, os.getpid(), send), daemon=True,
                            name=f"strata-rank{rank}")
            p.start()
            send.close()
            procs.append((rank, p))
            pending[recv] = (rank, p)
        deadline = time.monotonic() + timeout_s
        while pending:
            waitables = list(pending) + [p.sentinel for _, p in pending.values()]
            ready = multiprocessing.connection.wait(waitables, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise StrataError(f"worker ranks {[r for r, _ in pending.values()]} did not start within "
                                  f"{timeout_s:.0f}s")
            for conn in list(pending):
                rank, p = pending[conn]
                if conn in ready or p.sentinel in ready:
                    try:
                        conn.recv()
                    except EOFError:
                        p.join(timeout=5)
                        raise StrataError(
                            f"worker rank {rank} exited with code {p.exitcode} while starting. A script that "
                            f"builds a parallel engine must guard its entry point with "
                            f"`if __name__ == \"__main__\":` (workers are spawned and re-import it)") from None
                    conn.close()
                    del pending[conn]
    except BaseException:
        _kill(procs)
        raise
    return procs


def _kill(procs) -> None:
    for _, p in procs:
        if p.is_alive():
            p.kill()
    for _, p in procs:
        p.join(timeout=5)


TEARDOWN_S = 20.0


def _teardown(destroy: bool) -> None:
    """Leave the process groups. gloo tears down without talking to peers; a NCCL group with a dead peer
    may block in teardown, so it is only forgotten. A clean teardown that does not finish within TEARDOWN_S
    (NCCL waits for its peers and for every captured graph to be destroyed) is abandoned, not waited on."""
    if destroy:
        done = threading.Event()

        def run():
            try:
                ps.destroy_parallel()
            except Exception:  # noqa: BLE001
                pass
            done.set()

        threading.Thread(target=run, name="strata-teardown", daemon=True).start()
        if done.wait(TEARDOWN_S):
            return
        log.warning("process-group teardown did not finish in %.0f s; leaving it", TEARDOWN_S)
    ps.forget_parallel()


# ------------------------------------------------------------------------------------------- the driver
class _PipelinedStep:
    """A step in the pipeline. `result()` waits for the last stage's replies (when they were deferred) and
    samples on the driver, as a synchronous step does."""

    def __init__(self, ex: "MultiprocExecutor", plan, sample_chunks, batch, greedy_ids, outs, replies):
        self.ex, self.plan, self.sample_chunks, self.batch = ex, plan, sample_chunks, batch
        self.greedy_ids, self.outs, self.replies = greedy_ids, outs, replies

    def result(self) -> StepResult:
        outs, ex = self.outs, self.ex
        if self.replies is not None:
            with ex._lock:
                ex._check()
                try:
                    _arm("step")
                    outs = self.replies()
                    _disarm()
                except Exception as e:
                    time.sleep(0.2)  # let the monitor name the dead worker, when that is the cause
                    ex._die(ex._dead or f"step failed: {type(e).__name__}: {e}")
                    raise EngineDeadError(f"the parallel engine is dead: {ex._dead}") from e
        return ex._finish(self.plan, self.sample_chunks, self.batch, self.greedy_ids, outs)


class MultiprocExecutor:
    """Driver side: `execute(plan) -> StepResult`, `device`, `model` (rank 0's shard), `shutdown()`."""

    def __init__(self, r: _Rank, procs: list, seed: int):
        self._r = r
        self.spec = r.spec
        self.model = r.model
        self.device = r.device
        self.dtype = r.dtype
        self.stage = r.stage
        self.sampler = Sampler(seed, r.device)
        self._handler = _Handler(r)
        self._procs = procs  # [(rank, Process)] spawned by this process
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closed = False
        self.encoder = MsgEncoder()
        self._launch_stats = [0, 0.0, 0]  # StepHandle's accounting slot (unused here)
        self.logits_hook = None  # tests: called with the [rows, vocab] logits the driver samples from
        self.sample_on_last_stage = True  # PP > 1, all-greedy steps: the last stage returns argmax ids only
        if procs:
            threading.Thread(target=self._monitor, name="strata-worker-monitor", daemon=True).start()
        atexit.register(self.shutdown)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for _, p in self._procs]

    # ---- failure handling
    def _monitor(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in self._procs}
        while sentinels and not self._closed:
            for s in multiprocessing.connection.wait(list(sentinels), timeout=1.0):
                rank, p = sentinels.pop(s)
                p.join(timeout=1)
                if not self._closed:
                    self._die(f"worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}")

    def _die(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
            log.error("parallel engine is dead: %s", reason)
        for _, p in self._procs:  # the survivors cannot continue without their peer
            if p.is_alive():
                p.kill()
        if self.spec.backend == "nccl":  # a collective blocked on a dead NCCL peer never returns by itself
            abort = getattr(torch.distributed.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # noqa: BLE001
                    pass

    def _check(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the parallel engine is dead: {self._dead}")
        if self._closed:
            raise EngineDeadError("the parallel engine was shut down")

    def _send_ctrl(self, msg) -> None:
        """Broadcast a control message to every worker (shared memory on one node, else gloo)."""
        chan = self._r.chan
        if chan is not None and chan.send(msg, stop=lambda: self._dead is not None):
            return
        ps.broadcast_object(msg)

    # ---- the step
    def _run_step(self, msg, after=None, defer: bool = False):
        """Broadcast the step and run the driver's stage (then `after(outs)`, under the same lock and failure
        handling). Returns what `after` returns, or the stage's outputs."""
        with self._lock:
            self._check()
            try:
                _arm("step")
                self._send_ctrl(("step", msg))
                outs = self.stage.run(msg, defer=defer)
                out = after(outs) if after is not None else outs
                _disarm()
                return out
            except Exception as e:
                time.sleep(0.2)  # let the monitor name the dead worker, when that is the cause
                self._die(self._dead or f"step failed: {type(e).__name__}: {e}")
                raise EngineDeadError(f"the parallel engine is dead: {self._dead}") from e

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch_pipelined(plan, defer=False).result()

    @property
    def supports_batch_queue(self) -> bool:
        """Several steps in flight through the pipeline stages (PP > 1)."""
        return self.spec.pp > 1

    def launch_pipelined(self, plan: StepPlan, defer: bool = True) -> "_PipelinedStep":
        """Broadcast the step and run the driver's stage; with `defer` (PP > 1) the last stage's replies are
        collected by `result()`, so that the next step can enter the pipeline first (batch queue)."""
        self._check()
        ordered = runner_order(plan)
        sample_chunks = [c for c in ordered if c.sample]
        batch = SamplingBatch([c.request for c in sample_chunks]) if sample_chunks else None
        greedy_ids = (batch is not None and self.spec.pp > 1 and self.sample_on_last_stage and batch.all_greedy
                      and not batch.any_penalty and not batch.any_min_tokens and batch.max_logprobs is None)
        msg, _ = self.encoder.encode(plan, self.spec.pp, greedy_ids)
        defer = defer and self.spec.pp > 1
        outs = self._run_step(msg, defer=defer)
        return _PipelinedStep(self, plan, sample_chunks, batch, greedy_ids, outs if not defer else None,
                              outs if defer else None)

    def _finish(self, plan, sample_chunks, batch, greedy_ids, outs) -> StepResult:
        if not sample_chunks:
            return StepResult()
        if greedy_ids:
            tokens, lps = torch.cat(outs).tolist(), [None] * len(sample_chunks)
        else:
            logits = torch.cat(outs)  # [rows, vocab], rows in ModelRunner's sampling order
            if self.logits_hook is not None:
                self.logits_hook(logits)
            tokens, lps = self.sampler(logits, batch)
        by_chunk = {id(c): i for i, c in enumerate(sample_chunks)}
        result = StepResult()
        for c in plan.chunks:
            if c.sample:
                i = by_chunk[id(c)]
                result.sampled_token_ids.append(tokens[i])
                result.logprobs.append(lps[i] if lps is not None else None)
        return result

    @property
    def supports_async(self) -> bool:
        """Overlapped steps need the sampled ids on every rank's device: one pipeline stage only."""
        return self.spec.pp == 1

    def launch(self, plan: StepPlan) -> StepHandle:
        """Overlapped steps (PP = 1): queue the step on every rank and sample on the driver's device without
        waiting; the sampled ids are broadcast over the TP group on the device, so that the next step, launched
        before this one's tokens reach the host, reads its pending inputs from every rank's last_sampled."""
        self._check()
        ordered = runner_order(plan)
        sample_chunks = [c for c in ordered if c.sample]
        batch = SamplingBatch([c.request for c in sample_chunks]) if sample_chunks else None
        msg, _ = self.encoder.encode(plan, 1, False, share_tokens=True)

        def sample(outs):
            if not sample_chunks:
                return None, None
            logits = torch.cat(outs)
            if self.logits_hook is not None:
                self.logits_hook(logits)
            tokens, lps = self.sampler.sample(logits, batch)
            self.stage.share_tokens(msg, tokens)
            return tokens, lps

        tokens, lps = self._run_step(msg, sample)
        return StepHandle(plan, sample_chunks, batch, tokens, lps, self._launch_stats)

    def collective_rpc(self, method: str, *args) -> list:
        """Call `_Handler.method(*args)` on every rank; returns the results in rank order."""
        self._check()
        with self._lock:
            try:
                self._send_ctrl(("rpc", method, args))
                mine = getattr(self._handler, method)(*args)
                return ps.gather_objects(mine)
            except Exception as e:
                self._die(self._dead or f"rpc {method} failed: {type(e).__name__}: {e}")
                raise EngineDeadError(f"the parallel engine is dead: {self._dead}") from e

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._dead is None:
            try:
                with self._lock:
                    self._send_ctrl(("stop",))
            except Exception:  # noqa: BLE001
                self._dead = "shutdown failed"
        if self._dead is None:
            self.stage.release_graphs()  # NCCL teardown waits for graphs that captured its collectives
        for _, p in self._procs:
            p.join(timeout=10)
        _kill(self._procs)
        if self._r.chan is not None:
            self._r.chan.close()
        _teardown(self._dead is None or self.spec.backend == "gloo")
        atexit.unregister(self.shutdown)


# ------------------------------------------------------------------------------------------- building
def _engine_config(args: EngineArgs, source, r: _Rank, served_name: str) -> EngineConfig:
    on_gpu = r.device.type == "cuda"
    resolved = dict(model_path=source.path, model_format=source.format, served_model_name=served_name,
                    device=str(r.device), dtype=r.dtype, max_model_len=r.max_model_len, num_blocks=r.num_blocks,
                    max_num_batched_tokens=r.max_num_batched_tokens,
                    # the same auto rule as one process (it was left at 0, i.e. 1, here: no admission batching)
                    admit_batch=args.admit_batch or (max(1, args.max_num_seqs // 16) if on_gpu else 1),
                    # default (None): on for GPUs, where a 2 x H200 run gave TP=2 overlapped greedy outputs equal
                    # to TP=1's (float32, 8/8); PP engines step synchronously
                    async_scheduling=(on_gpu if args.async_scheduling is None else bool(args.async_scheduling))
                    and r.spec.pp == 1)
    kw = {f.name: resolved[f.name] if f.name in resolved else getattr(args, f.name) for f in fields(EngineConfig)}
    return EngineConfig(**kw)


def _run_headless(args: EngineArgs, spec: ParallelSpec, source, model_cfg) -> None:
    """Nodes other than 0 (or ranks other than 0 under torchrun/srun): serve the driver, then exit."""
    procs = _spawn(args, spec, spec.node_ranks[1:]) if spec.launcher == "spawn" else []
    log.info("node %d: ranks %s serve the driver at %s", spec.node_rank,
             spec.node_ranks if spec.launcher == "spawn" else [spec.rank], spec.init_method)
    code = _worker_main(args, spec, spec.rank)
    for _, p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    raise SystemExit(code)


def build_parallel_engine(engine_cls, args: EngineArgs):
    """LLMEngine.from_engine_args for TP x PP > 1, several nodes, or a torchrun/srun rank."""
    from strata.engine.llm_engine import load_tokenizer

    if ps.is_initialized():
        raise StrataError("a parallel engine is already running in this process; shut it down first "
                          "(engine.shutdown())")
    source, model_cfg = _resolve(args)
    spec = resolve_spec(args, model_cfg)  # bad layouts fail here, before any weights are read
    check_master(spec)
    if spec.rank != 0:
        _run_headless(args, spec, source, model_cfg)
    tokenizer = load_tokenizer(args, source)
    if spec.device_type == "cpu" and args.num_threads:
        torch.set_num_threads(args.num_threads)
    procs = _spawn(args, spec, spec.node_ranks[1:]) if spec.launcher == "spawn" else []
    try:
        _arm("startup")
        r = _init_rank(args, spec, 0, source, model_cfg)
        _disarm()
    except BaseException:
        _kill(procs)
        _teardown(spec.backend == "gloo")
        raise
    name = args.served_model_name or (os.path.basename(os.path.normpath(source.path)) if args.model else
                                      "SmolLM2-135M-Instruct")
    config = _engine_config(args, source, r, name)
    executor = MultiprocExecutor(r, procs, config.seed)
    log.info("parallel engine: TP %d x PP %d over %d node(s), %s; KV pool %d blocks", spec.tp, spec.pp,
             spec.nnodes, spec.backend, r.num_blocks)
    engine = engine_cls(config, model_cfg, tokenizer, executor)
    engine.shutdown = executor.shutdown
    return engine

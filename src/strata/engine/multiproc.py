"""The multiprocess executor: one model replica over TP x PP ranks, behind the Executor interface.

The engine process is global rank 0, the driver. Per step it broadcasts the StepPlan itself (through a
shared-memory ring when every rank is a process it spawned on this node, else on the gloo control group), then
runs it in its own ModelRunner like every other rank; the driver's runner samples (strata.runner.model_runner).

Startup, in order: model config read and the layout checked against it (strata.engine.launch: heads, layers,
world size, master address), tokenizer loaded; only then workers are spawned, the process groups made and each
rank loads its own shards. A rank that fails to load reports its error to all (the driver raises it); the KV pool
is the smallest any rank can hold, so every rank's cache has the same block count, and every rank resolves its
EngineConfig from the same arguments and figures (`builder.resolve_config`).

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
import logging
import multiprocessing.connection
import os
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp

from strata import settings
from strata.config.engine import EngineArgs, EngineConfig
from strata.core.errors import EngineDeadError, ModelLoadError, ParameterError, StrataError
from strata.core.plan import StepPlan
from strata.engine.builder import LoadedRank, load_rank, load_tokenizer, resolve_config, resolve_source
from strata.engine.executor import Executor, RankHandler
from strata.engine.launch import ParallelSpec, check_master, resolve_spec
from strata.layers.overlap import apply_comm_overlap
from strata.parallel import state as ps
from strata.parallel.shm_channel import ShmBroadcast
from strata.runner.model_runner import ModelRunner, StepHandle

log = logging.getLogger("strata.executor")


def _arm() -> None:
    """With STRATA_HANG_DUMP_S set, print every thread's stack if startup or a step takes longer."""
    s = settings.HANG_DUMP_S.get()
    if s > 0:
        faulthandler.dump_traceback_later(s, exit=False)


def _disarm() -> None:
    if settings.HANG_DUMP_S.get() > 0:
        faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------------------------------- every rank
class _Rank:
    """What one rank holds after startup."""

    def __init__(self, spec: ParallelSpec, config: EngineConfig, runner: ModelRunner, chan: ShmBroadcast | None):
        self.spec, self.config, self.runner, self.chan = spec, config, runner, chan


def _open_channel(spec: ParallelSpec, rank: int) -> ShmBroadcast | None:
    """The step-message channel: shared memory when every rank is a process this node's driver spawned (they
    exit with it), else None (gloo broadcasts). Rank 0 creates it and tells the others its name over gloo."""
    if spec.world_size == 1 or spec.nnodes != 1 or spec.launcher != "spawn" or settings.CTRL.get() == "gloo":
        return None
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


def _recv_ctrl(r: _Rank):
    """A worker's next control message (from the driver's `_send_ctrl`)."""
    if r.chan is not None:
        obj, ok = r.chan.recv()
        if ok:
            return obj
    return ps.broadcast_object(None)


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


def _load(args: EngineArgs, spec: ParallelSpec, rank: int, source, model_cfg, device: str) -> LoadedRank:
    loaded = load_rank(args, source, model_cfg, device)
    if spec.tp_comm_overlap:
        apply_comm_overlap(loaded.model)
    if settings.TP_ALLREDUCE.get() == "symm_mem" and ps.enable_fast_allreduce(torch.device(device), loaded.dtype):
        log.info("rank %d: TP all-reduces up to 8 MiB through symmetric memory", rank)
    return loaded


def _init_rank(args: EngineArgs, spec: ParallelSpec, rank: int, source, model_cfg) -> _Rank:
    """Join the process groups, load this rank's shards, agree on the KV pool. Raises the first rank's error."""
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
    err, loaded = None, None
    try:
        loaded = _load(args, spec, rank, source, model_cfg, device)
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
    mins = ps.all_reduce_min_ints([loaded.num_blocks, loaded.max_model_len, loaded.max_num_batched_tokens])
    loaded.num_blocks, loaded.max_model_len, loaded.max_num_batched_tokens = mins
    config = resolve_config(args, source, model_cfg, device, loaded)
    runner = ModelRunner(loaded.model, config)
    runner.allocate_kv_cache(config.num_blocks)
    return _Rank(spec, config, runner, _open_channel(spec, rank))


def _serve(r: _Rank) -> None:
    """A worker's loop: run what the driver broadcasts until it says stop."""
    handler = RankHandler(r.runner)
    while True:
        msg = _recv_ctrl(r)
        kind = msg[0]
        if kind == "step":
            _arm()
            r.runner.launch(msg[1])
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
        _arm()
        source, model_cfg = resolve_source(args)
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
    r.runner.release_graphs()
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
class MultiprocExecutor(Executor):
    """Driver side. `worker_pids` lists the processes it spawned."""

    def __init__(self, r: _Rank, procs: list):
        super().__init__(r.runner, r.config)
        self._r = r
        self.spec = r.spec
        self._procs = procs  # [(rank, Process)] spawned by this process
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closed = False
        if procs:
            threading.Thread(target=self._monitor, name="strata-worker-monitor", daemon=True).start()
        atexit.register(self.shutdown)

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

    def _on_every_rank(self, msg, run_here, what: str):
        """Send a control message, then run its driver side, under the lock and the failure handling."""
        return self._guarded(lambda: (self._send_ctrl(msg), run_here())[1], what)

    def _guarded(self, run, what: str):
        """run() under the lock and the failure handling: any error marks the engine dead (EngineDeadError)."""
        with self._lock:
            self._check()
            try:
                _arm()
                out = run()
                _disarm()
                return out
            except Exception as e:
                time.sleep(0.2)  # let the monitor name the dead worker, when that is the cause
                self._die(self._dead or f"{what} failed: {type(e).__name__}: {e}")
                raise EngineDeadError(f"the parallel engine is dead: {self._dead}") from e

    # ---- the executor
    def launch(self, plan: StepPlan) -> StepHandle:
        handle = self._on_every_rank(("step", plan), lambda: self.runner.launch(plan), "step")
        if handle.needs_grammar:
            # Structured outputs: the engine samples later, and sampling broadcasts the ids to the TP workers (a
            # collective that a dead NCCL peer would block until the monitor aborts the group): the same failure
            # handling as the launch, so it ends in EngineDeadError.
            sample = handle.sample
            handle.sample = lambda rows, bitmask: self._guarded(lambda: sample(rows, bitmask), "sampling")
        return handle

    def collective_rpc(self, method: str, *args) -> list:
        return self._on_every_rank(("rpc", method, args),
                                   lambda: ps.gather_objects(getattr(self.handler, method)(*args)), f"rpc {method}")

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
            self.runner.release_graphs()  # NCCL teardown waits for graphs that captured its collectives
        for _, p in self._procs:
            p.join(timeout=10)
        _kill(self._procs)
        if self._r.chan is not None:
            self._r.chan.close()
        _teardown(self._dead is None or self.spec.backend == "gloo")
        atexit.unregister(self.shutdown)


# ------------------------------------------------------------------------------------------- building
def _run_headless(args: EngineArgs, spec: ParallelSpec) -> None:
    """Nodes other than 0 (or ranks other than 0 under torchrun/srun): serve the driver, then exit."""
    procs = _spawn(args, spec, spec.node_ranks[1:]) if spec.launcher == "spawn" else []
    log.info("node %d: ranks %s serve the driver at %s", spec.node_rank,
             spec.node_ranks if spec.launcher == "spawn" else [spec.rank], spec.init_method)
    code = _worker_main(args, spec, spec.rank)
    for _, p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    raise SystemExit(code)


def build_multiproc(args: EngineArgs):
    """TP x PP > 1, several nodes, or a torchrun/srun rank: (config, model config, tokenizer, executor) on the
    driver; every other rank serves the driver here and exits."""
    if ps.is_initialized():
        raise StrataError("a parallel engine is already running in this process; shut it down first "
                          "(engine.shutdown())")
    source, model_cfg = resolve_source(args)
    spec = resolve_spec(args, model_cfg)  # bad layouts fail here, before any weights are read
    check_master(spec)
    if spec.rank != 0:
        _run_headless(args, spec)
    tokenizer = load_tokenizer(args, source)
    if spec.device_type == "cpu" and args.num_threads:
        torch.set_num_threads(args.num_threads)
    procs = _spawn(args, spec, spec.node_ranks[1:]) if spec.launcher == "spawn" else []
    try:
        _arm()
        r = _init_rank(args, spec, 0, source, model_cfg)
        _disarm()
    except BaseException:
        _kill(procs)
        _teardown(spec.backend == "gloo")
        raise
    executor = MultiprocExecutor(r, procs)
    log.info("parallel engine: TP %d x PP %d over %d node(s), %s; KV pool %d blocks", spec.tp, spec.pp,
             spec.nnodes, spec.backend, r.config.num_blocks)
    return r.config, model_cfg, tokenizer, executor

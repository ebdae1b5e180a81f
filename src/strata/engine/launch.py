"""Where each rank of one model replica runs, and the checks that happen before any model is loaded.

One replica is a TP x PP mesh of `world_size` ranks (DP replicas are separate engines: `strata.engine.dp`).
The executor that runs on those ranks is `strata.engine.multiproc`.
Rank r holds pipeline stage r // TP and TP rank r % TP (TP innermost, so TP stays inside a node).

Launchers:
  spawn  the engine process is global rank 0 (the driver) and starts the other ranks of its node with
         torch.multiprocessing (spawn). With --nnodes N every node runs the same command with its
         --node-rank; node n hosts ranks [n*W/N, (n+1)*W/N). Nodes other than 0 run only workers and exit
         when the driver shuts down.
  env    one process per rank, started by torchrun or srun: RANK / WORLD_SIZE / LOCAL_RANK (or SLURM_PROCID /
         SLURM_NTASKS / SLURM_LOCALID), MASTER_ADDR / MASTER_PORT. Rank 0 runs the engine, the others serve it
         and exit. `auto` picks env under torchrun (TORCHELASTIC_RUN_ID set), spawn otherwise: plain RANK /
         WORLD_SIZE are left alone because `strata batch` uses them for data shards.

Every address and port comes from EngineArgs or the environment; a single-node spawn with no port given binds
a free one.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from strata.core.errors import ParameterError
from strata.models.config import ModelConfig


@dataclass(frozen=True)
class ParallelSpec:
    tp: int
    pp: int
    enable_expert_parallel: bool
    pp_layer_partition: tuple[int, ...] | None
    launcher: str  # "spawn" | "env"
    world_size: int
    nnodes: int
    node_rank: int
    ranks_per_node: int
    rank: int  # this process's global rank (spawn: the first rank of this node)
    local_rank: int
    master_addr: str
    master_port: int
    device_type: str  # "cpu" | "cuda"
    backend: str  # "gloo" | "nccl"
    timeout_s: float
    tp_comm_overlap: bool
    ep_dispatch: str = "all_reduce"  # --expert-parallel-dispatch

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    @property
    def node_ranks(self) -> list[int]:
        first = self.node_rank * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))

    def local_rank_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def device_of(self, rank: int) -> str:
        return f"cuda:{self.local_rank_of(rank)}" if self.device_type == "cuda" else "cpu"

    @property
    def last_stage_driver_rank(self) -> int:
        """Global rank of TP rank 0 of the last pipeline stage (it returns sampled rows to the driver)."""
        return (self.pp - 1) * self.tp


def env_launched(launcher: str) -> bool:
    if launcher == "env":
        return True
    if launcher == "spawn":
        return False
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_executor(args) -> bool:
    """Whether an engine for `args` runs over several processes (the multiprocess executor)."""
    return (args.tensor_parallel_size * args.pipeline_parallel_size > 1 or args.nnodes > 1
            or env_launched(args.distributed_launcher))


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ParameterError("distributed_launcher", f"environment variable {n}={v!r} is not an integer")
    return None


def parse_partition(text, pp: int, layers: int) -> tuple[int, ...] | None:
    if text in (None, ""):
        return None
    try:
        parts = tuple(int(x) for x in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ParameterError("pp_layer_partition", f"--pp-layer-partition {text!r} must be comma-separated integers")
    if len(parts) != pp:
        raise ParameterError("pp_layer_partition", f"--pp-layer-partition {text!r} has {len(parts)} stages but "
                                                   f"pipeline_parallel_size is {pp}")
    if any(p < 1 for p in parts):
        raise ParameterError("pp_layer_partition", f"--pp-layer-partition {text!r}: every stage needs >= 1 layer")
    if sum(parts) != layers:
        raise ParameterError("pp_layer_partition", f"--pp-layer-partition {text!r} sums to {sum(parts)} but the "
                                                   f"model has {layers} layers")
    return parts


def check_model_fits_mesh(cfg: ModelConfig, tp: int, pp: int, enable_ep: bool) -> None:
    """Shape checks: TP must divide what it splits, PP needs a layer per stage."""
    def bad(param, msg):
        raise ParameterError(param, msg)

    if tp < 1 or pp < 1:
        bad("tensor_parallel_size", f"tensor_parallel_size ({tp}) and pipeline_parallel_size ({pp}) must be >= 1")
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if h % tp:
        bad("tensor_parallel_size", f"tensor_parallel_size {tp} does not divide the model's {h} attention heads")
    if kv % tp and tp % kv:
        bad("tensor_parallel_size", f"tensor_parallel_size {tp} and the model's {kv} key/value heads: one must "
                                    f"divide the other")
    moe = bool(cfg.num_experts)
    dense_mlp = not moe or bool((cfg.raw or {}).get("mlp_only_layers")) or \
        int((cfg.raw or {}).get("decoder_sparse_step") or 1) > 1
    if dense_mlp and cfg.intermediate_size % tp:
        bad("tensor_parallel_size", f"tensor_parallel_size {tp} does not divide intermediate_size "
                                    f"{cfg.intermediate_size}")
    if moe:
        if enable_ep and cfg.num_experts % tp:
            bad("tensor_parallel_size", f"expert parallelism over {tp} ranks needs the number of experts "
                                        f"({cfg.num_experts}) to be a multiple of {tp}")
        if not enable_ep and (cfg.moe_intermediate_size or 0) % tp:
            bad("tensor_parallel_size", f"tensor_parallel_size {tp} does not divide moe_intermediate_size "
                                        f"{cfg.moe_intermediate_size} (or use --enable-expert-parallel)")
    elif enable_ep and tp > 1:
        pass  # a dense model ignores expert parallelism
    if pp > cfg.num_hidden_layers:
        bad("pipeline_parallel_size", f"pipeline_parallel_size {pp} is larger than the model's "
                                      f"{cfg.num_hidden_layers} layers")


def resolve_spec(args, cfg: ModelConfig) -> ParallelSpec:
    """Validate the parallel configuration against the model's shape and the launch environment."""
    tp, pp = int(args.tensor_parallel_size), int(args.pipeline_parallel_size)
    check_model_fits_mesh(cfg, tp, pp, args.enable_expert_parallel)
    partition = parse_partition(args.pp_layer_partition, pp, cfg.num_hidden_layers)
    world = tp * pp
    dev = args.device
    if dev == "auto":
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if dev.startswith("cuda") else "cpu"
    if args.dist_timeout <= 0:
        raise ParameterError("dist_timeout", f"--dist-timeout must be > 0, got {args.dist_timeout}")

    if env_launched(args.distributed_launcher):
        launcher = "env"
        rank = _env_int("RANK", "SLURM_PROCID")
        env_world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
        if rank is None or env_world is None:
            raise ParameterError("distributed_launcher", "--distributed-launcher env needs RANK and WORLD_SIZE "
                                                         "(torchrun) or SLURM_PROCID and SLURM_NTASKS (srun)")
        if env_world != world:
            raise ParameterError("tensor_parallel_size", f"world size {env_world} (from the launcher) does not match "
                                                         f"the mesh: pipeline_parallel_size {pp} x "
                                                         f"tensor_parallel_size {tp} = {world}")
        local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
        local = rank if local is None else local
        per_node = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE") or world
        nnodes = max(1, world // per_node)
        node_rank = rank // per_node
        addr = args.master_addr or os.environ.get("MASTER_ADDR")
        port = args.master_port or _env_int("MASTER_PORT")
        if not addr or not port:
            raise ParameterError("master_addr", "under torchrun/srun set MASTER_ADDR and MASTER_PORT (or pass "
                                                "--master-addr/--master-port)")
    else:
        launcher = "spawn"
        nnodes, node_rank = int(args.nnodes), int(args.node_rank)
        if nnodes < 1:
            raise ParameterError("nnodes", f"--nnodes must be >= 1, got {nnodes}")
        if not 0 <= node_rank < nnodes:
            raise ParameterError("node_rank", f"--node-rank {node_rank} is outside 0..{nnodes - 1}")
        if world % nnodes:
            raise ParameterError("nnodes", f"world size {world} (pipeline_parallel_size {pp} x "
                                           f"tensor_parallel_size {tp}) does not split evenly over {nnodes} nodes")
        per_node = world // nnodes
        rank = node_rank * per_node
        local = 0
        addr = args.master_addr or (os.environ.get("MASTER_ADDR") if nnodes > 1 else None) or "127.0.0.1"
        port = args.master_port or (_env_int("MASTER_PORT") if nnodes > 1 else None)
        if not port:
            if nnodes > 1:
                raise ParameterError("master_port", "--nnodes > 1 needs --master-port (or MASTER_PORT), the same "
                                                    "on every node")
            port = free_port(addr)
    if not 0 < int(port) < 65536:
        raise ParameterError("master_port", f"master port {port} is not a valid TCP port")
    if device_type == "cuda":
        import torch
        n = torch.cuda.device_count()
        need = per_node
        if n < need:
            raise ParameterError("tensor_parallel_size", f"{need} ranks on this node need {need} GPUs; {n} visible")
    dispatch = getattr(args, "expert_parallel_dispatch", "all_reduce")
    if dispatch not in ("all_reduce", "all_to_all"):
        raise ParameterError("expert_parallel_dispatch", f"--expert-parallel-dispatch must be all_reduce or "
                                                         f"all_to_all, not {dispatch!r}")
    return ParallelSpec(tp=tp, pp=pp, enable_expert_parallel=bool(args.enable_expert_parallel),
                        pp_layer_partition=partition, launcher=launcher, world_size=world, nnodes=nnodes,
                        node_rank=node_rank, ranks_per_node=per_node, rank=rank, local_rank=local,
                        master_addr=str(addr), master_port=int(port), device_type=device_type,
                        backend="nccl" if device_type == "cuda" else "gloo", timeout_s=float(args.dist_timeout),
                        tp_comm_overlap=bool(args.tp_comm_overlap),
                        ep_dispatch=dispatch)


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_master(spec: ParallelSpec, connect_timeout_s: float | None = None) -> None:
    """Fail early, with the address in the message, when the rendezvous cannot work.

    The rank that hosts the store (global rank 0) must own the address and find the port free; every other
    rank must reach it (retrying until the timeout, since node 0 may still be starting)."""
    addr, port = spec.master_addr, spec.master_port
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ParameterError("master_addr", f"master address {addr!r} does not resolve: {e}") from None
    if spec.rank == 0:
        fam, _, _, _, sockaddr = infos[0]
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                raise ParameterError("master_addr", f"node 0 cannot listen on master {addr}:{port} ({e.strerror}): "
                                                    f"the address is not this machine's or the port is in use")
        return
    deadline = time.monotonic() + (connect_timeout_s if connect_timeout_s is not None else spec.timeout_s)
    last = None
    while True:
        for fam, _, _, _, sockaddr in infos:
            try:
                with socket.create_connection(sockaddr[:2], timeout=2.0):
                    return
            except OSError as e:
                last = e
        if time.monotonic() >= deadline:
            raise ParameterError("master_addr", f"cannot reach the master at {addr}:{port} from node "
                                                f"{spec.node_rank} within {spec.timeout_s:.0f}s ({last}); is node 0 "
                                                f"running with the same --master-addr/--master-port?")
        time.sleep(0.5)

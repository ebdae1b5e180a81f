"""Sizing the KV pool. `--kv-cache-memory` bytes when given. Otherwise, on GPU: `--gpu-memory-utilization` of
the GPU minus weights and an activation reserve. On CPU: what the engine can use at most (max_num_seqs
sequences of max_model_len tokens), capped at CPU_KV_FRACTION of the host's available memory and at
CPU_KV_CAP, both shared among the ranks on this host (a laptop-sized machine must not give a 135M model
gigabytes of cache it cannot fill; raise it with --kv-cache-memory). max_model_len is capped so that one
request always fits in the pool."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from strata.config.engine import EngineArgs
from strata.core.errors import ParameterError
from strata.models.config import ModelConfig

GiB = 1 << 30
MiB = 1 << 20
CPU_KV_CAP = 384 * MiB  # per host, before sharing among local ranks
CPU_KV_FRACTION = 0.10  # of MemAvailable, per host


def mem_available() -> int:
    """Bytes the kernel reports as available (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_ranks(args: EngineArgs) -> int:
    """Processes of this engine on this host (each holds its own KV pool)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    per_replica = args.tensor_parallel_size * args.pipeline_parallel_size
    return max(1, -(-per_replica // max(1, args.nnodes))) * max(1, args.data_parallel_size)


def cpu_kv_bytes(args: EngineArgs, per_tok: int, model_max: int) -> int:
    need = args.max_num_seqs * (args.max_model_len or model_max) * per_tok
    cap = min(CPU_KV_FRACTION * mem_available(), CPU_KV_CAP) / local_ranks(args)
    return int(min(need, cap))


@dataclass
class MemoryPlan:
    num_blocks: int
    max_model_len: int
    max_num_batched_tokens: int
    kv_bytes: int


def kv_bytes_per_token(model_cfg: ModelConfig, model: torch.nn.Module, dtype: torch.dtype) -> int:
    layers = getattr(model, "attention_layers", None)
    elt = torch.empty((), dtype=dtype).element_size()
    if layers:
        return sum(2 * a.num_kv_heads * a.head_dim for a in layers) * elt
    return model_cfg.kv_bytes_per_token * elt


def plan_memory(args: EngineArgs, model_cfg: ModelConfig, device: str, dtype: torch.dtype,
                model: torch.nn.Module, kv_dtype: torch.dtype | None = None) -> MemoryPlan:
    """kv_dtype: the KV cache's element type (default `dtype`; fp8: 1 byte, so twice the blocks of bf16)."""
    per_tok = kv_bytes_per_token(model_cfg, model, kv_dtype or dtype)
    per_block = per_tok * args.block_size
    mnbt = args.max_num_batched_tokens or (2048 if device == "cpu" else 8192)
    if args.num_gpu_blocks_override:
        num_blocks = args.num_gpu_blocks_override
        kv_bytes = num_blocks * per_block
    elif args.kv_cache_memory:
        kv_bytes = int(args.kv_cache_memory)
        num_blocks = kv_bytes // per_block
    elif device == "cpu":
        kv_bytes = cpu_kv_bytes(args, per_tok, model_cfg.max_position_embeddings)
        num_blocks = kv_bytes // per_block
    else:
        if not 0 < args.gpu_memory_utilization <= 1:
            raise ParameterError("gpu_memory_utilization", f"must be in (0, 1], got {args.gpu_memory_utilization}")
        dev = torch.device(device)
        free, total = torch.cuda.mem_get_info(dev)
        used_by_us = torch.cuda.memory_allocated(dev)
        others = total - free - used_by_us  # other processes on this GPU
        h, inter = model_cfg.hidden_size, max(model_cfg.intermediate_size, model_cfg.moe_intermediate_size or 0)
        elt = torch.empty((), dtype=dtype).element_size()
        act = mnbt * (6 * h + 4 * inter) * elt + args.max_num_seqs * model_cfg.vocab_size * 4 * 4 + GiB
        kv_bytes = int(total * args.gpu_memory_utilization - others - used_by_us - act)
        num_blocks = kv_bytes // per_block
    num_blocks += 1  # the null block
    if num_blocks < 2:
        raise ParameterError("kv_cache_memory", f"no room for the KV cache ({kv_bytes} bytes for blocks of "
                                                f"{per_block} bytes); give more memory")
    pool_tokens = (num_blocks - 1) * args.block_size
    model_max = model_cfg.max_position_embeddings
    if args.max_model_len is not None:
        if args.max_model_len > model_max:
            raise ParameterError("max_model_len", f"max_model_len={args.max_model_len} exceeds the model's "
                                                  f"max_position_embeddings={model_max}")
        if args.max_model_len > pool_tokens:
            raise ParameterError("max_model_len", f"max_model_len={args.max_model_len} does not fit in the KV "
                                                  f"cache ({pool_tokens} tokens); give more KV memory")
        max_len = args.max_model_len
    else:
        max_len = min(model_max, pool_tokens)
    if not args.enable_chunked_prefill:
        mnbt = max(mnbt, max_len)
    return MemoryPlan(num_blocks, max_len, mnbt, kv_bytes)

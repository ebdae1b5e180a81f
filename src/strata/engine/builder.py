"""Building an engine's parts. Settings are resolved here, once, the same way for one process and for every rank of
a TP x PP mesh: `resolve_config` turns the user's `EngineArgs` and what loading found (device, dtype, the KV pool
the memory plan allows) into the frozen `EngineConfig` that the engine and every rank's `ModelRunner` are built
from.

    build_inproc(args) -> (config, model config, tokenizer, InProcExecutor)      one process
    strata.engine.multiproc.build_multiproc(args) -> the same parts               several processes

Both call `load_rank` (model, then memory plan) and `resolve_config`.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from strata.config.engine import KV_CACHE_DTYPES, EngineArgs, EngineConfig
from strata.core.errors import ParameterError
from strata.engine.executor import InProcExecutor
from strata.engine.tokenizer import Tokenizer
from strata.models.config import QUANTIZATION_METHODS, ModelConfig, model_config_from_dict, online_quant_spec
from strata.models.embedded import default_model_path
from strata.models.loader import ModelSource, load_weights, resolve_model
from strata.models.registry import model_class
from strata.runner.memory import plan_memory
from strata.runner.model_runner import ModelRunner

log = logging.getLogger("strata")
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def resolve_source(args: EngineArgs) -> tuple[ModelSource, ModelConfig]:
    check_kv_cache_dtype(args.kv_cache_dtype)  # before anything loads
    overrides = json.loads(args.hf_overrides) if isinstance(args.hf_overrides, str) else args.hf_overrides
    source = resolve_model(args.model, overrides)
    return source, apply_quantization(args, model_config_from_dict(source.config))


def apply_quantization(args: EngineArgs, cfg: ModelConfig) -> ModelConfig:
    """--quantization: online FP8 of a 16/32-bit checkpoint. Checks the flag against what the model is."""
    q = args.quantization
    if args.tp_comm_overlap and (q is not None or cfg.quantization is not None):
        raise ParameterError("tp_comm_overlap", "--tp-comm-overlap does not support FP8 linear layers yet")
    if q is None:
        return cfg
    if q not in QUANTIZATION_METHODS:
        raise ParameterError("quantization", f"--quantization {q!r} is not supported (accepted: "
                                             f"{', '.join(QUANTIZATION_METHODS)})")
    if cfg.quantization is not None:
        if cfg.quantization.checkpoint and q == "fp8":  # already FP8: vLLM accepts the flag on FP8 checkpoints
            return cfg
        raise ParameterError("quantization", f"--quantization {q} on a checkpoint already quantised "
                                             f"({cfg.quantization.method})")
    cfg.quantization = online_quant_spec(q)
    return cfg


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", f"device {name!r} asked for but CUDA is not available")
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    table = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16}
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in table:
        raise ParameterError("dtype", f"unknown dtype {name!r} ({', '.join(table)})")
    return table[name]


def check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise ParameterError("kv_cache_dtype", f"--kv-cache-dtype {name!r} is not supported (accepted: "
                                               f"{', '.join(KV_CACHE_DTYPES)})")


def pick_kv_cache_dtype(name: str, dtype: torch.dtype, device: str) -> torch.dtype:
    """--kv-cache-dtype: auto = the model's dtype; fp8 = fp8_e4m3 = float8_e4m3fn (1 byte per element)."""
    check_kv_cache_dtype(name)
    if name == "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        raise ParameterError("kv_cache_dtype", f"--kv-cache-dtype {name} needs a GPU with FP8 support (compute "
                                               f"capability 8.9 or newer: Ada, Hopper, Blackwell); "
                                               f"{torch.cuda.get_device_name(torch.device(device))} has not")
    return torch.float8_e4m3fn


def load_tokenizer(args: EngineArgs, source: ModelSource) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.from_pretrained(args.tokenizer)
    if source.format == "gguf":
        return Tokenizer.from_gguf(source.path)
    if any(os.path.isfile(os.path.join(source.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return Tokenizer.from_pretrained(source.path)
    # A bare config directory (dummy weights): the embedded SmolLM2 tokenizer, whose ids are valid
    # for any vocabulary of at least 49152 tokens.
    return Tokenizer.from_gguf(default_model_path())


def build_model(device: str, dtype: torch.dtype, load_format: str, model_cfg: ModelConfig,
                source: ModelSource) -> torch.nn.Module:
    cls = model_class(model_cfg.architecture)
    with torch.device(device):
        model = cls(model_cfg, dtype)
    load_weights(model, source, load_format)
    return model.eval()


@dataclass
class LoadedRank:
    model: torch.nn.Module
    dtype: torch.dtype
    num_blocks: int
    max_model_len: int
    max_num_batched_tokens: int
    kv_cache_dtype: torch.dtype | None = None  # None: dtype


def load_rank(args: EngineArgs, source: ModelSource, model_cfg: ModelConfig, device: str) -> LoadedRank:
    """This process's model (its shards, when a mesh is set up) and the KV pool it can hold."""
    dtype = pick_dtype(args.dtype, device)
    kv_dtype = pick_kv_cache_dtype(args.kv_cache_dtype, dtype, device)
    model = build_model(device, dtype, args.load_format, model_cfg, source)
    mem = plan_memory(args, model_cfg, device, dtype, model, kv_dtype=kv_dtype)
    log.info("KV cache: %d blocks of %d tokens, %s, %.1f MiB", mem.num_blocks, args.block_size,
             str(kv_dtype).removeprefix("torch."), mem.kv_bytes / (1 << 20))
    return LoadedRank(model, dtype, mem.num_blocks, mem.max_model_len, mem.max_num_batched_tokens, kv_dtype)


def resolve_config(args: EngineArgs, source: ModelSource, model_cfg: ModelConfig, device: str,
                   rank: LoadedRank) -> EngineConfig:
    """The one place where "auto" and derived settings are decided."""
    on_gpu = device != "cpu"
    pp = args.pipeline_parallel_size
    # default (None): on for GPUs (H200: greedy outputs equal to synchronous steps, one process and TP=2, and faster
    # figures: docs/BENCHMARKS.md), off on CPU, where the device work is synchronous anyway. Engines with pipeline
    # stages step synchronously (the sampled ids live on the driver, not on the first stage).
    async_scheduling = on_gpu if args.async_scheduling is None else bool(args.async_scheduling)
    if async_scheduling and pp > 1:
        if args.async_scheduling:
            log.warning("async scheduling needs one pipeline stage; stepping synchronously")
        async_scheduling = False
    # all-to-all EP dispatch sizes its messages from the routing on the host: not capturable in a CUDA graph
    all_to_all = args.enable_expert_parallel and args.expert_parallel_dispatch == "all_to_all" and \
        bool(model_cfg.num_experts)
    name = args.served_model_name or (os.path.basename(os.path.normpath(source.path)) if args.model else DEFAULT_NAME)
    return EngineConfig(
        model_path=source.path, model_format=source.format, load_format=args.load_format, served_model_name=name,
        device=device, dtype=rank.dtype, max_model_len=rank.max_model_len, block_size=args.block_size,
        num_blocks=rank.num_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=rank.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill, scheduling_policy=args.scheduling_policy,
        seed=args.seed, admit_batch=args.admit_batch or (max(1, args.max_num_seqs // 16) if on_gpu else 1),
        admit_wait_steps=args.admit_wait_steps, enforce_eager=args.enforce_eager or all_to_all,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=pp,
        data_parallel_size=args.data_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        check_invariants=args.check_invariants, disable_log_stats=args.disable_log_stats,
        async_scheduling=async_scheduling, kv_cache_dtype=rank.kv_cache_dtype or rank.dtype)


def build_inproc(args: EngineArgs):
    """One process: (config, model config, tokenizer, executor)."""
    source, model_cfg = resolve_source(args)
    device = pick_device(args.device)
    if args.num_threads and device == "cpu":
        torch.set_num_threads(args.num_threads)
    # The tokenizer (mostly Python: metadata parsing, importing transformers) loads in a thread while the
    # weights (numpy / torch work that releases the GIL) load here: ~2 s less start-up on 2 cores.
    with ThreadPoolExecutor(1, thread_name_prefix="strata-tokenizer") as pool:
        tok_future = pool.submit(load_tokenizer, args, source)
        rank = load_rank(args, source, model_cfg, device)
        tokenizer = tok_future.result()
    config = resolve_config(args, source, model_cfg, device, rank)
    runner = ModelRunner(rank.model, config)
    runner.allocate_kv_cache(config.num_blocks)
    return config, model_cfg, tokenizer, InProcExecutor(runner, config)

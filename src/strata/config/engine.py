"""Engine arguments and the frozen engine configuration. CLI flags are generated from EngineArgs' fields (vLLM's
names).

`EngineArgs` holds what a user typed ("auto" allowed). `strata.engine.builder.resolve_config` turns it into a
frozen `EngineConfig` once the model is loaded and the KV pool is sized (the one place where "auto" is decided);
the engine and every rank's ModelRunner are built from that config.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # --kv-cache-dtype (vLLM's names; fp8 is e4m3)


@dataclass
class EngineArgs:
    model: str | None = field(default=None, metadata={"help": "HF model directory, hub id, or .gguf file (default: the embedded SmolLM2-135M-Instruct)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory if not the model's"})
    load_format: str = field(default="auto", metadata={"help": "auto | safetensors | gguf | dummy (random weights)", "choices": ["auto", "safetensors", "gguf", "dummy"]})
    quantization: str | None = field(default=None, metadata={"help": "fp8: quantise the linear weights to FP8 at load (per-row weight scales, dynamic per-token activation scales; docs/QUANTIZATION.md). FP8 checkpoints (quantization_config) load as FP8 without it"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, float32 on CPU)"})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "auto | fp8 | fp8_e4m3: the KV cache's dtype (auto: the model's dtype; fp8 = fp8_e4m3: float8 e4m3 with per-layer k/v scales from the checkpoint, else 1.0; half the KV bytes, so twice the blocks; docs/QUANTIZATION.md)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (default: the model's, capped by the KV pool)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "fraction of GPU memory for weights + activations + KV cache"})
    kv_cache_memory: int | None = field(default=None, metadata={"help": "bytes of KV cache (overrides --gpu-memory-utilization on GPU). CPU default: what --max-num-seqs sequences of --max-model-len tokens need, at most 10%% of available memory and 384 MiB, shared among the ranks on this host"})
    num_gpu_blocks_override: int | None = field(default=None, metadata={"help": "exact number of KV blocks (tests)"})
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int | None = field(default=None, metadata={"help": "token budget per step (default: 8192 on GPU, 2048 on CPU)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prompt prefixes"})
    enable_chunked_prefill: bool = field(default=True, metadata={"help": "split long prompts across steps, mixed with decodes"})
    admit_batch: int = field(default=0, metadata={"help": "while requests are decoding, admit waiting ones only once this many slots are free (or one waited --admit-wait-steps steps): fewer, larger prefill steps; 0 = auto (max_num_seqs/16 on GPU, 1 on CPU)"})
    admit_wait_steps: int = field(default=8, metadata={"help": "steps a waiting request may be held back by --admit-batch"})
    scheduling_policy: str = field(default="fcfs", metadata={"help": "fcfs | priority", "choices": ["fcfs", "priority"]})
    seed: int = field(default=0, metadata={"help": "seed for requests without their own"})
    enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs"})
    async_scheduling: bool | None = field(default=None, metadata={"help": "schedule step N+1 on the CPU while the GPU runs step N (default: on for GPUs, off on CPU; engines with pipeline stages step synchronously)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs (or CPU processes) per layer"})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "pipeline stages"})
    data_parallel_size: int = field(default=1, metadata={"help": "independent replicas"})
    enable_expert_parallel: bool = field(default=False, metadata={"help": "place MoE experts whole on EP ranks"})
    expert_parallel_dispatch: str = field(default="all_reduce", metadata={"help": "with --enable-expert-parallel: all_reduce (every rank runs its own experts on all of the step's tokens, one all-reduce per MoE layer; CUDA graphs) | all_to_all (tokens sent to the experts' ranks and back; eager)", "choices": ["all_reduce", "all_to_all"]})
    pp_layer_partition: str | None = field(default=None, metadata={"help": "layers per pipeline stage, e.g. '10,14' (default: even split)"})
    nnodes: int = field(default=1, metadata={"help": "nodes one model replica spans (run the same command on each)"})
    node_rank: int = field(default=0, metadata={"help": "this node's index, 0..nnodes-1 (node 0 runs the engine)"})
    master_addr: str | None = field(default=None, metadata={"help": "address of node 0 for the rendezvous (default: MASTER_ADDR, else 127.0.0.1)"})
    master_port: int | None = field(default=None, metadata={"help": "rendezvous port (default: MASTER_PORT; a free port on one node)"})
    distributed_launcher: str = field(default="auto", metadata={"help": "auto | spawn | env (one process per rank from RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/...; auto: env under torchrun)", "choices": ["auto", "spawn", "env"]})
    dist_timeout: float = field(default=300.0, metadata={"help": "seconds before a collective between ranks times out"})
    tp_comm_overlap: bool = field(default=False, metadata={"help": "overlap TP all-reduces with the GEMMs that produce them (chunked, asynchronous)"})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: all cores)"})
    hf_overrides: str | None = field(default=None, metadata={"help": "JSON merged into config.json (e.g. '{\"num_hidden_layers\": 2}')"})
    served_model_name: str | None = field(default=None, metadata={"help": "name reported by the API"})
    check_invariants: bool = field(default=False, metadata={"help": "check KV/scheduler invariants every step (tests)"})
    disable_log_stats: bool = field(default=False, metadata={"help": "no periodic stats lines"})

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        g = parser.add_argument_group("engine")
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            if f.default is not None and "default" not in help_:
                help_ += " (default: %(default)s)"
            if f.type in ("bool", bool, "bool | None"):
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
                continue
            typ = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            kw: dict[str, Any] = {"default": f.default, "help": help_, "type": typ}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            g.add_argument(flag, **kw)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items()
                      if k in defaults and not (v is None and defaults[k] is not None)})

    def replace(self, **kw) -> "EngineArgs":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class EngineConfig:
    """Resolved, frozen. Built by `strata.engine.builder.resolve_config`."""
    model_path: str
    model_format: str  # "hf" | "gguf"
    load_format: str
    served_model_name: str
    device: str  # "cpu" | "cuda" | "cuda:N"
    dtype: Any  # torch.dtype
    max_model_len: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    scheduling_policy: str
    admit_batch: int
    admit_wait_steps: int
    seed: int
    enforce_eager: bool  # also on when a layer cannot be captured (all-to-all expert dispatch)
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    enable_expert_parallel: bool
    check_invariants: bool
    disable_log_stats: bool
    async_scheduling: bool  # overlapped steps (never with pipeline stages)
    kv_cache_dtype: Any = None  # torch.dtype of the KV cache (None: `dtype`)

"""Model architectures as the planner sees them: shapes only, read from a built-in table or a config.json.

`Arch.tensors()` lists every weight with the rule by which tensor parallelism (TP) or expert parallelism (EP)
splits it; memory per GPU and FLOPs per token are sums over that list, so the arithmetic can be checked by hand.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field

from strata.core.errors import ModelLoadError
from strata.models.config import hf_fields, read_config_json, text_config
from strata.plan.errors import ConfigError, UnknownModelError

# How a tensor is split over the TP (or EP) group:
#   col    column-parallel linear (output features split): q/gate/up/fc1 weights and their biases
#   row    row-parallel linear (input features split): o/down/fc2 weights; their biases are "rep"
#   vocab  vocabulary-parallel embedding / lm_head rows
#   kv     k/v projections: split by KV head; replicated when TP > number of KV heads
#   rep    replicated on every rank: norms, row-parallel biases, router, learned positions
#   expert routed experts: whole experts spread over the EP group (EP > 1), or each expert split by TP (EP = 1)
SHARDS = ("col", "row", "vocab", "kv", "rep", "expert")


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    shard: str
    where: str  # "layer" (every layer), "dense" (dense-MLP layers), "moe" (MoE layers), "first", "last"
    linear: bool = True  # stored at the weight dtype; non-linear tensors stay 16-bit under fp8/int4


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width
    vocab: int
    tie_embeddings: bool = False
    mlp: str = "gated"  # "gated": gate, up, down (SwiGLU); "plain": fc1, fc2
    norm: str = "rms"  # "rms": weight only; "layer": weight + bias
    qkv_bias: bool = False  # biases on q, k, v (Qwen2)
    linear_bias: bool = False  # biases on every linear (OPT)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    learned_positions: int = 0  # rows of a learned position embedding (OPT: max_position + 2)
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    moe_layer_mask: tuple[bool, ...] | None = None  # None: every layer is MoE when experts > 0
    max_position: int = 0
    dtype: str = "bf16"
    source: str = "built-in"
    aliases: tuple[str, ...] = field(default=(), compare=False)

    # ---- shape helpers -------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def is_moe_layer(self, i: int) -> bool:
        if not self.is_moe:
            return False
        return True if self.moe_layer_mask is None else self.moe_layer_mask[i]

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.layers))

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def kv_bytes_per_token(self, kv_bytes: float = 2.0) -> float:
        """KV cache bytes per token, whole model, one copy: layers x 2 (K, V) x kv_heads x head_dim x bytes."""
        return self.layers * 2 * self.kv_heads * self.head_dim * kv_bytes

    # ---- weights -------------------------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        d, hd, h, kv = self.hidden, self.head_dim, self.heads, self.kv_heads
        b = self.linear_bias
        nb = 2 * d if self.norm == "layer" else d  # one norm's parameters
        t: list[Tensor] = [Tensor("embed_tokens", self.vocab * d, "vocab", "first", False)]
        if self.learned_positions:
            t.append(Tensor("embed_positions", self.learned_positions * d, "rep", "first", False))
        t += [
            Tensor("input_norm", nb, "rep", "layer", False),
            Tensor("q_proj", d * h * hd, "col", "layer"),
            Tensor("k_proj", d * kv * hd, "kv", "layer"),
            Tensor("v_proj", d * kv * hd, "kv", "layer"),
            Tensor("o_proj", h * hd * d, "row", "layer"),
            Tensor("post_attention_norm", nb, "rep", "layer", False),
        ]
        if self.qkv_bias or b:
            t += [Tensor("q_bias", h * hd, "col", "layer", False), Tensor("k_bias", kv * hd, "kv", "layer", False),
                  Tensor("v_bias", kv * hd, "kv", "layer", False)]
        if b:
            t.append(Tensor("o_bias", d, "rep", "layer", False))
        if self.qk_norm:
            t += [Tensor("q_norm", hd, "rep", "layer", False), Tensor("k_norm", hd, "rep", "layer", False)]
        f = self.intermediate
        if self.mlp == "gated":
            t += [Tensor("gate_proj", d * f, "col", "dense"), Tensor("up_proj", d * f, "col", "dense"),
                  Tensor("down_proj", f * d, "row", "dense")]
        else:
            t += [Tensor("fc1", d * f, "col", "dense"), Tensor("fc2", f * d, "row", "dense")]
        if b:
            t += [Tensor("fc1_bias" if self.mlp == "plain" else "up_bias", f, "col", "dense", False),
                  Tensor("fc2_bias" if self.mlp == "plain" else "down_bias", d, "rep", "dense", False)]
        if self.is_moe:
            per_expert = (3 if self.mlp == "gated" else 2) * d * self.moe_intermediate
            t += [Tensor("router", d * self.experts, "rep", "moe", False),
                  Tensor("experts", self.experts * per_expert, "expert", "moe")]
            s = self.shared_expert_intermediate
            if s:
                t += [Tensor("shared_gate_up", 2 * d * s, "col", "moe"), Tensor("shared_down", s * d, "row", "moe"),
                      Tensor("shared_expert_gate", d, "rep", "moe", False)]
        t.append(Tensor("final_norm", nb, "rep", "last", False))
        # A tied lm_head is the embedding itself on one GPU group; with PP the last stage needs its own copy.
        t.append(Tensor("lm_head", self.vocab * d, "vocab", "last"))
        return t

    def layer_counts(self) -> dict[str, int]:
        return {"layer": self.layers, "dense": self.dense_layers, "moe": self.moe_layers, "first": 1, "last": 1}

    def params_total(self) -> int:
        n = 0
        counts = self.layer_counts()
        for t in self.tensors():
            if t.name == "lm_head" and self.tie_embeddings:
                continue
            n += t.numel * counts[t.where]
        return n

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return (3 if self.mlp == "gated" else 2) * self.hidden * self.moe_intermediate

    def params_active(self) -> int:
        """Parameters touched per token (routed experts counted experts_per_token times)."""
        n = self.params_total()
        if self.is_moe:
            n -= self.moe_layers * (self.experts - self.experts_per_token) * self.expert_params
        return n

    def matmul_params_per_token(self) -> int:
        """Weights that enter a matmul per token (2 FLOPs each): everything active except embeddings and norms."""
        counts = self.layer_counts()
        n = 0
        for t in self.tensors():
            if not t.linear:
                continue
            if t.shard == "expert":
                n += self.experts_per_token * self.expert_params * counts[t.where]
            else:
                n += t.numel * counts[t.where]
        return n

    def summary(self) -> dict:
        return {
            "name": self.name, "source": self.source, "params": self.params_total(),
            "active_params": self.params_active(), "hidden": self.hidden, "layers": self.layers,
            "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "intermediate": self.intermediate, "vocab": self.vocab, "tie_embeddings": self.tie_embeddings,
            "experts": self.experts, "experts_per_token": self.experts_per_token,
            "moe_intermediate": self.moe_intermediate, "moe_layers": self.moe_layers,
            "max_position": self.max_position, "dtype": self.dtype,
        }


def _a(name, d, L, h, kv, hd, ffn, vocab, aliases=(), **kw) -> Arch:
    return Arch(name, d, L, h, kv, hd, ffn, vocab, aliases=tuple(aliases), **kw)


BUILTINS: dict[str, Arch] = {
    a.name: a
    for a in [
        _a("llama-3-8b", 4096, 32, 32, 8, 128, 14336, 128256, ["llama-3.1-8b", "llama3-8b"], max_position=131072),
        _a("llama-3-70b", 8192, 80, 64, 8, 128, 28672, 128256, ["llama-3.1-70b", "llama-3.3-70b", "llama3-70b"],
           max_position=131072),
        _a("llama-3.1-405b", 16384, 126, 128, 8, 128, 53248, 128256, ["llama-3-405b", "llama3.1-405b"],
           max_position=131072),
        _a("llama-2-70b", 8192, 80, 64, 8, 128, 28672, 32000, ["llama2-70b"], max_position=4096),
        _a("qwen3-4b", 2560, 36, 32, 8, 128, 9728, 151936, tie_embeddings=True, qk_norm=True, max_position=40960),
        _a("qwen3-8b", 4096, 36, 32, 8, 128, 12288, 151936, qk_norm=True, max_position=40960),
        _a("qwen3-32b", 5120, 64, 64, 8, 128, 25600, 151936, qk_norm=True, max_position=40960),
        _a("qwen3-30b-a3b", 2048, 48, 32, 4, 128, 6144, 151936, qk_norm=True, experts=128, experts_per_token=8,
           moe_intermediate=768, max_position=40960),
        _a("qwen3-235b-a22b", 4096, 94, 64, 4, 128, 12288, 151936, qk_norm=True, experts=128, experts_per_token=8,
           moe_intermediate=1536, max_position=40960),
        _a("mixtral-8x7b", 4096, 32, 32, 8, 128, 14336, 32000, experts=8, experts_per_token=2,
           moe_intermediate=14336, max_position=32768),
        _a("mixtral-8x22b", 6144, 56, 48, 8, 128, 16384, 32768, experts=8, experts_per_token=2,
           moe_intermediate=16384, max_position=65536),
        # OPT-175B / GPT-3 175B shape: 12288 x 96 layers, plain 4x MLP, LayerNorm, biases, learned positions.
        _a("opt-175b", 12288, 96, 96, 96, 128, 49152, 50272, ["gpt3-175b", "gpt-3-175b", "175b"],
           tie_embeddings=True, mlp="plain", norm="layer", linear_bias=True, learned_positions=2050,
           max_position=2048),
    ]
}

_ALIAS_TO_NAME = {alias: a.name for a in BUILTINS.values() for alias in a.aliases}
_SUFFIXES = ("-instruct-2507", "-thinking-2507", "-2507", "-instruct", "-chat", "-hf", "-base", "-v0.1",
             "-fp8", "-dummy")


def _normalize(model: str) -> str:
    n = model.strip().lower().replace("_", "-")
    n = n.rsplit("/", 1)[-1]
    if n.startswith("meta-llama-"):
        n = "llama-" + n[len("meta-llama-"):]
    changed = True
    while changed:
        changed = False
        for s in _SUFFIXES:
            if n.endswith(s):
                n, changed = n[: -len(s)], True
    return n


def builtin(model: str) -> Arch | None:
    n = _normalize(model)
    n = _ALIAS_TO_NAME.get(n, n)
    return BUILTINS.get(n)


# ---- config.json -----------------------------------------------------------------------------------------------
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def arch_from_config(cfg: dict, name: str = "config", source: str = "config.json") -> Arch:
    """Build an Arch from a Hugging Face config.json dict (fields read by `strata.models.config.hf_fields`, the
    engine's reader). Raises ConfigError naming the missing fields."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    cfg = text_config(cfg)
    mt = str(cfg.get("model_type", ""))
    if mt.startswith("deepseek") or "kv_lora_rank" in cfg:
        raise ConfigError(f"{source}: model_type {mt!r} uses multi-head latent attention, which the planner "
                          f"does not model yet")
    hint = "; give a complete Hugging Face config.json or a built-in name"
    try:
        f = hf_fields(cfg, source)
    except ModelLoadError as e:
        raise ConfigError(f"{e}{hint if ' lacks ' in str(e) else ''}") from None
    if f.num_experts and not f.num_experts_per_tok:
        raise ConfigError(f"{source} lacks num_experts_per_tok (needed to size the model){hint}")
    dtype = _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), "bf16")
    q = cfg.get("quantization_config") or {}
    if isinstance(q, dict) and q:
        method = str(q.get("quant_method", "")).lower()
        groups = q.get("config_groups") if method == "compressed-tensors" else None
        wq = next(iter(groups.values()), {}).get("weights") or {} if isinstance(groups, dict) and groups else {}
        if "fp8" in method or (wq.get("num_bits") == 8 and wq.get("type") == "float"):  # compressed-tensors FP8
            dtype = "fp8"
        elif q.get("bits") == 4 or method in ("awq", "gptq", "bitsandbytes") and q.get("load_in_4bit", True):
            dtype = "int4"
    kw: dict = dict(
        tie_embeddings=f.tie_word_embeddings,
        qk_norm=f.qk_norm,
        qkv_bias=f.attention_bias,
        experts=f.num_experts,
        experts_per_token=f.num_experts_per_tok,
        moe_intermediate=f.moe_intermediate_size,
        shared_expert_intermediate=int(cfg.get("shared_expert_intermediate_size") or 0) if f.num_experts else 0,
        moe_layer_mask=f.moe_layer_mask,
        max_position=f.max_position_embeddings,
        dtype=dtype,
        source=source,
    )
    if mt == "opt":
        kw.update(mlp="plain", norm="layer", linear_bias=bool(cfg.get("enable_bias", True)), qkv_bias=False,
                  learned_positions=int(cfg.get("max_position_embeddings") or 2048) + 2)
    return Arch(name, f.hidden_size, f.num_hidden_layers, f.num_attention_heads, f.num_key_value_heads, f.head_dim,
                f.intermediate_size, f.vocab_size, **kw)


def _hf_cache_dirs() -> list[str]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return dirs


def load_arch(model: str) -> Arch:
    """Resolve --model: a built-in architecture name (HF ids of known models map to them), a directory holding
    config.json, a config.json path, or an HF id present in the local Hugging Face cache. Never downloads."""
    if not model or not model.strip():
        raise UnknownModelError("--model is empty")
    path = os.path.expanduser(model)
    if os.path.isdir(path) or os.path.isfile(path):
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(cfg_path):
            raise UnknownModelError(f"{path} has no config.json (the planner needs only config.json, no weights)")
        return _read_config(cfg_path, os.path.basename(os.path.normpath(path)))
    b = builtin(model)
    if b is not None:
        return b
    if "/" in model.strip("/") and model.count("/") == 1:
        org, repo = model.split("/")
        hits = []
        for cache in _hf_cache_dirs():
            hits += glob.glob(os.path.join(cache, f"models--{org}--{repo}", "snapshots", "*", "config.json"))
        if hits:
            hits.sort(key=os.path.getmtime)
            return _read_config(hits[-1], repo)
    raise UnknownModelError(
        f"unknown model {model!r}: not a built-in architecture ({', '.join(BUILTINS)}), not a directory or file "
        f"with config.json, and not in the local Hugging Face cache (the planner never downloads; fetch only the "
        f"config with `huggingface-cli download {model} config.json` and pass its directory)")


def _read_config(cfg_path: str, name: str) -> Arch:
    try:
        cfg = read_config_json(cfg_path)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    b = builtin(name)
    arch = arch_from_config(cfg, name=name, source=cfg_path)
    return dataclasses.replace(arch, aliases=b.aliases if b else ())

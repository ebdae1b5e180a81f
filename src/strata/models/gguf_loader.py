"""Load a GGUF checkpoint as Hugging Face-named float32 tensors plus an HF `config.json`-style dict.

`read_gguf_header(path)` parses the metadata and the tensor table (fast, memory-mapped; the big
tokenizer string arrays can be skipped); `load_gguf(path)` checks every tensor's name and type first,
then dequantises with `gguf.quants.dequantize`, reverses the ggml shape order and un-permutes the Q/K
projection rows llama.cpp's converter permuted for Llama models.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from strata.core.errors import ModelLoadError, UnsupportedArchitectureError

if TYPE_CHECKING:  # torch is imported lazily: reading a header (the tokenizer does) must stay cheap
    import torch

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# metadata value types (gguf spec): fixed-size scalars, 8 = string, 9 = array
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}
SUPPORTED_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"})

# The tokenizer arrays are large (~100k strings); the weight loader does not need them.
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores", "tokenizer.ggml.precompiled_charsmap")


def ggml_type_name(type_id: int) -> str:
    info = GGML_TYPES.get(type_id)
    if info is not None:
        return info[0]
    try:
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(type_id).name
    except Exception:  # noqa: BLE001 - an id no gguf version knows
        return f"unknown ggml type id {type_id}"


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]        # torch order (ggml order reversed)
    type_id: int
    offset: int                   # absolute offset in the file
    nbytes: int | None            # None for a type whose block size is unknown

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type_id)


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class LazyTensors(Mapping):
    """HF name -> float tensor, read and dequantised from the memory-mapped file on each access and not kept:
    loading a model streams one tensor at a time, so the dequantised checkpoint never sits in memory beside
    the model's own parameters (that doubled the peak RSS of every command)."""

    def __init__(self, read: Callable[[str], "torch.Tensor"], names: list[str]):
        self._read, self._names = read, names

    def __getitem__(self, name: str) -> "torch.Tensor":
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


@dataclass
class GGUFModel:
    config: dict[str, Any]                     # HF config.json-style
    tensors: Mapping[str, torch.Tensor]        # HF parameter names -> float tensors in HF layout (LazyTensors)
    metadata: dict[str, Any] = field(default_factory=dict)       # GGUF metadata (tokenizer arrays left out)
    tensor_types: dict[str, str] = field(default_factory=dict)   # HF name -> ggml type it was stored as
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. llama.cpp's rope_freqs.weight


class _Cursor:
    """Little-endian reads from a buffer; any overrun raises ModelLoadError naming the file."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(f"GGUF file {self.path} is truncated or corrupt: {what} at byte {self.pos} "
                                 f"needs {n} bytes, the file has {self.size}.")

    def scalar(self, vtype: int, what: str = "a value"):
        fmt = _SCALAR_FMT[vtype]
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        if vtype == 6:  # float32: keep its shortest decimal spelling (9.9999997e-06 -> 1e-05)
            v = float(str(np.float32(v)))
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str = "a string", decode: bool = True):
        n = self.u64(what)
        self._need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        if not decode:
            return None
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str, skip: bool):
        if vtype in _SCALAR_FMT:
            return self.scalar(vtype, f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype != _ARRAY:
            raise ModelLoadError(f"GGUF file {self.path} is corrupt: metadata key {key!r} has unknown value type {vtype}.")
        etype = self.u32(f"the array type of {key}")
        count = self.u64(f"the array length of {key}")
        if etype in _SCALAR_FMT:
            width = struct.calcsize(_SCALAR_FMT[etype])
            self._need(count * width, f"the array {key}")
            start = self.pos
            self.pos += count * width
            if skip:
                return None
            arr = np.frombuffer(self.buf, dtype=_SCALAR_NP[etype], count=count, offset=start)
            return [bool(x) for x in arr] if etype == 7 else arr.tolist()
        if etype == _STRING:
            if count > self.size:  # every string takes at least its 8-byte length
                self._need(count * 8, f"the array {key}")
            out = [self.string(f"an element of {key}", decode=not skip) for _ in range(count)]
            return None if skip else out
        if etype == _ARRAY:
            if count > self.size:
                self._need(count * 12, f"the array {key}")
            out = [self.value(_ARRAY, key, skip) for _ in range(count)]
            return None if skip else out
        raise ModelLoadError(f"GGUF file {self.path} is corrupt: array {key!r} has unknown element type {etype}.")


def _open_buffer(path: str):
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path} does not exist or is not a file.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelLoadError(f"GGUF file {path} is truncated or corrupt: only {size} bytes.")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"Cannot read GGUF file {path}: {e}") from e


def read_gguf_header(path: str | os.PathLike, *, skip: Container[str] = ()) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file (no tensor data is read). Keys in `skip` are parsed
    past but left out of `metadata` (use it for the big tokenizer arrays)."""
    return _read_header(os.fspath(path), skip)[0]


def _read_header(path: str, skip: Container[str]):
    buf = _open_buffer(path)
    cur = _Cursor(buf, path)
    if buf[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF').")
    cur.pos = 4
    version = cur.u32("the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ModelLoadError(f"GGUF file {path} has version {version}{hint}; versions 2 and 3 are supported.")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    if n_tensors > cur.size or n_kv > cur.size:
        raise ModelLoadError(f"GGUF file {path} is corrupt: {n_tensors} tensors, {n_kv} metadata keys.")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.u32(f"the type of {key}")
        v = cur.value(vtype, key, skip=key in skip)
        if key not in skip:
            metadata[key] = v
    raw = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.u32(f"the rank of {name}")
        if n_dims > 8:
            raise ModelLoadError(f"GGUF file {path} is corrupt: tensor {name!r} has {n_dims} dimensions.")
        dims = tuple(cur.u64(f"the shape of {name}") for _ in range(n_dims))
        type_id = cur.u32(f"the type of {name}")
        rel = cur.u64(f"the offset of {name}")
        raw.append((name, dims, type_id, rel))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT) or _DEFAULT_ALIGNMENT)
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, rel in raw:
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        info = GGML_TYPES.get(type_id)
        nbytes = None
        if info is not None:
            _, block, bsize = info
            if dims and dims[0] % block:
                raise ModelLoadError(f"GGUF file {path} is corrupt: tensor {name!r} of type {info[0]} has rows of "
                                     f"{dims[0]} elements, not a multiple of its block size {block}.")
            nbytes = n // block * bsize
            if data_offset + rel + nbytes > cur.size:
                raise ModelLoadError(f"GGUF file {path} is truncated: tensor {name!r} ends at byte "
                                     f"{data_offset + rel + nbytes}, the file has {cur.size} bytes.")
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), type_id, data_offset + rel, nbytes))
    return GGUFHeader(path, version, metadata, tensors, data_offset, cur.size), buf


# ---------------------------------------------------------------------------------------------------
# architecture mapping

_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)")
_EXTRA_NAMES = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor of a dense llama/qwen2/qwen3 model (None if unknown)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _uniform(value, key: str):
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise UnsupportedArchitectureError(f"GGUF metadata {key} varies per layer ({value}); not supported.")
        return value[0]
    return value


def gguf_to_hf_config(header: GGUFHeader) -> dict[str, Any]:
    md, arch = header.metadata, header.architecture
    if arch not in _ARCHS:
        raise UnsupportedArchitectureError(
            f"GGUF file {header.path} has architecture {arch!r}; supported: {', '.join(sorted(_ARCHS))}.")

    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

    names = {t.name: t for t in header.tensors}
    required = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
                "attention.head_count": "num_attention_heads", "feed_forward_length": "intermediate_size"}
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise ModelLoadError(f"GGUF file {header.path} lacks metadata {', '.join(missing)}.")
    hidden = int(get("embedding_length"))
    heads = int(_uniform(get("attention.head_count"), f"{arch}.attention.head_count"))
    kv_heads = int(_uniform(get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv"))
    head_dim = get("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count")
    head_dim = int(head_dim or hidden // heads)
    vocab = get("vocab_size")
    if vocab is None and "token_embd.weight" in names:
        vocab = names["token_embd.weight"].shape[0]
    architectures, model_type = _ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [architectures], "model_type": model_type,
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden, "intermediate_size": int(_uniform(get("feed_forward_length"), "feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in names
    for key, md_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{md_key}" in md:
            cfg[key] = int(md[f"tokenizer.ggml.{md_key}"])
    rope_type = get("rope.scaling.type")
    if rope_type and rope_type != "none":
        scaling: dict[str, Any] = {"rope_type": str(rope_type), "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        cfg["rope_scaling"] = scaling
    sliding = get("attention.sliding_window")
    if sliding:  # a window on every layer; Qwen's config.json spelling needs the switch and the first layer too
        cfg.update(sliding_window=int(sliding), use_sliding_window=True, max_window_layers=0)
    return cfg


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of Q/K rows (HF half-split rotary -> GGML interleaved)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot un-permute a Q/K projection of {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(buf, t: GGUFTensorInfo) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.type_id)
    name = t.type_name
    if name == "F32":
        arr = np.frombuffer(buf, dtype="<f4", count=t.nbytes // 4, offset=t.offset).copy()
    elif name == "F16":
        arr = np.frombuffer(buf, dtype="<f2", count=t.nbytes // 2, offset=t.offset).astype(np.float32)
    else:
        row_bytes = t.nbytes // max(1, int(np.prod(t.shape[:-1], dtype=np.int64))) if t.shape else t.nbytes
        raw = np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(-1, row_bytes)
        arr = dequantize(raw, qtype)
    return arr.reshape(t.shape) if t.shape else arr.reshape(())


def load_gguf(path: str | os.PathLike, *, dtype: "torch.dtype | None" = None) -> GGUFModel:
    """Read a dense llama / qwen2 / qwen3 GGUF into HF-named tensors (float32 unless `dtype` says)
    and an HF-style config dict. Every tensor's name and type is checked before anything is
    dequantised; problems raise ModelLoadError naming the file / tensor / type."""
    import torch

    dtype = dtype or torch.float32
    path = os.fspath(path)
    header, buf = _read_header(path, TOKENIZER_ARRAYS)
    config = gguf_to_hf_config(header)
    arch = header.architecture

    plan: list[tuple[GGUFTensorInfo, str | None]] = []
    problems = []
    for t in header.tensors:
        if t.type_name not in SUPPORTED_TYPES:
            problems.append(f"tensor {t.name!r} has type {t.type_name}")
            continue
        hf = hf_tensor_name(t.name)
        if hf is None and t.name not in _EXTRA_NAMES:
            raise UnsupportedArchitectureError(
                f"GGUF file {path}: tensor {t.name!r} is not part of a dense {arch} model this loader knows.")
        plan.append((t, hf))
    if problems:
        raise ModelLoadError(f"GGUF file {path}: unsupported tensor type(s): {'; '.join(problems[:8])}"
                             f"{' ...' if len(problems) > 8 else ''}. Supported: {', '.join(sorted(SUPPORTED_TYPES))}.")
    if "model.embed_tokens.weight" not in {hf for _, hf in plan}:
        raise ModelLoadError(f"GGUF file {path} has no token_embd.weight tensor.")

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def read(t: GGUFTensorInfo, hf: str | None) -> torch.Tensor:
        try:
            w = torch.from_numpy(_dequantize(buf, t))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"GGUF file {path}: cannot read tensor {t.name!r} ({t.type_name}): {e}") from e
        if arch == "llama" and hf is not None and ".self_attn.q_proj." in hf:
            w = _unpermute_rows(w, heads)
        elif arch == "llama" and hf is not None and ".self_attn.k_proj." in hf:
            w = _unpermute_rows(w, kv_heads)
        if dtype != torch.float32:
            w = w.to(dtype)
        return w.contiguous()

    by_name = {hf: t for t, hf in plan if hf is not None}
    extra = {t.name: read(t, None) for t, hf in plan if hf is None}
    types = {hf: t.type_name for hf, t in by_name.items()}
    tensors = LazyTensors(lambda name: read(by_name[name], name), list(by_name))
    metadata = dict(header.metadata)
    return GGUFModel(config=config, tensors=tensors, metadata=metadata, tensor_types=types, extra_tensors=extra)


__all__ = ["GGUFModel", "GGUFHeader", "GGUFTensorInfo", "load_gguf", "read_gguf_header", "gguf_to_hf_config",
           "hf_tensor_name", "SUPPORTED_TYPES", "ggml_type_name"]

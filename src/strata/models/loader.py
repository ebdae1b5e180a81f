"""Finding a model and streaming its weights: HF directories (sharded safetensors with index, or
PyTorch .bin), hub ids (through huggingface_hub where a network exists), single-file GGUF, and
`dummy` random weights. Each rank copies only its own shards (the layers' weight_loaders)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

import torch

from strata.core.errors import ModelLoadError
from strata.models.config import read_config_json


@dataclass
class ModelSource:
    path: str  # directory or .gguf file
    format: str  # "hf" | "gguf"
    config: dict
    gguf: object | None = None  # the loaded GGUFModel (config, tensors, tokenizer metadata)


def resolve_model(model: str | None, hf_overrides: dict | None = None) -> ModelSource:
    if model is None:
        from strata.models.embedded import default_model_path
        model = default_model_path()
    if model.endswith(".gguf") or (os.path.isfile(model) and _is_gguf(model)):
        if not os.path.isfile(model):
            raise ModelLoadError(f"GGUF file not found: {model}")
        from strata.models.gguf_loader import load_gguf
        g = load_gguf(model)
        return ModelSource(model, "gguf", {**g.config, **(hf_overrides or {})}, gguf=g)
    if os.path.isdir(model):
        path = model
    elif os.path.exists(model):
        raise ModelLoadError(f"{model} is neither a model directory nor a .gguf file")
    else:
        path = _from_hub(model)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    return ModelSource(path, "hf", {**read_config_json(cfg_path), **(hf_overrides or {})})


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _from_hub(repo_id: str) -> str:
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise ModelLoadError(f"model {repo_id!r} is not a directory, a .gguf file or a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelLoadError(f"model {repo_id!r} is not a local path and huggingface_hub is not installed") from e
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub (no network, or no such "
                             f"model): {type(e).__name__}: {e}. Pass a local directory or .gguf file instead.") from e


def iter_hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        for fn in files:
            fp = os.path.join(path, fn)
            if not os.path.isfile(fp):
                raise ModelLoadError(f"weight file {fp} listed in the index is missing")
            try:
                with safe_open(fp, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except ModelLoadError:
                raise
            except Exception as e:
                raise ModelLoadError(f"corrupt or unreadable weight file {fp}: {e}") from e
        return
    bins = sorted(f for f in os.listdir(path) if f.endswith(".bin") and "pytorch_model" in f)
    if not bins:
        raise ModelLoadError(f"no weight files (*.safetensors or pytorch_model*.bin) in {path}")
    for fn in bins:
        fp = os.path.join(path, fn)
        try:
            sd = torch.load(fp, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"corrupt or unreadable weight file {fp}: {e}") from e
        yield from sd.items()


# FP8 KV-cache scales of a checkpoint, per attention module (names after "model."): `self_attn.k_scale` /
# `v_scale` (FP8 checkpoints, llm-compressor), `self_attn.kv_scale` (older: one scale for K and V),
# `self_attn.{k,v}_proj.{k,v}_scale` (ModelOpt), `self_attn.{k,v}_proj.output_scale` (older compressed-tensors).
_KV_SCALE = re.compile(r"layers\.(\d+)\.self_attn\.(?:(k_scale|v_scale|kv_scale)|k_proj\.(k_scale|output_scale)"
                       r"|v_proj\.(v_scale|output_scale))$")


def kv_scale_target(name: str) -> tuple[int, tuple[str, ...]] | None:
    """(layer index, the scales it sets: ("k_scale",), ("v_scale",) or both) when checkpoint tensor `name` (with
    or without the "model." prefix) is a KV-cache scale, else None."""
    m = _KV_SCALE.fullmatch(name.removeprefix("model."))
    if m is None:
        return None
    plain, k_proj = m.group(2), m.group(3)
    which = ("k_scale", "v_scale") if plain == "kv_scale" else (plain,) if plain else \
        ("k_scale",) if k_proj else ("v_scale",)
    return int(m.group(1)), which


def load_weights(model: torch.nn.Module, source: ModelSource, load_format: str) -> None:
    if load_format == "dummy":
        init_dummy_weights(model)
        return
    if source.format == "gguf":
        weights = source.gguf.tensors.items()
    else:
        weights = iter_hf_weights(source.path)
    loaded = model.load_weights(weights)
    expected = {n for n, _ in model.named_parameters()}
    # online FP8 (--quantization fp8): weight scales are computed from the weights as they load
    expected -= {f"{n}.weight_scale" for n, m in model.named_modules()
                 if getattr(m, "quant", None) is not None and not m.quant.spec.checkpoint}
    missing = expected - loaded
    if missing:
        raise ModelLoadError(f"checkpoint at {source.path} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights (benchmarks): small uniform values keep activations finite in any dtype."""
    gens: dict[torch.device, torch.Generator] = {}
    fp8 = set()
    for m in model.modules():
        if getattr(m, "quant", None) is not None:  # FP8 linear layers (strata.layers.quant)
            from strata.layers.quant import init_dummy_fp8
            g = gens.setdefault(m.weight.device, torch.Generator(device=m.weight.device).manual_seed(seed))
            init_dummy_fp8(m, g)
            fp8.update(id(p) for p in (m.weight, m.weight_scale, getattr(m, "input_scale", None)))
    for name, p in model.named_parameters():
        if id(p) in fp8:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.uniform_(-0.05, 0.05, generator=g)

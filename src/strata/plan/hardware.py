"""Known GPUs (data-sheet numbers) and link bandwidths. Explicit numbers on the command line override them."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from strata.plan.errors import PlanError, UnknownGPUError
from strata.plan.units import parse_bandwidth, parse_bytes, parse_flops


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float  # total device memory as nvidia-smi reports it
    hbm_bw: float  # bytes/s, data sheet
    flops: float  # dense bf16 FLOP/s, data sheet (no sparsity)
    intra_bw: float  # bytes/s per GPU per direction inside a node (NVLink; PCIe where there is none)
    inter_bw: float  # bytes/s per GPU between nodes (InfiniBand / RoCE NIC per GPU)
    gpus_per_node: int = 8
    cost_per_hour: float = 0.0  # USD per GPU-hour
    intra_link: str = "nvlink"
    note: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


_MIB = 2**20

# Costs are ballpark on-demand cloud prices per GPU-hour; pass --cost-per-gpu-hour for your contract.
GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("h100-80gb", 81559 * _MIB, 3.35e12, 989e12, 450e9, 50e9, 8, 3.00,
            note="H100 SXM5 80GB HBM3, NVLink 4 (900 GB/s bidirectional), 400 Gb/s NDR per GPU"),
        GPU("h100-pcie", 81559 * _MIB, 2.0e12, 756e12, 64e9, 50e9, 8, 2.40, intra_link="pcie",
            note="H100 PCIe 80GB, PCIe Gen5 x16 between GPUs"),
        GPU("h200", 143771 * _MIB, 4.8e12, 989e12, 450e9, 50e9, 8, 3.80,
            note="H200 SXM 141GB HBM3e, NVLink 4, 400 Gb/s NDR per GPU"),
        GPU("a100-80gb", 81920 * _MIB, 2.039e12, 312e12, 300e9, 25e9, 8, 1.80,
            note="A100 SXM4 80GB, NVLink 3 (600 GB/s bidirectional), 200 Gb/s HDR per GPU"),
        GPU("a100-40gb", 40960 * _MIB, 1.555e12, 312e12, 300e9, 25e9, 8, 1.30,
            note="A100 SXM4 40GB, NVLink 3, 200 Gb/s HDR per GPU"),
        GPU("l40s", 46068 * _MIB, 0.864e12, 362e12, 32e9, 25e9, 8, 1.00, intra_link="pcie",
            note="L40S 48GB GDDR6, no NVLink (PCIe Gen4 x16), 200 Gb/s per GPU"),
    ]
}

_ALIASES = {
    "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-sxm5": "h100-80gb", "h100-80gb-hbm3": "h100-80gb",
    "h100-sxm5-80gb": "h100-80gb", "h200-141gb": "h200", "h200-sxm": "h200",
    "a100": "a100-80gb", "a100-sxm4-80gb": "a100-80gb", "a100-sxm4-40gb": "a100-40gb",
    "a100-80": "a100-80gb", "a100-40": "a100-40gb", "l40s-48gb": "l40s",
}


def _norm(name: str) -> str:
    n = name.strip().lower().replace("nvidia", "").replace("_", "-").replace(" ", "-")
    return re.sub(r"-+", "-", n).strip("-")


def gpu_from_device_name(device: str) -> str | None:
    """Table key for a torch / nvidia-smi device name ("NVIDIA H100 80GB HBM3" -> "h100-80gb"), or None."""
    n = _norm(device)
    if n in GPUS:
        return n
    if n in _ALIASES:
        return _ALIASES[n]
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100-pcie" if "pcie" in n else "h100-80gb"
    if "a100" in n:
        return "a100-40gb" if "40" in n else "a100-80gb"
    if "l40s" in n:
        return "l40s"
    return None


def get_gpu(name: str, *, memory: str | None = None, hbm_bw: str | None = None, flops: str | None = None,
            intra_bw: str | None = None, inter_bw: str | None = None, gpus_per_node: int | None = None,
            cost_per_hour: float | None = None) -> GPU:
    """Look a GPU up and apply explicit overrides. `custom` (or any unknown name) needs memory, bandwidth and
    FLOP/s given explicitly."""
    key = _norm(name)
    key = _ALIASES.get(key, key)
    base = GPUS.get(key)
    if base is None:
        missing = [flag for flag, v in (("--gpu-mem", memory), ("--hbm-bw", hbm_bw), ("--flops", flops)) if v is None]
        if missing:
            raise UnknownGPUError(
                f"unknown GPU {name!r}; known: {', '.join(GPUS)}. For another device give its numbers "
                f"({', '.join(missing)} missing), e.g. --gpu mygpu --gpu-mem 80GiB --hbm-bw 3.35TB/s --flops 989T")
        base = GPU(key or "custom", 0.0, 0.0, 0.0, 450e9, 50e9, 8, 0.0, note="explicit numbers")
    changes: dict = {}
    if memory is not None:
        changes["memory_bytes"] = parse_bytes(memory)
    if hbm_bw is not None:
        changes["hbm_bw"] = parse_bandwidth(hbm_bw)
    if flops is not None:
        changes["flops"] = parse_flops(flops)
    if intra_bw is not None:
        changes["intra_bw"] = parse_bandwidth(intra_bw)
    if inter_bw is not None:
        changes["inter_bw"] = parse_bandwidth(inter_bw)
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise PlanError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
        changes["gpus_per_node"] = gpus_per_node
    if cost_per_hour is not None:
        changes["cost_per_hour"] = float(cost_per_hour)
    gpu = dataclasses.replace(base, **changes)
    for field in ("memory_bytes", "hbm_bw", "flops", "intra_bw", "inter_bw"):
        if getattr(gpu, field) <= 0:
            raise PlanError(f"GPU {gpu.name}: {field} must be positive")
    return gpu


def parse_interconnect(text: str) -> dict[str, str]:
    """'nvlink=450GB/s,ib=50GB/s' -> {'intra': '450GB/s', 'inter': '50GB/s'}."""
    keys = {"nvlink": "intra", "intra": "intra", "pcie": "intra", "node": "intra",
            "ib": "inter", "inter": "inter", "infiniband": "inter", "net": "inter", "roce": "inter", "eth": "inter"}
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise PlanError(f"--interconnect {text!r}: expected key=bandwidth pairs like nvlink=450GB/s,ib=50GB/s")
        k, v = (s.strip() for s in part.split("=", 1))
        if k.lower() not in keys:
            raise PlanError(f"--interconnect: unknown link {k!r}; use nvlink (inside a node) and ib (between nodes)")
        parse_bandwidth(v)  # validate now
        out[keys[k.lower()]] = v
    return out

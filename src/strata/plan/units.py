"""Parsing of human quantities: bandwidths ("450GB/s", "400Gb/s"), sizes ("80GiB"), FLOP/s ("989T")."""
from __future__ import annotations

import re

from strata.plan.errors import PlanError

_NUM = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_DEC = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_BIN = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _split(text: str, what: str) -> tuple[float, str]:
    m = re.fullmatch(_NUM + r"\s*([A-Za-z/]*)", text.strip())
    if not m:
        raise PlanError(f"cannot read {what} {text!r}")
    return float(m.group(1)), m.group(2)


def parse_bandwidth(text: str) -> float:
    """Bytes per second. A bare number is GB/s. 'Gb/s' / 'Gbps' are bits (400Gb/s = 50 GB/s)."""
    value, unit = _split(text, "bandwidth")
    if unit == "":
        return value * 1e9
    m = re.fullmatch(r"([kKmMgGtT]?)(B|b)(?:/s|ps)", unit)
    if not m:
        raise PlanError(f"cannot read bandwidth {text!r}: use e.g. 450GB/s, 400Gb/s or 1.6TB/s")
    scale = _DEC[m.group(1).lower()]
    return value * scale / (8.0 if m.group(2) == "b" else 1.0)


def parse_bytes(text: str) -> float:
    """Bytes. A bare number is GiB (GPU memory is quoted that way); GB = 1e9, GiB = 2**30."""
    value, unit = _split(text, "memory size")
    if unit == "":
        return value * 2**30
    u = unit.lower()
    if u.endswith("ib") and u[:-1] in _BIN:
        return value * _BIN[u[:-1]]
    if u.endswith("b") and u[:-1] in _DEC:
        return value * _DEC[u[:-1]]
    raise PlanError(f"cannot read memory size {text!r}: use e.g. 80GiB or 141GB")


def parse_flops(text: str) -> float:
    """FLOP/s. A bare number below 1e6 is TFLOP/s; suffixes T/P (optionally followed by FLOPS)."""
    value, unit = _split(text, "FLOP/s")
    u = unit.lower().replace("flops", "").replace("flop/s", "")
    if u == "":
        return value * 1e12 if value < 1e6 else value
    if u in _DEC:
        return value * _DEC[u]
    raise PlanError(f"cannot read FLOP/s {text!r}: use e.g. 989T or 989e12")


def fmt_bytes(n: float) -> str:
    """Decimal units (GB = 1e9), as the seeds and vendor sheets use."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"

"""Every `STRATA_*` environment variable strata reads, declared once: name, type, default, one line of doc.

    from strata import settings
    if settings.FORCE_TRITON.get(): ...

A value is read from the environment at each `.get()` (tests and parent processes set variables after import),
parsed by the declared type; a bad value raises `SettingError` naming the variable. An unset or empty variable
gives the default. No torch here: the router and `strata plan` import this module and stay torch-free.
docs/SETTINGS.md is generated from this module (`python -m strata.settings > docs/SETTINGS.md`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingError(ValueError):
    """A `STRATA_*` variable holds a value its type does not accept."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # bool, int, float or str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()  # str settings: the accepted values (empty: any)
    group: str = "user"  # "user": a switch for people; "internal": plumbing between strata's own processes

    def get(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None or raw.strip() == "":
            return self.default
        return self.parse(raw.strip())

    def parse(self, raw: str) -> Any:
        if self.type is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise SettingError(f"{self.name}={raw!r}: expected one of {'/'.join(_TRUE + _FALSE)}")
        if self.type in (int, float):
            try:
                return self.type(raw)
            except ValueError:
                raise SettingError(f"{self.name}={raw!r}: expected {self.type.__name__}") from None
        if self.choices and raw not in self.choices:
            raise SettingError(f"{self.name}={raw!r}: expected one of {', '.join(self.choices)}")
        return raw


REGISTRY: dict[str, Setting] = {}


def _declare(name: str, type_: type, default: Any, doc: str, choices: tuple[str, ...] = (),
             group: str = "user") -> Setting:
    assert name.startswith("STRATA_") and name not in REGISTRY, name
    s = Setting(name, type_, default, doc, choices, group)
    REGISTRY[name] = s
    return s


# kernels (strata.ops)
FORCE_TRITON = _declare(
    "STRATA_FORCE_TRITON", bool, False,
    "run the Triton kernels on any device (CPU tests, with TRITON_INTERPRET=1); fail if they do not import")
DISABLE_TRITON = _declare(
    "STRATA_DISABLE_TRITON", bool, False, "run the pure-torch twins of every kernel, also on CUDA")
CPU_KERNELS = _declare(
    "STRATA_CPU_KERNELS", bool, True,
    "build and use strata's C kernels on the CPU (paged decode attention); 0 runs the torch twins")
MOE_CONFIG_DIR = _declare(
    "STRATA_MOE_CONFIG_DIR", str, "", "directory of tuned fused-MoE tile tables (default: the packaged moe_configs/)")

# engine and parallel ranks
CTRL = _declare(
    "STRATA_CTRL", str, "auto",
    "step-message channel between ranks: auto (shared memory when one node spawned them all) or gloo",
    choices=("auto", "gloo"))
HANG_DUMP_S = _declare(
    "STRATA_HANG_DUMP_S", float, 0.0,
    "diagnostics: a rank whose startup or step takes longer than this many seconds prints its threads' stacks "
    "(0: off)")
TP_ALLREDUCE = _declare(
    "STRATA_TP_ALLREDUCE", str, "nccl",
    "all-reduce of the tensor-parallel group's small tensors: nccl or symm_mem (one-shot, symmetric memory)",
    choices=("nccl", "symm_mem"))

# batch jobs
BATCH_DP_CHILD = _declare(
    "STRATA_BATCH_DP_CHILD", bool, False,
    "set by `strata batch --data-parallel-size N` in the worker processes it starts", group="internal")
BATCH_ARGS = _declare(
    "STRATA_BATCH_ARGS", str, "", "JSON arguments of a data-parallel `strata batch` worker", group="internal")

# serving, router
API_KEY = _declare(
    "STRATA_API_KEY", str, "", "`strata serve`: accepted API keys for /v1/*, comma-separated (added to --api-key)")
ROUTER_URL = _declare(
    "STRATA_ROUTER_URL", str, "http://127.0.0.1:9000", "`strata router status`: the router's URL")
ROUTER_KEY = _declare(
    "STRATA_ROUTER_KEY", str, "", "router key: the secret replicas present to /register and admin calls use")
ROUTER_LOOP = _declare(
    "STRATA_ROUTER_LOOP", str, "auto", "router event loop: auto (uvloop when installed) or asyncio",
    choices=("auto", "asyncio"))

# benchmarks
WORKLOAD_DIR = _declare(
    "STRATA_WORKLOAD_DIR", str, "", "`strata bench`: first directory searched for carried workload files")


def doc_table() -> str:
    """The Markdown of docs/SETTINGS.md."""
    lines = ["# Settings", "",
             "Every `STRATA_*` environment variable strata reads, generated from `src/strata/settings.py`",
             "(`python -m strata.settings > docs/SETTINGS.md`; tests/test_settings.py checks they agree). Booleans take",
             "1/0, true/false, yes/no, on/off; an unset or empty variable gives the default; a bad value is an error",
             "naming the variable.", "",
             "| variable | type | default | meaning |", "|---|---|---|---|"]
    for group in ("user", "internal"):
        if group == "internal":
            lines += ["", "Set by strata for its own child processes, not by hand:", "",
                      "| variable | type | default | meaning |", "|---|---|---|---|"]
        for s in REGISTRY.values():
            if s.group == group:
                default = "" if s.default == "" else f"`{s.default}`"
                lines.append(f"| `{s.name}` | {s.type.__name__} | {default} | {s.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(doc_table(), end="")

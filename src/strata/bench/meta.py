"""What every recorded figure carries: device, date, git commit, the exact command, library versions."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from typing import Any


def command_line(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = argv[0]
    if head == "strata" or os.path.basename(head) == "strata":
        return shlex.join(["strata"] + argv[1:])
    if head.replace(os.sep, "/").endswith("strata/cli.py") or head.replace(os.sep, "/").endswith("strata/__main__.py"):
        return shlex.join(["python", "-m", "strata.cli"] + argv[1:])
    return shlex.join(["python"] + argv)


def repo_dir() -> str:
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


def git_info(path: str | None = None) -> dict[str, Any]:
    path = path or repo_dir()
    def git(*a):
        r = subprocess.run(["git", *a], cwd=path, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str | None = None) -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["host_memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        props = torch.cuda.get_device_properties(0)
        info.update(device=f"{n} x {names[0]}" if n > 1 else names[0], gpus=names, gpu_count=n,
                    gpu_memory_gib=round(props.total_memory / (1 << 30), 1),
                    cuda=torch.version.cuda, cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        info["device"] = f"CPU: {info['cpu']} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return info


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "triton", "strata"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing library is recorded, not fatal
            out[mod] = None
    return out


def run_meta(device: str | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    g = git_info()
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": g["commit"], "dirty": g["dirty"], "command": command_line(argv),
            "host": platform.node(), **device_info(device), "versions": versions()}


def json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def write_json(path: str, data: dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(data), f, indent=2)
        f.write("\n")

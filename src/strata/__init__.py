"""strata: run large language models on large data and serve them."""
import os as _os
import sys as _sys

# OpenMP threads that spin-wait make every small CPU op pay a wake-up cost; on the 2-vCPU VMs measured
# here, elementwise ops ran 12x slower with the default policy than with PASSIVE (1.2 ms vs 14 ms for a
# 2048x576 add) and matmuls no faster. Only effective if torch is not imported yet.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> None:
    """glibc returns freed memory above 128 KiB-32 MiB (a moving threshold) to the kernel, and the next step's
    tensors of the same size fault their pages in again: on 2 cores a 2048-token prefill step took 370,000
    page faults and a second of system time in ~9 s. Fixed thresholds (allocations up to 32 MiB from the heap,
    up to 512 MiB of free heap kept) bring that to ~1,700 faults. Skipped where the user set glibc's own
    MALLOC_*_ variables, and off glibc."""
    if _sys.platform != "linux" or any(k.startswith("MALLOC_") and k.endswith("_") for k in _os.environ):
        return
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 512 << 20)


_keep_freed_memory()
from strata.core.sampling_params import SamplingParams
from strata.core.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":  # lazy: importing strata must not import torch
        from strata.engine.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

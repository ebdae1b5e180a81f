"""strata: run large language models on large data and serve them."""
import os as _os
import sys as _sys

# OpenMP threads that spin-wait make every small CPU op pay a wake-up cost; on the 2-vCPU VMs measured
# here, elementwise ops ran 12x slower with the default policy than with PASSIVE (1.2 ms vs 14 ms for a
# 2048x576 add) and matmuls no faster. Only effective if torch is not imported yet.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from strata.core.sampling_params import SamplingParams
from strata.core.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":  # lazy: importing strata must not import torch
        from strata.engine.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

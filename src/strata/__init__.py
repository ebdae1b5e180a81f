"""strata: run large language models on large data and serve them."""
from strata.core.sampling_params import SamplingParams
from strata.core.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":  # lazy: importing strata must not import torch
        from strata.engine.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

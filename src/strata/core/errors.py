"""Errors that name the problem. Each is raised before any work for the request or model starts."""
from __future__ import annotations

from strata.core.sampling_params import ParameterError, StructuredOutputError


class StrataError(Exception):
    pass


class PromptTooLongError(ParameterError):
    def __init__(self, prompt_len: int, max_model_len: int, param: str = "prompt"):
        super().__init__(param, f"The prompt has {prompt_len} tokens, more than the model's context length "
                                f"max_model_len={max_model_len} allows (at least one token must be generated).")
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


class ModelLoadError(StrataError):
    """Missing or corrupt model files, unsupported architecture or quantisation."""


class UnsupportedArchitectureError(ModelLoadError):
    pass


class EngineDeadError(StrataError):
    """The engine (or one of its workers) died; pending requests fail with this."""


__all__ = ["StrataError", "ParameterError", "PromptTooLongError", "StructuredOutputError", "ModelLoadError",
           "UnsupportedArchitectureError", "EngineDeadError"]

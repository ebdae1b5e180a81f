"""Offline API: `LLM(model).generate(prompts, params)` and `.chat(conversations, params)`."""
from __future__ import annotations

import itertools
import sys
import time
from typing import Sequence

from strata.config.engine import EngineArgs
from strata.core.outputs import RequestOutput
from strata.core.sampling_params import SamplingParams
from strata.engine.dp import DataParallelLLM
from strata.engine.llm_engine import LLMEngine

Prompt = str | list[int] | dict


class LLM:
    def __new__(cls, model: str | None = None, **kwargs):
        """data_parallel_size > 1: a DataParallelLLM (N replica processes, the same generate / chat calls)."""
        if int(kwargs.get("data_parallel_size") or 1) > 1:
            return DataParallelLLM(model, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # Validate everything before enqueueing anything: bad input fails the call, not half of it.
        items = []
        cache: dict[int, SamplingParams] = {}
        for p, sp in zip(prompts, params):
            if sp.output_kind != "final":  # offline calls only need the finished outputs
                sp = cache.setdefault(id(sp), sp.clone(output_kind="final"))
            if isinstance(p, dict):
                p = p.get("prompt_token_ids", p.get("prompt"))
            items.append((p, sp))
        ids = []
        try:
            for p, sp in items:
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, p, sp)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        return self._run(ids, use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                      **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, file=sys.stderr,
                       disable=not use_tqdm)
        t0 = time.perf_counter()
        gen0 = self.engine.generation_tokens_total
        while self.engine.has_unfinished_requests():
            steps_out = self.engine.step()
            out_toks = self.engine.generation_tokens_total - gen0
            for out in steps_out:
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.set_postfix_str(f"output {out_toks / max(dt, 1e-9):.1f} tok/s", refresh=False)
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]

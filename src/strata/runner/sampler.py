"""Sampling from logits: greedy, temperature, top-k, top-p, min-p, repetition/presence/frequency
penalties, min_tokens, per-request seeds and top-N logprobs.

Per-request seed: a seeded request draws its noise from its own generator, one [vocab] draw per token,
so its output does not depend on what else is in the batch. Unseeded rows share one batched draw.
Sampling is the exponential-race form of categorical sampling: argmax(p / E), E ~ Exp(1).

`Sampler.sample` keeps the token ids on the device and, without penalties or min_tokens masking, never
waits for the device: per-row parameters travel through pinned, non-blocking copies (`to_device`). That is
what lets the engine schedule the next step while this one runs (async scheduling).

Structured outputs: `sample(..., grammar=(rows, bitmask))` sets the tokens a row's grammar forbids to -inf
(`ops.apply_token_bitmask`, one kernel) after min_tokens and penalties and before anything picks a token; the
bitmask was filled on the host by the engine (`strata.structured`). min_tokens does not ban EOS on such rows:
the grammar decides when the output may end.

A row is anything with a request's sampling view: `params`, `generator`, `all_token_ids`, `output_token_ids`,
`num_output_tokens` (the runner's `RunnerRequest`; tests pass `core.request.Request`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from strata import ops
from strata.runner.inputs import to_device


@dataclass
class SamplingBatch:
    requests: list  # one per logits row

    def __post_init__(self):
        ps = [r.params for r in self.requests]
        self.all_greedy = all(p.greedy for p in ps)
        self.any_penalty = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in ps)
        self.any_structured = any(p.structured_outputs is not None for p in ps)
        self.any_min_tokens = any(r.num_output_tokens < r.params.min_tokens and r.params.structured_outputs is None
                                  for r in self.requests)
        self.max_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=None)


def apply_penalties(logits: torch.Tensor, reqs: list) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (vLLM, transformers); presence and frequency
    penalties over output tokens only (OpenAI, vLLM). Edits `logits` [B, V] in place and returns it."""
    V = logits.shape[1]
    for i, r in enumerate(reqs):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long, device=logits.device)
            seen = seen[seen < V]
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp_logits(logits: torch.Tensor, reqs: list) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (transformers' warper order): the logits [B, V] a row
    samples from, the tokens it may not draw at -inf. Greedy rows keep temperature 1."""
    V = logits.shape[1]
    dev = logits.device
    temps = to_device([max(r.params.temperature, 1e-5) if not r.params.greedy else 1.0 for r in reqs],
                      torch.float32, dev)
    logits = logits / temps[:, None]
    top_ks = [r.params.top_k for r in reqs]
    if any(k > 0 for k in top_ks):
        k = to_device([min(k, V) if k > 0 else V for k in top_ks], torch.int64, dev)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).view(-1, 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = [r.params.top_p for r in reqs]
    if any(p < 1.0 for p in top_ps):
        # From the least likely token up, drop tokens while the mass dropped stays <= 1 - top_p: what is
        # left is the smallest set whose mass reaches top_p, the most likely token always in it. Tied
        # tokens at the edge are cut in sort order, as transformers and vLLM do.
        rest = to_device([1.0 - p if p < 1.0 else -1.0 for p in top_ps], torch.float32, dev)
        ascending, order = logits.sort(dim=-1)
        sorted_drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= rest[:, None]
        sorted_drop[:, -1] = False
        drop = torch.zeros_like(sorted_drop).scatter(1, order, sorted_drop)
        logits = logits.masked_fill(drop, float("-inf"))
    min_ps = [r.params.min_p for r in reqs]
    if any(m > 0 for m in min_ps):
        m = to_device(min_ps, torch.float32, dev)
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * m[:, None], float("-inf"))
    return logits


def host_logprobs(lps: tuple | None, batch: SamplingBatch) -> list | None:
    """The logprob tensors of `Sampler.sample` as per-row (chosen, [(token, logprob)]) or None."""
    if lps is None:
        return None
    chosen, top_v, top_i = (t.tolist() for t in lps)
    out = []
    for i, r in enumerate(batch.requests):
        n = r.params.logprobs
        out.append(None if n is None else (chosen[i], list(zip(top_i[i][:n], top_v[i][:n]))))
    return out


class Sampler:
    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, grammar: tuple | None = None):
        """logits: [B, V] -> (token ids [B] as a list, logprobs per row or None)."""
        tokens, lps = self.sample(logits, batch, grammar)
        return tokens.tolist(), host_logprobs(lps, batch)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch,
               grammar: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple | None]:
        """logits: [B, V] -> (token ids [B] int64 on the device, logprob tensors or None), the latter
        (chosen [B], top values [B, N], top ids [B, N]) for `host_logprobs`. `grammar`: (rows [K] int64,
        bitmask [K, ceil(V / 32)] int32) on the device, the allowed tokens of K constrained rows."""
        owned = logits.dtype != torch.float32  # .float() below copies
        logits = logits.float()
        reqs = batch.requests
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None
        if batch.any_min_tokens:
            logits = logits.clone()
            for i, r in enumerate(reqs):
                if r.num_output_tokens < r.params.min_tokens and r.params.structured_outputs is None:
                    banned = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(r.params.eos_token_ids))
                    if banned:
                        logits[i, banned] = float("-inf")
        if batch.any_penalty:
            logits = apply_penalties(logits.clone() if not batch.any_min_tokens else logits, reqs)
        if grammar is not None and grammar[0].numel():
            if not (owned or batch.any_min_tokens or batch.any_penalty):
                logits = logits.clone()  # (raw_logprobs and the model's output stay unmasked)
            ops.apply_token_bitmask(logits, grammar[1], grammar[0])
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, reqs)
        if raw_logprobs is None:
            return tokens, None
        chosen = raw_logprobs.gather(1, tokens.view(-1, 1)).view(-1)
        top_v, top_i = raw_logprobs.topk(max(batch.max_logprobs, 1), dim=-1)
        return tokens, (chosen, top_v, top_i)

    def _sample(self, logits: torch.Tensor, reqs: list) -> torch.Tensor:
        B, V = logits.shape
        dev = logits.device
        greedy_rows = to_device([r.params.greedy for r in reqs], torch.bool, dev)
        greedy_tokens = logits.argmax(dim=-1)
        probs = torch.softmax(warp_logits(logits, reqs), dim=-1)
        unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
        if len(unseeded) == B:
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
        else:
            noise = torch.empty_like(probs)
            if unseeded:  # (indexing with a list would copy it to the device synchronously)
                rows = to_device(unseeded, torch.int64, dev)
                noise[rows] = torch.empty(len(unseeded), V, device=dev).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                noise[i] = torch.empty(V, device=dev).exponential_(generator=r.generator)
        scores = probs / noise
        if any(r.params.structured_outputs is not None for r in reqs):
            scores.masked_fill_(probs == 0, -1.0)  # a zero draw on a forbidden token (0 / 0) never wins
        sampled = scores.argmax(dim=-1)
        return torch.where(greedy_rows, greedy_tokens, sampled)

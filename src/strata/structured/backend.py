"""Grammar compilation and per-request grammar state, on xgrammar.

Why xgrammar (docs/STRUCTURED.md): it is vLLM's and SGLang's default backend, its compiled grammars carry a
precomputed per-state token-mask cache (filling a 150k-vocabulary bitmask costs tens of microseconds), it
compiles JSON schema, regex, EBNF and structural tags, fills many matchers' bitmasks on its own threads, and
its wheel installs beside any torch (pure C++ with a small FFI package; `pip install 'strata[structured]'`).

    backend = GrammarBackend(tokenizer, vocab_size, stop_token_ids)
    fut = backend.prepare(params.structured_outputs)  # checks the spec now (StructuredOutputError), compiles
                                                      # on a worker thread; cached by (kind, spec)
    g = RequestGrammar(fut)                           # one per request (n > 1: one per sample)
    g.ready / g.accept(token) / g.is_terminated() / backend.fill_bitmask([g, ...], out)

The engine owns the backend and the `RequestGrammar` of every request (`Request.grammar`); the scheduler only
asks `ready` (admission) and `accept`/`is_terminated` (update). Nothing here touches the device.
"""
from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from strata.core.errors import StructuredOutputError
from strata.core.sampling_params import StructuredOutputsParams


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise StructuredOutputError("structured_outputs", "structured outputs need the xgrammar package: "
                                    f"pip install 'strata[structured]' ({e})") from None
    return xgrammar


# JSON schemas: at most this many whitespace characters between two JSON tokens (xgrammar's max_whitespace_cnt).
# Enough for any indentation a model writes, and a model that would pad forever (random weights, a small model
# in a loop) must move on to the next key or value. vLLM leaves runs unbounded.
MAX_JSON_WHITESPACE = 24


# JSON string characters in xgrammar 0.2.9's grammars admit two kinds of text that are not JSON text, both seen in
# schema outputs of random weights on an H200 (2026-12-03-h200-structured-*.json):
# - a string with minLength/maxLength is a run of [^"\\\r\n], which admits raw control characters that JSON forbids
#   in strings (xgrammar's plain strings exclude \0-\x1f): 4 of the 5 invalid rows kept of 20;
# - every string class is matched as UTF-8 byte sequences that include the encodings of U+D800-U+DFFF, which are
#   not UTF-8 (ED A0-BF xx): byte-level tokens spelled a surrogate, the text decoded to three U+FFFD and broke a
#   maxLength (2 of 608 rows after the first fix).
# `strict_json_strings` rewrites both classes to exclude what JSON text cannot hold.
_STRICT_CLASS = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'
_JSON_CLASSES = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]', r'[^\"\\\0-\x1f]')  # bounded, schema, json_object


def strict_json_strings(g, xgr):
    """The grammar with every JSON string character class narrowed to what JSON text allows (no raw control
    characters, no surrogate code points)."""
    text = str(g)
    if not any(c in text for c in _JSON_CLASSES):
        return g
    for c in _JSON_CLASSES:
        text = text.replace(c, _STRICT_CLASS)
    return xgr.Grammar.from_ebnf(text)


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (JSON string escapes are EBNF literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarBackend:
    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int], max_workers: int = 2):
        xgr = _xgr()
        self.xgr = xgr
        self.vocab_size = vocab_size  # the model's (logits) width
        # The grammar's vocabulary is the tokenizer's, not the model's padded logits width: ids past the tokenizer
        # have no text and are never allowed (the bitmask is narrower than the logits, and `apply_token_bitmask`
        # forbids every column past it). xgrammar treats each such id as a special token, and its accept_token
        # pays for them on every call: with SmolLM2's 49,152-token tokenizer under a 151,936-wide model, 36 us
        # per accepted token instead of 1.2 us (CPU, 2026-12-03).
        self.grammar_vocab = min(vocab_size, max([len(hf_tokenizer), *(int(t) + 1 for t in stop_token_ids)]))
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=self.grammar_vocab,
                                                       stop_token_ids=list(stop_token_ids))
        threads = max(1, min(8, os.cpu_count() or 1))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads)
        self.batch_matcher = xgr.BatchGrammarMatcher(max_threads=threads)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="strata-grammar")
        self._cache: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self.bitmask_width = (self.grammar_vocab + 31) // 32

    # ---- compilation
    def grammar(self, so: StructuredOutputsParams):
        """The spec as an xgrammar `Grammar` (parsing only: milliseconds, no token work). Raises
        StructuredOutputError naming the field when the spec is not accepted."""
        xgr, kind = self.xgr, so.kind
        param = f"structured_outputs.{kind}"
        try:
            if kind == "json":
                any_ws = not so.disable_any_whitespace
                g = xgr.Grammar.from_json_schema(json.dumps(so.json), any_whitespace=any_ws,
                                                 max_whitespace_cnt=MAX_JSON_WHITESPACE if any_ws else None)
                return strict_json_strings(g, xgr)
            if kind == "json_object":
                return strict_json_strings(xgr.Grammar.builtin_json_grammar(), xgr)
            if kind == "regex":
                return xgr.Grammar.from_regex(so.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(choice_ebnf(so.choice))
            if kind == "grammar":
                return xgr.Grammar.from_ebnf(so.grammar)
            tag = so.structural_tag
            return xgr.Grammar.from_structural_tag(tag if isinstance(tag, str) else json.dumps(tag))
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own kinds
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", msg)  # xgrammar's "[time] file.cc:line: " prefix
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "structural_tag": "structural tag"}
            raise StructuredOutputError(param, f"{param} is not a valid {what.get(kind, kind)}: {msg}") from None

    def prepare(self, so: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar, from the cache or started now on a worker thread. The spec is
        parsed here, synchronously, so a bad one fails the request before it is queued."""
        key = so.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                return fut
        g = self.grammar(so)
        with self._lock:
            fut = self._cache.get(key)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self.pool.submit(self.compiler.compile_grammar, g)
                self._cache[key] = fut
        return fut

    def compile_now(self, so: StructuredOutputsParams):
        """Compile in this thread (benchmarks, tools): the CompiledGrammar."""
        return self.prepare(so).result()

    # ---- the mask
    def new_bitmask(self, rows: int, pin: bool = False) -> torch.Tensor:
        return torch.empty((rows, self.bitmask_width), dtype=torch.int32, pin_memory=pin)

    def fill_bitmask(self, grammars: list["RequestGrammar"], out: torch.Tensor) -> None:
        """Row i of `out` [len(grammars), W] int32: the tokens grammars[i] allows next (bit t % 32 of word
        t // 32). Many rows are filled on xgrammar's own threads."""
        if len(grammars) >= 8:
            self.batch_matcher.batch_fill_next_token_bitmask([g.matcher for g in grammars], out)
        else:
            for i, g in enumerate(grammars):
                g.matcher.fill_next_token_bitmask(out, i)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's grammar state: the compile future, then a matcher that has accepted every output token
    the scheduler appended. Preemption (recompute) keeps a request's output tokens, so the matcher stays valid
    as it is; nothing is rolled back or replayed."""

    __slots__ = ("future", "_matcher", "num_accepted", "failed")

    def __init__(self, future: Future):
        self.future = future
        self._matcher = None
        self.num_accepted = 0
        self.failed = False  # a sampled token the grammar rejected (should not happen: the mask forbids it)

    @property
    def ready(self) -> bool:
        """Compiled without error (the scheduler admits the request only then)."""
        return self.future.done() and self.future.exception() is None

    @property
    def error(self) -> BaseException | None:
        return self.future.exception() if self.future.done() else None

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr
            self._matcher = xgr.GrammarMatcher(self.future.result())
        return self._matcher

    def accept(self, token: int) -> bool:
        ok = self.matcher.accept_token(token)
        self.num_accepted += ok
        self.failed = self.failed or not ok
        return ok

    def is_terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()

"""What `strata batch` checks before it loads the model, so that the answer comes in a second, not after
the model has loaded: is anything left to do (a finished output), and do the first rows to do read the way
the job says (a wrong --text-field stops the job here, and nothing is written).

The check reads the input up to the first row to do that reads well (on a finished output: to the end), with
the selection the job itself makes. Selecting by token counts (--min/--max-text-tokens) needs the model's
tokenizer: it is loaded alone, from the GGUF file's metadata or the model folder's tokenizer.json, without
transformers or torch; where that cannot be done (a hub id...), the checks wait for the model.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from strata.batch.jobs import CONFIG_ERRORS, JobBuilder, JobOptions
from strata.batch.output import ScanResult
from strata.batch.readers import open_reader
from strata.batch.runner import Counters, misconfigured_message, select_records


@dataclass
class Preflight:
    nothing_left: bool = False
    misconfigured: str | None = None  # the message, when the first rows all fail with configuration errors
    counters: Counters | None = None


class _TokenCounter:
    """A `tokenizers.Tokenizer` with the `encode` of strata's Tokenizer (all the selection needs)."""
    chat_template = None

    def __init__(self, raw: Any):
        self._raw = raw

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._raw.encode(text, add_special_tokens=add_special_tokens).ids


def light_tokenizer(args: argparse.Namespace) -> Any | None:
    """The tokenizer the engine will load (see `strata.engine.llm_engine.load_tokenizer`), for counting tokens
    only, loaded without the model; None where that is not possible here."""
    from strata.engine.tokenizer import _byte_level_from_metadata
    from strata.models.embedded import default_model_path
    from strata.models.gguf_loader import read_gguf_header

    path = getattr(args, "tokenizer", None) or getattr(args, "model", None)
    try:
        if path is None:
            path = default_model_path()
        if os.path.isdir(path):
            file = os.path.join(path, "tokenizer.json")
            if os.path.isfile(file):
                from tokenizers import Tokenizer
                return _TokenCounter(Tokenizer.from_file(file))
            if getattr(args, "tokenizer", None) or os.path.isfile(os.path.join(path, "tokenizer_config.json")):
                return None  # a tokenizer only transformers can load
            path = default_model_path()  # a bare config folder: the engine uses the embedded tokenizer
        if not (os.path.isfile(path) and path.endswith(".gguf")):
            return None
        md = read_gguf_header(path).metadata
        if md.get("tokenizer.ggml.model") != "gpt2" or not md.get("tokenizer.ggml.merges"):
            return None
        return _TokenCounter(_byte_level_from_metadata(md, backend_only=True))
    except Exception:  # noqa: BLE001 - the model load reports a broken model; the checks just wait for it
        return None


def preflight(args: argparse.Namespace, opts: JobOptions, fmt: str, scan: ScanResult, rank: int, world: int,
              tokenizer: Any = None, fail_fast: int = 100) -> Preflight | None:
    """None when the checks cannot be made before the model loads (stdin, a token filter without a tokenizer).
    `fail_fast`: as `run_jobs`'s (0: no configuration check)."""
    if args.input == "-":
        return None
    if opts.min_text_tokens is not None or opts.max_text_tokens is not None:
        tokenizer = tokenizer or light_tokenizer(args)
        if tokenizer is None:
            return None
    builder = JobBuilder(opts, tokenizer)
    counters = Counters()
    records = open_reader(args.input, fmt, columns=opts.needed_columns())
    want = max(1, fail_fast)
    errors, fields = [], None
    for rec, _key, id_ in select_records(records, builder, rank=rank, world_size=world,
                                         done=scan.keys if scan.rows else None, limit=args.limit, counters=counters):
        err = builder.check(rec, id_)
        if fields is None and isinstance(rec.data, dict):
            fields = [str(k) for k in list(rec.data)[:20]]
        if err is None or err.type not in CONFIG_ERRORS or not fail_fast:
            return Preflight(counters=counters)  # a row the job can do (or whose error is its own)
        errors.append(err)
        if len(errors) >= want:
            break
    if not errors:
        return Preflight(nothing_left=True, counters=counters)
    return Preflight(misconfigured=misconfigured_message(errors, fields), counters=counters)

"""From input rows to engine requests (`Job`) and row errors (`ErrorItem`); `strata.batch.rows` defines both and
the output rows they become.

Two row kinds:
- plain rows: the prompt comes from `--text-field`, `--prompt-template` ("{field}" placeholders) or
  `--messages-field`, wrapped in the model's chat template with `--system-prompt`. Output row:
  `{"id", "row", "text", "finish_reason", "prompt_tokens", "output_tokens", "truncated", ..., "error"}`.
- OpenAI batch rows (`custom_id`, `method`, `url`, `body`): the body of a /v1/chat/completions or
  /v1/completions request. Output row: `{"id", "custom_id", "response": {"status_code", "request_id",
  "body"}, "error"}` as the OpenAI Batch API writes it; a request the API would refuse gets status 400 and an
  OpenAI error body, a line that is not a request at all gets `response: null` and `error`.

Truncation (`--max-input-tokens`): `content` (default) cuts the text itself so the chat template around it
(system prompt, the assistant turn's opening) stays whole; `right`/`left` cut the templated prompt's token
ids. Truncated rows say so (`truncated`, `prompt_tokens_untruncated`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from strata.batch.readers import Record, RowError
from strata.batch.rows import ErrorItem, Job, error_row, job_error_row, result_row  # re-exported: see __all__
from strata.core.sampling_params import ParameterError, SamplingParams

SENTINEL = "\u2063STRATA\u2063CONTENT\u2063"  # invisible separators: no template alters them
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
_MISSING = object()
# Row errors that, when every one of the first rows has one, mean the job is misconfigured (a wrong
# --text-field or --id-field, the wrong --input-format): the job stops instead of recording them.
CONFIG_ERRORS = frozenset({"missing_field", "non_text_field", "missing_id", "invalid_id", "invalid_messages"})


def is_openai_row(obj: Any) -> bool:
    return isinstance(obj, dict) and "custom_id" in obj and ("body" in obj or "url" in obj)


def get_path(obj: Any, path: str) -> Any:
    """`obj[path]`, else dotted lookup (`meta.title`); _MISSING when absent."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    cur = obj
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def template_fields(template: str) -> list[str]:
    return [m.group(1).strip() for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


def render_template(template: str, data: dict) -> str:
    """Substitute `{field}` (dotted paths allowed; `{{`/`}}` are literal braces). Raises RowErrorExc."""
    def sub(m: re.Match) -> str:
        tok = m.group(0)
        if tok == "{{":
            return "{"
        if tok == "}}":
            return "}"
        name = m.group(1).strip()
        v = get_path(data, name)
        if v is _MISSING or v is None:
            raise RowErrorExc("missing_field", f"field {name!r} (in --prompt-template) is missing")
        if isinstance(v, (str, int, float, bool)):
            return str(v)
        raise RowErrorExc("non_text_field", f"field {name!r} (in --prompt-template) is {type(v).__name__}, not text")
    return _PLACEHOLDER.sub(sub, template)


class RowErrorExc(Exception):
    def __init__(self, type_: str, message: str, status_code: int = 400, param: str | None = None):
        super().__init__(message)
        self.error = RowError(type_, message)
        self.status_code = status_code
        self.param = param


# ---------------------------------------------------------------- options

PLAIN_DEFAULTS = {"max_tokens": 256, "temperature": 0.0}  # batch jobs are greedy (reproducible) unless asked
OPENAI_DEFAULTS = {"max_tokens": None, "temperature": 1.0}  # the OpenAI API's own defaults


@dataclass
class JobOptions:
    mode: str = "plain"  # plain | openai
    id_field: str | None = None
    text_field: str | None = "text"
    prompt_template: str | None = None
    messages_field: str | None = None
    system_prompt: str | None = None
    instruction: str | None = None  # appended to the user turn after the row's text; never truncated
    chat_template: bool = True
    include_fields: list[str] = field(default_factory=list)
    max_input_tokens: int | None = None
    truncation_side: str = "content"  # content | right | left
    on_too_long: str = "truncate"  # truncate | error
    sampling: dict = field(default_factory=dict)  # values the user gave explicitly (None ones dropped)
    filters: list[tuple[str, str]] = field(default_factory=list)
    min_text_tokens: int | None = None
    max_text_tokens: int | None = None

    def needed_columns(self) -> list[str] | None:
        """Top-level columns a columnar reader must load (None: all)."""
        if self.mode == "openai" or self.messages_field is None and self.text_field is None and not self.prompt_template:
            return None
        cols = []
        for f in [self.id_field, self.text_field, self.messages_field, *self.include_fields,
                  *(k for k, _ in self.filters), *(template_fields(self.prompt_template) if self.prompt_template else [])]:
            if f:
                cols.append(f.split(".")[0])
        return cols

    @property
    def selects_by_content(self) -> bool:
        return bool(self.filters) or self.min_text_tokens is not None or self.max_text_tokens is not None


# ---------------------------------------------------------------- building

class JobBuilder:
    """Turns records into Jobs or ErrorItems. Holds the tokenizer; used from one thread at a time."""

    def __init__(self, opts: JobOptions, tokenizer: Any, *, max_model_len: int | None = None):
        self.o = opts
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None)) and opts.chat_template
        self._affix_cache: dict[tuple, tuple[str, str] | None] = {}
        # tokenizers' encode_batch runs in Rust threads without the GIL, so that tokenising the next rows in
        # the prefetch thread does not hold up the engine's loop; None: one tokenizer.encode per row.
        backend = getattr(getattr(tokenizer, "hf", None), "backend_tokenizer", None)
        self._encode_batch = (lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]) \
            if backend is not None and hasattr(backend, "encode_batch") else None
        self._tail = "\n\n" + opts.instruction if opts.instruction else ""  # after the row's text
        self._plain_sampling = {**PLAIN_DEFAULTS, **opts.sampling}
        self._openai_sampling = {**OPENAI_DEFAULTS, **opts.sampling}
        SamplingParams(**self._plain_sampling)  # fail fast on bad CLI values

    # ---- identity and selection (cheap; before a row is built)

    def identify(self, rec: Record) -> tuple[str, Any]:
        """(resume key, id) of a loaded record."""
        if self.o.mode != "openai" and not self.o.id_field:
            return str(rec.row), rec.row
        if rec.data is not None:
            if self.o.mode == "openai":
                cid = rec.data.get("custom_id")
                if isinstance(cid, (str, int)) and not isinstance(cid, bool):
                    return str(cid), cid
            elif self.o.id_field:
                v = get_path(rec.data, self.o.id_field)
                if isinstance(v, (str, int)) and not isinstance(v, bool):
                    return str(v), v
        return f"#row{rec.row}", None

    def selected(self, rec: Record) -> bool:
        """False when `--filter` / `--min/max-text-tokens` leave the row out (no output row at all). Rows
        that are broken are selected: they become error rows."""
        if rec.data is None:
            return True
        for name, want in self.o.filters:
            v = get_path(rec.data, name)
            if v is _MISSING or str(v) != want:
                return False
        if self.o.min_text_tokens is not None or self.o.max_text_tokens is not None:
            try:
                n = len(self._content_ids(rec))
            except RowErrorExc:
                return True
            if self.o.min_text_tokens is not None and n < self.o.min_text_tokens:
                return False
            if self.o.max_text_tokens is not None and n > self.o.max_text_tokens:
                return False
        return True

    # ---- building

    def prepare(self, recs: list[Record]) -> None:
        """Tokenise the prompts of several plain rows at once (an optimisation: `build` gives the same
        result without it)."""
        o = self.o
        if self._encode_batch is None or o.mode != "plain" or o.messages_field or not self.has_chat_template:
            return
        todo, texts = [], []
        for rec in recs:
            if rec.data is None or rec.error is not None:
                continue
            try:
                content = self._content(rec)
            except RowErrorExc:
                continue
            messages = self._plain_messages(content)
            aff = self._affixes(messages, len(messages) - 1, self._tail)
            if aff is None:
                return
            todo.append(rec)
            texts.append(aff[0] + content + aff[1])
        if not todo:
            return
        for rec, ids in zip(todo, self._encode_batch(texts)):
            rec.cache["prompt_ids"] = ids
        limit = o.max_input_tokens
        if limit is not None and o.on_too_long == "truncate" and o.truncation_side == "content":
            over = [r for r in todo if len(r.cache["prompt_ids"]) > limit and "content_ids" not in r.cache]
            if over:
                for rec, ids in zip(over, self._encode_batch([r.cache["content"] for r in over])):
                    rec.cache["content_ids"] = ids

    def _plain_messages(self, content: str) -> list[dict]:
        messages = ([{"role": "system", "content": self.o.system_prompt}] if self.o.system_prompt else [])
        messages.append({"role": "user", "content": content})
        return messages

    def _id_error(self, rec: Record, id_: Any) -> RowError | None:
        if id_ is not None or not (self.o.mode == "openai" or self.o.id_field):
            return None
        what = "custom_id" if self.o.mode == "openai" else f"id field {self.o.id_field!r}"
        v = rec.data.get("custom_id") if self.o.mode == "openai" else get_path(rec.data, self.o.id_field)
        if v is _MISSING or v is None:
            return RowError("missing_id", f"{what} is missing")
        return RowError("invalid_id", f"{what} is {type(v).__name__}, not a string or integer")

    def check(self, rec: Record, id_: Any) -> RowError | None:
        """The row's error when it can be found without the tokenizer (unreadable row, id, text field), else
        None. `strata batch` checks the first rows with it before it loads the model."""
        if rec.error is not None:
            return rec.error
        err = self._id_error(rec, id_)
        if err is not None or self.o.mode == "openai":
            return err
        try:
            if self.o.messages_field:
                _check_messages(get_path(rec.data, self.o.messages_field), self.o.messages_field)
            else:
                self._content(rec)
        except RowErrorExc as e:
            return e.error
        return None

    def build(self, rec: Record, key: str, id_: Any) -> Job | ErrorItem:
        kind = self.o.mode
        if rec.error is not None:
            return ErrorItem(key, id_, rec.row, rec.error, kind)
        err = self._id_error(rec, id_)
        if err is not None:
            return ErrorItem(key, None, rec.row, err, kind)
        try:
            if kind == "openai":
                return self._build_openai(rec, key, id_)
            return self._build_plain(rec, key, id_)
        except RowErrorExc as e:
            extra = self._extra(rec) if kind == "plain" else None
            return ErrorItem(key, id_, rec.row, e.error, kind, e.status_code if kind == "openai" else None,
                             e.param, extra)

    def _extra(self, rec: Record) -> dict | None:
        if not self.o.include_fields or rec.data is None:
            return None
        out = {}
        for f in self.o.include_fields:
            v = get_path(rec.data, f)
            out[f] = None if v is _MISSING else v
        return out

    def _content(self, rec: Record) -> str:
        c = rec.cache.get("content") if rec.cache else None
        if c is not None:
            return c
        o = self.o
        if o.prompt_template:
            c = render_template(o.prompt_template, rec.data)
        else:
            v = get_path(rec.data, o.text_field)
            if v is _MISSING or v is None:
                raise RowErrorExc("missing_field", f"field {o.text_field!r} is missing")
            if not isinstance(v, str):
                raise RowErrorExc("non_text_field", f"field {o.text_field!r} is {type(v).__name__}, not text")
            c = v
        if not c.strip():
            raise RowErrorExc("empty_text", "the prompt text is empty")
        rec.cache = {**(rec.cache or {}), "content": c}
        return c

    def _content_ids(self, rec: Record) -> list[int]:
        ids = rec.cache.get("content_ids") if rec.cache else None
        if ids is None:
            ids = self.tok.encode(self._content(rec), add_special_tokens=False)
            rec.cache["content_ids"] = ids
        return ids

    def _build_plain(self, rec: Record, key: str, id_: Any) -> Job:
        o = self.o
        if o.messages_field:
            messages = _check_messages(get_path(rec.data, o.messages_field), o.messages_field)
            if o.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": o.system_prompt}, *messages]
            ids, truncated, full = self._prompt_ids(messages, None)
        else:
            content = self._content(rec)
            ids, truncated, full = self._prompt_ids(self._plain_messages(content), rec, self._tail)
        params = _sampling(self._plain_sampling)
        return Job(key, id_, rec.row, ids, params, "plain", None, truncated, full if truncated else None,
                   self._extra(rec))

    def _build_openai(self, rec: Record, key: str, id_: Any) -> Job:
        d = rec.data
        method = d.get("method", "POST")
        if str(method).upper() != "POST":
            raise RowErrorExc("invalid_request", f"method {method!r} is not supported; only POST", param="method")
        url = d.get("url")
        if url not in OPENAI_URLS:
            raise RowErrorExc("invalid_request", f"url {url!r} is not supported; use one of {', '.join(OPENAI_URLS)}",
                              param="url")
        body = d.get("body")
        if not isinstance(body, dict):
            raise RowErrorExc("invalid_request", "body must be a JSON object", param="body")
        for unsupported in ("tools", "functions", "tool_choice", "function_call"):
            if body.get(unsupported):
                raise RowErrorExc("invalid_request", f"{unsupported!r} is not supported by strata batch", param=unsupported)
        params = _openai_params(body, self._openai_sampling, url)
        if url == "/v1/chat/completions":
            messages = _check_messages(body.get("messages", _MISSING), "messages", openai=True)
            ids, truncated, full = self._prompt_ids(messages, None)
        else:
            prompt = body.get("prompt", _MISSING)
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.tok.encode(prompt, add_special_tokens=True)
                ids, truncated, full = self._truncate_raw(ids, prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids, truncated, full = self._truncate_ids(list(prompt))
            elif prompt is _MISSING:
                raise RowErrorExc("invalid_request", "prompt is required", param="prompt")
            else:
                raise RowErrorExc("invalid_request", "prompt must be a string or a list of token ids "
                                  "(several prompts per request are not supported in batch files)", param="prompt")
        return Job(key, id_, rec.row, ids, params, "openai", url, truncated, full if truncated else None)

    # ---- templating and truncation

    def _affixes(self, messages: list[dict], ci: int, tail: str = "") -> tuple[str, str] | None:
        """(text before, text after) message `ci`'s content in the rendered chat prompt, when that message
        is the content followed by `tail`; None if the template does not reproduce the content verbatim."""
        if not self.has_chat_template:
            return "", tail
        ck = (tail, *((m["role"], m["content"] if i != ci else None) for i, m in enumerate(messages)))
        if ck in self._affix_cache:
            return self._affix_cache[ck]
        probe = [dict(m) for m in messages]
        probe[ci]["content"] = SENTINEL + tail
        rendered = self.tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        res = None
        if rendered.count(SENTINEL) == 1:
            pre, post = rendered.split(SENTINEL)
            # The fast path (prefix + content + suffix) must equal rendering; check with awkward content.
            probe[ci]["content"] = " x\n" + tail
            if self.tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False) == pre + " x\n" + post:
                res = (pre, post)
        if len(self._affix_cache) > 1024:
            self._affix_cache.clear()
        self._affix_cache[ck] = res
        return res

    def _prompt_ids(self, messages: list[dict], rec: Record | None, tail: str = "") -> tuple[list[int], bool, int]:
        """Token ids of the chat prompt, truncated per the options: (ids, truncated, untruncated length).
        `tail` (the --instruction) follows the last user message's content and is never cut."""
        ci = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        content = messages[ci]["content"]
        if not self.has_chat_template:
            text = "\n\n".join(m["content"] for m in messages)
            ids = self.tok.encode(text + tail, add_special_tokens=True)
            return self._truncate_raw(ids, text, tail)
        aff = self._affixes(messages, ci, tail)
        cached = rec.cache.get("prompt_ids") if rec is not None and rec.cache else None
        if cached is not None and aff is not None and rec.cache.get("content") == content:
            ids = cached  # from prepare(): the same text, tokenised in a batch
        else:
            if aff is not None:
                text = aff[0] + content + aff[1]
            else:
                full = [*messages[:ci], {**messages[ci], "content": content + tail}, *messages[ci + 1:]]
                text = self.tok.apply_chat_template(full, add_generation_prompt=True, tokenize=False)
            ids = self.tok.encode(text, add_special_tokens=False)
        limit = self.o.max_input_tokens
        if limit is None or len(ids) <= limit:
            return ids, False, len(ids)
        if self.o.on_too_long == "error":
            raise RowErrorExc("prompt_too_long", f"the prompt has {len(ids)} tokens, more than --max-input-tokens={limit}",
                              param="messages")
        if self.o.truncation_side == "content" and aff is not None:
            pre = self.tok.encode(aff[0], add_special_tokens=False) if aff[0] else []
            post = self.tok.encode(aff[1], add_special_tokens=False) if aff[1] else []
            budget = limit - len(pre) - len(post)
            if budget < 1:
                raise RowErrorExc("prompt_too_long", f"the chat template, system prompt and instruction alone take "
                                  f"{len(pre) + len(post)} tokens, --max-input-tokens={limit} leaves no room for the text")
            cids = (self._content_ids(rec) if rec is not None and rec.cache and rec.cache.get("content") == content
                    else self.tok.encode(content, add_special_tokens=False))
            return pre + cids[:budget] + post, True, len(ids)
        return self._cut(ids), True, len(ids)

    def _truncate_raw(self, ids: list[int], text: str, tail: str = "") -> tuple[list[int], bool, int]:
        limit = self.o.max_input_tokens
        if limit is None or len(ids) <= limit:
            return ids, False, len(ids)
        if self.o.on_too_long == "error":
            raise RowErrorExc("prompt_too_long", f"the prompt has {len(ids)} tokens, more than --max-input-tokens={limit}",
                              param="prompt")
        if self.o.truncation_side == "content":
            special = self.tok.encode("", add_special_tokens=True)
            body = self.tok.encode(text, add_special_tokens=False)
            end = self.tok.encode(tail, add_special_tokens=False) if tail else []
            return special + body[: max(1, limit - len(special) - len(end))] + end, True, len(ids)
        return self._cut(ids), True, len(ids)

    def _truncate_ids(self, ids: list[int]) -> tuple[list[int], bool, int]:
        limit = self.o.max_input_tokens
        if limit is None or len(ids) <= limit:
            return ids, False, len(ids)
        if self.o.on_too_long == "error":
            raise RowErrorExc("prompt_too_long", f"the prompt has {len(ids)} tokens, more than --max-input-tokens={limit}",
                              param="prompt")
        return self._cut(ids), True, len(ids)

    def _cut(self, ids: list[int]) -> list[int]:
        limit = self.o.max_input_tokens
        return ids[-limit:] if self.o.truncation_side == "left" else ids[:limit]


def _check_messages(v: Any, name: str, openai: bool = False) -> list[dict]:
    if v is _MISSING or v is None:
        raise RowErrorExc("missing_field" if not openai else "invalid_request", f"{name!r} is missing", param=name)
    if not isinstance(v, list) or not v:
        raise RowErrorExc("invalid_messages", f"{name!r} must be a non-empty list of messages", param=name)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RowErrorExc("invalid_messages", f"{name}[{i}] must be an object with a 'role'", param=name)
        c = m.get("content")
        if isinstance(c, list):  # OpenAI content parts: text only
            parts = []
            for p in c:
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                    parts.append(p["text"])
                else:
                    raise RowErrorExc("invalid_messages", f"{name}[{i}]: only text content parts are supported", param=name)
            c = "\n".join(parts)
        if c is None and m.get("role") == "assistant":
            c = ""
        if not isinstance(c, str):
            raise RowErrorExc("non_text_field", f"{name}[{i}].content is {type(c).__name__}, not text", param=name)
        out.append({"role": m["role"], "content": c})
    return out


# Batch rows need only each request's final output: no per-step detokenization or output objects.
_FINAL = {"output_kind": "final"} if "output_kind" in SamplingParams.__dataclass_fields__ else {}


def _sampling(kw: dict) -> SamplingParams:
    try:
        return SamplingParams(**kw, **_FINAL)
    except ParameterError as e:
        raise RowErrorExc("invalid_parameter", str(e), param=e.param) from e
    except (TypeError, ValueError) as e:
        raise RowErrorExc("invalid_parameter", f"invalid sampling parameters: {e}") from e


def _structured(body: dict):
    """A body's own output constraint: OpenAI's `response_format`, or vLLM's `structured_outputs` (docs/STRUCTURED.md)."""
    from strata.core.errors import StructuredOutputError
    from strata.core.sampling_params import StructuredOutputsParams
    from strata.core.structured import params_from_response_format
    try:
        if body.get("structured_outputs") is not None:
            so = body["structured_outputs"]
            if not isinstance(so, dict):
                raise StructuredOutputError("structured_outputs", "structured_outputs must be an object")
            return StructuredOutputsParams(**so)
        return params_from_response_format(body.get("response_format"))
    except StructuredOutputError as e:
        raise RowErrorExc("invalid_request", str(e), param=e.param) from e
    except TypeError as e:
        raise RowErrorExc("invalid_request", f"structured_outputs: {e}", param="structured_outputs") from e


def _openai_params(body: dict, defaults: dict, url: str) -> SamplingParams:
    kw = dict(defaults)
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        kw["max_tokens"] = mt
    for name in ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
                 # vLLM's extensions of the OpenAI body
                 "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "skip_special_tokens", "include_stop_str_in_output"):
        if body.get(name) is not None:
            kw[name] = body[name]
    if body.get("stop") is not None:
        kw["stop"] = body["stop"]
    so = _structured(body)
    if so is not None:
        kw["structured_outputs"] = so
    if url == "/v1/chat/completions":
        if body.get("logprobs"):
            kw["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:
        kw["logprobs"] = body["logprobs"]
    for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        if k in kw and kw[k] is not None and not isinstance(kw[k], (int, float)) or isinstance(kw.get(k), bool):
            raise RowErrorExc("invalid_parameter", f"{k} must be a number, got {kw[k]!r}", param=k)
    for k in ("max_tokens", "n", "seed", "top_k", "min_tokens"):
        if kw.get(k) is not None and (not isinstance(kw[k], int) or isinstance(kw[k], bool)):
            raise RowErrorExc("invalid_parameter", f"{k} must be an integer, got {kw[k]!r}", param=k)
    return _sampling(kw)


__all__ = ["SENTINEL", "OPENAI_URLS", "PLAIN_DEFAULTS", "OPENAI_DEFAULTS", "Job", "ErrorItem",
           "RowErrorExc", "JobOptions", "JobBuilder", "is_openai_row", "get_path", "template_fields",
           "render_template", "result_row", "error_row", "job_error_row"]

"""Request bodies of the OpenAI API (plus vLLM's extensions), parsed and validated into `SamplingParams`.

Unknown fields are ignored, as OpenAI and vLLM do. Every problem becomes `ParameterError(param, message)`
(400 with `param` naming the field); features strata does not implement are refused with 400 rather than
silently ignored. Output constraints (`response_format`, `structured_outputs`, `guided_*`) are read by
serve/structured.py, tools by serve/tools.py.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from strata.core.sampling_params import ParameterError, SamplingParams
from strata.serve.structured import make as make_constraint
from strata.serve.structured import request_constraint

MAX_N = 128
MAX_LOGPROBS = 20
# torch generators take seeds in [-2^63, 2^64); sample i of n uses seed + i
_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1 - MAX_N


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] | None = None
    suffix: str | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    add_special_tokens: bool = True


class ChatCompletionRequest(_SamplingFields):
    messages: list[Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class BatchCreateRequest(_Body):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------- parsing
def parse_json_object(raw: bytes) -> dict:
    """The body must be one JSON object; anything else is a 400."""
    if not raw.strip():
        raise ParameterError(None, "The request body is empty; expected a JSON object.")  # type: ignore[arg-type]
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ParameterError(None, f"The request body is not valid JSON: {e}") from None  # type: ignore[arg-type]
    except RecursionError:
        raise ParameterError(None, "The request body is nested too deeply.") from None  # type: ignore[arg-type]
    if not isinstance(body, dict):
        raise ParameterError(None, f"The request body must be a JSON object, got {type(body).__name__}.")  # type: ignore[arg-type]
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def parse_model(cls: type[BaseModel], body: dict) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        # drop pydantic's union-branch names ("list[int]", "str", ...) from the location
        loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid value")
        inp = err.get("input")
        shown = json.dumps(inp)[:200] if _jsonable(inp) else repr(inp)[:200]
        raise ParameterError(param, f"Invalid value for '{param}': {msg} (got {shown})") from None  # type: ignore[arg-type]


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- sampling
def _check_range(param: str, value, lo=None, hi=None, *, lo_open=False, what="") -> None:
    if value is None:
        return
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        lo_s = "(" if lo_open else "["
        raise ParameterError(param, f"{param} must be in {lo_s}{lo}, {hi}]{what}, got {value!r}")


def _common_checks(r: _SamplingFields) -> None:
    if r.stream_options is not None and not r.stream:
        raise ParameterError("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(r.n, int) or not 1 <= r.n <= MAX_N:
        raise ParameterError("n", f"n must be an integer in [1, {MAX_N}], got {r.n!r}")
    _check_range("temperature", r.temperature, 0.0, 2.0)
    _check_range("top_p", r.top_p, 0.0, 1.0, lo_open=True)
    if r.top_k is not None and r.top_k < -1:
        raise ParameterError("top_k", f"top_k must be -1 (off), 0 (off) or a positive integer, got {r.top_k}")
    _check_range("min_p", r.min_p, 0.0, 1.0)
    _check_range("presence_penalty", r.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", r.frequency_penalty, -2.0, 2.0)
    _check_range("repetition_penalty", r.repetition_penalty, 0.0, 2.0, lo_open=True)
    if r.seed is not None and not _SEED_MIN <= r.seed <= _SEED_MAX:
        raise ParameterError("seed", f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {r.seed}")
    if r.logit_bias:
        raise ParameterError("logit_bias", "logit_bias is not supported by this server")
    if r.prompt_logprobs is not None:
        raise ParameterError("prompt_logprobs", "prompt_logprobs is not supported by this server")
    if r.min_tokens is not None and r.min_tokens < 0:
        raise ParameterError("min_tokens", f"min_tokens must be >= 0, got {r.min_tokens}")
    stops = [r.stop] if isinstance(r.stop, str) else (r.stop or [])
    for s in stops:
        if s == "":
            raise ParameterError("stop", "stop sequences must be non-empty strings")
    for t in r.stop_token_ids or []:
        if t < 0:
            raise ParameterError("stop_token_ids", f"stop_token_ids must be non-negative, got {t}")


def _max_tokens_check(value: int | None, param: str) -> None:
    if value is not None and value < 1:
        raise ParameterError(param, f"{param} must be at least 1, got {value}")


def _sampling(r: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
              constraint: Any = None) -> SamplingParams:
    extra = {"structured_outputs": constraint} if constraint is not None else {}
    return SamplingParams(
        n=r.n,
        temperature=1.0 if r.temperature is None else float(r.temperature),
        top_p=1.0 if r.top_p is None else float(r.top_p),
        top_k=-1 if r.top_k is None else int(r.top_k),
        min_p=0.0 if r.min_p is None else float(r.min_p),
        presence_penalty=r.presence_penalty or 0.0,
        frequency_penalty=r.frequency_penalty or 0.0,
        repetition_penalty=1.0 if r.repetition_penalty is None else float(r.repetition_penalty),
        seed=r.seed,
        max_tokens=max_tokens,
        min_tokens=r.min_tokens or 0,
        stop=r.stop,
        stop_token_ids=r.stop_token_ids,
        ignore_eos=r.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=r.skip_special_tokens,
        include_stop_str_in_output=r.include_stop_str_in_output,
        priority=r.priority,
        **extra,
    )


def completion_sampling_params(r: CompletionRequest) -> SamplingParams:
    _common_checks(r)
    _max_tokens_check(r.max_tokens, "max_tokens")
    if r.suffix:
        raise ParameterError("suffix", "suffix is not supported by this server")
    if r.best_of is not None and r.best_of != r.n:
        raise ParameterError("best_of", f"best_of must equal n ({r.n}) on this server, got {r.best_of}")
    if r.logprobs is not None and not 0 <= r.logprobs <= MAX_LOGPROBS:
        raise ParameterError("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {r.logprobs}")
    if r.echo and r.logprobs is not None:
        raise ParameterError("echo", "echo together with logprobs is not supported (prompt logprobs are not computed)")
    if r.min_tokens and r.max_tokens is not None and r.min_tokens > r.max_tokens:
        raise ParameterError("min_tokens", f"min_tokens ({r.min_tokens}) must be <= max_tokens ({r.max_tokens})")
    return _sampling(r, max_tokens=r.max_tokens, logprobs=r.logprobs, constraint=request_constraint(r)[0])


def chat_max_tokens(r: ChatCompletionRequest) -> tuple[int | None, str]:
    """max_completion_tokens wins over the deprecated max_tokens (OpenAI's rule)."""
    if r.max_completion_tokens is not None:
        return r.max_completion_tokens, "max_completion_tokens"
    return r.max_tokens, "max_tokens"


def chat_sampling_params(r: ChatCompletionRequest, tool_constraint: dict | None = None,
                         tools_field: str = "tools") -> SamplingParams:
    """`tool_constraint`: the grammar of tool_choice "required" or a named function (serve/tools.py), from the
    request field `tools_field` ("tools", or the deprecated "functions")."""
    _common_checks(r)
    max_tokens, mt_param = chat_max_tokens(r)
    _max_tokens_check(r.max_tokens, "max_tokens")
    _max_tokens_check(r.max_completion_tokens, "max_completion_tokens")
    if r.top_logprobs is not None:
        if not 0 <= r.top_logprobs <= MAX_LOGPROBS:
            raise ParameterError("top_logprobs", f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                                 f"got {r.top_logprobs}")
        if not r.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs requires logprobs to be true")
    if r.min_tokens and max_tokens is not None and r.min_tokens > max_tokens:
        raise ParameterError("min_tokens", f"min_tokens ({r.min_tokens}) must be <= {mt_param} ({max_tokens})")
    if r.continue_final_message and r.add_generation_prompt:
        raise ParameterError("continue_final_message", "continue_final_message and add_generation_prompt "
                                                       "cannot both be true")
    if r.echo:
        raise ParameterError("echo", "echo is not supported for chat completions")
    logprobs = (r.top_logprobs or 0) if r.logprobs else None
    constraint, param = request_constraint(r)
    if tool_constraint is not None:
        if constraint is not None:
            raise ParameterError(param, f"{param} cannot be combined with tool_choice 'required' or a named "
                                        "function (the tool calls' grammar constrains the output)")
        constraint = make_constraint(tool_constraint, tools_field)
    return _sampling(r, max_tokens=max_tokens, logprobs=logprobs, constraint=constraint)


# ---------------------------------------------------------------------------------------------- messages
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def normalize_messages(messages: Any, param: str = "messages") -> list[dict]:
    """Validate chat messages; returns them with content flattened to text (the template's input)."""
    if not isinstance(messages, list) or not messages:
        raise ParameterError(param, f"{param} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        p = f"{param}.{i}"
        if not isinstance(m, dict):
            raise ParameterError(p, f"{p} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in _ROLES:
            raise ParameterError(f"{p}.role", f"{p}.role must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None:
            if role not in ("assistant", "function"):  # a deprecated function result may be null (OpenAI's type)
                raise ParameterError(f"{p}.content", f"{p}.content is required for role {role!r}")
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ParameterError(f"{p}.content.{j}", f"only text content parts are supported, got {kind!r}")
                t = part.get("text")
                if not isinstance(t, str):
                    raise ParameterError(f"{p}.content.{j}.text", "a text part needs a string 'text'")
                parts.append(t)
            text = "\n".join(parts)
        else:
            raise ParameterError(f"{p}.content", f"{p}.content must be a string or a list of text parts")
        msg = {k: v for k, v in m.items() if k not in ("content",)}
        msg["role"] = "system" if role == "developer" else role
        msg["content"] = text
        out.append(msg)
    return out

"""Sampling parameters, validated once at construction (vLLM's names and meanings)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class ParameterError(ValueError):
    """A request parameter is out of range. `param` names it (the server maps it to OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StructuredOutputError(ParameterError):
    """A structured-output spec (JSON schema, regex, choice, grammar) that is malformed or does not compile;
    `param` names the field (e.g. "structured_outputs.json"; the server may rename it "response_format").
    (Defined here beside ParameterError, re-exported by strata.core.errors.)"""


_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's `StructuredOutputsParams`): exactly one of
    `json` (a JSON schema: dict, JSON string or pydantic model class), `json_object` (any JSON object),
    `regex`, `choice` (one of these strings), `grammar` (xgrammar EBNF), `structural_tag` (xgrammar's JSON).
    Checked here for shape; the grammar itself is checked when the engine takes the request."""
    json: Any = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False  # JSON: no free whitespace between tokens (compact output)

    def __post_init__(self) -> None:
        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            names = ", ".join(_KINDS)
            raise StructuredOutputError("structured_outputs", f"structured_outputs needs exactly one of {names}; "
                                        f"got {', '.join(set_) or 'none'}")
        kind = set_[0]
        setattr(self, kind, check_spec(kind, getattr(self, kind), f"structured_outputs.{kind}"))

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """What a compiled grammar is cached under. JSON keeps its key order (it is the output's order)."""
        kind = self.kind
        v = getattr(self, kind)
        spec = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        return kind, spec, self.disable_any_whitespace


def check_spec(kind: str, v: Any, param: str) -> Any:
    """One constraint's value checked for shape and normalised (a JSON schema given as JSON text or as a pydantic
    model class becomes a dict, choices a list). Errors are `StructuredOutputError`s naming `param`: the
    server passes the request's field (e.g. "guided_json"), `StructuredOutputsParams` "structured_outputs.<kind>"."""
    if kind == "json":
        if isinstance(v, type) and hasattr(v, "model_json_schema"):  # a pydantic model class
            v = v.model_json_schema()
        elif isinstance(v, (str, bytes)):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise StructuredOutputError(param, f"{param} is not valid JSON: {e}") from None
        if not isinstance(v, (dict, bool)):
            raise StructuredOutputError(param, f"{param} must be a JSON schema object, got {type(v).__name__}")
    elif kind == "json_object":
        if v is not True:
            raise StructuredOutputError(param, f"{param} must be true, got {v!r}")
    elif kind == "choice":
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(c, str) and c for c in v):
            raise StructuredOutputError(param, f"{param} must be a non-empty list of non-empty strings")
        v = list(v)
    elif kind == "structural_tag":
        if isinstance(v, str):
            try:
                json.loads(v)
            except ValueError as e:
                raise StructuredOutputError(param, f"{param} is not valid JSON: {e}") from None
        elif not isinstance(v, dict):
            raise StructuredOutputError(param, f"{param} must be a JSON string or object")
    elif not isinstance(v, str) or not v:  # regex, grammar
        raise StructuredOutputError(param, f"{param} must be a non-empty string")
    return v


def check_json_schema(schema: Any, param: str) -> dict | bool:
    """`check_spec("json", ...)`, then the schema checked against its meta-schema (with `jsonschema`, when it is
    installed; the grammar engine checks what it compiles either way). The server checks every schema a request
    carries with this, so a bad one is a 400 naming the field, with the place in the schema."""
    schema = check_spec("json", schema, param)
    try:
        from jsonschema import Draft202012Validator, SchemaError, validators
    except ImportError:
        return schema
    try:
        validators.validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise StructuredOutputError(param, f"{param}: invalid JSON schema at {where}: {e.message}") from None
    return schema


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per output token (0: only the chosen token's)
    prompt_logprobs: int | None = None  # accepted for API compatibility; not computed
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0  # lower runs first with the priority policy
    # What step outputs carry: "cumulative" (full text + deltas every step), "delta" (the same; consumers
    # read the deltas), "final" (one output when the request finishes: no per-step work).
    output_kind: str = "cumulative"
    # Constrain the output to a JSON schema, regex, choice or grammar (a dict is taken as its fields).
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine from the tokenizer/generation_config, not by users.
    eos_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.structured_outputs, dict):
            so = self.structured_outputs
            unknown = sorted(set(so) - set(StructuredOutputsParams.__dataclass_fields__))
            if unknown:
                raise ParameterError("structured_outputs", f"structured_outputs has unknown fields {unknown}")
            self.structured_outputs = StructuredOutputsParams(**so)
        self.validate()

    def validate(self) -> None:
        def bad(param: str, msg: str) -> None:
            raise ParameterError(param, f"{param} {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature is None or self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < -1):
            bad("top_k", f"must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        if self.output_kind not in ("cumulative", "delta", "final"):
            bad("output_kind", f"must be cumulative, delta or final, got {self.output_kind!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", f"entries must be non-empty strings, got {s!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", f"must be StructuredOutputsParams or a dict, got "
                                      f"{type(self.structured_outputs).__name__}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                bad("stop_token_ids", f"entries must be non-negative integers, got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone(self, **changes) -> "SamplingParams":
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(changes)
        return SamplingParams(**d)

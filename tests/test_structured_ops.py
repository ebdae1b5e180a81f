"""The grammar bitmask on the logits: the Triton kernel against its torch twin (CPU, TRITON_INTERPRET=1), and
masked sampling never picking a masked token (property test over the sampler's parameters)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch
from hypothesis import given, settings, strategies as st

from strata.core.sampling_params import SamplingParams, StructuredOutputsParams
from strata.ops import ref
from strata.runner.sampler import Sampler, SamplingBatch

try:
    import triton  # noqa: F401
    from strata.ops import triton_kernels as tk
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _TRITON_ERR = e


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """[K, V] bool -> [K, ceil(V / 32)] int32 bitmask (bit t % 32 of word t // 32)."""
    K, V = allowed.shape
    W = (V + 31) // 32
    bits = torch.zeros(K, W * 32, dtype=torch.int64)
    bits[:, :V] = allowed.long()
    words = (bits.view(K, W, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
@pytest.mark.parametrize("B,V,rows,dtype", [(4, 100, [0, 2], torch.float32), (3, 4097, [2, 0, 1], torch.float32),
                                            (5, 64, [4], torch.bfloat16), (2, 77, [], torch.float32)])
def test_bitmask_kernel_matches_twin(B, V, rows, dtype):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=g).to(dtype)
    allowed = torch.rand(len(rows), V, generator=g) < 0.3
    bitmask = pack(allowed)
    r = torch.tensor(rows, dtype=torch.int64)
    a = tk.apply_token_bitmask(logits.clone(), bitmask, r)
    b = ref.apply_token_bitmask(logits.clone(), bitmask, r)
    assert torch.equal(a, b)
    for k, row in enumerate(rows):  # masked -> -inf, the rest untouched
        assert torch.isinf(b[row][~allowed[k]]).all() and torch.equal(b[row][allowed[k]], logits[row][allowed[k]])
    untouched = [i for i in range(B) if i not in rows]
    assert torch.equal(b[untouched], logits[untouched])


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
def test_bitmask_masks_padded_vocab_columns():
    """A bitmask narrower than the logits (the model's embedding is padded past the tokenizer): columns past
    W * 32 are never allowed, by both implementations."""
    logits = torch.zeros(2, 100)
    bitmask = torch.full((1, 2), -1, dtype=torch.int32)  # 64 tokens, all allowed
    for f in (ref.apply_token_bitmask, tk.apply_token_bitmask):
        out = f(logits.clone(), bitmask, torch.tensor([1]))
        assert (out[1, :64] == 0).all() and torch.isinf(out[1, 64:]).all() and (out[0] == 0).all()


class Row:
    """The sampler's view of a request."""

    def __init__(self, params: SamplingParams, generator=None):
        self.params, self.generator = params, generator
        self.all_token_ids, self.output_token_ids, self.num_output_tokens = [1, 2], [], 0


SO = StructuredOutputsParams(regex="a+")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 6), V=st.integers(2, 300))
def test_masked_sampling_never_picks_a_masked_token(data, B, V):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = torch.randn(B, V, generator=g) * data.draw(st.sampled_from([0.1, 1.0, 30.0]))
    rows, reqs = [], []
    for i in range(B):
        constrained = data.draw(st.booleans())
        p = SamplingParams(temperature=data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
                           top_k=data.draw(st.sampled_from([-1, 1, 5])), top_p=data.draw(st.sampled_from([1.0, 0.5])),
                           min_p=data.draw(st.sampled_from([0.0, 0.2])), min_tokens=data.draw(st.sampled_from([0, 3])),
                           seed=data.draw(st.sampled_from([None, 7])), eos_token_ids=[0],
                           structured_outputs=SO if constrained else None)
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        reqs.append(Row(p, gen))
        if constrained:
            rows.append(i)
    allowed = torch.rand(len(rows), V, generator=g) < data.draw(st.sampled_from([0.01, 0.3, 0.9]))
    for k in range(len(rows)):  # at least one allowed token, sometimes only the worst one
        if not allowed[k].any():
            allowed[k, int(logits[rows[k]].argmin())] = True
    grammar = (torch.tensor(rows, dtype=torch.int64), pack(allowed))
    tokens, _ = Sampler(seed=3).sample(logits.clone(), SamplingBatch(reqs), grammar)
    for k, i in enumerate(rows):
        assert allowed[k, tokens[i]], f"row {i} picked masked token {int(tokens[i])}"


def test_length_bounded_json_strings_refuse_control_characters():
    """xgrammar 0.2.9 writes strings with minLength/maxLength as runs of [^"\\\r\n], which lets raw control
    characters through (JSON forbids them; 4 of the 5 invalid outputs kept from an H200 run had them). The backend narrows the class;
    plain strings, escapes of the schema and non-ASCII text are unchanged."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from strata.structured.backend import GrammarBackend

    backend = GrammarBackend.__new__(GrammarBackend)  # grammar() needs only the xgrammar module
    backend.xgr = xgr
    so = StructuredOutputsParams(json={
        "type": "object", "required": ["a", "t", "p"],
        "properties": {"a": {"type": "string", "maxLength": 5}, "p": {"type": "string"},
                       "t": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3}}}})
    g = backend.grammar(so)
    assert accepts(g, '{"a": "h\u00e9", "p": "x", "t": ["ab"]}')  # properties in the schema's order
    for bad in ('{"a": "x\x0by", "p": "x", "t": []}', '{"a": "xy", "p": "x", "t": ["a\tb"]}',
                '{"a": "xy", "p": "\x1c", "t": []}', '{"a": "abcdef", "p": "x", "t": []}'):
        assert not accepts(g, bad), repr(bad)


@pytest.mark.parametrize("kind", ["bounded", "plain", "json_object"])
def test_json_strings_refuse_surrogate_code_points(kind):
    """UTF-8 spellings of U+D800-U+DFFF are not UTF-8 (an H200 run's byte tokens spelled ED AF 98 inside a string:
    the text decoded to three U+FFFD and broke maxLength). Every JSON string class refuses them; real non-ASCII
    text (2-, 3- and 4-byte characters) still passes."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from strata.structured.backend import GrammarBackend

    backend = GrammarBackend.__new__(GrammarBackend)
    backend.xgr = xgr
    prop = {"type": "string", "maxLength": 5} if kind == "bounded" else {"type": "string"}
    so = (StructuredOutputsParams(json_object=True) if kind == "json_object" else
          StructuredOutputsParams(json={"type": "object", "properties": {"a": prop}, "required": ["a"]}))
    g = backend.grammar(so)
    for good in ("h\u00e9".encode(), "\u4e2d".encode(), b"\xf0\x9f\x98\x80"):
        assert accepts(g, b'{"a": "' + good + b'"}'), good
    for bad in (b"\xed\xaf\x98", b"\xed\xa0\x80", b"x\xed\xbf\xbf"):
        assert not accepts(g, b'{"a": "' + bad + b'"}'), bad

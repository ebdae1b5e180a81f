"""Structured outputs on the embedded SmolLM2: every output of a JSON schema (enum, integer range, nested object,
array, pattern), a regex and a choice is valid; the grammar state survives preemption, async scheduling, n > 1,
seeds and stop strings; bad specs fail before anything is queued."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from strata.core.errors import StructuredOutputError
from strata.core.sampling_params import SamplingParams, StructuredOutputsParams as SO
from strata.core.structured import params_from_response_format
from strata.engine.llm import LLM

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,8}-[0-9]{3}"
CHOICE = ["positive", "negative", "neutral"]


def convs(n, what):
    return [[{"role": "user", "content": f"{what} (number {i})"}] for i in range(n)]


@pytest.fixture(scope="module")
def llm():
    return LLM(check_invariants=True)


def texts(outs):
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def test_json_schema_64_outputs_all_valid(llm):
    # compact (no free whitespace) for CI time; the free-whitespace default runs in the tests below
    params = [SamplingParams(max_tokens=300, temperature=0.7, seed=i,
                             structured_outputs=SO(json=SCHEMA, disable_any_whitespace=True)) for i in range(64)]
    outs = llm.chat(convs(64, "Invent a person and describe them as JSON."), params, use_tqdm=False)
    for text, reason in texts(outs):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choice_64_outputs_all_valid(llm):
    n = 64
    params = ([SamplingParams(max_tokens=40, temperature=0.8, seed=i, structured_outputs=SO(regex=REGEX))
               for i in range(n)]
              + [SamplingParams(max_tokens=10, temperature=0.8, seed=i, structured_outputs=SO(choice=CHOICE))
                 for i in range(n)])
    outs = llm.chat(convs(n, "Give a product code.") + convs(n, "Is 'I love it' positive or negative?"), params,
                    use_tqdm=False)
    got = texts(outs)
    for text, reason in got[:n]:
        assert reason == "stop" and re.fullmatch(REGEX, text), text
    for text, reason in got[n:]:
        assert reason == "stop" and text in CHOICE, text
    assert len({t for t, _ in got[n:]}) > 1  # sampled, not one forced answer


def test_constrained_and_free_rows_in_one_batch(llm):
    """Constrained rows beside unconstrained ones, json_object, a grammar, n > 1 with seeds, a stop string."""
    free = SamplingParams(max_tokens=12, temperature=0.0)
    ps = [free, SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=SO(json_object=True)),
          SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=SO(grammar='root ::= "yes" | "no"')),
          SamplingParams(n=3, max_tokens=40, temperature=1.0, seed=5, structured_outputs=SO(regex=REGEX))]
    outs = llm.chat(convs(4, "Answer in JSON: what is 2 + 2?"), ps, use_tqdm=False)
    assert outs[0].outputs[0].text == llm.chat(convs(1, "Answer in JSON: what is 2 + 2?"), free,
                                               use_tqdm=False)[0].outputs[0].text
    obj = outs[1].outputs[0]  # any JSON object: the model may nest past max_tokens, else it parses
    assert obj.text.startswith("{") and (obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict))
    assert outs[2].outputs[0].text in ("yes", "no")
    assert all(re.fullmatch(REGEX, c.text) for c in outs[3].outputs) and len(outs[3].outputs) == 3
    again = llm.chat(convs(4, "Answer in JSON: what is 2 + 2?")[3:], ps[3], use_tqdm=False)
    assert texts(again) == texts(outs[3:])  # seeds reproduce under a grammar
    # a stop string inside the grammar's language cuts the output as usual
    so = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=SO(regex="abc[0-9]{6}"), stop=["c1"])
    out = llm.generate(["Say it:"], so, use_tqdm=False)[0].outputs[0]
    full = llm.generate(["Say it:"], so.clone(stop=[]), use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("abc[0-9]{6}", full.text)
    if "c1" in full.text:
        assert out.text == full.text[:full.text.index("c1")] and out.stop_reason == "c1"


GREEDY = [SamplingParams(max_tokens=120, temperature=0.0, structured_outputs=SO(json=SCHEMA)),
          SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=SO(regex=REGEX)),
          SamplingParams(max_tokens=30, temperature=0.0)] * 2


def test_preempted_and_async_equal_reference(llm):
    prompts = convs(len(GREEDY), "Describe a person as JSON.")
    ref = texts(llm.chat(prompts, GREEDY, use_tqdm=False))
    small = LLM(num_gpu_blocks_override=14, max_num_batched_tokens=96, check_invariants=True)  # must preempt
    assert texts(small.chat(prompts, GREEDY, use_tqdm=False)) == ref
    assert small.engine.scheduler.num_preemptions > 0
    a = LLM(async_scheduling=True, check_invariants=True)
    assert a.engine.async_scheduling
    assert texts(a.chat(prompts, GREEDY, use_tqdm=False)) == ref
    for text, reason in ref[::3]:  # (free whitespace: the default)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_bad_specs_fail_before_queueing(llm):
    with pytest.raises(StructuredOutputError) as e:
        SO(json={"type": "object"}, regex="a")
    assert "json, regex" in str(e.value)
    with pytest.raises(StructuredOutputError) as e:
        SamplingParams(structured_outputs={"json": "{not json"})
    assert e.value.param == "structured_outputs.json"
    for so, param in [(SO(regex="a(b"), "structured_outputs.regex"),
                      (SO(grammar="root ::= "), "structured_outputs.grammar"),
                      (SO(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
                       "structured_outputs.json")]:
        with pytest.raises(StructuredOutputError) as e:
            llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
        assert e.value.param == param
    assert not llm.engine.has_unfinished_requests()


def test_response_format():
    assert params_from_response_format({"type": "text"}) is None
    assert params_from_response_format({"type": "json_object"}).json_object is True
    so = params_from_response_format({"type": "json_schema",
                                      "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}})
    assert so.json == SCHEMA
    for bad in ({"type": "json_schema"}, {"type": "yaml"}, "json", {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(StructuredOutputError) as e:
            params_from_response_format(bad)
        assert e.value.param == "response_format"


def test_padded_vocab_rows_never_allowed(llm):
    """The model's vocabulary wider than the tokenizer's: the grammar covers the tokenizer's ids only (xgrammar would
    treat each padding id as a special token and pay for it on every accepted token), and the bitmask forbids every
    logits column past it."""
    import torch

    from strata import ops
    from strata.structured import GrammarBackend, RequestGrammar
    tok = llm.engine.tokenizer
    V = len(tok.hf)
    backend = GrammarBackend(tok.hf, V + 70, tok.eos_token_ids)
    assert backend.grammar_vocab == V
    g = RequestGrammar(backend.prepare(SO(json_object=True)))
    g.future.result()
    mask = backend.new_bitmask(1)
    backend.fill_bitmask([g], mask)
    assert mask.shape[1] == (V + 31) // 32
    logits = torch.zeros(2, V + 70)
    ops.apply_token_bitmask(logits, mask, torch.tensor([1]))
    assert torch.isinf(logits[1, V:]).all() and not torch.isinf(logits[0]).any()
    assert torch.isfinite(logits[1, :V]).any()
    assert g.accept(int(torch.isfinite(logits[1, :V]).nonzero()[0]))
    backend.shutdown()


def _tiny_dummy_llama(tmp_path):
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path
    from tests.test_batch_e2e import TINY_CFG
    Tokenizer.from_gguf(default_model_path()).hf.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CFG))
    return str(tmp_path)


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2, async_scheduling=True),
                                    dict(pipeline_parallel_size=2)])
def test_parallel_meshes_follow_the_grammar(tmp_path, layout):
    """TP = 2 with overlapped steps (the driver samples and broadcasts the ids) and PP = 2 (the last stage sends
    logits, not argmax ids, when a row is constrained): random weights, so only the mask makes outputs valid."""
    from strata.engine.llm_engine import LLMEngine
    from tests.parallel_support import engine_args
    small = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                              "n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["name", "n"]}
    eng = LLMEngine.from_engine_args(engine_args(_tiny_dummy_llama(tmp_path), load_format="dummy", **layout))
    try:
        for i in range(6):
            so = SO(json=small) if i % 2 == 0 else SO(regex="[a-z]{3}-[0-9]{2}")
            eng.add_request(f"r{i}", [5, 6, 7, 8 + i], SamplingParams(max_tokens=120, temperature=0.8 if i > 2 else 0,
                                                                      seed=i, structured_outputs=so))
        outs = {}
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o.outputs[0] for o in eng.step() if o.finished})
        assert len(outs) == 6
        for rid, c in outs.items():
            assert c.finish_reason == "stop", c.text
            if int(rid[1:]) % 2 == 0:
                jsonschema.validate(json.loads(c.text), small)
            else:
                assert re.fullmatch("[a-z]{3}-[0-9]{2}", c.text)
    finally:
        eng.shutdown()


def test_compiling_grammar_waits_while_the_batch_goes_on(llm, monkeypatch):
    """A request whose grammar is still compiling waits in the queue; the others are scheduled and finish."""
    from concurrent.futures import Future
    eng = llm.engine
    so = SO(regex="[0-9]{4}")
    real = eng.grammars.prepare(so).result()
    slow = Future()
    monkeypatch.setattr(eng.grammars, "prepare", lambda s: slow)
    eng.add_request("waits", "Say a number:", SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=so))
    eng.add_request("free", "Say a number:", SamplingParams(max_tokens=4, temperature=0.0))
    done = {}
    for _ in range(20):
        done.update({o.request_id: o for o in eng.step() if o.finished})
        if "free" in done:
            break
    assert "free" in done and "waits" not in done
    assert [r.request_id for r in eng.scheduler.waiting] == ["waits"]
    slow.set_result(real)
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert re.fullmatch("[0-9]{4}", done["waits"].outputs[0].text)


def test_failed_compile_ends_the_request_with_error(llm, monkeypatch):
    from concurrent.futures import Future
    eng = llm.engine
    bad = Future()
    bad.set_exception(RuntimeError("boom"))
    monkeypatch.setattr(eng.grammars, "prepare", lambda s: bad)
    eng.add_request("bad", "x", SamplingParams(max_tokens=4, n=2, structured_outputs=SO(regex="a")))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert [c.finish_reason for c in outs[-1].outputs] == ["error", "error"] and outs[-1].finished

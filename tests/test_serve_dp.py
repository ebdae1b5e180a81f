"""Data parallelism for serving: `DataParallelEngine` (two replica processes behind one engine interface) and
`strata serve --data-parallel-size 2` end to end with the official `openai` client.

Reference: one in-process engine on the same tiny model (dummy weights are seeded, so every replica holds the
same weights). Greedy outputs must be equal, token for token."""
from __future__ import annotations

import concurrent.futures

import openai
import pytest

from strata.config.engine import EngineArgs
from strata.core.errors import PromptTooLongError
from strata.core.sampling_params import ParameterError, SamplingParams
from strata.engine.dp_engine import DataParallelEngine
from strata.engine.llm_engine import LLMEngine
from test_serve_utils import MODEL_NAME, ServerProcess, write_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPTS = ["The cat sat", "Once upon a time", "In 1905 Einstein", "Rivers flow to", "Bread needs", "Stars are"]


def _args(path, **kw) -> EngineArgs:
    base = dict(model=path, load_format="dummy", device="cpu", kv_cache_memory=32 << 20, max_model_len=256,
                num_threads=1, served_model_name=MODEL_NAME)
    return EngineArgs(**{**base, **kw})


def _drain(engine) -> dict:
    """request id -> (final RequestOutput, text streamed through the deltas)."""
    streamed, final = {}, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            streamed[o.request_id] = streamed.get(o.request_id, "") + o.outputs[0].text_delta
            if o.finished:
                final[o.request_id] = o
    return {k: (final[k], streamed[k]) for k in final}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("dp_model") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = LLMEngine.from_engine_args(_args(model_dir))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, output_kind="delta")
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, params)
    return {k: (v[0].outputs[0].token_ids, v[0].outputs[0].text) for k, v in _drain(engine).items()}


def test_engine_interface_dispatch_stream_abort_and_bad_input(model_dir, reference):
    engine = DataParallelEngine(_args(model_dir, data_parallel_size=2))
    try:
        assert engine.model_name == MODEL_NAME and engine.config.max_model_len == 256
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, output_kind="delta")
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"r{i}", p, params)
        assert engine.dispatched == [3, 3]  # equal work, spread by outstanding tokens
        got = _drain(engine)
        assert {k: (v[0].outputs[0].token_ids, v[0].outputs[0].text) for k, v in got.items()} == reference
        for final, streamed in got.values():  # the deltas add up to the final text
            assert streamed == final.outputs[0].text and final.outputs[0].finish_reason == "length"
        assert engine.get_stats().generation_tokens_total == 12 * len(PROMPTS)
        assert engine.load == [0, 0] and not engine.owner
        # bad input fails the call at once, with the single engine's errors; nothing is sent to a replica
        with pytest.raises(PromptTooLongError):
            engine.add_request("long", list(range(5, 300)), params)
        with pytest.raises(ParameterError, match="max_tokens"):
            engine.add_request("big", "hello", SamplingParams(max_tokens=1000))
        with pytest.raises(ParameterError, match="vocabulary"):
            engine.add_request("vocab", [1, 10 ** 9], params)
        assert engine.dispatched == [3, 3]
        # abort: the request finishes with "abort" and its replica's load is released. The abort follows the
        # add down the same pipe and the replica reads its pipe between steps, so it lands long before the
        # 200th token however fast the replica runs.
        engine.add_request("a", "Abort me", SamplingParams(max_tokens=200, ignore_eos=True))
        with pytest.raises(ParameterError, match="already in use"):
            engine.add_request("a", "again", params)
        engine.abort_request("a")
        got = _drain(engine)
        out = got["a"][0].outputs[0]
        assert out.finish_reason == "abort" and len(out.token_ids) < 200 and engine.load == [0, 0]
    finally:
        engine.shutdown()


def test_serve_with_two_replicas(model_dir, reference, tmp_path):
    srv = ServerProcess(model_dir, "--data-parallel-size", "2", "--num-threads", "1", "--max-model-len", "256",
                        log_path=str(tmp_path / "server.log")).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(i):
            r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
            return i, r.choices[0]

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = dict(pool.map(complete, range(len(PROMPTS))))
        for i, choice in results.items():
            assert choice.text == reference[f"r{i}"][1], (i, choice.text)
        # streaming through a replica: the chunks add up to the non-streamed text
        chunks = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks) == results[0].text
        # a bad request is refused with the single engine's error, and the server keeps serving
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=MODEL_NAME, prompt="x " * 400, max_tokens=4)
        assert client.completions.create(model=MODEL_NAME, prompt="ok", max_tokens=2).choices[0].text is not None
    finally:
        srv.stop()

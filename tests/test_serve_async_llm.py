"""AsyncLLM over the real engine (tiny random Llama), in process: streaming, validation errors before any
output, abort frees the engine, drain, and engine death (every pending request fails with EngineDeadError,
new ones are refused, /health turns 503)."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from strata.core.errors import EngineDeadError
from strata.core.sampling_params import ParameterError, SamplingParams
from strata.engine.async_llm import AsyncLLM, EngineDrainingError

from test_serve_utils import write_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from strata.config.engine import EngineArgs
    from strata.engine.llm_engine import LLMEngine
    d = write_tiny_model(tmp_path_factory.mktemp("async_llm") / "model")
    return LLMEngine.from_engine_args(EngineArgs(model=d, load_format="dummy", kv_cache_memory=32 << 20,
                                                 served_model_name="tiny"))


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_generate_stream_matches_engine_and_errors_come_first(engine):
    async def main():
        llm = AsyncLLM(engine)
        try:
            outs = [o async for o in llm.generate("a", [5, 6, 7], greedy(6))]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
            assert "".join(o.outputs[0].text_delta for o in outs) == outs[-1].outputs[0].text
            with pytest.raises(ParameterError) as e:
                await llm.add_request("b", [10 ** 9], greedy(2))
            assert e.value.param == "prompt"
            assert llm.num_in_flight == 0
            # concurrent requests all complete
            async def one(i):
                return [o async for o in llm.generate(f"c{i}", [100 + i] * 4, greedy(5))][-1]
            finals = await asyncio.gather(*(one(i) for i in range(16)))
            assert all(len(f.outputs[0].token_ids) == 5 for f in finals)
            assert llm.stats().num_running == 0
        finally:
            llm.shutdown()
    asyncio.run(main())


def test_abort_and_closed_iterator_free_the_engine(engine):
    async def main():
        llm = AsyncLLM(engine)
        try:
            stream = await llm.add_request("long", [1, 2, 3], greedy(900))
            await stream.__anext__()
            llm.abort("long")
            gen = llm.generate("long2", [4, 5, 6], greedy(900))
            await gen.__anext__()
            await gen.aclose()  # consumer went away
            deadline = time.monotonic() + 10
            while (s := llm.stats()).num_running or s.num_waiting or s.kv_cache_usage:
                assert time.monotonic() < deadline, s
                await asyncio.sleep(0.02)
            assert not engine.has_unfinished_requests()
        finally:
            llm.shutdown()
    asyncio.run(main())


def test_drain(engine):
    async def main():
        llm = AsyncLLM(engine)
        try:
            # The drain timeout in this machine's pace: a tenth of what the long request needs (900 tokens),
            # thirty times what the short one needs (3 tokens).
            t0 = time.monotonic()
            await _collect(llm.generate("pace", [1, 2], greedy(30)))
            timeout = 3 * (time.monotonic() - t0)
            short = asyncio.create_task(_collect(llm.generate("s", [1, 2], greedy(3))))
            long_stream = await llm.add_request("l", [3, 4], greedy(900))
            failed = await llm.drain(timeout=timeout)
            assert failed == 1
            assert (await short)[-1].outputs[0].finish_reason == "length"
            with pytest.raises(EngineDrainingError):
                async for _ in long_stream:
                    pass
            with pytest.raises(EngineDrainingError):
                await llm.add_request("new", [1], greedy(1))
        finally:
            llm.shutdown()
    asyncio.run(main())


async def _collect(agen):
    return [o async for o in agen]


def test_engine_death_fails_everything_and_health_503(engine, monkeypatch):
    from strata.serve.app import build_app
    from strata.serve.args import ServerArgs
    from strata.serve.server import build_state

    calls = {"n": 0}
    real_step = engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    async def main():
        state = build_state(engine, ServerArgs())
        app = build_app(state)
        llm = state.engine
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200
            monkeypatch.setattr(engine, "step", failing_step)
            pending = [asyncio.create_task(_collect(llm.generate(f"d{i}", [7, 8, 9], greedy(50)))) for i in range(4)]
            for t in pending:
                with pytest.raises(EngineDeadError):
                    await t
            assert llm.is_dead
            with pytest.raises(EngineDeadError):
                await llm.add_request("after", [1], greedy(1))
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "dead"
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert "strata:engine_dead" in (await c.get("/metrics")).text
        llm.shutdown()
    asyncio.run(main())


def test_overlapped_steps_stream_the_same_tokens(tmp_path):
    """`--async-scheduling` behind AsyncLLM: concurrent streams give the synchronous engine's greedy tokens and
    texts, aborts still free everything."""
    from strata.config.engine import EngineArgs
    from strata.engine.llm_engine import LLMEngine
    d = write_tiny_model(tmp_path / "model")

    def run(async_steps):
        eng = LLMEngine.from_engine_args(EngineArgs(model=d, load_format="dummy", kv_cache_memory=32 << 20,
                                                    served_model_name="tiny", async_scheduling=async_steps))
        assert eng.async_scheduling == async_steps

        async def main():
            llm = AsyncLLM(eng)
            try:
                async def one(i):
                    outs = [o async for o in llm.generate(f"r{i}", [100 + i, 7, 9] * (1 + i % 3), greedy(4 + i % 5))]
                    return outs[-1].outputs[0].token_ids, "".join(o.outputs[0].text_delta for o in outs)
                res = await asyncio.gather(*(one(i) for i in range(12)))
                gen = llm.generate("x", [5, 6], greedy(50))
                await gen.__anext__()
                await gen.aclose()  # abort mid-stream
                deadline = time.monotonic() + 10
                while llm.num_in_flight or eng.kv.usage:
                    assert time.monotonic() < deadline, (llm.num_in_flight, eng.kv.usage)
                    await asyncio.sleep(0.02)
                return res
            finally:
                llm.shutdown()
        return asyncio.run(main())

    assert run(True) == run(False)

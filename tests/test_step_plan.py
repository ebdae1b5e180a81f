"""The step message (`core/plan.py`) is a diff: a runner that applies the plans it receives, pickled as they go to
other ranks, holds exactly the scheduler's per-request state (tokens known on the host, blocks, slot) for every
request a plan schedules, and forgets finished ones. Plus the unified runner on a pipeline: PP=2 on CPU/gloo
equals one process, with every kind of sampling and with the graph runner's static-buffer path.
"""
from __future__ import annotations

import pickle

from hypothesis import given, settings, strategies as st

from strata.core.plan import StepResult
from strata.core.request import Request, RequestStatus
from strata.core.sampling_params import SamplingParams
from strata.engine.llm_engine import LLMEngine
from strata.kvcache.manager import KVCacheManager
from strata.runner.inputs import Requests
from strata.sched.scheduler import Scheduler
from tests.parallel_support import engine_args, prompts
from tests.tiny_models import write_tiny_model


def _check_mirror(mirror: Requests, plan, live: set[str]) -> None:
    for c in plan.chunks:
        req, r = c.request, mirror[c.request_id]
        assert r.token_ids == req.all_token_ids, c  # the tokens known on the host when the plan was made
        assert r.block_ids == req.block_ids, c
        assert r.slot == req.slot and r.num_prompt_tokens == req.num_prompt_tokens
        assert r.params is not None and r.seed == req.params.seed
    assert set(mirror) <= live  # finished requests are forgotten


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(4, 20),
    reqs=st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 12)),
                  min_size=1, max_size=10),
    budget=st.integers(1, 40),
    max_seqs=st.integers(1, 5),
    aborts=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 20)), max_size=3),
    overlap=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_plan_diff_round_trip(num_blocks, reqs, budget, max_seqs, aborts, overlap, policy):
    """Preemptions (requests resent in full), aborts, chunked prefill, and with `overlap` the async loop (a plan
    made while the step before is in flight: its tokens are not known yet, and are sent with a later plan)."""
    kv = KVCacheManager(num_blocks, 4)
    max_len = (num_blocks - 1) * 4
    sched = Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len, policy=policy)
    all_reqs = []
    for i, (prompt, mt) in enumerate(reqs):
        prompt = prompt[: max_len - 1]
        mt = min(mt, max_len - len(prompt))
        r = Request(str(i), prompt, SamplingParams(max_tokens=mt, ignore_eos=True, seed=i if i % 2 else None),
                    max_tokens=mt)
        r.priority = i % 3
        all_reqs.append(r)
        sched.add(r)
    mirror = Requests(None)
    in_flight = None
    for step in range(3000):
        if not sched.has_unfinished() and in_flight is None:
            break
        for a, at in aborts:
            if at == step and a < len(all_reqs) and not all_reqs[a].is_finished:
                sched.finish(all_reqs[a], RequestStatus.FINISHED_ABORTED)
        prev, in_flight = in_flight, None
        if prev is not None and prev.blocked:
            sched.update(prev, StepResult([sum(c.request.all_token_ids) % 7 for c in prev.chunks if c.sample]))
            prev = None
        plan = sched.schedule(in_flight=prev is not None)
        if not plan.empty:
            sent = pickle.loads(pickle.dumps(plan))  # what another rank receives
            assert all(c.request is None for c in sent.chunks)
            mirror.apply(sent)
            _check_mirror(mirror, plan, set(sched.requests))
            if overlap:
                in_flight = plan
            else:
                sched.update(plan, StepResult([sum(c.request.all_token_ids) % 7 for c in plan.chunks if c.sample]))
        if prev is not None:
            sched.update(prev, StepResult([sum(c.request.all_token_ids) % 7 for c in prev.chunks if c.sample]))
    else:
        raise AssertionError("did not finish")
    assert all(r.is_finished for r in all_reqs)


def test_pp2_unified_runner_matches_one_process(tmp_path):
    """PP=2 (even split of 4 layers) against one process: greedy, seeded top-p, penalties and logprobs sampled
    once, by the driver's runner, from the logits the last stage sends back; then the same requests with both
    stages' decode micro-batches going through the graph runner's static buffers (uncaptured on CPU)."""
    write_tiny_model("qwen3", tmp_path, num_hidden_layers=4)
    ps = prompts(lens=(5, 17, 33, 2, 9))
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, seed=3, min_tokens=4, ignore_eos=True)]

    def run(engine, tag):
        for i, (p, sp) in enumerate(zip(ps, params)):
            engine.add_request(f"{tag}{i}", p, sp)
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    c = o.outputs[0]
                    lps = [{t: round(v.logprob, 4) for t, v in d.items()} for d in c.logprobs] if c.logprobs else None
                    out[int(o.request_id[len(tag):])] = (c.token_ids, lps)
        return out

    want = run(LLMEngine.from_engine_args(engine_args(tmp_path, max_num_seqs=8)), "a")
    engine = LLMEngine.from_engine_args(engine_args(tmp_path, pipeline_parallel_size=2, max_num_seqs=8))
    try:
        assert engine.runner.collective_rpc("layer_range") == [(0, 2), (2, 4)]
        eager = run(engine, "a")
        engine.runner.collective_rpc("start_graphs")
        graphed = run(engine, "b")
        runs = engine.runner.collective_rpc("graph_runs")
    finally:
        engine.shutdown()
    for got in (eager, graphed):
        assert {i: t for i, (t, _) in got.items()} == {i: t for i, (t, _) in want.items()}
        for i, (_, lps) in got.items():
            if lps is not None:
                for a, b in zip(lps, want[i][1]):
                    assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-3 for t in a)
    assert runs[0] > 0 and runs[0] == runs[1]

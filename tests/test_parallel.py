"""Model parallelism on CPU processes over gloo: TP, PP, TP x PP, DP, two "nodes", a killed worker, bad input.

Every comparison is against the single-process engine on the same tiny random checkpoint: the greedy tokens must
be equal and the logits the driver samples from equal to float32 rounding (sums split over ranks reorder adds).
The driver runs in the pytest process; workers are spawned processes with one thread each.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from strata.core.errors import EngineDeadError
from strata.core.sampling_params import ParameterError, SamplingParams
from strata.engine.llm_engine import LLMEngine
from tests.parallel_support import engine_args, prompts, run_greedy
from tests.tiny_models import write_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def qwen3_3l(tmp_path_factory):
    """Qwen3 shape (q/k norm, 4 heads / 2 KV heads), 3 layers so that PP can split unevenly."""
    path = tmp_path_factory.mktemp("qwen3_3l")
    write_tiny_model("qwen3", path, num_hidden_layers=3)
    return path


@pytest.fixture(scope="module")
def reference(qwen3_3l):
    engine = LLMEngine.from_engine_args(engine_args(qwen3_3l))
    return run_greedy(engine, prompts())


def _run_parallel(path, **kw):
    engine = LLMEngine.from_engine_args(engine_args(path, **kw))
    try:
        return engine, run_greedy(engine, prompts())
    except BaseException:
        engine.shutdown()
        raise


def test_tp2_matches_tp1_and_overlap_matches(qwen3_3l, reference):
    ref_tokens, ref_logits = reference
    engine, (tokens, logits) = _run_parallel(qwen3_3l, tensor_parallel_size=2)
    try:
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, **TOL)
        # Overlapped all-reduces (chunked GEMM + async all-reduce), forced on for every step size.
        n = engine.runner.collective_rpc("set_comm_overlap", True, 2, 1)
        assert n == [6, 6]  # per rank: o_proj and down_proj of 3 layers
        tokens2, logits2 = run_greedy(engine, prompts(), tag="o")
        assert tokens2 == ref_tokens
        torch.testing.assert_close(logits2, ref_logits, **TOL)
    finally:
        engine.shutdown()


def test_pp2_uneven_partition_matches_pp1(qwen3_3l, reference):
    ref_tokens, ref_logits = reference
    engine, (tokens, logits) = _run_parallel(qwen3_3l, pipeline_parallel_size=2, pp_layer_partition="2,1")
    try:
        assert engine.runner.collective_rpc("layer_range") == [(0, 2), (2, 3)]
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, **TOL)
        # All-greedy steps: the last stage returns argmax ids only (no logits cross back to the driver).
        engine.runner.collective_rpc("greedy_on_last_stage", True)
        engine.runner.logits_hook = None
        out = {}
        for i, p in enumerate(prompts()):
            engine.add_request(f"g{i}", p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[int(o.request_id[1:])] = o.outputs[0].token_ids
        assert out == ref_tokens
    finally:
        engine.shutdown()


def test_pp2_stage_graph_path_matches_pp1(qwen3_3l):
    """Pipeline stages run decode micro-batches through the one graph runner (on CUDA by construction; here
    switched on by hand): each stage's static buffers, padded to the graph ladder, metadata from the per-slot
    tables. On CPU that path runs uncaptured; the tokens and logits must still be the single-process engine's.
    Seven prompts: decode micro-batches of 4 and 3, the 3 padded to 4."""
    ps7 = prompts(lens=(5, 17, 33, 2, 9, 12, 7))
    ref_tokens, ref_logits = run_greedy(LLMEngine.from_engine_args(engine_args(qwen3_3l, max_num_seqs=8)), ps7)
    engine = LLMEngine.from_engine_args(engine_args(qwen3_3l, pipeline_parallel_size=2, pp_layer_partition="2,1",
                                                    max_num_seqs=8))
    try:
        engine.runner.collective_rpc("start_graphs")
        tokens, logits = run_greedy(engine, ps7)
        runs = engine.runner.collective_rpc("graph_runs")
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, **TOL)
        assert runs[0] > 0 and runs[0] == runs[1], runs  # both stages, every decode micro-batch
    finally:
        engine.shutdown()


@pytest.mark.parametrize("blocks", [64, 5])  # 5 blocks of 16: preemptions
def test_pp2_preemption_and_seeds_match_single(qwen3_3l, blocks):
    """PP=2 with greedy and seeded sampling, a small pool (preemptions: requests come back to the runners in
    full), scheduler invariants checked every step. Tokens equal the single-process engine's."""
    ps7 = prompts(lens=(5, 17, 33, 2, 9, 12, 7))
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)] * 5 + \
        [SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)] * 2

    def run(engine):
        for i, (p, sp) in enumerate(zip(ps7, params)):
            engine.add_request(f"q{i}", p, sp)
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        return out

    kw = dict(max_num_seqs=4, num_gpu_blocks_override=blocks, check_invariants=True)
    single = LLMEngine.from_engine_args(engine_args(qwen3_3l, **kw))
    want = run(single)
    engine = LLMEngine.from_engine_args(engine_args(qwen3_3l, pipeline_parallel_size=2, **kw))
    try:
        got = run(engine)
        if blocks == 5:
            assert engine.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()
    assert got == want


def test_tp2_pp2_four_processes_match_single(qwen3_3l, reference):
    ref_tokens, ref_logits = reference
    engine, (tokens, logits) = _run_parallel(qwen3_3l, tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        assert len(engine.runner.worker_pids) == 3
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, **TOL)
        # Sampling with penalties, seeds and logprobs runs in the driver, as in the single-process runner.
        params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, logprobs=2,
                                repetition_penalty=1.2, ignore_eos=True)
        engine.add_request("s", prompts()[1], params)
        got = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                got = o
    finally:
        engine.shutdown()
    single = LLMEngine.from_engine_args(engine_args(qwen3_3l))
    single.add_request("s", prompts()[1], params)
    want = None
    while single.has_unfinished_requests():
        for o in single.step():
            want = o
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) < 1e-4


def test_tp2_overlapped_steps_match_single(qwen3_3l, reference):
    """--async-scheduling on TP=2: step N+1 is launched before N's tokens reach the host; the driver broadcasts
    the sampled ids over the TP group and every rank reads its pending inputs from last_sampled."""
    ref_tokens, ref_logits = reference
    engine = LLMEngine.from_engine_args(engine_args(qwen3_3l, tensor_parallel_size=2, async_scheduling=True))
    try:
        assert engine.async_scheduling
        seen = {"pending": 0, "steps": 0}
        orig = engine.scheduler.schedule

        def spy(in_flight=False):
            plan = orig(in_flight)
            seen["pending"] += sum(c.input_pending for c in plan.chunks)
            seen["steps"] += 1
            return plan
        engine.scheduler.schedule = spy
        tokens, logits = run_greedy(engine, prompts())
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, **TOL)
        assert seen["pending"] > 0  # inputs really came from the device
        # stops: EOS-like stop ids and max_tokens cut each request exactly where the single engine does
        for i in range(len(prompts())):
            stop_id = ref_tokens[i][-3]
            engine.add_request(f"st{i}", prompts()[i], SamplingParams(max_tokens=8, temperature=0.0,
                                                                      stop_token_ids=[stop_id]))
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[int(o.request_id[2:])] = o.outputs[0]
        for i, o in outs.items():
            want = ref_tokens[i][: ref_tokens[i].index(ref_tokens[i][-3]) + 1]
            assert o.token_ids == want and o.finish_reason == "stop"
    finally:
        engine.shutdown()


def test_dp2_matches_dp1(qwen3_3l):
    from strata.engine.dp import DataParallelLLM
    from strata.engine.llm import LLM
    ps = [p[: 3 + i] for i, p in enumerate(prompts(lens=(9, 9, 9, 9, 9, 9)))]
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)] * 5 + \
        [SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)]
    kw = dict(engine_args(qwen3_3l).__dict__)
    kw.pop("model")
    one = LLM(str(qwen3_3l), **kw).generate(ps, params, use_tqdm=False)
    with LLM(str(qwen3_3l), **{**kw, "data_parallel_size": 2}) as dp:  # LLM(data_parallel_size=2) is DP
        assert isinstance(dp, DataParallelLLM)
        two = dp.generate(ps, params)
        assert dp.load == [0, 0] and min(dp.dispatched) >= 2  # work spread, all of it finished
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
    assert [o.request_id for o in two] == [f"dp-{i}" for i in range(6)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback(tmp_path):
    """`strata generate ... --nnodes 2 --node-rank R` launched twice; node 1 serves stage 1 and exits.
    (Text prompts go through the embedded SmolLM2 tokenizer, so the model takes its 49152-token vocabulary.)"""
    qwen3_3l = tmp_path
    write_tiny_model("qwen3", tmp_path, num_hidden_layers=3, vocab_size=49152)
    port = _free_port()
    common = [sys.executable, "-m", "strata.cli", "generate", "--model", str(qwen3_3l), "--prompt", "hello there",
              "--max-tokens", "8", "--ignore-eos", "--json", "--device", "cpu", "--dtype", "float32",
              "--num-gpu-blocks-override", "64", "--num-threads", "1", "--pipeline-parallel-size", "2",
              "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--dist-timeout", "60"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    node1 = subprocess.Popen(common + ["--node-rank", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    node0 = subprocess.Popen(common + ["--node-rank", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        out0, err0 = node0.communicate(timeout=120)
        out1, err1 = node1.communicate(timeout=30)
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()
    assert node0.returncode == 0, err0[-3000:]
    assert node1.returncode == 0, err1[-3000:]
    assert out1.strip() == ""
    got = json.loads(out0.strip().splitlines()[-1])
    from strata.engine.llm import LLM
    kw = dict(engine_args(qwen3_3l).__dict__)
    kw.pop("model")
    want = LLM(str(qwen3_3l), **kw).generate("hello there", SamplingParams(max_tokens=8, temperature=0.0,
                                                                           ignore_eos=True), use_tqdm=False)[0]
    assert got["num_tokens"] == 8 and got["text"] == want.outputs[0].text


def test_killed_worker_fails_requests_and_exits(qwen3_3l):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.parallel_support.killed_worker", str(qwen3_3l)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["steps"] == 2 and res["error"] is not None and "rank 1" in res["error"]
    assert res["failed_after_s"] < 10
    assert res["later"] is not None
    assert time.monotonic() - t0 < 110


def test_killed_worker_during_held_back_sampling_fails_fast(tmp_path):
    """Structured outputs hold a step's sampling back for the grammar bitmask; sampling then broadcasts the ids
    to the TP workers. A worker killed between the forward and that sampling fails the engine, not hangs it."""
    pytest.importorskip("xgrammar")
    from tests.test_structured import _tiny_dummy_llama
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tests.parallel_support.killed_worker", _tiny_dummy_llama(tmp_path),
                           "structured"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["error"] is not None and "rank 1" in res["error"], res
    assert res["failed_after_s"] < 10
    assert res["later"] is not None


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was loaded before the parallel configuration was checked")
    monkeypatch.setattr("strata.engine.builder.build_model", fail)


@pytest.mark.parametrize("kw,param,text", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size", "does not divide the model's 4 attention heads"),
    (dict(pipeline_parallel_size=4), "pipeline_parallel_size", "larger than the model's 3 layers"),
    (dict(pipeline_parallel_size=2, pp_layer_partition="1,1"), "pp_layer_partition", "sums to 2"),
    (dict(pipeline_parallel_size=2, pp_layer_partition="3"), "pp_layer_partition", "has 1 stages"),
    (dict(tensor_parallel_size=2, nnodes=4), "nnodes", "does not split evenly over 4 nodes"),
    (dict(tensor_parallel_size=2, nnodes=2, node_rank=1), "master_port", "needs --master-port"),
    (dict(tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="no-such-host.invalid", master_port=29999),
     "master_addr", "does not resolve"),
    (dict(tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="192.0.2.1", master_port=29999),
     "master_addr", "cannot listen on master 192.0.2.1"),
])
def test_bad_layouts_fail_before_loading(qwen3_3l, no_model_load, kw, param, text):
    t0 = time.monotonic()
    with pytest.raises(ParameterError) as e:
        LLMEngine.from_engine_args(engine_args(qwen3_3l, **kw))
    assert e.value.param == param and text in str(e.value)
    assert not multiprocessing.active_children()
    assert time.monotonic() - t0 < 5


def test_unreachable_master_fails_fast(qwen3_3l, no_model_load):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ParameterError, match=f"cannot reach the master at 127.0.0.1:{port}"):
        LLMEngine.from_engine_args(engine_args(qwen3_3l, tensor_parallel_size=2, nnodes=2, node_rank=1,
                                               master_addr="127.0.0.1", master_port=port, dist_timeout=1.5))
    assert time.monotonic() - t0 < 10


def test_launcher_world_size_must_match_mesh(qwen3_3l, no_model_load, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29998")
    with pytest.raises(ParameterError, match=r"world size 3 \(from the launcher\) does not match the mesh"):
        LLMEngine.from_engine_args(engine_args(qwen3_3l, tensor_parallel_size=2, distributed_launcher="env"))

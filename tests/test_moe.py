"""MoE models and the fused MoE kernel.

- Qwen3MoeForCausalLM (with a dense `mlp_only_layers` layer) and MixtralForCausalLM: logits equal transformers'
  on tiny random checkpoints, through chunked prefill and decode (float32).
- Expert parallel (EP=2, experts whole on each rank; partial outputs all-reduced, or all-to-all dispatch and
  combine) and TP-sharded experts (TP=2) equal the single-process engine.
- The Triton grouped GEMM, its alignment-free decode path and the routing kernel (softmax + top-k) equal their
  torch twins (strata.ops.moe_ref) under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import

import pytest
import torch

from strata.core.sampling_params import SamplingParams
from strata.engine.llm_engine import LLMEngine
from strata.ops import moe_ref
from tests.parallel_support import capture_logits, engine_args, prompts, run_greedy, write_tiny_moe

TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf = write_tiny_moe("qwen3_moe", path, mlp_only_layers=[1], num_hidden_layers=3)
    return path, hf


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    hf = write_tiny_moe("mixtral", path)
    return path, hf


@pytest.mark.parametrize("which", ["qwen3_moe", "mixtral"])
def test_moe_logits_match_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    engine = LLMEngine.from_engine_args(engine_args(path, max_num_batched_tokens=8))
    seen = capture_logits(engine)
    prompt = list(range(10, 31))  # 21 tokens: three prefill chunks of 8
    engine.add_request("a", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    toks = out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + toks])).logits[0][len(prompt) - 1: len(prompt) - 1 + 12]
    torch.testing.assert_close(torch.cat(seen), ref, atol=1e-4, rtol=1e-4)
    assert toks == ref.argmax(-1).tolist()


@pytest.mark.parametrize("which,kw,triton_kernels", [
    ("qwen3_moe", dict(tensor_parallel_size=2, enable_expert_parallel=True), False),  # all-reduce of partial outputs
    ("qwen3_moe", dict(tensor_parallel_size=2, enable_expert_parallel=True, expert_parallel_dispatch="all_to_all"),
     False),
    ("mixtral", dict(tensor_parallel_size=2), False),
    # the ranks on the Triton kernels (interpreted): routing kernel, and each rank's experts picked by expert_offset
    # in the alignment and the decode kernels
    ("qwen3_moe", dict(tensor_parallel_size=2, enable_expert_parallel=True, max_num_seqs=1), True),
])
def test_parallel_experts_match_single_process(which, kw, triton_kernels, request, monkeypatch):
    path, _ = request.getfixturevalue(which)
    same = {k: v for k, v in kw.items() if k == "max_num_seqs"}  # the same batches, so logits come in one order
    ps_, steps = (prompts()[:2], 4) if triton_kernels else (prompts(), 8)  # the interpreter is slow
    ref_tokens, ref_logits = run_greedy(LLMEngine.from_engine_args(engine_args(path, **same)), ps_, steps)
    offsets = []
    if triton_kernels:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs triton in interpreter mode")
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")  # inherited by the worker process
        from strata.ops.triton_kernels import fused_moe as fm
        real = fm.fused_moe_decode

        def spy(*a, **k):  # the driver is rank 0 and runs its share of the model in this process
            offsets.append(k.get("expert_offset"))
            return real(*a, **k)
        monkeypatch.setattr(fm, "fused_moe_decode", spy)
    engine = LLMEngine.from_engine_args(engine_args(path, **kw))
    try:
        tokens, logits = run_greedy(engine, ps_, steps)
        mem = engine.runner.collective_rpc("memory")
    finally:
        engine.shutdown()
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, **TOL)
    if triton_kernels:
        assert offsets and set(offsets) == {0}  # rank 0: experts [0, 4) of 8 (rank 1, offset 4, is in the logits)
    if kw.get("enable_expert_parallel"):  # each rank holds half of the experts, whole
        assert engine.runner.model.layers["0"].experts.w13.shape[0] == 4
        assert engine.runner.model.layers["0"].experts.dispatch == kw.get("expert_parallel_dispatch", "all_reduce")
    else:  # each rank holds every expert, half of each
        assert engine.runner.model.layers["0"].experts.w13.shape == (4, 32, 64)
    assert mem[0]["weights_bytes"] == mem[1]["weights_bytes"]


# ------------------------------------------------------------------------------------------ the kernel
try:
    import triton  # noqa: F401
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _TRITON_ERR = e


def _case(T, H, I, E, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k)
    return x, w13, w2, w, ids


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
@pytest.mark.parametrize("T,H,I,E,k,dtype", [
    (1, 32, 16, 4, 1, torch.float32),  # one decode token
    (7, 48, 24, 4, 2, torch.float32),  # ragged sizes (masks on every edge)
    (40, 64, 32, 8, 2, torch.float32),  # several blocks per expert (block_m 16)
    (24, 32, 32, 6, 3, torch.bfloat16),
])
def test_fused_moe_kernel_matches_twin(T, H, I, E, k, dtype):
    from strata.ops.triton_kernels.fused_moe import fused_moe, moe_align
    x, w13, w2, w, ids = _case(T, H, I, E, k, dtype)
    if T > 4:
        ids[1, 0] = -1  # an id outside [0, E) contributes nothing in both
        ids[2, -1] = E
    got = fused_moe(x, w13, w2, w, ids)
    want = moe_ref.fused_moe(x, w13, w2, w, ids)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    # other tile sizes (what benchmarks/moe_kernel.py sweeps) give the same result
    other = fused_moe(x, w13, w2, w, ids, config={"block_m": 32, "block_n": 16, "block_k": 32, "num_warps": 2})
    torch.testing.assert_close(other.float(), want.float(), **tol)
    # Alignment: every valid pair appears exactly once, in a block of its own expert.
    sorted_ids, block_expert, total, nblocks = moe_align(ids, E, 16)
    s = sorted_ids[: int(total)].long()
    real = s[s < ids.numel()]
    valid = ((ids >= 0) & (ids < E)).reshape(-1).nonzero().flatten()
    assert sorted(real.tolist()) == valid.tolist()
    flat = ids.reshape(-1)
    for b in range(int(total) // 16):
        blk = s[b * 16:(b + 1) * 16]
        blk = blk[blk < ids.numel()]
        assert (flat[blk] == block_expert[b]).all()


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
@pytest.mark.parametrize("T,H,I,E,k,dtype", [
    (1, 32, 24, 8, 2, torch.float32),  # one decode token, ragged column blocks
    (3, 40, 24, 16, 2, torch.float32),  # several tokens, with ids outside [0, E)
    (2, 64, 48, 16, 4, torch.bfloat16),
    (1, 300, 20, 4, 4, torch.float32),  # hidden > one 256-wide K block; every expert chosen once
])
def test_fused_moe_decode_path_matches_twin(T, H, I, E, k, dtype, monkeypatch):
    from strata.ops.triton_kernels import fused_moe as fm
    x, w13, w2, w, ids = _case(T, H, I, E, k, dtype, seed=T + H)
    if T > 1:
        ids[0, 0] = -1  # e.g. another EP rank's expert: contributes nothing
        ids[T - 1, k - 1] = E
    assert fm.use_decode_path(T, k, E)
    calls, real = [], fm.fused_moe_decode

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(fm, "fused_moe_decode", spy)
    got = fm.fused_moe(x, w13, w2, w, ids)
    assert calls == [1]  # fused_moe chose the decode path
    want = moe_ref.fused_moe(x, w13, w2, w, ids)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    sorted_path = fm.fused_moe(x, w13, w2, w, ids, config={})  # a config forces the sorted grouped GEMM
    torch.testing.assert_close(sorted_path.float(), want.float(), **tol)
    assert calls == [1]


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
@pytest.mark.parametrize("E,k,renorm,dtype", [(12, 3, True, torch.float32), (8, 2, False, torch.bfloat16),
                                              (128, 8, True, torch.bfloat16)])
def test_select_experts_kernel_matches_twin(E, k, renorm, dtype):
    from strata.ops.triton_kernels.fused_moe import select_experts
    logits = torch.randn(6, E, generator=torch.Generator().manual_seed(E)).mul(3).to(dtype)
    w, ids = select_experts(logits, k, renorm)
    w_ref, ids_ref = moe_ref.select_experts(logits, k, renorm)
    assert ids.dtype == ids_ref.dtype and w.dtype == w_ref.dtype == torch.float32
    if dtype == torch.float32:
        assert torch.equal(ids, ids_ref)
    else:  # bf16 logits tie now and then: the chosen set's weights must still agree
        assert (ids == ids_ref).float().mean() > 0.9
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    assert select_experts(logits[:0], k, renorm)[1].shape == (0, k)


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
def test_moe_align_has_static_shapes():
    """The alignment's torch twin runs inside the decode CUDA graphs, so it must not read device data on the host. Ops whose
    output shape depends on the data (bincount, boolean masks, nonzero, .item()) have no meta kernel either, so
    running it on meta tensors catches them on a CPU (the bincount version failed graph capture on an H200)."""
    from strata.ops.triton_kernels.fused_moe import moe_align_torch
    ids = torch.empty(5, 8, dtype=torch.long, device="meta")
    sorted_ids, block_expert, total, max_blocks = moe_align_torch(ids, 128, 16)
    assert max_blocks == 3 + 128
    assert sorted_ids.shape == (max_blocks * 16,) and block_expert.shape == (max_blocks,) and total.shape == (1,)


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
@pytest.mark.parametrize("T,E,k,block_m,dtype", [(1, 8, 2, 16, torch.int64), (37, 6, 3, 16, torch.int64),
                                                 (50, 4, 2, 32, torch.int32), (3, 128, 8, 16, torch.int64),
                                                 (300, 6, 4, 16, torch.int64)])  # 1,200 pairs: two 1,024-pair chunks
def test_moe_align_kernel_matches_torch(T, E, k, block_m, dtype):
    """The two-kernel alignment equals its torch twin where the GEMM reads: the first `total` sorted ids (a stable
    sort, padded per expert with the sentinel) and the expert of each of those blocks; invalid ids left out."""
    from strata.ops.triton_kernels.fused_moe import moe_align, moe_align_torch
    g = torch.Generator().manual_seed(T * E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dtype)
    if T > 2:
        ids[0, 0], ids[2, 1] = -1, E  # invalid: skipped
    got, want = moe_align(ids, E, block_m), moe_align_torch(ids, E, block_m)
    assert got[3] == want[3] and got[0].shape == want[0].shape and got[1].shape == want[1].shape
    total = int(want[2])
    assert int(got[2]) == total
    assert torch.equal(got[0][:total], want[0][:total])
    assert torch.equal(got[1][:total // block_m], want[1][:total // block_m])


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
def test_tuned_config_table(tmp_path, monkeypatch):
    """The sorted GEMM's tiles come from a per-(shape, GPU) table when one exists: nearest token count on a log
    scale; no table, or no GPU name (CPU), gives None and the heuristic default is used."""
    import json
    from strata.ops.triton_kernels import fused_moe as fm
    name = fm.config_file_name(128, 768, 2048, "NVIDIA H200")
    assert name == "E=128,I=768,H=2048,device=NVIDIA_H200.json"
    cfgs = {"16": {"block_m": 16}, "256": {"block_m": 32}, "4096": {"block_m": 64}}
    (tmp_path / name).write_text(json.dumps({"configs": cfgs}))
    monkeypatch.setenv("STRATA_MOE_CONFIG_DIR", str(tmp_path))
    pick = lambda T: fm.tuned_config(T, 128, 768, 2048, "NVIDIA H200")  # noqa: E731
    assert pick(1) == {"block_m": 16} and pick(60) == {"block_m": 16} and pick(70) == {"block_m": 32}
    assert pick(1000) == {"block_m": 32} and pick(1100) == {"block_m": 64} and pick(10 ** 6) == {"block_m": 64}
    assert fm.tuned_config(16, 128, 384, 2048, "NVIDIA H200") is None  # another shape
    assert fm.tuned_config(16, 128, 768, 2048, None) is None  # not on a GPU
    for f in os.listdir(fm.CONFIG_DIR):  # the shipped tables parse and name real tiles
        if f.endswith(".json"):
            for c in fm._load_tuned(os.path.join(fm.CONFIG_DIR, f)).values():
                assert set(c) <= {"block_m", "block_n", "block_k", "num_warps", "num_stages"} and c["block_m"] >= 16


@pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")
@pytest.mark.parametrize("T,path", [(1, "decode"), (2, "decode"), (40, "sorted")])
def test_expert_offset_selects_this_ranks_experts(T, path):
    """Expert parallelism: ids are global (two ranks of E experts here) and a rank holding experts [E, 2E) passes
    expert_offset=E; its result equals the twin on the ids made local (others -1), on both kernel paths, and
    the alignment kernel equals its twin with the same offset."""
    from strata.ops.triton_kernels import fused_moe as fm
    H, I, E, k = 32, 16, 8, 2
    x, w13, w2, w, _ = _case(T, H, I, E, k, torch.float32, seed=T)
    g = torch.Generator().manual_seed(100 + T)
    ids = torch.stack([torch.randperm(2 * E, generator=g)[:k] for _ in range(T)])  # global, over both ranks
    local = torch.where(ids >= E, ids - E, -1)
    want = moe_ref.fused_moe(x, w13, w2, w, local)
    torch.testing.assert_close(moe_ref.fused_moe(x, w13, w2, w, ids, expert_offset=E), want)
    config = {} if path == "sorted" else None  # a config forces the sorted path
    assert (path == "decode") == (config is None and fm.use_decode_path(T, k, E))
    got = fm.fused_moe(x, w13, w2, w, ids, config=config, expert_offset=E)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    a, b = fm.moe_align(ids, E, 16, expert_offset=E), fm.moe_align_torch(ids, E, 16, expert_offset=E)
    n = int(b[2])
    assert int(a[2]) == n and torch.equal(a[0][:n], b[0][:n]) and torch.equal(a[1][:n // 16], b[1][:n // 16])


def test_twin_matches_per_token_loop():
    """The twin against the plain definition (one token, one choice at a time)."""
    x, w13, w2, w, ids = _case(9, 32, 16, 4, 2, torch.float32)
    out = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            out[t] += w[t, j] * moe_ref.expert_mlp(x[t:t + 1], w13[ids[t, j]], w2[ids[t, j]])[0]
    torch.testing.assert_close(moe_ref.fused_moe(x, w13, w2, w, ids), out)

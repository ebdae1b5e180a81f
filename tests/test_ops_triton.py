"""Every Triton kernel against its torch twin in strata.ops.ref, on CPU under TRITON_INTERPRET=1.

Small random shapes; ragged lengths on and across block boundaries (block_size 16); GQA ratios 1/4/8;
cached prefixes; the split-KV path forced on; slot -1 skipping; fp32 exact-ish, bf16 looser.
Outputs the kernels allocate are poisoned (NaN / sentinel) so an unwritten element cannot pass.
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

try:
    import triton  # noqa: F401
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _TRITON_ERR = e

pytestmark = pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")

if _TRITON_ERR is None:
    import strata.ops as ops
    from strata.ops import ref
    from strata.ops import triton_kernels as tk

BS = 16  # block_size of every cache here
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty hands out NaN-filled (float) or -7-filled (int) memory while the kernel call runs."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        t.fill_(float("nan") if t.is_floating_point() else -7)
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = orig


def rand_cache(num_blocks, kvh, d, dtype):
    k = torch.randn(num_blocks, BS, kvh, d, dtype=torch.float32).to(dtype)
    v = torch.randn(num_blocks, BS, kvh, d, dtype=torch.float32).to(dtype)
    return k, v


def rand_block_tables(lens, num_blocks):
    """Each sequence gets distinct random pages (shuffled, so never contiguous); padding entries are 0."""
    need = [(int(n) + BS - 1) // BS for n in lens]
    width = max(max(need), 1) + 1
    perm = torch.randperm(num_blocks).tolist()
    assert sum(need) <= num_blocks
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return bt


def assert_close(out, expected, dtype):
    assert not torch.isnan(out).any(), "output holds NaN (an element was never written?)"
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


# --------------------------------------------------------------------------------------------- dispatcher

def test_dispatcher_routes(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.delenv("STRATA_FORCE_TRITON", raising=False)
    assert not ops.use_triton(x)  # CPU tensors go to the twin unless forced
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    assert ops.use_triton(x)
    w = torch.randn(8)
    with poisoned_empty():
        out = ops.rms_norm(x, w, 1e-6)
    assert_close(out, ref.rms_norm(x, w, 1e-6), torch.float32)
    for name in ("reshape_and_cache", "paged_decode_attention", "paged_prefill_attention", "rms_norm",
                 "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "gather_kv"):
        assert callable(getattr(ops, name))


# ----------------------------------------------------------------------------------------- reshape_and_cache

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache(dtype):
    T, kvh, d, nb = 37, 2, 32, 6
    key = torch.randn(T, kvh, d).to(dtype)
    value = torch.randn(T, kvh, d).to(dtype)
    slots = torch.randperm(nb * BS)[:T].to(torch.int64)
    slots[[0, 5, 17, T - 1]] = -1  # padding tokens: must not be written
    slots[3] = 15  # last slot of block 0
    slots[4] = 16  # first slot of block 1
    k0, v0 = rand_cache(nb, kvh, d, dtype)  # random "old" contents (never zeros)
    k_ref, v_ref = k0.clone(), v0.clone()
    ref.reshape_and_cache(key, value, k_ref, v_ref, slots)
    k_tr, v_tr = k0.clone(), v0.clone()
    tk.reshape_and_cache(key, value, k_tr, v_tr, slots.to(torch.int32))
    assert torch.equal(k_tr, k_ref) and torch.equal(v_tr, v_ref)


def test_reshape_and_cache_strided_input():
    # key/value as views of a fused qkv buffer: token stride larger than kvh * d.
    T, kvh, d, nb = 9, 4, 16, 3
    qkv = torch.randn(T, (8 + 2 * kvh) * d)
    key = qkv[:, 8 * d:(8 + kvh) * d].view(T, kvh, d)
    value = qkv[:, (8 + kvh) * d:].view(T, kvh, d)
    slots = torch.tensor([3, -1, 40, 16, 15, 0, -1, 47, 20], dtype=torch.int64)
    k0, v0 = rand_cache(nb, kvh, d, torch.float32)
    k_ref, v_ref = k0.clone(), v0.clone()
    ref.reshape_and_cache(key, value, k_ref, v_ref, slots)
    k_tr, v_tr = k0.clone(), v0.clone()
    tk.reshape_and_cache(key, value, k_tr, v_tr, slots)
    assert torch.equal(k_tr, k_ref) and torch.equal(v_tr, v_ref)


# ------------------------------------------------------------------------------------------- decode attention

DECODE_LENS = [1, 15, 16, 17, 33, 64, 100]  # on and across block (16) and tile boundaries


# one program per (seq, kv head); fixed 32-token pieces; each sequence cut in up to 3 by its own length
SPLIT_MODES = {"nosplit": dict(num_splits=1), "fixed32": dict(partition_size=32),
               "per_seq3": dict(num_splits=3, min_partition=16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("split", list(SPLIT_MODES))
def test_paged_decode_attention(dtype, group, split):
    kvh, d = 2, 32
    H = kvh * group
    lens = torch.tensor(DECODE_LENS, dtype=torch.int32)
    nb = sum((n + BS - 1) // BS for n in DECODE_LENS) + 3
    kc, vc = rand_cache(nb, kvh, d, dtype)
    bt = rand_block_tables(DECODE_LENS, nb)
    q = torch.randn(len(DECODE_LENS), H, d).to(dtype)
    scale = d ** -0.5
    expected = ref.paged_decode_attention(q, kc, vc, bt, lens, scale)
    with poisoned_empty():
        out = tk.paged_decode_attention(q, kc, vc, bt, lens, scale, tile=16, **SPLIT_MODES[split])
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


def test_paged_decode_attention_defaults_and_max_seq_len():
    # Default heuristics (which split on the interpreter's assumed 132 SMs), tile 64, head_dim 64, with and
    # without an upper-bound max_seq_len (as a CUDA-graph caller passes) larger than every length.
    kvh, group, d = 2, 4, 64
    lens_list = [300, 5, 257, 16]
    lens = torch.tensor(lens_list, dtype=torch.int32)
    nb = sum((n + BS - 1) // BS for n in lens_list) + 2
    kc, vc = rand_cache(nb, kvh, d, torch.float32)
    bt = rand_block_tables(lens_list, nb)
    q = torch.randn(len(lens_list), kvh * group, d)
    expected = ref.paged_decode_attention(q, kc, vc, bt, lens, 0.125)
    assert tk.decode_attention.choose_num_splits(len(lens_list), kvh, q.device) > 1
    for bound in (512, None):
        with poisoned_empty():
            out = tk.paged_decode_attention(q, kc, vc, bt, lens, 0.125, max_seq_len=bound)
        assert_close(out, expected, torch.float32)
    with poisoned_empty():
        out = tk.paged_decode_attention(q, kc, vc, bt, lens, 0.125, partition_size=0)
    assert_close(out, expected, torch.float32)
    # Many small partitions: up to 19 per sequence, merged by stage 2 in more than one chunk (of 16).
    with poisoned_empty():
        out = tk.paged_decode_attention(q, kc, vc, bt, lens, 0.125, max_seq_len=300, partition_size=16, tile=16)
    assert_close(out, expected, torch.float32)


def test_paged_decode_attention_odd_head_dim_via_dispatcher(monkeypatch):
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    kvh, group, d = 1, 2, 40  # head_dim not a power of two
    lens_list = [31, 48, 2]
    lens = torch.tensor(lens_list, dtype=torch.int32)
    nb = 10
    kc, vc = rand_cache(nb, kvh, d, torch.float32)
    bt = rand_block_tables(lens_list, nb)
    q = torch.randn(3, kvh * group, d)
    expected = ref.paged_decode_attention(q, kc, vc, bt, lens, 0.2)
    with poisoned_empty():
        out = ops.paged_decode_attention(q, kc, vc, bt, lens, 0.2)
    assert_close(out, expected, torch.float32)


# ------------------------------------------------------------------------------------------ prefill attention

# (q_len, seq_len): fresh prompts, cached prefixes (q_len < seq_len), a decode-like row, an empty query.
PREFILL_SEQS = [(17, 17), (5, 40), (1, 1), (16, 16), (0, 12), (20, 52), (33, 33)]


def _prefill_inputs(seqs, kvh, group, d, dtype):
    qlens = [a for a, _ in seqs]
    lens_list = [b for _, b in seqs]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(lens_list, dtype=torch.int32)
    nb = sum((n + BS - 1) // BS for n in lens_list) + 2
    kc, vc = rand_cache(nb, kvh, d, dtype)
    bt = rand_block_tables(lens_list, nb)
    q = torch.randn(int(qsl[-1]), kvh * group, d).to(dtype)
    return q, kc, vc, bt, qsl, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_paged_prefill_attention(dtype, group):
    d = 32
    q, kc, vc, bt, qsl, lens = _prefill_inputs(PREFILL_SEQS, 1, group, d, dtype)
    scale = d ** -0.5
    expected = ref.paged_prefill_attention(q, kc, vc, bt, qsl, lens, scale)
    with poisoned_empty():
        out = tk.paged_prefill_attention(q, kc, vc, bt, qsl, lens, scale, block_m=16, block_n=16)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


def test_paged_prefill_attention_default_tiles():
    # The launcher's own tile sizes (64 x 32 for fp32), tiles spanning several blocks, a long cached prefix.
    seqs = [(70, 70), (40, 130), (3, 67)]
    q, kc, vc, bt, qsl, lens = _prefill_inputs(seqs, 2, 2, 16, torch.float32)
    expected = ref.paged_prefill_attention(q, kc, vc, bt, qsl, lens, 0.3)
    with poisoned_empty():
        out = tk.paged_prefill_attention(q, kc, vc, bt, qsl, lens, 0.3)
    assert_close(out, expected, torch.float32)


# ------------------------------------------------------------------------------------------- norms

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 64), (4, 100)])
def test_rms_norm(dtype, shape):
    x = (torch.randn(*shape) * 3).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    expected = ref.rms_norm(x, w, 1e-6)
    with poisoned_empty():
        out = tk.rms_norm(x, w, 1e-6)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected, dtype)


def test_rms_norm_strided_rows():
    base = torch.randn(6, 160)
    x = base[:, :128]  # row stride 160
    w = torch.rand(128) + 0.5
    with poisoned_empty():
        out = tk.rms_norm(x, w, 1e-5)
    assert_close(out, ref.rms_norm(x, w, 1e-5), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 100)])
def test_fused_add_rms_norm(dtype, shape):
    x = torch.randn(*shape).to(dtype)
    r = torch.randn(*shape).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    x0, r0 = x.clone(), r.clone()
    exp_out, exp_res = ref.fused_add_rms_norm(x, r, w, 1e-6)
    with poisoned_empty():
        out, res = tk.fused_add_rms_norm(x, r, w, 1e-6)
    # The sum is rounded once to the input dtype, as in the twin: exact in fp32. The CPU interpreter
    # truncates fp32 -> bf16 (a GPU rounds to nearest), hence 1 ulp of slack for bf16.
    if dtype == torch.float32:
        assert torch.equal(res, exp_res)
    else:
        torch.testing.assert_close(res.float(), exp_res.float(), atol=0, rtol=2 ** -7)
    assert_close(out, exp_out, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched, like the twin


# ------------------------------------------------------------------------------------------- rotary

def _cos_sin_cache(max_pos, d, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat((f.cos(), f.sin()), dim=-1)  # [max_pos, d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_rotary_embedding(dtype, heads):
    H, kvh = heads
    T, d = 11, 32
    # q and k as strided views of one fused qkv projection output, as a model produces them.
    qkv = torch.randn(T, (H + 2 * kvh) * d).to(dtype)
    q, k = qkv[:, :H * d], qkv[:, H * d:(H + kvh) * d]
    pos = torch.randint(0, 200, (T,))
    pos[0] = 0
    pos[1] = 199
    cs = _cos_sin_cache(200, d)
    q0, k0 = q.clone(), k.clone()
    eq, ek = ref.rotary_embedding(pos, q, k, cs, d)
    with poisoned_empty():
        oq, ok = tk.rotary_embedding(pos, q, k, cs, d)
    assert oq.shape == eq.shape and ok.shape == ek.shape and oq.dtype == dtype
    assert_close(oq, eq, dtype)
    assert_close(ok, ek, dtype)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# ------------------------------------------------------------------------------------------- qkv epilogue

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,d", [((4, 4), 32), ((8, 2), 64), ((6, 1), 32), ((8, 8), 128)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qkv_epilogue_matches_composition(dtype, heads, d, qk_norm):
    """norm (Qwen3) + rotary + cache write in one kernel == the twins one after another; slot -1 skipped."""
    H, kvh = heads
    T = 9
    qkv = (torch.randn(T, (H + 2 * kvh) * d) * 2).to(dtype)
    wide = torch.randn(T, (H + 2 * kvh) * d + 7).to(dtype)
    wide[:, 3:3 + qkv.shape[1]] = qkv
    view = wide[:, 3:3 + qkv.shape[1]]  # strided rows, as the qkv projection's output may be
    pos = torch.randint(0, 300, (T,))
    pos[0] = 0
    slots = torch.randperm(4 * BS)[:T]
    slots[2] = -1
    cs = _cos_sin_cache(300, d)
    wq = (torch.rand(d) + 0.5).to(dtype) if qk_norm else None
    wk = (torch.rand(d) + 0.5).to(dtype) if qk_norm else None
    ek, ev = rand_cache(4, kvh, d, dtype)
    gk, gv = ek.clone(), ev.clone()
    eq = ref.qkv_epilogue(qkv, pos, cs, wq, wk, 1e-6, ek, ev, slots, H, kvh, d)
    with poisoned_empty():
        oq = tk.qkv_epilogue(view, pos, cs, wq, wk, 1e-6, gk, gv, slots, H, kvh, d)
    assert oq.shape == (T, H * d) and oq.dtype == dtype and oq.is_contiguous()
    assert_close(oq, eq, dtype)
    assert_close(gk, ek, dtype)
    assert torch.equal(gv, ev)  # V is copied, never rounded differently


def test_qkv_epilogue_dispatcher_composes_unfused_kernels(monkeypatch):
    """Off (or failing its device check), the dispatcher composes the unfused kernels: same result."""
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    H, kvh, d, T = 4, 2, 32, 5
    qkv = torch.randn(T, (H + 2 * kvh) * d)
    pos, slots, cs = torch.arange(T), torch.arange(T), _cos_sin_cache(16, d)
    w = torch.rand(d) + 0.5
    k1, v1 = rand_cache(2, kvh, d, torch.float32)
    k2, v2 = k1.clone(), v1.clone()
    q1 = ops.qkv_epilogue(qkv, pos, cs, w, w, 1e-6, k1, v1, slots, H, kvh, d)
    monkeypatch.setattr(ops, "_fused_epilogue_ok", False)  # as after a failed device check
    q2 = ops.qkv_epilogue(qkv, pos, cs, w, w, 1e-6, k2, v2, slots, H, kvh, d)
    assert_close(q1, q2, torch.float32)
    assert_close(k1, k2, torch.float32)
    assert torch.equal(v1, v2)


def test_qkv_epilogue_device_check_turns_a_wrong_kernel_off(monkeypatch):
    """The runner's warm-up check: the fused kernel agrees with the unfused ones (kept on), and a kernel that
    disagrees is turned off for the process (the dispatcher then composes the unfused kernels)."""
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    monkeypatch.setattr(ops, "_fused_epilogue_ok", True)
    assert ops.check_fused_qkv_epilogue(torch.device("cpu"), torch.float32, 4, 2, 32, qk_norm=True)
    assert ops._fused_epilogue_ok
    real = tk.qkv_epilogue
    monkeypatch.setattr(tk, "qkv_epilogue", lambda *a, **k: real(*a, **k) * 1.5)
    assert not ops.check_fused_qkv_epilogue(torch.device("cpu"), torch.bfloat16, 4, 2, 32, qk_norm=False)
    assert not ops._fused_epilogue_ok


# ------------------------------------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 300), (2, 3, 2 * 64), (1, 2 * 1500)])
def test_silu_and_mul(dtype, shape):
    x = (torch.randn(*shape) * 3).to(dtype)
    expected = ref.silu_and_mul(x)
    with poisoned_empty():
        out = tk.silu_and_mul(x)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype)


# ------------------------------------------------------------------------------------------- GPU lowering

def test_kernels_compile_for_sm90():
    """Compile every kernel for sm_90 (H100/H200) offline: the interpreter never lowers to PTX, this does.

    Skips when this triton cannot compile for CUDA without a GPU (no nvidia backend / ptxas, API drift).
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "strata.ops.triton_kernels._compile_check", "--arch", "90",
                        "--quick"],
                       env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    if p.returncode == 2:
        pytest.skip(lines[-1] if lines else "offline compile unavailable")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]

"""The C kernels of strata.ops.cpu against their torch twins (strata.ops.ref), and the fallback to the twins."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from strata import ops
from strata.ops import cpu, ref

needs_kernel = pytest.mark.skipif(cpu.library() is None, reason="no C compiler on this machine")


def _paged(B, H, kvh, d, bs, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    maxb = max((L + bs - 1) // bs for L in lens)
    nb = B * maxb + 3
    kc = torch.randn(nb, bs, kvh, d, generator=g)
    vc = torch.randn(nb, bs, kvh, d, generator=g)
    bt = (torch.randperm(nb - 1, generator=g)[:B * maxb] + 1).view(B, maxb).to(torch.int32)
    q = torch.randn(B, H, d, generator=g)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


@needs_kernel
@pytest.mark.parametrize("H,kvh,d,bs", [(9, 3, 64, 16), (8, 8, 128, 16), (4, 1, 80, 8), (6, 2, 32, 32)])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_paged_decode_matches_twin(H, kvh, d, bs, window, threads):
    lens = [1, 2, bs, bs + 1, 3 * bs - 1, 57, 100, 7, 64]
    q, kc, vc, bt, sl = _paged(len(lens), H, kvh, d, bs, lens)
    want = ref.paged_decode_attention(q, kc, vc, bt, sl, d ** -0.5, sliding_window=window)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.paged_decode_attention(q, kc, vc, bt, sl, d ** -0.5, sliding_window=window)
    finally:
        torch.set_num_threads(prev)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_dispatch_uses_the_kernel_for_float32_only():
    q, kc, vc, bt, sl = _paged(3, 4, 2, 64, 16, [5, 40, 17])
    assert cpu.paged_decode_attention(q, kc, vc, bt, sl, 0.125) is not None
    assert cpu.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, 0.125) is None
    # through the entry point the engine calls, float32 and float64 agree with the twin
    for dt in (torch.float32, torch.float64):
        a = ops.paged_decode_attention(q.to(dt), kc.to(dt), vc.to(dt), bt, sl, 0.125)
        b = ref.paged_decode_attention(q.to(dt), kc.to(dt), vc.to(dt), bt, sl, 0.125)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_twin_runs(tmp_path):
    """No compiler (CC points nowhere, no gcc on PATH): one warning naming the cause, then the twin's answer."""
    code = ("import logging, torch; logging.basicConfig();"
            "from strata.ops import cpu; print('LIB', cpu.library());"
            "q=torch.randn(2,2,8); kc=torch.randn(4,4,1,8); vc=torch.randn(4,4,1,8);"
            "bt=torch.tensor([[1],[2]],dtype=torch.int32); sl=torch.tensor([3,4],dtype=torch.int32);"
            "from strata import ops; from strata.ops import ref;"
            "torch.testing.assert_close(ops.paged_decode_attention(q,kc,vc,bt,sl,0.3),"
            "ref.paged_decode_attention(q,kc,vc,bt,sl,0.3)); print('OK')")
    env = {**os.environ, "CC": "/nonexistent/cc", "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LIB None" in r.stdout and "OK" in r.stdout
    assert "CPU kernels unavailable" in r.stderr and "no C compiler" in r.stderr
    r = subprocess.run([sys.executable, "-c", "from strata.ops import cpu; print(cpu.library())"],
                       env={**os.environ, "STRATA_CPU_KERNELS": "0"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr


@needs_kernel
def test_bad_indices_are_refused_not_read():
    q, kc, vc, bt, sl = _paged(2, 4, 2, 64, 16, [5, 40])
    with pytest.raises(ValueError, match="seq_lens"):
        cpu.paged_decode_attention(q, kc, vc, bt, torch.tensor([5, 10_000], dtype=torch.int32), 0.125)
    bad = bt.clone()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="block ids"):
        cpu.paged_decode_attention(q, kc, vc, bad, sl, 0.125)

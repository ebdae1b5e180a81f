"""Compile every kernel for a CUDA target on a machine without a GPU, to catch lowering errors early.

    python -m strata.ops.triton_kernels._compile_check [--arch 90] [--full | --quick]

Runs each public launcher on small CPU tensors with the real launch replaced by a recorder, then feeds the
recorded arguments (types, divisibility-by-16 of ints and pointers, constexprs, num_warps/num_stages) to
triton.compile for the target. Prints one line per kernel variant; exit status 1 if any failed to compile,
2 (with a SKIP line) if this triton cannot compile offline. TRITON_INTERPRET must be unset.
This uses triton's internal ASTSource API, which moves between releases: treat a SKIP as "not checked".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_DT = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int32": "i32",
       "torch.int64": "i64", "torch.uint8": "u8", "torch.bool": "i1"}


class _Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))
        return launch


def _compile(fn, args, kwargs, arch):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = fn.arg_names
    vals = dict(zip(names, args))
    vals.update(kwargs)
    sig, cx, attrs = {}, {}, {}
    for i, n in enumerate(names):
        p = fn.params[i]
        v = vals[n]
        if p.is_constexpr:
            sig[n] = "constexpr"
            cx[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + _DT[str(v.dtype)]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned (views here too)
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            sig[n] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            raise TypeError(f"{n}: {type(v)}")
    src = ASTSource(fn, sig, cx, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _cases(full: bool):
    """(label, thunk) pairs; each thunk calls one public launcher on CPU tensors of realistic layout."""
    import torch

    from strata.ops import triton_kernels as tk

    def decode(dtype, partition, G=4, d=128):
        kvh, B, bs, nb = 8, 4, 16, 40
        q = torch.randn(B, kvh * G, d).to(dtype)
        kc = torch.randn(nb, bs, kvh, d).to(dtype)
        bt = torch.arange(B * 8, dtype=torch.int32).view(B, 8)
        lens = torch.tensor([100, 17, 128, 1], dtype=torch.int32)
        return lambda: tk.paged_decode_attention(q, kc, kc, bt, lens, 0.1, 128, partition_size=partition)

    def prefill(dtype, d=128):
        kvh, G, bs, nb = 8, 4, 16, 40
        qsl = torch.tensor([0, 100, 117], dtype=torch.int32)
        q = torch.randn(117, kvh * G, d).to(dtype)
        kc = torch.randn(nb, bs, kvh, d).to(dtype)
        bt = torch.arange(2 * 10, dtype=torch.int32).view(2, 10)
        lens = torch.tensor([100, 150], dtype=torch.int32)
        return lambda: tk.paged_prefill_attention(q, kc, kc, bt, qsl, lens, 0.1)

    dt = torch.bfloat16
    x = torch.randn(4, 2560).to(dt)
    w = torch.randn(2560).to(dt)
    qkv = torch.randn(4, 48 * 128).to(dt)
    cs = torch.randn(64, 128)
    pos = torch.arange(4)
    key = torch.randn(4, 8, 128).to(dt)
    kc = torch.randn(10, 16, 8, 128).to(dt)
    slots = torch.tensor([0, 5, -1, 17], dtype=torch.int64)
    cases = [
        ("decode bf16 split", decode(dt, 32)),
        ("decode bf16 no-split", decode(dt, 0)),
        ("decode fp32 split", decode(torch.float32, 32)),
        ("prefill bf16", prefill(dt)),
        ("prefill fp32", prefill(torch.float32)),
        ("rms_norm bf16", lambda: tk.rms_norm(x, w, 1e-6)),
        ("fused_add_rms_norm bf16", lambda: tk.fused_add_rms_norm(x, x, w, 1e-6)),
        ("rotary bf16", lambda: tk.rotary_embedding(pos, qkv[:, :32 * 128], qkv[:, 32 * 128:40 * 128], cs, 128)),
        ("silu_and_mul bf16", lambda: tk.silu_and_mul(torch.randn(4, 2 * 9728).to(dt))),
        ("reshape_and_cache bf16", lambda: tk.reshape_and_cache(key, key, kc, kc, slots)),
        ("qkv_epilogue bf16 qk-norm", lambda: tk.qkv_epilogue(qkv, pos, cs, w[:128], w[:128], 1e-6, kc, kc, slots,
                                                              32, 8, 128)),
        ("qkv_epilogue bf16", lambda: tk.qkv_epilogue(qkv, pos, cs, None, None, 1e-6, kc, kc, slots, 32, 8, 128)),
    ]
    if full:
        cases += [
            ("decode fp16 split G=8", decode(torch.float16, 32, G=8)),
            ("decode bf16 no-split G=1 d=64", decode(dt, 0, G=1, d=64)),
            ("prefill fp16 d=64", prefill(torch.float16, d=64)),
            ("rms_norm fp32", lambda: tk.rms_norm(x.float(), w.float(), 1e-6)),
        ]
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--full", action="store_true", help="more dtype / head-dim variants")
    ap.add_argument("--quick", action="store_true", help="bf16 variants only (what the engine runs)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("SKIP: TRITON_INTERPRET is set; run without it")
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:
        print(f"SKIP: cannot compile offline with this triton: {e!r}")
        return 2

    from strata.ops.triton_kernels import (activation, cache, decode_attention, norm, prefill_attention,
                                           epilogue, rotary)

    # Can this install compile for the target at all (nvidia backend, ptxas)? If not, nothing is checked.
    import torch
    try:
        _compile(activation._silu_and_mul_kernel, (torch.empty(2), torch.empty(1), 2, 1, 1), {"BLOCK": 16},
                 a.arch)
    except Exception as e:
        print(f"SKIP: triton {triton.__version__} cannot compile for sm_{a.arch} here: {e!r}"[:400])
        return 2

    calls: list = []
    mods = [activation, cache, decode_attention, norm, prefill_attention, epilogue, rotary]
    for m in mods:
        for name in list(vars(m)):
            if name.endswith("_kernel") and isinstance(getattr(m, name), triton.runtime.JITFunction):
                setattr(m, name, _Recorder(getattr(m, name), calls))
    failed = 0
    for label, thunk in _cases(a.full):
        if a.quick and "bf16" not in label:
            continue
        del calls[:]
        thunk()
        for fn, args, kwargs in calls:
            t0 = time.time()
            try:
                k = _compile(fn, args, dict(kwargs), a.arch)
            except Exception as e:  # a lowering error: report, go on
                failed += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL {label} / {fn.__name__}: {type(e).__name__}: {msg[-1] if msg else ''}")
                continue
            shared = getattr(k.metadata, "shared", "?")
            print(f"ok   {label} / {fn.__name__}: sm_{a.arch}, shared {shared} B, {time.time() - t0:.1f} s")
    print(f"triton {triton.__version__}: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

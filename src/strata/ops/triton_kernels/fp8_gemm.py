"""FP8 (e4m3) linear layers on the GPU. Twin: `strata.ops.ref.fp8_linear` (same arguments, same regimes).

    y[M, N] = x[M, K] @ (w_fp8[N, K] * scale).T (+ bias)     scale: per row [N], or per block [ceil(N/bn), ceil(K/bk)]

Two regimes, chosen by `strata.ops.fp8_linear` on the number of rows M (`ref.FP8_W8A16_MAX_M`):

* **W8A16, small M (decode)**: `fp8_w8a16_linear`. x is not quantised: each weight tile is converted to x's
  dtype in registers and multiplied in fp32 (tensor cores for BLOCK_M >= 16; BLOCK_M = 1: one row per program,
  CUDA-core products summed along K). Batch-1 decode is bandwidth-bound, so the grid must cover the GPU while reading every weight byte
  once: few column blocks are split along K (SPLIT_K programs per tile write fp32 partial sums, and a second
  small kernel adds them, applies the per-row scale and the bias, and rounds once). Weight scales: per row in the
  epilogue; per block per K tile inside the loop (BLOCK_K divides bk); where bk is too small for a tile (scales
  expanded to one per column) the tile is scaled element-wise in fp32. Tiles: `W8A16_CONFIGS` (measured per
  shape and M bucket by benchmarks/fp8_gemm.py), else `w8a16_default_config`. With weight_scale None the same
  kernel multiplies a 16/32-bit weight (benchmarks compare it with cuBLAS).
* **W8A8, large M (prefill)**: `fp8_w8a8_linear`. Activations are quantised to e4m3 by `fp8_quantize_act` (one
  kernel: per token, per token and `act_group` columns, or with the static `input_scale`), then per-row weights
  with bf16 activations go to cuBLASLt through `torch._scaled_mm` (row-wise scales [M, 1] x [1, N], fp32
  accumulation); everything else (block-wise weights, fp16/fp32 activations, N or K not a multiple of 16, the CPU
  interpreter) to the Triton kernel `_w8a8_kernel`: fp8 x fp8 `tl.dot`, the activation and weight scales of each
  K tile applied to its partial product (promoted to fp32 every BLOCK_K), or once in the epilogue when both are
  per row. Block scales whose grid does not fit a tile of >= 32 columns (expanded columns) take the exact slow
  path: activations quantised, dequantised to fp32, then the W8A16 kernel in fp32.

M changes from step to step and is not specialised on (no compile in the middle of serving); the M bucket picks
the tiles, and the buckets (1, 2, 4, 8, 16, 32, 64) are all sizes of the decode CUDA-graph ladder.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import dot_precision, interpreting, mm, num_sms

FP8_MAX = tl.constexpr(448.0)

# (N, K) -> {M bucket: (block_m, block_n, block_k, split_k, num_warps, num_stages)}. An entry serves every M up to
# its bucket (the smallest bucket >= M is used; M above every bucket: the largest); shapes not in the table get
# `w8a16_default_config`. Filled from `benchmarks/fp8_gemm.py` on one H200 (it prints this table); empty until then.
W8A16_CONFIGS: dict[tuple[int, int], dict[int, tuple[int, int, int, int, int, int]]] = {}
# (N, K) -> {M bucket: (block_m, block_n, block_k, group_m, num_warps, num_stages)} for `_w8a8_kernel`, same rules.
W8A8_CONFIGS: dict[tuple[int, int], dict[int, tuple[int, int, int, int, int, int]]] = {}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_supported(device: torch.device) -> bool:
    """Whether these kernels run on `device`: CUDA compute capability 8.9 or later (e4m3 conversions and MMA), or
    the CPU under the interpreter."""
    if device.type != "cuda":
        return True
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


# ---------------------------------------------------------------------------------------------- W8A16
@triton.jit(do_not_specialize=["M", "s_yp"])  # s_yp = M * N
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, k_split, s_bn, s_bk,
                  s_xm, s_wn, s_sn, s_sk, s_ym, s_yp,
                  SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """x [M, K], w [N, K], y [M, N], all contiguous along their last dimension. SCALE_MODE 0: no scale; 1: one
    scale per (row block of s_bn rows), in the epilogue; 2: per (row block, K tile), K tiles inside one scale
    column (s_bk % BLOCK_K == 0); 3: element-wise, in fp32. SPLIT: write fp32 partial sums of this program's K range
    to y[pid_k] (stride s_yp) for `_splitk_reduce_kernel`. BLOCK_M 1: one row per program, products on CUDA
    cores kept per (row, column) of the tile and summed once after the loop (a [BLOCK_M, BLOCK_N, BLOCK_K] product
    would move every weight tile through shared memory); BLOCK_M >= 16: tensor cores. Row blocks of one weight
    tile are neighbours in the grid (axis 0), so a tile read for one is in L2 for the next."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + pid_m.to(tl.int64) * s_xm + offs_k, mask=k_ok, other=0.0)
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE_MODE == 2:
            s = tl.load(s_ptr + (offs_n // s_bn) * s_sn + (k0 // s_bk) * s_sk, mask=n_ok, other=0.0)
        if SCALE_MODE == 3:  # element-wise scales (expanded columns): the dequantised tile in fp32
            s = tl.load(s_ptr + (offs_n // s_bn)[:, None] * s_sn + (offs_k // s_bk)[None, :] * s_sk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            w = w.to(tl.float32) * s
            x = x.to(tl.float32)
        if BLOCK_M == 1:
            wf = w.to(tl.float32)
            if SCALE_MODE == 2:
                wf = wf * s[:, None]
            acc2 += wf * x.to(tl.float32)[None, :]
        else:  # tensor cores; e4m3 is exact in bf16 / fp16 / fp32
            part = mm(x, tl.trans(w.to(x.dtype)), DOT_PREC, INTERP)
            if SCALE_MODE == 2:
                acc += part * s[None, :]
            else:
                acc += part
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]
    if SPLIT:
        out = y_ptr + pid_k.to(tl.int64) * s_yp + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        if SCALE_MODE == 1:
            acc = acc * tl.load(s_ptr + (offs_n // s_bn) * s_sn, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "s_pp"])
def _splitk_reduce_kernel(p_ptr, s_ptr, b_ptr, y_ptr, M, N, split_k, s_bn, s_sn, s_pp, s_pm, s_ym,
                          ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = round(sum over splits of p[:, m, n] (* row scale) (+ bias)): one program per (row, BLOCK cols)."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = p_ptr + m * s_pm + offs
    for _ in range(0, split_k):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += s_pp
    if ROW_SCALE:
        acc = acc * tl.load(s_ptr + (offs // s_bn) * s_sn, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * s_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _bucket(M: int, table: dict[int, tuple] | None) -> tuple | None:
    """The entry of the smallest bucket >= M, else of the largest bucket; None without a table."""
    if not table:
        return None
    fits = [b for b in table if b >= M]
    return table[min(fits) if fits else max(table)]


def w8a16_default_config(M: int, N: int, K: int, sms: int = 132) -> tuple[int, int, int, int, int, int]:
    """Tiles where `W8A16_CONFIGS` has none (a guess until measured): CUDA-core products for M = 1, tensor-core
    tiles of 16 / 32 / 64 rows above; split-K until about 4 programs per SM."""
    if M <= 1:  # no MMA: the pipeliner has nothing to stage, so num_stages 1
        bm, bn, bk, warps, stages = 1, 32, 256, 4, 1
    else:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64
        bn, bk, warps, stages = 64, 128, 4, 3
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = max(1, min(4 * sms // tiles, K // (4 * bk), 16))
    return bm, bn, bk, split, warps, stages


def w8a16_config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    return _bucket(M, W8A16_CONFIGS.get((N, K))) or w8a16_default_config(M, N, K, num_sms(device))


def _scale_layout(weight: torch.Tensor, scale: torch.Tensor | None, block_size):
    """(scale as 2-D [rows, cols] view, rows per scale row s_bn, columns per scale column s_bk)."""
    N, K = weight.shape
    if scale is None:
        return None, 1, max(K, 1)
    if block_size is None:
        return scale.reshape(N, 1), 1, max(K, 1)
    bn, bk = block_size
    return scale, bn, (bk if bk < K else max(K, 1))


def _tile_k(block_k: int, s_bk: int, K: int) -> int:
    """The largest block_k' <= block_k that divides the scale columns' width (s_bk >= K: any)."""
    if s_bk >= K:
        return block_k
    while block_k > 1 and s_bk % block_k:
        block_k //= 2
    return block_k


def fp8_w8a16_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                     block_size: tuple[int, int] | None = None, bias: torch.Tensor | None = None,
                     config: tuple[int, int, int, int, int, int] | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ (weight * scale).T (+ bias), x [M, K] not quantised; weight [N, K] float8_e4m3fn (or 16/32-bit
    with weight_scale None); result in out_dtype (default x's). config: (block_m, block_n, block_k, split_k,
    num_warps, num_stages), default `w8a16_config`."""
    M, K = x.shape
    N = weight.shape[0]
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("fp8_w8a16_linear: x and weight must be contiguous along K")
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    bm, bn, bk, split, warps, stages = config or w8a16_config(M, N, K, x.device)
    if bm != 1 and bm < 16:
        raise ValueError(f"block_m {bm}: 1 (CUDA cores) or >= 16 (tensor cores)")
    s2, s_bn, s_bk = _scale_layout(weight, weight_scale, block_size)
    mode = 0 if s2 is None else 1 if s_bk >= K else 2
    if mode == 2:
        tk = _tile_k(bk, s_bk, K)
        mode, bk = (2, tk) if tk >= 16 else (3, bk)
    k_split = triton.cdiv(triton.cdiv(K, bk), split) * bk
    split = triton.cdiv(K, k_split)  # no empty splits
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    scale_arg = s2 if s2 is not None else weight  # never read with SCALE_MODE 0
    s_sn, s_sk = (s2.stride(0), s2.stride(1)) if s2 is not None else (0, 0)
    common = dict(SCALE_MODE=mode, HAS_BIAS=bias is not None, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, DOT_PREC=dot_precision(x.dtype if mode != 3 else torch.float32),
                  INTERP=interpreting(), num_warps=warps, num_stages=stages)
    b = bias if bias is not None else y
    if split == 1:
        _w8a16_kernel[grid](x, weight, scale_arg, b, y, M, N, K, k_split, s_bn, s_bk,
                            x.stride(0), weight.stride(0), s_sn, s_sk, y.stride(0), 0, SPLIT=False, **common)
        return y
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _w8a16_kernel[grid](x, weight, scale_arg, b, part, M, N, K, k_split, s_bn, s_bk,
                        x.stride(0), weight.stride(0), s_sn, s_sk, part.stride(1), part.stride(0), SPLIT=True,
                        **common)
    block = min(1024, triton.next_power_of_2(N))
    _splitk_reduce_kernel[(M, triton.cdiv(N, block))](
        part, scale_arg, b, y, M, N, split, s_bn, s_sn, part.stride(0), part.stride(1), y.stride(0),
        ROW_SCALE=mode == 1, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return y


# ---------------------------------------------------------------------------------------------- activations
@triton.jit
def _to_e4m3(v, INTERP: tl.constexpr):
    """fp32 v (|v| <= 448) to e4m3, rounded to nearest even. The interpreter's own conversion (triton 3.9) rounds
    ties away and drops the carry into the exponent (124.3 -> 64), so there v is first rounded to an e4m3 value
    with fp32 bit arithmetic (3 mantissa bits; multiples of 2^-9 below 2^-6) and the conversion is exact."""
    if INTERP:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        sub = ((v * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        sub = tl.where(sub == 0.0, v * 0.0, sub)  # keeps the sign of zero
        v = tl.where(tl.abs(v) < 0.015625, sub, bits.to(tl.float32, bitcast=True))
    return v.to(tl.float8e4nv)


@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, in_scale_ptr, M, K, group, n_groups, s_xm, s_qm, s_sm,
                      STATIC: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """One program per row: for each group of `group` columns, scale = amax / 448 (or the static scale),
    q = e4m3(x / scale) (clamped to +-448, round to nearest even, divisions rounded as torch's)."""
    row = tl.program_id(0).to(tl.int64)
    for g in range(0, n_groups):
        k_lo = g * group
        k_hi = tl.minimum(K, k_lo + group)
        if STATIC:
            s = tl.load(in_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                v = tl.load(x_ptr + row * s_xm + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            s = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), FP8_MAX)
        for k0 in range(k_lo, k_hi, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * s_xm + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * s_qm + offs, _to_e4m3(q, INTERP), mask=offs < k_hi)
        tl.store(s_ptr + row * s_sm + g, s)


def fp8_quantize_act(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                     group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K / group)]): the quantisation of
    `ref.fp8_quant_dequant` (static input_scale: every row and group gets it; group None: one per token)."""
    M, K = x.shape
    g = K if (group is None or input_scale is not None or group >= K) else group
    n_groups = triton.cdiv(K, g) if K else 1
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, n_groups), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block = min(1024, triton.next_power_of_2(max(g, 16)))
    _act_quant_kernel[(M,)](x, q, s, input_scale if input_scale is not None else s, M, K, max(g, 1), n_groups,
                            x.stride(0), q.stride(0), s.stride(0), STATIC=input_scale is not None, BLOCK=block,
                            INTERP=interpreting(),
                            num_warps=4 if block >= 512 else 2)
    return q, s


# ---------------------------------------------------------------------------------------------- W8A8
@triton.jit
def _dot_fp8(a, b, acc, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b for e4m3 tiles, the tile's products summed in fp32 (Hopper's fp8 MMA accumulates in lower
    precision unless promoted: max_num_imprecise_acc=BLOCK_K promotes once per tile)."""
    if INTERP:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)


@triton.jit(do_not_specialize=["M"])
def _w8a8_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, a_group, s_bn, s_bk,
                 s_am, s_asm, s_wn, s_wsn, s_wsk, s_ym,
                 PER_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 INTERP: tl.constexpr):
    """y = (a * a_scale) @ (w * w_scale).T: a [M, K] e4m3 with scales [M, ceil(K / a_group)], w [N, K] e4m3 with
    scales [ceil(N / s_bn), ceil(K / s_bk)]. PER_K: the scales of each K tile multiply its product (BLOCK_K
    divides a_group and s_bk); else both have one column and multiply the result."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # groups of GROUP_M row blocks walk the column blocks together (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * s_am
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_cols + offs_k[:, None], mask=n_ok[None, :], other=0.0)  # [BK, BN]
        else:
            k_ok = offs_k < K
            a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if PER_K:
            sa = tl.load(as_ptr + offs_m * s_asm + k0 // a_group, mask=m_ok, other=0.0)
            sw = tl.load(ws_ptr + (offs_n // s_bn) * s_wsn + (k0 // s_bk) * s_wsk, mask=n_ok, other=0.0)
            acc += _dot_fp8(a, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_K, INTERP) \
                * sa[:, None] * sw[None, :]
        else:
            acc = _dot_fp8(a, w, acc, BLOCK_K, INTERP)
    if not PER_K:
        sa = tl.load(as_ptr + offs_m * s_asm, mask=m_ok, other=0.0)
        sw = tl.load(ws_ptr + (offs_n // s_bn) * s_wsn, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def w8a8_default_config(M: int, N: int, K: int) -> tuple[int, int, int, int, int, int]:
    bm = 64 if M <= 64 else 128
    return bm, 128, 128, 8, 4 if bm == 64 else 8, 3


def _use_scaled_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """cuBLASLt row-wise FP8: CUDA, bf16 output, row-major activations, column-major weight (w.t() of a
    contiguous [N, K]), N and K multiples of 16, bias in the output dtype."""
    N, K = weight.shape
    return (x.is_cuda and x.dtype == torch.bfloat16 and N % 16 == 0 and K % 16 == 0 and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def fp8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    block_size: tuple[int, int] | None = None, input_scale: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, act_group: int | None = None,
                    config: tuple[int, int, int, int, int, int] | None = None,
                    allow_scaled_mm: bool = True) -> torch.Tensor:
    """y = quant(x) @ (weight * scale).T (+ bias), activations quantised as `ref.fp8_quant_dequant` (static
    input_scale; else per token, or per token and act_group columns). config: (block_m, block_n, block_k,
    group_m, num_warps, num_stages) of the Triton kernel, default from `W8A8_CONFIGS`."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0 or K == 0:
        return fp8_w8a16_linear(x, weight, weight_scale, block_size, bias)
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("fp8_w8a8_linear: x and weight must be contiguous along K")
    group = act_group if (act_group is not None and input_scale is None and act_group < K) else K
    xq, xs = fp8_quantize_act(x, input_scale, group)
    s2, s_bn, s_bk = _scale_layout(weight, weight_scale, block_size)
    if allow_scaled_mm and group == K and block_size is None and _use_scaled_mm(x, weight, bias):
        return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.reshape(1, N).float(),
                                bias=bias, out_dtype=x.dtype)
    bm, bn, bk, gm, warps, stages = config or _bucket(M, W8A8_CONFIGS.get((N, K))) or w8a8_default_config(M, N, K)
    per_k = group < K or s_bk < K
    if per_k:
        bk = _tile_k(_tile_k(bk, group, K), s_bk, K)
    if bk < 32:  # scales finer than an fp8 MMA tile: dequantised activations through the W8A16 kernel, in fp32
        xd = xq.float() * xs.repeat_interleave(group, dim=1)[:, :K]
        return fp8_w8a16_linear(xd, weight, weight_scale, block_size, bias, out_dtype=x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _w8a8_kernel[grid](xq, xs, weight, s2, bias if bias is not None else y, y, M, N, K, group, s_bn, s_bk,
                       xq.stride(0), xs.stride(0), weight.stride(0), s2.stride(0), s2.stride(1), y.stride(0),
                       PER_K=per_k, HAS_BIAS=bias is not None, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, GROUP_M=gm, INTERP=interpreting(), num_warps=warps, num_stages=stages)
    return y

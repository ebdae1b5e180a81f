"""FP8 KV cache (`--kv-cache-dtype fp8`, docs/QUANTIZATION.md): e4m3 caches with per-layer k/v scales.

Kernels (Triton under TRITON_INTERPRET=1, as tests/test_ops_triton.py): the cache write bit for bit against its
twin (every e4m3 value, the ties between them, saturation, non-unit scales), decode and prefill/extend attention
on fp8 caches with non-unit scales against the twins, which read stored * scale; the dispatch (C kernel declines,
the fused qkv epilogue is skipped); sm_90 lowering. Loading: checkpoint scale names, values on each layer.
Engine (tiny random models, CPU): fp8 logits close to the model-dtype cache, 4x (float32) / 2x (bf16) the blocks
in the same memory, prefix hit == miss, chunked == unchunked, preempted == not, TP=2 and PP=2 == one process, the
whole engine on the Triton kernels == on the twins. CLI: the flag through the installed `strata` entry point.
"""
from __future__ import annotations

import json
import os
import subprocess

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from strata import ops
from strata.config.engine import EngineArgs
from strata.core.errors import ModelLoadError
from strata.core.sampling_params import ParameterError
from strata.engine.llm_engine import LLMEngine
from strata.models.loader import kv_scale_target
from strata.ops import ref
from tests.parallel_support import engine_args, prompts, run_greedy
from tests.tiny_models import write_tiny_model

try:
    from strata.ops import triton_kernels as tk
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    tk, _TRITON_ERR = None, e

needs_triton = pytest.mark.skipif(_TRITON_ERR is not None or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason=f"needs triton in interpreter mode ({_TRITON_ERR!r})")
FP8 = torch.float8_e4m3fn
BS = 16
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
KS, VS = torch.tensor([0.05]), torch.tensor([3.0])  # non-unit scales for the kernel tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def fp8_cache(nb, kvh, d, k_mag=1.0, v_mag=1.0):
    """Random K/V (normal, times k_mag / v_mag) as an fp8 cache with scales KS / VS holds them."""
    k = ref.quantize_kv(torch.randn(nb, BS, kvh, d) * k_mag, KS)
    v = ref.quantize_kv(torch.randn(nb, BS, kvh, d) * v_mag, VS)
    return k, v


def block_tables(lens, nb):
    need = [(n + BS - 1) // BS for n in lens]
    perm = torch.randperm(nb).tolist()
    bt = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return bt


# ------------------------------------------------------------------------------------------------ twins

def test_twin_write_clamps_and_read_is_stored_times_scale():
    key = torch.tensor([[[0.0, 1.0, -3.3, 1e6]]]), torch.tensor([[[-1e6, 0.5, 7.0, float("inf")]]])
    kc, vc = torch.zeros(2, BS, 1, 4, dtype=FP8), torch.zeros(2, BS, 1, 4, dtype=FP8)
    ref.reshape_and_cache(key[0], key[1], kc, vc, torch.tensor([17]), torch.tensor([0.5]), torch.tensor([2.0]))
    k, v = kc[1, 1, 0].float(), vc[1, 1, 0].float()
    assert k.tolist() == [0.0, 2.0, -6.5, 448.0]  # -3.3 / 0.5 = -6.6 -> -6.5 (e4m3); 1e6 saturates
    assert v.tolist() == [-448.0, 0.25, 3.5, 448.0]  # never NaN, also for inf
    assert not kc[0].float().any() and not kc[1, 0].float().any()  # nothing else written
    # a read is stored * scale, in the reader's dtype
    assert ref.dequantize_kv(kc[1, 1, 0], torch.tensor([0.5]), torch.float32).tolist() == [0.0, 1.0, -3.25, 224.0]


def test_twins_attend_to_stored_times_scale():
    """Decode and prefill twins on an fp8 cache == the same twins on the float32 cache stored * scale."""
    kvh, d, lens = 2, 16, [5, 40, 17]
    nb = 8
    kc, vc = fp8_cache(nb, kvh, d)
    kf, vf = kc.float() * KS, vc.float() * VS
    bt = block_tables(lens, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 4, d)
    torch.testing.assert_close(ref.paged_decode_attention(q, kc, vc, bt, sl, 0.25, None, None, KS, VS),
                               ref.paged_decode_attention(q, kf, vf, bt, sl, 0.25), atol=0, rtol=0)
    qsl = torch.tensor([0, 5, 9, 26], dtype=torch.int32)
    qp = torch.randn(26, 4, d)
    torch.testing.assert_close(ref.paged_prefill_attention(qp, kc, vc, bt, qsl, sl, 0.25, 7, KS, VS),
                               ref.paged_prefill_attention(qp, kf, vf, bt, qsl, sl, 0.25, 7), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- kernels

@needs_triton
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_cache_write_rounds_every_e4m3_value_like_the_twin(scale):
    """Every finite e4m3 value, every midpoint between neighbours (ties: to even), just above and below them,
    values past the range (saturate), zeros of both signs: the kernel stores the twin's bytes."""
    allv = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    v = allv[~allv.isnan()].unique()
    mids = (v[1:] + v[:-1]) / 2
    x = torch.cat([v, mids, mids * (1 + 1e-3), mids * (1 - 1e-3), torch.tensor([-0.0, 1e-12, 449.0, 465.0, 1e5, -1e5])])
    x = torch.nn.functional.pad(x * scale, (0, (-x.numel()) % 256)).view(-1, 4, 64)  # 4 heads x 64 per token
    T = x.shape[0]
    s = torch.tensor([scale])
    caches = [torch.zeros(T, BS, 4, 64, dtype=FP8) for _ in range(4)]
    slots = torch.arange(T) * BS + 3
    ref.reshape_and_cache(x, -x, caches[0], caches[1], slots, s, s)
    tk.reshape_and_cache(x, -x, caches[2], caches[3], slots, s, s)
    assert torch.equal(bits(caches[0]), bits(caches[2])) and torch.equal(bits(caches[1]), bits(caches[3]))
    assert not caches[2].float().isnan().any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_write_fp8_with_scales(dtype):
    T, kvh, d, nb = 37, 2, 32, 6
    key, value = (torch.randn(T, kvh, d) * 30).to(dtype), (torch.randn(T, kvh, d) * 500).to(dtype)
    slots = torch.randperm(nb * BS)[:T]
    slots[[0, 5, T - 1]] = -1  # padding tokens: not written
    k0, v0 = fp8_cache(nb, kvh, d, 10.0, 500.0)  # old contents, never all zeros
    k_ref, v_ref, k_tr, v_tr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    ref.reshape_and_cache(key, value, k_ref, v_ref, slots, KS, VS)
    tk.reshape_and_cache(key, value, k_tr, v_tr, slots.to(torch.int32), KS, VS)
    assert torch.equal(bits(k_tr), bits(k_ref)) and torch.equal(bits(v_tr), bits(v_ref))
    assert (v_tr.float().abs() == 448).any()  # some values saturated
    # without scales an fp8 cache is written with scale 1.0
    tk.reshape_and_cache(key, value, k_tr, v_tr, slots, None, None)
    ref.reshape_and_cache(key, value, k_ref, v_ref, slots, torch.ones(1), torch.ones(1))
    assert torch.equal(bits(k_tr), bits(k_ref)) and torch.equal(bits(v_tr), bits(v_ref))


DECODE_LENS = [1, 16, 17, 64, 100]
SPLITS = {"nosplit": dict(num_splits=1), "fixed32": dict(partition_size=32)}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("split", list(SPLITS))
def test_decode_attention_fp8_cache(dtype, group, split):
    kvh, d = 2, 32
    nb = sum((n + BS - 1) // BS for n in DECODE_LENS) + 2
    kc, vc = fp8_cache(nb, kvh, d)
    bt = block_tables(DECODE_LENS, nb)
    lens = torch.tensor(DECODE_LENS, dtype=torch.int32)
    q = torch.randn(len(DECODE_LENS), kvh * group, d).to(dtype)
    for window in (None, 20):
        want = ref.paged_decode_attention(q, kc, vc, bt, lens, d ** -0.5, None, window, KS, VS)
        got = tk.paged_decode_attention(q, kc, vc, bt, lens, d ** -0.5, sliding_window=window, k_scale=KS,
                                        v_scale=VS, tile=16, **SPLITS[split])
        assert got.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    # the scales are applied: a kernel that ignored them would be far off (v is scaled by 3)
    unscaled = tk.paged_decode_attention(q, kc, vc, bt, lens, d ** -0.5, tile=16, **SPLITS[split])
    assert (unscaled.float() - want.float()).abs().max() > 0.3 * want.float().abs().max()


PREFILL = [(17, 17), (5, 40), (1, 1), (0, 12), (20, 52)]  # (new tokens, context): fresh, cached prefix, empty


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_attention_fp8_cache(dtype, group):
    d, kvh = 32, 1
    qlens, lens_list = [a for a, _ in PREFILL], [b for _, b in PREFILL]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    nb = sum((n + BS - 1) // BS for n in lens_list) + 2
    kc, vc = fp8_cache(nb, kvh, d)
    bt = block_tables(lens_list, nb)
    lens = torch.tensor(lens_list, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), kvh * group, d).to(dtype)
    for window in (None, 9):
        want = ref.paged_prefill_attention(q, kc, vc, bt, qsl, lens, d ** -0.5, window, KS, VS)
        got = tk.paged_prefill_attention(q, kc, vc, bt, qsl, lens, d ** -0.5, sliding_window=window, k_scale=KS,
                                         v_scale=VS, block_m=16, block_n=16)
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@needs_triton
def test_dispatch_with_an_fp8_cache(monkeypatch):
    kvh, d, lens_list = 2, 16, [3, 33]
    nb = 6
    kc, vc = fp8_cache(nb, kvh, d)
    bt = block_tables(lens_list, nb)
    lens = torch.tensor(lens_list, dtype=torch.int32)
    q = torch.randn(2, 4, d)
    # CPU, no Triton: the C decode kernel reads float32 caches only, so the twin answers
    monkeypatch.delenv("STRATA_FORCE_TRITON", raising=False)
    assert ops.cpu.paged_decode_attention(q, kc, vc, bt, lens, 0.3) is None
    want = ref.paged_decode_attention(q, kc, vc, bt, lens, 0.3, None, None, KS, VS)
    assert torch.equal(ops.paged_decode_attention(q, kc, vc, bt, lens, 0.3, None, None, KS, VS), want)
    # Triton: the dispatched kernels take the scales
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    torch.testing.assert_close(ops.paged_decode_attention(q, kc, vc, bt, lens, 0.3, None, None, KS, VS), want,
                               **TOL[torch.float32])
    # the fused qkv epilogue stores K/V unscaled: with an fp8 cache the unfused kernels run, with the scales
    monkeypatch.setattr(tk, "qkv_epilogue", lambda *a, **k: pytest.fail("fused epilogue on an fp8 cache"))
    H, T = 4, 5
    qkv = torch.randn(T, (H + 2 * kvh) * d)
    pos = torch.tensor([0, 3, 17, 40, 63])
    freqs = torch.outer(torch.arange(64).float(), torch.rand(d // 2))
    cs = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots = torch.tensor([1, 18, -1, 40, 63])
    c = [torch.zeros(nb, BS, kvh, d, dtype=FP8) for _ in range(4)]
    q1 = ops.qkv_epilogue(qkv, pos, cs, None, None, 0.0, c[0], c[1], slots, H, kvh, d, KS, VS)
    q2 = ref.qkv_epilogue(qkv, pos, cs, None, None, 0.0, c[2], c[3], slots, H, kvh, d, k_scale=KS, v_scale=VS)
    torch.testing.assert_close(q1, q2, **TOL[torch.float32])
    assert torch.equal(bits(c[1]), bits(c[3]))  # v is copied: bit for bit
    k1, k2 = c[0].float(), c[2].float()  # k is rotated (kernel vs twin: float32 rounding) then quantised
    assert ((k1 - k2).abs() <= k2.abs() / 8 + 1e-6).all() and (k1 == k2).float().mean() > 0.95


def test_fp8_kernels_compile_for_sm90():
    """The fp8 variants of the cache write, decode (split and not) and prefill kernels lower to sm_90 PTX, with an
    IEEE division and the saturating e4m3 conversion. Skips where this triton cannot compile offline."""
    probe = subprocess.run(["python3", "-c", _COMPILE_FP8], env={k: v for k, v in os.environ.items()
                                                                  if k != "TRITON_INTERPRET"},
                           capture_output=True, text=True, timeout=600)
    if probe.returncode == 2:
        pytest.skip(probe.stdout.strip()[-300:])
    assert probe.returncode == 0, probe.stdout + probe.stderr[-3000:]
    assert probe.stdout.count("ok ") == 4 and "div.rn.f32" in probe.stdout and "e4m3" in probe.stdout, probe.stdout


_COMPILE_FP8 = r"""
import sys, torch
from strata.ops.triton_kernels import _compile_check as cc, activation, cache, decode_attention, prefill_attention
from strata.ops import triton_kernels as tk
try:  # can this triton compile for sm_90 here at all (as _compile_check probes)?
    cc._compile(activation._silu_and_mul_kernel, (torch.empty(2), torch.empty(1), 2, 1, 1), {"BLOCK": 16}, 90)
except Exception as e:
    print("cannot compile offline:", repr(e)[:200]); sys.exit(2)
cc._DT["torch.float8_e4m3fn"] = "fp8e4nv"
calls = []
for m in (cache, decode_attention, prefill_attention):
    for name in list(vars(m)):
        if name.endswith("_kernel"):
            setattr(m, name, cc._Recorder(getattr(m, name), calls))
kvh, G, d = 8, 4, 128
kc = torch.zeros(40, 16, kvh, d, dtype=torch.float8_e4m3fn)
ks, vs = torch.ones(1), torch.ones(1)
q = torch.randn(4, kvh * G, d).to(torch.bfloat16)
bt = torch.arange(32, dtype=torch.int32).view(4, 8)
lens = torch.tensor([100, 17, 128, 1], dtype=torch.int32)
tk.paged_decode_attention(q, kc, kc, bt, lens, 0.1, 128, partition_size=32, k_scale=ks, v_scale=vs)
tk.paged_prefill_attention(q, kc, kc, bt, torch.tensor([0, 2, 4], dtype=torch.int32), lens[:2], 0.1,
                           k_scale=ks, v_scale=vs)
tk.reshape_and_cache(q[:, :kvh], q[:, :kvh], kc, kc, torch.tensor([0, 5, -1, 17]), ks, vs)
for fn, args, kwargs in calls:
    k = cc._compile(fn, args, dict(kwargs), 90)
    ptx = k.asm["ptx"]
    print("ok", fn.__name__, *sorted({w for w in ptx.split() if w.startswith(("div.", "cvt.rn.satfinite.e4m3"))}))
"""


# ---------------------------------------------------------------------------------------------- loading

def test_checkpoint_kv_scale_names():
    assert kv_scale_target("model.layers.3.self_attn.k_scale") == (3, ("k_scale",))
    assert kv_scale_target("model.layers.3.self_attn.v_scale") == (3, ("v_scale",))
    assert kv_scale_target("model.layers.12.self_attn.kv_scale") == (12, ("k_scale", "v_scale"))
    assert kv_scale_target("model.layers.0.self_attn.k_proj.k_scale") == (0, ("k_scale",))
    assert kv_scale_target("model.layers.0.self_attn.v_proj.output_scale") == (0, ("v_scale",))
    for other in ("model.layers.0.self_attn.q_scale", "model.layers.0.self_attn.k_proj.weight_scale",
                  "model.layers.0.self_attn.k_proj.input_scale", "model.layers.0.mlp.k_scale",
                  "model.layers.0.self_attn.q_proj.output_scale"):
        assert kv_scale_target(other) is None, other


def write_scales(path, scales: dict[str, float]) -> None:
    from safetensors.torch import save_file
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in scales.items()},
              os.path.join(path, "kv_scales.safetensors"))


def cache_amax(engine) -> list[tuple[float, float]]:
    """Per layer, the largest |K| and |V| an engine's (model-dtype) cache holds after a run."""
    return [(float(k.abs().max()), float(v.abs().max())) for k, v in engine.runner.runner.kv_caches]


def attn_layers(engine):
    return engine.runner.runner.model.attention_layers


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 (q/k norm, head_dim 32), its greedy tokens and logits with the float32 cache, and the K/V
    amax per layer that run left in the cache."""
    d = tmp_path_factory.mktemp("qwen3")
    write_tiny_model("qwen3", d, seed=2)
    engine = LLMEngine.from_engine_args(engine_args(d))
    tokens, logits = run_greedy(engine, prompts(), steps=6)
    return str(d), tokens, logits, cache_amax(engine)


def test_scales_load_from_the_checkpoint(qwen3, tmp_path):
    import shutil
    d = str(tmp_path / "m")
    shutil.copytree(qwen3[0], d)
    write_scales(d, {"model.layers.0.self_attn.k_scale": 0.25, "model.layers.0.self_attn.v_scale": [0.5],
                     "model.layers.1.self_attn.kv_scale": 0.125})
    layers = attn_layers(LLMEngine.from_engine_args(engine_args(d, kv_cache_dtype="fp8")))
    assert [(float(a.k_scale), float(a.v_scale)) for a in layers] == [(0.25, 0.5), (0.125, 0.125)]
    assert layers[0].kv_scales()[0] is layers[0].k_scale
    # the model-dtype cache ignores them
    assert attn_layers(LLMEngine.from_engine_args(engine_args(d)))[0].kv_scales() == (None, None)
    write_scales(d, {"model.layers.0.self_attn.k_scale": [0.1, 0.2]})  # per head: not supported
    with pytest.raises(ModelLoadError, match="one scale per layer"):
        LLMEngine.from_engine_args(engine_args(d, kv_cache_dtype="fp8"))


# ----------------------------------------------------------------------------------------------- engine

def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_fp8_kv_close_to_model_dtype(qwen3, tmp_path):
    """Greedy tokens equal and logits within 5% of the largest logit (measured: ~2% on this model, e4m3 keeps 3
    mantissa bits), with unit scales and with per-layer scales calibrated as amax / 448 (as FP8 checkpoints
    carry them). Scales 16x too small saturate K and V: far off, but finite."""
    import shutil
    path, tokens, logits, amax = qwen3
    got_tokens, got = run_greedy(LLMEngine.from_engine_args(engine_args(path, kv_cache_dtype="fp8")), prompts(), 6)
    assert got_tokens == tokens and max_rel_err(got, logits) < 0.05

    cal = str(tmp_path / "calibrated")
    shutil.copytree(path, cal)
    write_scales(cal, {f"model.layers.{i}.self_attn.{n}_scale": m / 448.0 for i, (km, vm) in enumerate(amax)
                       for n, m in (("k", km), ("v", vm))})
    engine = LLMEngine.from_engine_args(engine_args(cal, kv_cache_dtype="fp8_e4m3"))
    assert float(attn_layers(engine)[0].k_scale) == pytest.approx(amax[0][0] / 448.0)
    cal_tokens, cal_logits = run_greedy(engine, prompts(), 6)
    assert cal_tokens == tokens and max_rel_err(cal_logits, logits) < 0.05
    assert not torch.equal(cal_logits, got)  # the scales changed what was stored

    write_scales(cal, {f"model.layers.{i}.self_attn.{n}_scale": m / 448.0 / 16 for i, (km, vm) in enumerate(amax)
                       for n, m in (("k", km), ("v", vm))})
    _, sat = run_greedy(LLMEngine.from_engine_args(engine_args(cal, kv_cache_dtype="fp8")), prompts(), 6)
    assert torch.isfinite(sat).all() and max_rel_err(sat, logits) > 0.05


def test_fp8_kv_doubles_the_blocks(qwen3):
    """The pool is sized at 1 byte per element: 4x the blocks of a float32 cache, 2x those of bf16, in the same
    memory (the null block aside)."""
    mem = dict(num_gpu_blocks_override=None, kv_cache_memory=2 << 20)
    blocks = {}
    for dtype in ("float32", "bfloat16"):
        for kv in ("auto", "fp8"):
            e = LLMEngine.from_engine_args(engine_args(qwen3[0], dtype=dtype, kv_cache_dtype=kv, **mem))
            k, v = e.runner.runner.kv_caches[0]
            assert k.dtype == v.dtype == (FP8 if kv == "fp8" else getattr(torch, dtype))
            assert e.config.kv_cache_dtype == k.dtype and e.kv.pool.num_blocks == e.config.num_blocks
            blocks[dtype, kv] = e.config.num_blocks - 1
    assert blocks["float32", "fp8"] == 4 * blocks["float32", "auto"] > 0
    assert blocks["bfloat16", "fp8"] == 2 * blocks["bfloat16", "auto"]
    # per token: 2 (K, V) x 2 layers x 2 kv heads x 32 = 256 elements, 1 byte each
    assert blocks["bfloat16", "fp8"] == (2 << 20) // (256 * BS)


def test_fp8_kv_scheduling_never_changes_outputs(qwen3):
    """With an fp8 cache: prefix hit == miss, chunked == unchunked, preempted == not preempted (the KV of a token
    is quantised the same whichever step writes it)."""
    from strata.engine.llm import LLM
    from strata.core.sampling_params import SamplingParams
    ps = prompts(lens=(3, 40, 17, 33, 20))
    ps[3] = ps[1][:32] + ps[3]  # two full blocks shared with prompt 1
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    base = dict(device="cpu", dtype="float32", check_invariants=True, kv_cache_dtype="fp8", num_threads=1)

    def run(**kw):
        llm = LLM(qwen3[0], **{**base, **kw})
        return llm, [o.outputs[0].token_ids for o in llm.generate(ps, greedy, use_tqdm=False)]

    _, want = run(enable_prefix_caching=False, enable_chunked_prefill=False, num_gpu_blocks_override=64)
    llm, cold = run(enable_prefix_caching=True, num_gpu_blocks_override=64)
    warm = [o.outputs[0].token_ids for o in llm.generate(ps, greedy, use_tqdm=False)]
    assert cold == want and warm == want and llm.engine.kv.prefix_hits > 0
    _, chunked = run(enable_prefix_caching=False, max_num_batched_tokens=7, num_gpu_blocks_override=64)
    assert chunked == want
    llm, preempted = run(enable_prefix_caching=False, num_gpu_blocks_override=8, max_num_batched_tokens=32)
    assert preempted == want and llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_fp8_kv_tp2_pp2_equal_one_process(qwen3, tmp_path, layout):
    """TP=2 (each rank quantises its own heads, same per-layer scales) and PP=2 (each stage its layers' scales)
    over gloo give one process's fp8 tokens and logits (float32 reduction order aside)."""
    import shutil
    d = str(tmp_path / "m")
    shutil.copytree(qwen3[0], d)
    write_scales(d, {"model.layers.0.self_attn.k_scale": 0.02, "model.layers.0.self_attn.v_scale": 0.01,
                     "model.layers.1.self_attn.kv_scale": 0.03})
    want_tokens, want = run_greedy(LLMEngine.from_engine_args(engine_args(d, kv_cache_dtype="fp8")), prompts(), 4)
    engine = LLMEngine.from_engine_args(engine_args(d, kv_cache_dtype="fp8", **layout))
    try:
        tokens, logits = run_greedy(engine, prompts(), 4)
    finally:
        engine.shutdown()
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


@needs_triton
def test_engine_on_triton_kernels_fp8_matches_twins(qwen3, tmp_path, monkeypatch):
    """The whole engine with an fp8 cache and non-unit scales on the Triton kernels (cache write, decode, prefill
    with a cached prefix, chunked) against the twins: same tokens, logits within float32 rounding."""
    import shutil
    d = str(tmp_path / "m")
    shutil.copytree(qwen3[0], d)
    write_scales(d, {"model.layers.0.self_attn.kv_scale": 0.02, "model.layers.1.self_attn.kv_scale": 0.05})
    ps = prompts()[:3]
    ps.append(ps[0][:20] + [7, 8, 9])  # a cached prefix of the first prompt
    kw = dict(kv_cache_dtype="fp8", enable_prefix_caching=True, max_num_batched_tokens=16)
    want_tokens, want = run_greedy(LLMEngine.from_engine_args(engine_args(d, **kw)), ps, steps=4)
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    tokens, logits = run_greedy(LLMEngine.from_engine_args(engine_args(d, **kw)), ps, steps=4)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_bad_kv_cache_dtype_named_before_loading():
    for bad in ("fp8_e5m2", "int8", "bf16"):
        with pytest.raises(ParameterError) as e:
            LLMEngine.from_engine_args(EngineArgs(model="/no/such/model", kv_cache_dtype=bad))
        assert e.value.param == "kv_cache_dtype"
        assert "--kv-cache-dtype" in str(e.value) and "fp8_e4m3" in str(e.value) and bad in str(e.value)


# -------------------------------------------------------------------------------------------------- CLI

def test_cli_flag_through_the_entry_point(tmp_path):
    from test_serve_utils import write_tiny_model as write_config_only
    model = write_config_only(tmp_path / "model")
    cmd = ["strata", "generate", "--model", model, "--load-format", "dummy", "--kv-cache-memory", str(4 << 20),
           "--num-threads", "1", "--max-tokens", "3", "--ignore-eos", "--prompt", "Hello there", "--json"]
    r = subprocess.run([*cmd, "--kv-cache-dtype", "fp8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["num_tokens"] == 3
    bad = subprocess.run([*cmd, "--kv-cache-dtype", "fp4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and not bad.stdout
    assert "--kv-cache-dtype 'fp4' is not supported" in bad.stderr and "auto, fp8, fp8_e4m3" in bad.stderr
    assert "--kv-cache-dtype" in subprocess.run(["strata", "serve", "--help"], capture_output=True, text=True,
                                                timeout=120).stdout


def test_plan_takes_the_engine_flag():
    def plan(*flags):
        r = subprocess.run(["strata", "plan", "--model", "llama-3-8b", "--gpus", "1", "--gpu", "h200", "--json",
                            *flags], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        return d["kv_dtype"], d["layouts"][0]["memory"]["kv_tokens_per_replica"], d["layouts"][0]["tpot_ms"]

    auto, fp8, old = plan(), plan("--kv-cache-dtype", "fp8_e4m3"), plan("--kv-dtype", "fp8")
    assert auto[0] == "bf16" and fp8[0] == old[0] == "fp8" and fp8 == old
    assert fp8[1] == pytest.approx(2 * auto[1], rel=1e-3) and fp8[2] < auto[2]
    assert plan("--dtype", "fp16")[0] == "fp16"  # auto follows the compute dtype

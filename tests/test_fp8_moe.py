"""FP8 MoE experts (docs/QUANTIZATION.md): float8_e4m3fn expert weights with per-row or block-wise float32 scales,
run weight-only (W8A16) by the fused MoE kernel and its twin.

- The kernel (sorted grouped GEMM and the decode path, every scale branch) equals the twin under
  TRITON_INTERPRET=1; the twin equals the unquantised twin on the dequantised weights.
- FP8 checkpoints (fp8 per tensor, compressed-tensors per channel, fp8 block-wise with aligned and unaligned
  blocks; Qwen3-MoE and Mixtral) load with FP8 experts, scales as stored, and match transformers running the
  dequantised experts. Only the experts are FP8 in these checkpoints (the attention linears are listed as
  ignored), so the comparison is the experts' alone.
- `--quantization fp8` on a float32 MoE: experts are float8 in memory, exactly `fp8_quantize_rows` of each
  rank's slice, and the logits are close to the unquantised model's; `--load-format dummy` gives FP8 experts.
- TP=2 (experts TP-sharded, block scales split inside checkpoint blocks) and EP=2 over gloo equal TP=1.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import

import pytest
import torch

from strata.core.errors import ModelLoadError
from strata.engine.llm_engine import LLMEngine
from strata.ops import moe_ref
from tests.parallel_support import engine_args, prompts, run_greedy, write_tiny_moe

FP8 = torch.float8_e4m3fn

try:
    import triton  # noqa: F401
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _TRITON_ERR = e
needs_triton = pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton not importable: {_TRITON_ERR!r}")


# ---- quantisers, written out independently of strata -------------------------------------------------------
def block_quant(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (e4m3, scale [..., ceil(N/bn), ceil(K/bk)] = block amax / 448, dequantised float32)."""
    N, K = w.shape[-2:]
    p = torch.nn.functional.pad(w.abs(), (0, (-K) % bk, 0, (-N) % bn))
    s = p.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn)).amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0
    full = s.repeat_interleave(bn, -2)[..., :N, :].repeat_interleave(bk, -1)[..., :K]
    q = (w / full).to(FP8)
    return q, s, q.float() * full


def row_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (e4m3, scale [..., N] = row amax / 448, dequantised float32)."""
    s = w.abs().amax(dim=-1).clamp(min=1e-12) / 448.0
    q = (w / s[..., None]).to(FP8)
    return q, s, q.float() * s[..., None]


# ---- the kernel against the twin ---------------------------------------------------------------------------
def _case(T, H, I, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k)
    return x, w13, w2, w, ids


def _quantised(w13, w2, block13, block2):
    """(fp8 kwargs of fused_moe, w13, w2 in e4m3, their dequantised float32 weights)."""
    q13, s13, d13 = row_quant(w13) if block13 is None else block_quant(w13, *block13)
    q2, s2, d2 = row_quant(w2) if block2 is None else block_quant(w2, *block2)
    return dict(w13_scale=s13, w2_scale=s2, w13_block=block13, w2_block=block2), q13, q2, d13, d2


@pytest.mark.parametrize("block13,block2", [(None, None), ((16, 16), (8, 32)), ((4, 8), (32, 4))])
def test_twin_is_the_unquantised_twin_on_dequantised_weights(block13, block2):
    x, w13, w2, w, ids = _case(9, 64, 32, 6, 2)
    ids[0, 0] = -1
    fp8, q13, q2, d13, d2 = _quantised(w13, w2, block13, block2)
    got = moe_ref.fused_moe(x, q13, q2, w, ids, **fp8)
    torch.testing.assert_close(got, moe_ref.fused_moe(x, d13, d2, w, ids), atol=1e-6, rtol=1e-6)
    assert (got - moe_ref.fused_moe(x, w13, w2, w, ids)).abs().max() > 1e-4  # FP8 does change the result
    with pytest.raises(ValueError, match="scale"):  # e4m3 weights are never used without their scales
        moe_ref.fused_moe(x, q13, q2, w, ids)


@needs_triton
@pytest.mark.parametrize("T,H,I,E,k,block13,block2,dtype", [
    (7, 48, 24, 4, 2, None, None, torch.float32),  # per row; ragged tiles
    (40, 64, 32, 8, 2, None, None, torch.bfloat16),  # several blocks per expert
    (24, 64, 32, 6, 3, (16, 32), (16, 16), torch.float32),  # scale blocks >= the K tile: a scale per tile column
    (20, 48, 40, 4, 2, (8, 4), (2, 8), torch.float32),  # blocks narrower than any K tile: tiles dequantised first
    (16, 64, 32, 8, 2, (32, 128), (128, 128), torch.bfloat16),  # one block over all of K (a checkpoint's 128s)
])
def test_sorted_kernel_matches_twin(T, H, I, E, k, block13, block2, dtype):
    from strata.ops.triton_kernels.fused_moe import fused_moe
    x, w13, w2, w, ids = _case(T, H, I, E, k, seed=T)
    ids[1, 0], ids[2, -1] = -1, E  # outside [0, E): skipped by both
    fp8, q13, q2, _, _ = _quantised(w13, w2, block13, block2)
    x = x.to(dtype)
    want = moe_ref.fused_moe(x, q13, q2, w, ids, **fp8)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for config in ({}, {"block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 2},
                   {"block_m": 32, "block_n": 32, "block_k": 64}):
        got = fused_moe(x, q13, q2, w, ids, config=config, **fp8)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_triton
@pytest.mark.parametrize("T,H,I,E,k,block13,block2,config", [
    (1, 64, 32, 8, 2, None, None, None),  # per row, default tiles
    (3, 40, 24, 16, 2, None, None, {"up_bn": 4, "up_bk": 16, "down_bn": 8, "down_bk": 8}),
    # block scales: tiles inside one block, and tiles over several blocks (partial sums per block)
    (2, 64, 32, 16, 4, (16, 64), (16, 32), {"up_bk": 32, "down_bk": 16}),
    (2, 64, 32, 16, 4, (16, 16), (32, 8), {"up_bk": 64, "down_bk": 32}),
    (1, 48, 24, 4, 4, (8, 16), (4, 8), None),  # ragged: partial last blocks, masked tails
])
def test_decode_kernels_match_twin(T, H, I, E, k, block13, block2, config, monkeypatch):
    from strata.ops.triton_kernels import fused_moe as fm
    x, w13, w2, w, ids = _case(T, H, I, E, k, seed=T + H)
    if T > 1:
        ids[0, 0], ids[T - 1, k - 1] = -1, E
    fp8, q13, q2, _, _ = _quantised(w13, w2, block13, block2)
    want = moe_ref.fused_moe(x, q13, q2, w, ids, **fp8)
    got = fm.fused_moe_decode(x, q13, q2, w, ids, config=config, **fp8)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    calls, real = [], fm.fused_moe_decode
    monkeypatch.setattr(fm, "fused_moe_decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    torch.testing.assert_close(fm.fused_moe(x, q13, q2, w, ids, **fp8), want, atol=2e-5, rtol=2e-5)
    assert calls and calls[0]["w13_scale"] is fp8["w13_scale"]  # fused_moe took the decode path, with the scales
    xb = x.to(torch.bfloat16)  # bf16 activations: fp8 tiles converted to bf16
    torch.testing.assert_close(fm.fused_moe_decode(xb, q13, q2, w, ids, config=config, **fp8).float(),
                               moe_ref.fused_moe(xb, q13, q2, w, ids, **fp8).float(), atol=3e-2, rtol=3e-2)


@needs_triton
@pytest.mark.parametrize("T", [1, 40])
def test_expert_offset_with_fp8_experts(T):
    """Expert parallelism: a rank holding experts [E, 2E) of 2E passes expert_offset=E, on both kernel paths."""
    from strata.ops.triton_kernels import fused_moe as fm
    H, I, E, k = 32, 16, 8, 2
    x, w13, w2, w, _ = _case(T, H, I, E, k, seed=T)
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(2 * E, generator=g)[:k] for _ in range(T)])
    fp8, q13, q2, _, _ = _quantised(w13, w2, (16, 16), None)
    want = moe_ref.fused_moe(x, q13, q2, w, torch.where(ids >= E, ids - E, -1), **fp8)
    torch.testing.assert_close(moe_ref.fused_moe(x, q13, q2, w, ids, expert_offset=E, **fp8), want)
    got = fm.fused_moe(x, q13, q2, w, ids, expert_offset=E, **fp8)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_triton
def test_kernel_rejects_scales_that_do_not_fit():
    from strata.ops.triton_kernels.fused_moe import weight_scales
    w = torch.zeros(4, 32, 64, dtype=FP8)
    with pytest.raises(ValueError, match="need their scale"):
        weight_scales(w, None, None)
    with pytest.raises(ValueError, match="per-row scale"):
        weight_scales(w, torch.ones(4, 64), None)
    with pytest.raises(ValueError, match="powers of two"):
        weight_scales(w, torch.ones(4, 2, 1), (24, 128))
    with pytest.raises(ValueError, match="block scale"):
        weight_scales(w, torch.ones(4, 2, 2), (16, 64))
    assert weight_scales(w, torch.ones(4, 2, 1), (16, 64))[1:4] == (2, 16, 64)


# ---- checkpoints -------------------------------------------------------------------------------------------
QUANT = {  # config.json quantization_config per format; the attention (and any dense MLP) is left unquantised
    "tensor": {"quant_method": "fp8", "activation_scheme": "static",
               "ignored_layers": ["re:.*self_attn.*", "re:.*mlp\\.(gate|up|down)_proj"]},
    "channel": {"quant_method": "compressed-tensors", "format": "float-quantized",
                "ignore": ["lm_head", "re:.*self_attn.*"],
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                          "dynamic": True}}}},
    "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
              "modules_to_not_convert": ["re:.*self_attn.*"]},
    # blocks that split the expert width, its TP=2 shards and the hidden size unevenly (partial last blocks)
    "block_odd": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [24, 40],
                  "modules_to_not_convert": ["re:.*self_attn.*"]},
}
MIXTRAL_PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def write_fp8_experts(hf, path, fmt: str) -> None:
    """Rewrite `path`'s checkpoint with every expert matrix FP8 (per-expert names, as FP8 MoE checkpoints are) and
    set `hf`'s experts to the dequantised weights. Static input scales are written too (weight-only experts skip
    them)."""
    from safetensors.torch import save_file
    out = {}
    mixtral = hf.config.model_type == "mixtral"
    for name, w in hf.state_dict().items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = w.contiguous()
            continue
        prefix, kind = name.rsplit(".", 1)
        I = w.shape[1] // 2
        parts = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I)} if kind == "gate_up_proj" else \
            {"down_proj": slice(None)}
        deq = torch.empty_like(w)
        for e in range(w.shape[0]):
            for part, rows in parts.items():
                base = f"{prefix.replace('.mlp.', '.block_sparse_moe.')}.{e}.{MIXTRAL_PARTS[part]}" if mixtral else \
                    f"{prefix}.{e}.{part}"  # Mixtral's FP8 checkpoints spell it block_sparse_moe.experts.E.w1
                if fmt.startswith("block"):
                    bn, bk = QUANT[fmt]["weight_block_size"]
                    q, s, d = block_quant(w[e, rows], bn, bk)
                    out[base + ".weight_scale_inv"] = s
                else:
                    q, s, d = row_quant(w[e, rows])
                    out[base + ".weight_scale"] = s.amax().reshape(()) if fmt == "tensor" else s[:, None]
                    if fmt == "tensor":  # one scale per tensor: requantise with it
                        q = (w[e, rows] / out[base + ".weight_scale"]).to(FP8)
                        d = q.float() * out[base + ".weight_scale"]
                        out[base + ".input_scale"] = torch.tensor(0.02)
                out[base + ".weight"] = q
                deq[e, rows] = d
        with torch.no_grad():
            hf.get_parameter(name).copy_(deq)
    save_file(out, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = QUANT[fmt]
    (path / "config.json").write_text(json.dumps(cfg))


def _model(engine):
    return engine.runner.runner.model  # the in-process executor's runner


def _hf_logits(hf, prompt_ids, tokens, steps):
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompt_ids):
            full = torch.tensor([p + tokens[i]])
            out.append(hf(full).logits[0][len(p) - 1: len(p) - 1 + steps])
    return out


@pytest.mark.parametrize("arch,fmt", [("qwen3_moe", "tensor"), ("qwen3_moe", "channel"), ("qwen3_moe", "block"),
                                      ("qwen3_moe", "block_odd"), ("mixtral", "block_odd")])
def test_fp8_checkpoint_keeps_fp8_experts_and_matches_dequantised(arch, fmt, tmp_path):
    hf = write_tiny_moe(arch, tmp_path)
    write_fp8_experts(hf, tmp_path, fmt)
    engine = LLMEngine.from_engine_args(engine_args(tmp_path, max_num_seqs=1))  # logits prompt after prompt
    layer = _model(engine).layers["0"]
    ex = layer.experts
    assert ex.w13.weight.dtype == ex.w2.weight.dtype == FP8
    assert ex.w13.weight_scale.dtype == torch.float32
    assert layer.qkv_proj.weight.dtype == torch.float32  # ignored: only the experts are FP8
    E, I, H = 8 if arch == "qwen3_moe" else 4, 32, 64
    if fmt.startswith("block"):  # gate/up are 32 rows each: blocks of 24 rows are split to 8 rows (a power of 2)
        assert ex.w13.block_size == ((32, 128) if fmt == "block" else (8, 8))
        assert ex.w13.weight_scale.shape == (E, 2 * I // ex.w13.block_size[0], -(-H // ex.w13.block_size[1]))
    else:
        assert ex.w13.block_size is None and ex.w13.weight_scale.shape == (E, 2 * I)
    ps_ = prompts()[:3]
    toks, logits = run_greedy(engine, ps_, steps=4)
    want = torch.cat(_hf_logits(hf, ps_, toks, 4))
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_fp8_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = write_tiny_moe("qwen3_moe", tmp_path)
    write_fp8_experts(hf, tmp_path, "block")
    sd = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    scale = sd.pop(name)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"\(1, 3, 'w3'\).*not both"):
        LLMEngine.from_engine_args(engine_args(tmp_path))
    sd[name] = scale
    sd[name.replace("_scale_inv", "")] = sd[name.replace("_scale_inv", "")].float()  # a float32 weight among blocks
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="block-wise FP8 experts"):
        LLMEngine.from_engine_args(engine_args(tmp_path))


# ---- online quantisation and dummy weights -----------------------------------------------------------------
def test_online_fp8_quantises_experts_per_row(tmp_path):
    hf = write_tiny_moe("qwen3_moe", tmp_path)
    ps_ = prompts()[:3]
    base_toks, base = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path)), ps_, steps=1)
    engine = LLMEngine.from_engine_args(engine_args(tmp_path, quantization="fp8"))
    ex = _model(engine).layers["1"].experts
    params = dict(ex.named_parameters())
    assert set(params) == {"w13.weight", "w13.weight_scale", "w2.weight", "w2.weight_scale"}  # nothing 32-bit
    assert ex.w13.weight.dtype == FP8 and ex.w13.weight_scale.shape == (8, 64) and ex.w2.weight_scale.shape == (8, 64)
    for mine, theirs in ((ex.w13, hf.model.layers[1].mlp.experts.gate_up_proj),
                         (ex.w2, hf.model.layers[1].mlp.experts.down_proj)):
        q, s, _ = row_quant(theirs.detach())
        assert torch.equal(mine.weight.view(torch.uint8), q.view(torch.uint8))
        torch.testing.assert_close(mine.weight_scale, s)
    toks, logits = run_greedy(engine, ps_, steps=1)
    # the first step has the same context in both runs: FP8 weights move the logits a little, not much
    for got, want in zip(logits, base):
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
        assert float((p.exp() * (p - q)).sum()) < 1e-3


def test_dummy_weights_with_fp8_experts(tmp_path):
    write_tiny_moe("qwen3_moe", tmp_path)
    engine = LLMEngine.from_engine_args(engine_args(tmp_path, quantization="fp8", load_format="dummy"))
    ex = _model(engine).layers["0"].experts
    assert ex.w13.weight.dtype == FP8 and bool((ex.w13.weight_scale > 0).all())
    assert ex.w13.weight.float().abs().max() > 0
    _, logits = run_greedy(engine, prompts()[:1], steps=2)
    assert torch.isfinite(logits).all()


# ---- parallel and the kernels in the engine ----------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_blocks(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8_moe_odd")
    hf = write_tiny_moe("qwen3_moe", path)
    write_fp8_experts(hf, path, "block_odd")
    return path


@pytest.mark.parametrize("kw", [dict(tensor_parallel_size=2),
                                dict(tensor_parallel_size=2, enable_expert_parallel=True)])
def test_fp8_experts_tp2_and_ep2_match_one_process(odd_blocks, kw):
    """TP=2: each rank holds 16 of each expert's 32 columns; the checkpoint's 24 x 40 blocks are cut to 8 x 8 so that
    none straddles the gate/up edge or the shard edge. EP=2: four whole experts per rank."""
    ps_ = prompts()
    ref_toks, ref_logits = run_greedy(LLMEngine.from_engine_args(engine_args(odd_blocks)), ps_, steps=4)
    engine = LLMEngine.from_engine_args(engine_args(odd_blocks, **kw))
    try:
        toks, logits = run_greedy(engine, ps_, steps=4)
        ex = engine.runner.model.layers["0"].experts
    finally:
        engine.shutdown()
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
    assert ex.w13.weight.dtype == FP8
    assert ex.w13.weight.shape == ((4, 64, 64) if kw.get("enable_expert_parallel") else (8, 32, 64))


@needs_triton
def test_engine_on_the_kernels_with_fp8_experts(odd_blocks, monkeypatch):
    """One process on the Triton kernels (interpreted), decode path and sorted path, against the twins."""
    ps_ = prompts()[:2]
    ref_toks, ref_logits = run_greedy(LLMEngine.from_engine_args(engine_args(odd_blocks, max_num_seqs=1)), ps_, 3)
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    from strata.ops.triton_kernels import fused_moe as fm
    seen, real = [], fm.fused_moe

    def spy(*a, **kw):
        seen.append((a[1].dtype, kw.get("w13_block"), fm.use_decode_path(a[0].shape[0], a[4].shape[1], a[1].shape[0])))
        return real(*a, **kw)
    monkeypatch.setattr(fm, "fused_moe", spy)
    toks, logits = run_greedy(LLMEngine.from_engine_args(engine_args(odd_blocks, max_num_seqs=1)), ps_, 3)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert {s[:2] for s in seen} == {(FP8, (8, 8))} and {s[2] for s in seen} == {True, False}

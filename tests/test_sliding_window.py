"""Sliding-window attention (Mistral; Qwen2 with `use_sliding_window`, per layer).

The query at position p sees keys p - W + 1 .. p (transformers' `kv_idx > q_idx - sliding_window`). Checked:
how configs are read (as transformers 5 reads them, GGUF metadata included); the torch twins against a dense
reference; the Triton kernels (TRITON_INTERPRET=1) against the twins, decode with and without split-KV and
prefill over a cached prefix; and the whole engine against transformers on tiny random models whose window
is shorter than the prompt, through chunked prefill and a prefix-cache hit.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from strata.core.errors import ModelLoadError
from strata.engine.llm_engine import LLMEngine
from strata.models.config import model_config_from_dict
from strata.ops import ref
from tests.parallel_support import capture_logits, engine_args
from tests.tiny_models import TINY, write_tiny_model

try:
    import triton  # noqa: F401
    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _TRITON_ERR = e

needs_triton = pytest.mark.skipif(_TRITON_ERR is not None or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs triton in interpreter mode")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ------------------------------------------------------------------------------------------------ config

def _windows(d: dict) -> list:
    cfg = model_config_from_dict(d)
    return [cfg.layer_sliding_window(i) for i in range(cfg.num_hidden_layers)]


def test_config_windows_follow_transformers():
    import transformers as tf
    kw = {**TINY, "num_hidden_layers": 4}
    assert _windows(tf.MistralConfig(**kw, sliding_window=8).to_dict()) == [8] * 4
    assert _windows(tf.MistralConfig(**kw, sliding_window=None).to_dict()) == [None] * 4
    # Qwen2: the window only when use_sliding_window, and then per layer as transformers lays it out
    for qkw in (dict(use_sliding_window=False, sliding_window=8),
                dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
                dict(use_sliding_window=True, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"] * 2)):
        hf = tf.Qwen2Config(**kw, **qkw)
        want = [8 if t == "sliding_attention" else None for t in hf.layer_types]
        assert _windows(hf.to_dict()) == want
    assert _windows(tf.Qwen2Config(**kw, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=2).to_dict()) == [None, None, 8, 8]
    # a hand-written Qwen2.5-style config.json: window given but switched off, max_window_layers, no layer_types
    raw = {**kw, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32768, "use_sliding_window": False,
           "max_window_layers": 2}
    assert _windows(raw) == [None] * 4
    assert _windows({**raw, "use_sliding_window": True}) == [None, None, 32768, 32768]
    # Mistral-7B-v0.1 spelling; Mixtral and Llama configs without the field stay full
    assert _windows({**kw, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}) == [4096] * 4
    assert _windows({**kw, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4}) == [None] * 4
    assert _windows({**kw, "architectures": ["LlamaForCausalLM"]}) == [None] * 4


@pytest.mark.parametrize("bad, field", [({"sliding_window": 0}, "sliding_window"),
                                        ({"sliding_window": "8"}, "sliding_window"),
                                        ({"use_sliding_window": True, "sliding_window": 8,
                                          "layer_types": ["sliding_attention"]}, "layer_types"),
                                        ({"use_sliding_window": True, "sliding_window": 8,
                                          "layer_types": ["chunked_attention"] * 2}, "layer_types")])
def test_config_bad_window_names_the_field(bad, field):
    arch = "Qwen2ForCausalLM" if "layer_types" in bad else "MistralForCausalLM"
    with pytest.raises(ModelLoadError, match=field):
        model_config_from_dict({**TINY, "architectures": [arch], **bad})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_sliding_window_reaches_the_layers(arch):
    from strata.models.gguf_loader import GGUFHeader, GGUFTensorInfo, gguf_to_hf_config
    md = {"general.architecture": arch, f"{arch}.embedding_length": 64, f"{arch}.block_count": 2,
          f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
          f"{arch}.feed_forward_length": 128, f"{arch}.vocab_size": 384, f"{arch}.attention.sliding_window": 8}
    tensors = [GGUFTensorInfo("token_embd.weight", (384, 64), 0, 0, None)]
    header = GGUFHeader(path="tiny.gguf", version=3, metadata=md, tensors=tensors, data_offset=0, file_size=0)
    assert _windows(gguf_to_hf_config(header)) == [8, 8]
    del md[f"{arch}.attention.sliding_window"]
    assert _windows(gguf_to_hf_config(header)) == [None, None]


# --------------------------------------------------------------------------------- twins vs dense reference

BS = 16


def _paged(lens, kvh, d):
    """Random caches and per-sequence shuffled block tables holding `lens` tokens each."""
    need = [(n + BS - 1) // BS for n in lens]
    nb = sum(need) + 2
    kc, vc = torch.randn(nb, BS, kvh, d), torch.randn(nb, BS, kvh, d)
    perm = torch.randperm(nb).tolist()
    bt = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return kc, vc, bt


def _dense(q, k, v, qpos, window, scale):
    """q: [n, H, d] at positions qpos; k/v: [L, kvh, d] at 0..L-1. The HF rule, written out."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    kpos = torch.arange(k.shape[0])
    visible = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)  # [n, L]
    s = torch.einsum("nhd,lhd->hnl", q, k) * scale
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", p, v)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_twins_match_dense_reference(window):
    kvh, H, d = 2, 4, 16
    lens = [1, 15, 17, 33, 64]
    kc, vc, bt = _paged(lens, kvh, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), H, d)
    out = ref.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.3, sliding_window=window)
    for b, n in enumerate(lens):
        k, v = ref.gather_kv(kc, bt[b], n), ref.gather_kv(vc, bt[b], n)
        want = _dense(q[b:b + 1], k, v, torch.tensor([n - 1]), window, 0.3)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)
    # prefill: new tokens after a cached prefix (q_len < seq_len), and whole prompts
    seqs = [(17, 17), (5, 40), (20, 52), (1, 1)]
    kc, vc, bt = _paged([L for _, L in seqs], kvh, d)
    qsl = torch.tensor([0] + torch.tensor([n for n, _ in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), H, d)
    out = ref.paged_prefill_attention(q, kc, vc, bt, qsl, torch.tensor([L for _, L in seqs], dtype=torch.int32),
                                      0.3, sliding_window=window)
    for b, (n, L) in enumerate(seqs):
        k, v = ref.gather_kv(kc, bt[b], L), ref.gather_kv(vc, bt[b], L)
        s, e = int(qsl[b]), int(qsl[b + 1])
        want = _dense(q[s:e], k, v, torch.arange(L - n, L), window, 0.3)
        torch.testing.assert_close(out[s:e], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- kernels vs twins

# (window, kernel knobs): a window of one token; one shorter than a tile; several tiles with split-KV cutting
# the window (per sequence; fixed pieces); one longer than some sequences
DECODE_CASES = [(1, dict(num_splits=1)), (5, dict(num_splits=1)), (20, dict(num_splits=3, min_partition=16)),
                (40, dict(partition_size=16))]


@needs_triton
@pytest.mark.parametrize("window, knobs", DECODE_CASES)
def test_decode_kernel_window(window, knobs):
    from strata.ops import triton_kernels as tk
    kvh, H, d = 2, 8, 32
    lens = [1, 15, 17, 33, 100]
    kc, vc, bt = _paged(lens, kvh, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), H, d)
    want = ref.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.2, sliding_window=window)
    assert not torch.allclose(want, ref.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.2), atol=1e-3)
    out = tk.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.2, sliding_window=window, tile=16, **knobs)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


# (window, block_m, block_n): window inside one key tile, equal to it, across tiles, longer than BLOCK_M
PREFILL_CASES = [(1, 16, 16), (7, 16, 16), (16, 32, 16), (20, None, None)]


@needs_triton
@pytest.mark.parametrize("window, block_m, block_n", PREFILL_CASES)
def test_prefill_kernel_window(window, block_m, block_n):
    from strata.ops import triton_kernels as tk
    kvh, H, d = 1, 4, 32
    seqs = [(17, 17), (5, 40), (0, 12), (20, 52), (40, 100)]  # whole prompts, cached prefixes, an empty query
    lens = torch.tensor([L for _, L in seqs], dtype=torch.int32)
    kc, vc, bt = _paged(lens.tolist(), kvh, d)
    qsl = torch.tensor([0] + torch.tensor([n for n, _ in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), H, d)
    want = ref.paged_prefill_attention(q, kc, vc, bt, qsl, lens, 0.2, sliding_window=window)
    out = tk.paged_prefill_attention(q, kc, vc, bt, qsl, lens, 0.2, sliding_window=window, block_m=block_m,
                                     block_n=block_n)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------ engine vs transformers

WINDOW, PROMPT_LEN, STEPS = 8, 40, 16


def _greedy(engine, prompt, tag):
    """Greedy tokens and one logits row per sampled token of one request, plus its cached prompt tokens."""
    from strata.core.sampling_params import SamplingParams
    seen = capture_logits(engine)
    start = len(seen)
    engine.add_request(tag, prompt, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            last = o
    return last.outputs[0].token_ids, torch.cat(seen[start:]), last.metrics.num_cached_tokens


def _check_against_transformers(hf, path):
    prompt = torch.randint(3, TINY["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = LLMEngine.from_engine_args(engine_args(path, max_num_batched_tokens=64))
    toks, logits, _ = _greedy(whole, prompt, "whole")
    with torch.no_grad():
        want = hf(torch.tensor([prompt + toks])).logits[0][PROMPT_LEN - 1: PROMPT_LEN - 1 + STEPS]
    assert toks == want.argmax(-1).tolist()
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    # chunks of 8 (prefill over a cached prefix each step), then the same prompt again: a prefix-cache hit
    chunked = LLMEngine.from_engine_args(engine_args(path, max_num_batched_tokens=8, enable_prefix_caching=True))
    for tag in ("miss", "hit"):
        t, lg, cached = _greedy(chunked, prompt, tag)
        assert (cached > 0) == (tag == "hit")
        assert t == toks
        torch.testing.assert_close(lg, logits, atol=1e-4, rtol=1e-4)


def test_mistral_window_matches_transformers(tmp_path):
    hf = write_tiny_model("mistral", tmp_path, sliding_window=WINDOW)
    assert hf.config.sliding_window == WINDOW < PROMPT_LEN
    _check_against_transformers(hf, tmp_path)


@pytest.mark.parametrize("layers", [dict(max_window_layers=1),
                                    dict(layer_types=["sliding_attention", "full_attention"])])
def test_qwen2_window_layers_match_transformers(layers, tmp_path):
    hf = write_tiny_model("qwen2", tmp_path, use_sliding_window=True, sliding_window=WINDOW, **layers)
    assert "sliding_attention" in hf.config.layer_types and "full_attention" in hf.config.layer_types
    _check_against_transformers(hf, tmp_path)


@needs_triton
def test_engine_on_triton_kernels_with_window(tmp_path, monkeypatch):
    """The tiny Mistral on the Triton kernels (interpreted) gives the twins' tokens and logits: windowed
    prefill chunks over a cached prefix, then decodes."""
    from tests.parallel_support import run_greedy
    write_tiny_model("mistral", tmp_path, sliding_window=WINDOW, num_hidden_layers=1)
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist() for n in (PROMPT_LEN, 21)]
    kw = dict(max_num_batched_tokens=16)
    want_toks, want_logits = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path, **kw)), ps, steps=3)
    monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    from strata.ops import triton_kernels as tk
    windows = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, real=real, **k: windows.append((real, k["sliding_window"]))
                            or real(*a, **k))
    toks, logits = run_greedy(LLMEngine.from_engine_args(engine_args(tmp_path, **kw)), ps, steps=3)
    assert {w for _, w in windows} == {WINDOW} and len({f for f, _ in windows}) == 2  # both kernels, windowed
    assert toks == want_toks
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)

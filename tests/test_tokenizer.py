"""Tokenizer: parity with transformers' GGUF tokenizer, chat template, HF-directory loading, and the
incremental detokenizer's streaming property."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.core.errors import ModelLoadError
from strata.engine.tokenizer import PRE_TOKENIZER_SPLITS, IncrementalDetokenizer, Tokenizer, _byte_alphabet
from strata.models import embedded

TEXTS = [
    "", " ", "Hello world", "Hello world, the GPU is fast.", "  leading and trailing  ", "a  1", "x   12345 y",
    "tabs\tand\t\tnew\nlines\n\n\nend\r\nwindows", "don't you'll we've I'M", "1234567890 3.14159 -42 1e-9",
    "héllo wörld ñandú façade", "日本語のテキスト、中文字符。", "Привет, мир! Γειά σου", "emoji 🎉🚀👩‍👩‍👧 ok",
    "e\u0301 combining and \u200b zero width", "עברית ומספרים 123", "\x00\x01 control \x7f chars",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tif x != 0: pass",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<repo_name>foo<file_sep>bar<|endoftext|>",
    "<|im_start|><|im_start|>", "not <|im_start special", "    " * 10 + "deep", "!!!???...,,,;;;", "a" * 300,
]


def _path() -> str:
    try:
        return embedded.default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(_path())


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoTokenizer
    path = _path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_backend_identical_to_transformers(tok, ref):
    assert json.loads(tok.hf.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, 2, [2], 49152)
    assert (tok.hf.bos_token, tok.hf.eos_token, tok.hf.pad_token, tok.hf.unk_token) == \
        (ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
    assert tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template
    assert set(range(17)) <= tok.all_special_ids


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_decode_parity(tok, ref, add_special):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=add_special)
        assert ids == ref.encode(text, add_special_tokens=add_special), text
        assert ids == tok.hf.encode(text, add_special_tokens=add_special), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert tok.encode("<|im_start|>user")[:1] == [1]
    assert tok.decode(tok.encode("héllo 🎉 <|im_end|>"), skip_special_tokens=True) == "héllo 🎉 "


_SPECIAL_PIECES = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", " ", "\n", "  ",
                                   "1", "'s", "é", "🎉", "\t"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=12), _SPECIAL_PIECES), max_size=8))
def test_encode_parity_random_text(tok, ref, pieces):
    text = "".join(pieces)
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


def test_chat_template_parity(tok, ref):
    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Summarise: the GPU is fast."}],
        [{"role": "user", "content": "héllo 🎉"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == \
                ref.encode(text, add_special_tokens=False)
    text = tok.apply_chat_template(conversations[0])
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_from_pretrained_directory(tok, tmp_path):
    tok.hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token_ids == [2, 0] and loaded.eos_token_id == 2 and loaded.bos_token_id == 1
    for text in TEXTS[:12] + TEXTS[18:21]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == tok.chat_template
    assert Tokenizer.from_pretrained(_path()).encode("hi there") == tok.encode("hi there")  # a .gguf path
    with pytest.raises(ModelLoadError, match="no-such-dir"):
        Tokenizer.from_pretrained(tmp_path / "no-such-dir")


def test_pre_tokenizer_table_matches_transformers():
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert PRE_TOKENIZER_SPLITS == mapping.GGUF_PRE_TOKENIZER_SPLITS


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_gguf_tokenizer_matches_transformers(tmp_path, add_bos):
    """Raw-spelled tokens, user-defined and control tokens, a `pre` split regex, add_bos_token."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    alphabet = _byte_alphabet()
    sun = "".join(alphabet[b] for b in "日".encode())  # how a byte-level vocabulary spells 日
    tokens = [alphabet[b] for b in range(256)]
    merges = [f"{sun[0]} {sun[1]}", f"{sun[:2]} {sun[2]}", "Ġ Ġ", "ĠĠ Ġ", "1 2", "Ġ w"]
    # "日" is stored raw (as some converters do) and must be respelled to match the merges
    tokens += [sun[:2], "日", "ĠĠ", "ĠĠĠ", "12", "Ġw", "<think>", "<|end|>", "<|start|>", "<｜bad｜>"]
    types = [1] * (len(tokens) - 4) + [4, 3, 3, 3]
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 3)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|start|>{{ m['content'] }}<|end|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_gguf(tmp_path / "tok.gguf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in ["日 日日", "   w  12 123", "<think>x</think><|end|><|start|>", "<｜bad｜>", "日é\n\n  \tw日"]:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == theirs.encode(text, add_special_tokens=add), text
            assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.encode("日", add_special_tokens=False) == [tokens.index("日")]
    assert ours.eos_token_ids == [len(tokens) - 3]
    assert (ours.encode("w")[0] == len(tokens) - 2) == add_bos
    msgs = [{"role": "user", "content": "日"}]
    assert ours.apply_chat_template(msgs) == theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------------------------
# incremental detokenizer

_POOLS: dict[int, tuple] = {}


def _pools(tok: Tokenizer) -> tuple[list[int], list[list[int]], list[int]]:
    """(ids of single-byte tokens, ids of multi-byte characters, special ids), computed once."""
    if id(tok) not in _POOLS:
        vocab = tok.hf.get_vocab()
        byte_ids = [vocab[c] for c in _byte_alphabet().values() if c in vocab]
        multibyte = [tok.encode(s, add_special_tokens=False) for s in ("é", "日本", "🎉", "👩‍👧", "ñ", "€", " 世界")]
        _POOLS[id(tok)] = (byte_ids, multibyte, sorted(tok.all_special_ids))
    return _POOLS[id(tok)]


def _check_stream(tok: Tokenizer, ids: list[int], chunks: list[int], skip: bool, prompt: list[int]) -> None:
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    out, pos, sizes = "", 0, iter(chunks)
    while pos < len(ids):
        n = max(1, next(sizes, 1))
        out += det.add(ids[pos:pos + n])
        pos += n
        full = tok.decode(ids[:pos], skip_special_tokens=skip)
        if full.endswith("\ufffd"):
            assert full.startswith(out)
        else:
            assert out == full
    out += det.flush()
    assert out == tok.decode(ids, skip_special_tokens=skip) == det.text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), skip=st.booleans())
def test_incremental_detokenizer_property(tok, data, skip):
    byte_ids, multibyte, special_ids = _pools(tok)
    single = st.one_of(
        st.sampled_from(byte_ids),                                   # lone bytes: partial UTF-8 sequences
        st.integers(0, tok.vocab_size - 1),                          # anything in the vocabulary
        st.sampled_from(special_ids),
    )
    piece = st.one_of(single.map(lambda i: [i]), st.sampled_from(multibyte),
                      st.text(max_size=6).map(lambda s: tok.encode(s, add_special_tokens=False)))
    ids = [i for p in data.draw(st.lists(piece, max_size=25)) for i in p]
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    prompt = data.draw(st.lists(st.sampled_from(byte_ids), max_size=3))
    _check_stream(tok, ids, chunks, skip, prompt)


def test_incremental_detokenizer_streams_text(tok):
    text = "Héllo 世界 🎉👩‍👩‍👧 — ok.\n<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode("prompt"), skip_special_tokens=True)
    deltas = [det.add([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text.replace("<|im_end|>", "")
    assert sum(1 for d in deltas if d == "") > 0  # multi-byte characters were held back
    det2 = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert det2.add(ids) + det2.flush() == text
    assert det2.add([]) == ""

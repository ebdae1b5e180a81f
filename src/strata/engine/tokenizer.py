"""Tokenizer wrapper (HF directory or GGUF metadata) and the incremental detokenizer used for streaming.

`Tokenizer.from_gguf` builds a byte-level BPE `tokenizers.Tokenizer` straight from the GGUF metadata
(tokens, merges, token types, special ids, chat template) and wraps it in
`transformers.PreTrainedTokenizerFast`; it encodes exactly as transformers' own GGUF tokenizer
(`AutoTokenizer.from_pretrained(folder, gguf_file=...)`) but loads several times faster. Files with a
non byte-level tokenizer (sentencepiece `llama`, `t5`, ...) fall back to transformers' loader.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from strata.core.errors import ModelLoadError

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes for `tokenizer.ggml.pre` values whose merges were learned on a split other than
# GPT-2's (the ByteLevel default); the same table as transformers' GGUF tokenizer (a test checks).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT, "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


class Tokenizer:
    """Thin, fast wrapper over a transformers tokenizer (`.hf`)."""

    def __init__(self, hf, *, eos_token_ids: Sequence[int] | None = None, chat_template: str | None = None):
        self.hf = hf
        if chat_template is not None:
            hf.chat_template = chat_template
        self._backend = getattr(hf, "backend_tokenizer", None)
        self._clean_spaces = bool(getattr(hf, "clean_up_tokenization_spaces", False))
        ids = _as_id_list(hf.eos_token_id) + _as_id_list(eos_token_ids)
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        self.vocab_size: int = len(hf)
        self.bos_token_id: int | None = hf.bos_token_id
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        self.pad_token_id: int | None = hf.pad_token_id
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        self.all_special_ids: frozenset[int] = frozenset(hf.all_special_ids) | frozenset(
            i for i, t in added.items() if getattr(t, "special", False))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "Tokenizer":
        """An HF directory (tokenizer.json / tokenizer_config.json, local files only), or a .gguf file."""
        path = os.fspath(path)
        if os.path.isfile(path) and path.lower().endswith(".gguf"):
            return cls.from_gguf(path)
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the path either way
            raise ModelLoadError(f"Cannot load a tokenizer from {path}: {e}") from e
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                try:
                    with open(file, encoding="utf-8") as f:
                        eos += _as_id_list(json.load(f).get("eos_token_id"))
                except (OSError, ValueError, AttributeError):
                    pass
        return cls(hf, eos_token_ids=eos)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Tokenizer and chat template from a GGUF file's metadata."""
        from strata.models.gguf_loader import read_gguf_header
        path = os.fspath(path)
        md = read_gguf_header(path).metadata
        if md.get("tokenizer.ggml.model") != "gpt2" or not md.get("tokenizer.ggml.merges") \
                or not md.get("tokenizer.ggml.tokens"):
            return cls._from_gguf_with_transformers(path, md)
        hf = _byte_level_from_metadata(md)
        eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if k in md]
        return cls(hf, eos_token_ids=eos)

    @classmethod
    def _from_gguf_with_transformers(cls, path: str, md: dict[str, Any]) -> "Tokenizer":
        from transformers import AutoTokenizer
        if "tokenizer.ggml.tokens" not in md:
            raise ModelLoadError(f"GGUF file {path} carries no tokenizer (no tokenizer.ggml.tokens).")
        try:
            hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                               gguf_file=os.path.basename(path))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"Cannot build a tokenizer from GGUF file {path}: {e}") from e
        eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if k in md]
        return cls(hf, eos_token_ids=eos)

    # ---- use -----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None and not self._clean_spaces:
            return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        if not self.hf.chat_template:
            raise ModelLoadError("This tokenizer has no chat template; pass plain prompts instead.")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, **kwargs)
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


def _byte_level_from_metadata(md: dict[str, Any], backend_only: bool = False):
    """A PreTrainedTokenizerFast equal to transformers' GGUF `gpt2` tokenizer, built directly
    (`backend_only`: its `tokenizers.Tokenizer`, without importing transformers: `strata batch`'s checks)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    alphabet_map = _byte_alphabet()
    alphabet = set(alphabet_map.values())
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type") or []
    # tokens stored as raw text (not in the byte alphabet) are respelled through their UTF-8 bytes
    spelled = [t if set(t) <= alphabet else "".join(alphabet_map[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre"))
    if split is not None:
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        idx = md.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    specials = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    raw.add_special_tokens(control + [AddedToken(t, normalized=False, special=True)
                                      for t in specials.values() if t is not None])
    if user:
        raw.add_tokens(user)
    if backend_only:
        return raw
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=md.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in specials.items() if v is not None},
    )
    return hf


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas that are always valid text.

    The concatenation of all deltas equals `tok.decode(output_ids, skip_special_tokens)` whenever that
    decode does not end in U+FFFD (an incomplete UTF-8 sequence is held back until it completes);
    `flush()` releases whatever is held back (call it when the sequence finishes).
    `prompt_ids` are accepted for interface compatibility; decoding starts at the first output token,
    exactly as `tok.decode(output_ids)` does.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.prompt_len = len(prompt_ids) if prompt_ids is not None else 0
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0   # start of the context window re-decoded with the new tokens
        self._read_offset = 0     # tokens before this are already in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append new ids; return the newly decodable text ('' while a character is incomplete)."""
        self.token_ids.extend(int(i) for i in new_ids)
        if len(self.token_ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if new_text.endswith("\ufffd"):
            return ""  # ends mid-character: wait for the rest of its bytes
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else \
            new_text[len(os.path.commonprefix([prefix_text, new_text])):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Release held-back text (replacement characters included); for when the output is complete."""
        if self._read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        delta = new_text[len(os.path.commonprefix([prefix_text, new_text])):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta


__all__ = ["Tokenizer", "IncrementalDetokenizer"]

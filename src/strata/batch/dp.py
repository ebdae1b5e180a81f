"""`--data-parallel-size N` on one node: N worker processes, each a rank with its own engine.

Worker i of this process gets RANK = outer_rank * N + i and WORLD_SIZE = outer_world * N (the outer rank
comes from Slurm/torchrun when there is one), its own GPUs through CUDA_VISIBLE_DEVICES (a block of
`tensor_parallel_size x pipeline_parallel_size` devices; on CPU a share of the cores: `strata.engine.placement`,
the rule DataParallelLLM uses too), and writes its own rank file. When this process owns the output (outer world size 1) it first merges rank files left by an
earlier run, and merges the workers' files into the output at the end; under Slurm the job script merges.
A worker that dies does not stop the others; rerunning resumes only what is missing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time

from strata.batch.lock import LockSet
from strata.batch.output import merge_outputs, scan_output
from strata.batch.progress import Progress
from strata.batch.sharding import find_rank_files, rank_output_path
from strata.engine.placement import place_replicas

log = logging.getLogger("strata.batch")


class _Tail:
    """Counts rows (and output tokens) appended to a file since it was opened."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.rows = self.errors = self.tokens = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            return
        if size < self.offset:  # truncated (--overwrite or torn-line repair)
            self.offset = size
            self._partial = b""
        if size == self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset = size
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            self.rows += 1
            resp = obj.get("response")
            if obj.get("error") is not None or (isinstance(resp, dict) and resp.get("status_code") != 200):
                self.errors += 1
            elif isinstance(resp, dict):
                self.tokens += ((resp.get("body") or {}).get("usage") or {}).get("completion_tokens", 0)
            else:
                self.tokens += obj.get("output_tokens") or 0


def launch(args: argparse.Namespace, outer_rank: int, outer_world: int) -> int:
    owns_output = outer_world == 1 and "{rank}" not in args.output
    # This process merges into the output: it holds the output's lock for the whole job (each worker holds
    # its rank file's); a second run on the same output stops here at once.
    with LockSet([args.output] if owns_output else [], wait=args.wait_for_lock):
        return _launch(args, outer_rank, outer_world, owns_output)


def _launch(args: argparse.Namespace, outer_rank: int, outer_world: int, owns_output: bool) -> int:
    n = args.data_parallel_size
    group = max(1, args.tensor_parallel_size) * max(1, args.pipeline_parallel_size)
    world = outer_world * n
    place = place_replicas(n, group, args.device, args.num_threads)

    if owns_output:
        leftovers = find_rank_files(args.output)
        with LockSet(leftovers):  # not while a rank of an earlier run still writes its file
            if args.overwrite:
                for p in [args.output, *leftovers]:
                    if os.path.exists(p):
                        os.remove(p)
            elif leftovers:
                res = merge_outputs(leftovers, args.output, remove_inputs=True)
                log.info("batch: merged %d rows left in %d rank files by an earlier run", res.appended, len(leftovers))
        if args.retry_errors and not args.overwrite:
            from strata.batch.output import drop_error_rows
            dropped = drop_error_rows(args.output)
            if dropped:
                log.info("batch: retrying %d error rows of %s", dropped, args.output)

    child = dict(vars(args))
    child.pop("func", None)
    child.update(data_parallel_size=1, progress="log", rank=None, world_size=None,
                 log_interval=max(args.log_interval, 60.0))
    if not place.on_gpu:
        child["num_threads"] = place.num_threads
    if args.overwrite and owns_output:
        child["overwrite"] = False  # the parent removed everything already; workers must not truncate rank files twice

    procs: list[subprocess.Popen] = []
    paths = []
    tails = []
    prev_rows = scan_output(args.output).rows if os.path.exists(args.output) else 0
    for i in range(n):
        r = outer_rank * n + i
        env = dict(os.environ)
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(i), LOCAL_WORLD_SIZE=str(n),
                   STRATA_BATCH_DP_CHILD="1", STRATA_BATCH_ARGS=json.dumps(child))
        env.update(place.env(i))
        path = rank_output_path(args.output, r, world)
        paths.append(path)
        if os.path.exists(path):
            prev_rows += scan_output(path).rows
        tails.append(_Tail(path))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from strata.batch.cli import child_main; sys.exit(child_main())"],
            env=env))
    log.info("batch: %d data-parallel workers (ranks %d..%d of %d)%s", n, outer_rank * n, outer_rank * n + n - 1,
             world, f" on GPUs {','.join(g for b in place.gpus for g in b)}" if place.on_gpu else " on CPU")

    stopping = {"sig": None}

    def forward(signum, frame):
        stopping["sig"] = signum
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    progress = None if args.progress == "none" else Progress(mode=args.progress, interval=args.log_interval,
                                                             label=f"batch[dp {n}]")
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            if progress is not None:
                for t in tails:
                    t.poll()
                progress.update(sum(t.rows for t in tails), sum(t.errors for t in tails), prev_rows,
                                sum(t.tokens for t in tails))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if progress is not None:
            for t in tails:
                t.poll()
            progress.update(sum(t.rows for t in tails), sum(t.errors for t in tails), prev_rows,
                            sum(t.tokens for t in tails), force=True)
            progress.close()
    rcs = [p.wait() for p in procs]
    for i, rc in enumerate(rcs):
        if rc not in (0, 1):
            log.error("batch: worker %d (rank %d) exited with status %d; rerun the same command to resume it",
                      i, outer_rank * n + i, rc)
    if owns_output:
        with LockSet(p for p in paths if os.path.exists(p)):
            res = merge_outputs(paths, args.output, allow_missing=True, remove_inputs=True)
        scan = scan_output(args.output)
        print(f"batch: merged {res.appended} new rows into {args.output}: it holds {scan.rows} rows, "
              f"{scan.errors} of them errors", file=sys.stderr, flush=True)
        failed_rows = scan.errors > 0
    else:
        failed_rows = any(rc == 1 for rc in rcs)
    if stopping["sig"] is not None:
        return 128 + stopping["sig"]
    bad = [rc for rc in rcs if rc not in (0, 1)]
    if bad:
        return bad[0] if bad[0] > 0 else 2
    return 1 if failed_rows else 0

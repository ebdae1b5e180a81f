"""The README's main job on this machine: peak RSS, time until the model is loaded, and wall time
(issue 18, item 9). Runs `strata batch` (the default job, embedded SmolLM2) through the installed entry point
in a fresh temporary directory, under a fresh Python whose RUSAGE_CHILDREN sees only that process.

    python benchmarks/main_job_footprint.py --out benchmarks/results/<date>-cpu-main-job-footprint.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

PROBE = r"""
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(["strata", "batch", "--progress", "log", *sys.argv[1:]], stderr=subprocess.PIPE,
                     stdout=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
loaded = None
lines = []
for line in p.stderr:
    lines.append(line.rstrip())
    if loaded is None and "model loaded in" in line:
        loaded = time.perf_counter() - t0
rc = p.wait()
print(json.dumps({"rc": rc, "model_loaded_s": loaded, "wall_s": time.perf_counter() - t0,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "tail": lines[-3:]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-arg", action="append", default=[], help="extra `strata batch` flag (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", PROBE, *args.batch_arg], capture_output=True, text=True, cwd=d)
    if r.returncode != 0 or not r.stdout.strip():
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit, "command": " ".join(sys.argv),
           "job": "strata batch " + " ".join(args.batch_arg), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "loadavg_after": load, **res,
           "peak_rss_gb": round(res["peak_rss_kib"] * 1024 / 1e9, 3)}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if res["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""`strata slurm serve` against a real Slurm (opt-in: STRATA_TEST_SLURM=1 with a running cluster; see
/work/shared/notes/local-slurm.md). The generated sbatch script starts the replicas with srun; they register
with the router, serve, and deregister when the job is cancelled."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import pytest

from router_support.fleet import FAKE, ROUTER_KEY, USING_FAKE, RouterProc, free_port, one

pytestmark = pytest.mark.skipif(
    os.environ.get("STRATA_TEST_SLURM") != "1" or shutil.which("sbatch") is None,
    reason="opt-in: STRATA_TEST_SLURM=1 and a running Slurm")


def test_sbatch_replicas_register_serve_and_leave(tmp_path):
    from strata.router.slurm import add_slurm_serve_args, render_serve_sbatch

    router = RouterProc(tmp_path, args=["--region", "hpc"])
    router.start().wait_ready()
    try:
        if USING_FAKE:   # `strata serve ARGS` -> the fake replica with the same flags
            strata = tmp_path / "strata"
            strata.write_text(f"#!/bin/bash\nshift\nexec {sys.executable} {FAKE} \"$@\"\n")
            strata.chmod(0o755)
            cmd = str(strata)
        else:
            cmd = "strata"
        ap = argparse.ArgumentParser()
        add_slurm_serve_args(ap)
        args = ap.parse_args(["--nodes", "1", "--replicas-per-node", "2", "--router", router.url, "--region", "hpc",
                              "--port", str(free_port()), "--strata-cmd", cmd, "--job-name", "strata-router-test",
                              "--output", str(tmp_path / "job-%j.out")])
        script = tmp_path / "job.sh"
        script.write_text(render_serve_sbatch(args))
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "STRATA_ROUTER_KEY": ROUTER_KEY}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        try:
            router.wait_for(lambda: sum(r["routable"] for r in router.fleet()["replicas"]) == 2, 60,
                            "two sbatch replicas registered")
            assert {r["region"] for r in router.fleet()["replicas"]} == {"hpc"}
            assert one(router.url, "from slurm", max_tokens=3)["status"] == 200
        finally:
            subprocess.run(["scancel", job], timeout=30)
        router.wait_for(lambda: not router.fleet()["replicas"], 30, "replicas deregistered after scancel")
    finally:
        router.stop()

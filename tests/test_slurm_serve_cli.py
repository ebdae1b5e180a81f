"""`strata slurm serve` through the installed entry point, on a real Slurm (Debian's slurm-wlm, started by
tests/slurm/start.sh; skipped when it cannot start): the script it writes starts two real `strata serve`
replicas (tiny random Llama) with srun; they register with a real router, answer through it, and leave the fleet
when the job is cancelled."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from router_support.fleet import ROUTER_KEY, RouterProc, one
from test_serve_utils import write_tiny_model

SLURM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm")


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (tests/slurm/setup.sh installs Debian's slurm-wlm + munge)")
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "start.sh")], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"Slurm could not start: {(r.stderr or r.stdout).strip()[-500:]}")
    yield {"SLURM_CONF": r.stdout.strip().splitlines()[-1].split("=", 1)[1]}
    subprocess.run(["sh", os.path.join(SLURM_DIR, "stop.sh")], timeout=60)


def two_free_ports() -> int:
    """A port p with p and p + 1 free (replica k of a node listens on --port + k)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("", 0))
            p = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("", p + 1))
                    return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def wait_job_ended(job: str, env: dict, timeout: float = 120.0) -> str:
    """The job's final state, once Slurm has finished it (every step's processes gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
        state = dict(kv.split("=", 1) for kv in q.stdout.split() if "=" in kv).get("JobState", "")
        if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
            return state
        time.sleep(0.3)
    raise TimeoutError(f"job {job} still not ended after {timeout} s")


def test_slurm_serve_replicas_register_serve_and_leave(slurm, tmp_path):
    model = write_tiny_model(tmp_path / "model")
    router = RouterProc(tmp_path, args=["--region", "hpc"]).start().wait_ready()
    env = {**os.environ, **slurm, "STRATA_ROUTER_KEY": ROUTER_KEY}
    try:
        script = tmp_path / "serve.sbatch"
        r = subprocess.run(
            ["strata", "slurm", "serve", model, "--nodes", "1", "--replicas-per-node", "2", "--cpus-per-task", "1",
             "--router", router.url, "--region", "hpc", "--port", str(two_free_ports()),
             "--job-name", "strata-slurm-serve-test", "--output", str(tmp_path / "job-%j.out"),
             "--serve-args", "--load-format dummy --kv-cache-memory 16777216 --num-threads 1 --served-model-name tiny",
             "--script-output", str(script)],
            capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert ROUTER_KEY not in script.read_text()   # the key is read when the job starts, never written down
        out = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), str(script)], capture_output=True,
                             text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]

        def logs() -> str:
            return "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))[-3000:]

        try:
            router.wait_for(lambda: sum(x["routable"] for x in router.fleet()["replicas"]) == 2, 240,
                            "two sbatch replicas registered and healthy")
            assert {x["region"] for x in router.fleet()["replicas"]} == {"hpc"}, logs()
            answer = one(router.url, "from slurm", max_tokens=3, extra={"model": "tiny"})
            assert answer["status"] == 200 and answer["region"] == "hpc", (answer, logs())
        finally:
            subprocess.run(["scancel", job], timeout=30, env=env)
        router.wait_for(lambda: not router.fleet()["replicas"], 90, "replicas deregistered after scancel")
        assert wait_job_ended(job, env) == "CANCELLED"
    finally:
        router.stop()

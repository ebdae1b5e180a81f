"""The CPU KV pool is sized from what the engine can use, capped by a share of the host's memory, and the
embedded model's commands stay laptop-sized (issue 18, item 9)."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from strata.config.engine import EngineArgs
from strata.runner import memory
from strata.runner.memory import CPU_KV_CAP, cpu_kv_bytes, local_ranks

PER_TOK = 46080  # SmolLM2-135M in float32: 30 layers x 2 x 3 KV heads x 64 x 4 bytes


def test_cpu_pool_is_what_the_engine_can_use_when_that_is_small():
    args = EngineArgs(max_num_seqs=4, max_model_len=256)
    assert cpu_kv_bytes(args, PER_TOK, 8192) == 4 * 256 * PER_TOK


def test_cpu_pool_is_capped_and_shared_among_local_ranks(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setattr(memory, "mem_available", lambda: 64 << 30)
    one = cpu_kv_bytes(EngineArgs(), PER_TOK, 8192)  # 256 x 8192 tokens would be 96 GB
    assert one == CPU_KV_CAP
    six = EngineArgs(tensor_parallel_size=3, pipeline_parallel_size=2)
    assert local_ranks(six) == 6 and cpu_kv_bytes(six, PER_TOK, 8192) == CPU_KV_CAP // 6
    two_nodes = EngineArgs(tensor_parallel_size=4, nnodes=2)
    assert local_ranks(two_nodes) == 2
    monkeypatch.setattr(memory, "mem_available", lambda: 1 << 30)  # a small machine: 10% of what is free
    assert cpu_kv_bytes(EngineArgs(), PER_TOK, 8192) == int(0.1 * (1 << 30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_ranks(EngineArgs()) == 4


def test_cpu_engine_pool_follows_the_plan(tmp_path):
    """A tiny model on the CPU: the pool is what max_num_seqs x max_model_len needs (far under the cap)."""
    from strata.engine.llm import LLM
    from tests.tiny_models import write_tiny_model
    write_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), device="cpu", max_num_seqs=3, max_model_len=96)
    c = llm.engine.config
    per_tok = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head_dim x float32
    assert (c.num_blocks - 1) == 3 * 96 * per_tok // (per_tok * c.block_size)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_embedded_model_command_peaks_under_1_5_gb(tmp_path):
    """The whole `strata generate` process on the embedded SmolLM2 (float32 weights, default KV pool), run
    under a fresh Python so that RUSAGE_CHILDREN sees only that process."""
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run(['strata', 'generate', '--prompt', 'Say hi.', '--chat', '--max-tokens', '4'],"
             " capture_output=True, text=True)\n"
             "sys.stderr.write(r.stderr[-2000:])\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    rc, peak_kib = map(int, out.stdout.split())
    assert rc == 0, out.stderr
    assert 100_000 < peak_kib < 1_500_000, f"peak RSS {peak_kib / 1e6:.2f} GB"

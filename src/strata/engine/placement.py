"""Where the data-parallel replicas of one node run: each on its own block of GPUs, or on its share of the CPU
cores. The one placement rule of both data-parallel launchers:

  strata.engine.dp     DataParallelLLM / DataParallelEngine (`LLM(data_parallel_size=N)`, `strata serve`): N
                       replica engines behind one front end that dispatches requests to the least loaded
  strata.batch.dp      `strata batch --data-parallel-size N`: N independent batch workers, each a whole job on
                       its shard of the rows with its own rank file, resumable on its own, merged at the end

They stay two launchers because their processes are different things (an engine serving a dispatcher over a
pipe; a batch job that outlives a dead peer and is rerun alone); what they share is decided here.
torch is imported only to count GPUs when CUDA_VISIBLE_DEVICES is unset (the batch launcher runs without it).
"""
from __future__ import annotations

import os

from strata.core.sampling_params import ParameterError


def visible_gpus() -> list[str]:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPUs
        return []


class Placement:
    """`gpus[i]`: replica i's devices (None on CPU); `num_threads`: torch threads per replica on CPU."""

    def __init__(self, gpus: list[list[str]] | None, num_threads: int | None):
        self.gpus, self.num_threads = gpus, num_threads

    @property
    def on_gpu(self) -> bool:
        return self.gpus is not None

    def env(self, i: int) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus[i])} if self.gpus is not None else {}


def place_replicas(n: int, group: int, device: str, num_threads: int | None) -> Placement:
    """n replicas of `group` (TP x PP) devices each. device: cuda | cpu | auto (GPUs when any is visible)."""
    gpus = [] if device == "cpu" else visible_gpus()
    if device.startswith("cuda") and not gpus:
        raise ParameterError("device", "--device cuda but no GPU is visible")
    if not gpus:
        return Placement(None, num_threads or max(1, (os.cpu_count() or 1) // n))
    if len(gpus) < n * group:
        raise ParameterError("data_parallel_size", f"--data-parallel-size {n} x {group} GPUs per replica needs "
                                                   f"{n * group} GPUs; {len(gpus)} visible ({','.join(gpus)})")
    return Placement([gpus[i * group:(i + 1) * group] for i in range(n)], num_threads)

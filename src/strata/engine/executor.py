"""The executor: what the engine hands a StepPlan to. One interface, two implementations:

    InProcExecutor      one process: the engine's own ModelRunner
    MultiprocExecutor   a TP x PP mesh of processes (`strata.engine.multiproc`): the plan is broadcast, every rank
                        runs it in its own ModelRunner, the driver's runner (rank 0) samples

    executor.launch(plan) -> StepHandle     queue the step; handle.result() -> StepResult
    executor.execute(plan) -> StepResult    launch(plan).result()
    executor.max_steps_in_flight            1, or 2 when the next step may be launched before the last one's
                                            tokens are on the host (async scheduling)
    executor.collective_rpc(method, *args)  RankHandler.method on every rank, results in rank order
    executor.shutdown()
"""
from __future__ import annotations

import os

import torch

from strata.config.engine import EngineConfig
from strata.core.plan import StepPlan, StepResult
from strata.layers.overlap import apply_comm_overlap
from strata.parallel import state as ps
from strata.runner.model_runner import ModelRunner, StepHandle


class RankHandler:
    """Methods the engine may call on every rank at once (`collective_rpc`): diagnostics and test switches."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def pid(self) -> int:
        return os.getpid()

    def comm_stats(self) -> dict:
        return ps.comm_stats()

    def reset_comm_stats(self) -> None:
        ps.reset_comm_stats()

    def set_comm_overlap(self, enabled: bool, chunks: int | None = None, min_tokens: int | None = None) -> int:
        return apply_comm_overlap(self.runner.model, enabled, chunks=chunks, min_tokens=min_tokens)

    def start_graphs(self) -> None:
        """Decode steps and micro-batches through the graph runner (captured on CUDA; on CPU, tests run the same
        static-buffer path uncaptured)."""
        self.runner.start_graphs()

    def graph_runs(self) -> int:
        """Decode batches this rank ran through its graph runner (-1: none)."""
        return -1 if self.runner.graphs is None else self.runner.graphs.runs

    def greedy_on_last_stage(self, on: bool) -> None:
        """PP, all-greedy steps: the last stage sends argmax ids (on, the default) or logits (tests compare them)."""
        self.runner.greedy_on_last_stage = on

    def layer_range(self) -> tuple[int, int]:
        return getattr(self.runner.model, "start_layer", 0), getattr(self.runner.model, "end_layer", 0)

    def memory(self) -> dict:
        params = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in self.runner.kv_caches)
        out = {"weights_bytes": params, "kv_cache_bytes": kv}
        if self.runner.device.type == "cuda":
            out["max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.runner.device)
        return out


class Executor:
    """Runs steps on one rank or many; `runner` is the ModelRunner of this process (the driver's)."""

    def __init__(self, runner: ModelRunner, config: EngineConfig):
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.max_steps_in_flight = 2 if config.async_scheduling else 1
        self.handler = RankHandler(runner)

    @property
    def step_stats(self) -> dict[str, list]:
        return self.runner.step_stats

    @property
    def logits_hook(self):
        return self.runner.logits_hook

    @logits_hook.setter
    def logits_hook(self, hook) -> None:
        self.runner.logits_hook = hook

    def launch(self, plan: StepPlan) -> StepHandle:
        raise NotImplementedError

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    def collective_rpc(self, method: str, *args) -> list:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class InProcExecutor(Executor):
    def launch(self, plan: StepPlan) -> StepHandle:
        return self.runner.launch(plan)

    def collective_rpc(self, method: str, *args) -> list:
        return [getattr(self.handler, method)(*args)]

    def shutdown(self) -> None:
        self.runner.release_graphs()

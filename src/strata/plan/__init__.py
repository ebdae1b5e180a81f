"""`strata plan`: choose a parallel layout and fleet size from first principles (pure Python, no torch).

    from strata.plan import builtin, get_gpu, make_plan, Workload
    plan = make_plan(builtin("llama-3-70b"), [get_gpu("h100-80gb")], 8, Workload(1000, 200, 64))
    plan.best.layout.label, plan.why

The empirical constants of the model live in `strata.plan.constants`; everything else is arithmetic.
"""
from strata.plan.arch import BUILTINS, Arch, arch_from_config, builtin, load_arch
from strata.plan.constants import Constants
from strata.plan.errors import ConfigError, LayoutError, PlanError, UnknownGPUError, UnknownModelError
from strata.plan.estimate import Layout, Setup, Workload, comm_per_token, estimate, memory, stage_weights
from strata.plan.hardware import GPUS, GPU, get_gpu
from strata.plan.planner import Plan, make_plan
from strata.plan.replicas import size_fleet

__all__ = [
    "Arch", "BUILTINS", "arch_from_config", "builtin", "load_arch", "Constants", "ConfigError", "LayoutError",
    "PlanError", "UnknownGPUError", "UnknownModelError", "Layout", "Setup", "Workload", "comm_per_token",
    "estimate", "memory", "stage_weights", "GPU", "GPUS", "get_gpu", "Plan", "make_plan", "size_fleet",
]

"""`strata slurm batch`: write an sbatch script that runs `strata batch` on several nodes.

    strata slurm batch --nodes 2 --gpus-per-node 2 --tensor-parallel-size 1 --time 02:00:00 \\
        --partition gpu --account myproj --input posts.parquet --text-field body --output out.jsonl > job.sbatch
    sbatch job.sbatch

The script starts `--nodes x --tasks-per-node` tasks with srun; each task is one rank (SLURM_PROCID of
SLURM_NTASKS) and runs `--data-parallel-size = gpus-per-node / (tasks-per-node x TP x PP)` engine workers on its
node's GPUs, each worker a rank of its own writing `<stem>.rank<R><ext>`. After srun, the script merges the
rank files into --output (also before, to fold in files an earlier, interrupted job left). Resubmitting the
same script resumes. Ranks that failed can be rerun alone (`RANK=r WORLD_SIZE=w strata batch ...`).

`strata slurm serve` (replicas of `strata serve` that join a router) is registered here too; its script is
`strata.router.slurm`'s.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from strata.batch.cli import add_batch_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("slurm", help="write Slurm job scripts (batch jobs, serving fleets)")
    sub = p.add_subparsers(dest="slurm_command", metavar="{batch,serve}")
    b = sub.add_parser("batch", help="sbatch script that runs `strata batch` on several nodes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = b.add_argument_group("slurm")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: a CPU job)")
    g.add_argument("--tasks-per-node", type=int, default=1,
                   help="srun tasks (ranks) per node; each drives gpus-per-node / tasks-per-node GPUs")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
    g.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--job-name", default="strata-batch")
    g.add_argument("--log", default="strata-batch-%j.log", help="the job's stdout/stderr file")
    g.add_argument("--gpu-directive", choices=["gres", "gpus-per-node"], default="gres",
                   help="how to ask for GPUs: --gres=gpu:N (default, every Slurm) or --gpus-per-node=N")
    g.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra '#SBATCH OPT' line (repeatable), e.g. --sbatch-option=--exclusive")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the job (repeatable), e.g. 'source venv/bin/activate'")
    g.add_argument("--python", default=sys.executable, help="python that has strata installed (default: this one)")
    g.add_argument("--script-output", default=None, help="write the script here instead of stdout")
    batch_actions = add_batch_arguments(b)
    from strata.config.engine import EngineArgs
    engine_group_start = len(b._actions)
    EngineArgs.add_cli_args(b)
    engine_actions = b._actions[engine_group_start:]
    b.set_defaults(func=lambda a: slurm_batch(a, batch_actions + engine_actions))
    from strata.router import slurm as serve_slurm
    s = sub.add_parser("serve", help="sbatch script that runs `strata serve` replicas registering with a router",
                       description=serve_slurm.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_slurm.add_slurm_serve_args(s)
    s.add_argument("--script-output", default=None, help="write the script here instead of stdout")
    s.set_defaults(func=slurm_serve)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _argv(args: argparse.Namespace, actions: list[argparse.Action], drop: set[str]) -> list[str]:
    """Command-line flags that reproduce the non-default values of `actions` in `args`."""
    out: list[str] = []
    for a in actions:
        if not a.option_strings or a.dest in drop:
            continue
        v = getattr(args, a.dest, a.default)
        if v == a.default:
            continue
        flag = max(a.option_strings, key=len)
        if isinstance(a, argparse.BooleanOptionalAction):
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(a, argparse._StoreTrueAction):
            if v:
                out.append(flag)
        elif isinstance(a, argparse._AppendAction):
            for x in v or []:
                out += [flag, str(x)]
        elif v is not None:
            out += [flag, str(v)]
    return out


def build_script(args: argparse.Namespace, actions: list[argparse.Action]) -> str:
    tasks_per_node = args.tasks_per_node
    ntasks = args.nodes * tasks_per_node
    group = max(1, args.tensor_parallel_size) * max(1, args.pipeline_parallel_size)
    if args.gpus_per_node:
        if args.gpus_per_node % (tasks_per_node * group):
            raise ValueError(f"--gpus-per-node {args.gpus_per_node} is not a multiple of tasks-per-node x TP x PP "
                             f"= {tasks_per_node * group}")
        dp = args.gpus_per_node // (tasks_per_node * group)
    else:
        dp = args.data_parallel_size
    world = ntasks * dp
    output = args.output
    if output is None:
        from strata.batch.cli import apply_defaults
        ns = argparse.Namespace(**vars(args))
        apply_defaults(ns)
        output = ns.output
    if "{rank}" in output:
        raise ValueError("--output must not contain {rank} in a Slurm job (the job merges rank files)")

    cli = [args.python, "-m", "strata.cli"]
    batch = cli + ["batch"] + _argv(args, actions, {"data_parallel_size", "rank", "world_size", "output", "progress"})
    batch += ["--output", output, "--data-parallel-size", str(dp), "--progress", "log"]
    merge = cli + ["batch", "merge", "--allow-missing", "--remove-inputs", "--output", output]

    q = shlex.quote
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={args.job_name}",
             f"#SBATCH --nodes={args.nodes}",
             f"#SBATCH --ntasks-per-node={tasks_per_node}"]
    if args.gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{args.gpus_per_node}" if args.gpu_directive == "gres"
                     else f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    for flag, v in (("cpus-per-task", args.cpus_per_task), ("mem", args.mem), ("time", args.time),
                    ("partition", args.partition), ("account", args.account), ("qos", args.qos),
                    ("constraint", args.constraint), ("output", args.log)):
        if v is not None:
            lines.append(f"#SBATCH --{flag}={v}")
    lines += [f"#SBATCH {o}" for o in args.sbatch_option]
    lines += [
        "",
        f"# Written by `strata slurm batch`: {ntasks} tasks x {dp} engine workers = {world} ranks"
        + (f", {group} GPU(s) each" if args.gpus_per_node else " (CPU)") + ".",
        "# Each rank writes its own file; the merge below folds them into the output. Resubmit to resume.",
        "set -uo pipefail",
        "export PYTHONUNBUFFERED=1",
        *args.setup,
        "",
        "# Fold in rank files left by an earlier (interrupted) run, so every rank resumes from them.",
        " ".join(q(x) for x in merge) + " || true",
    ]
    if args.overwrite:
        lines.append(f"rm -f {q(output)}")
    lines += [
        "",
        "# One rank per task: SLURM_PROCID / SLURM_NTASKS select the shard.",
        "srun --kill-on-bad-exit=0 " + " ".join(q(x) for x in batch),
        "rc=$?",
        "",
        " ".join(q(x) for x in merge) + " || rc=2",
        'echo "strata batch job finished with status $rc"',
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def slurm_batch(args: argparse.Namespace, actions: list[argparse.Action]) -> int:
    try:
        script = build_script(args, actions)
    except ValueError as e:
        print(f"strata slurm batch: error: {e}", file=sys.stderr)
        return 2
    write_script(script, args.script_output)
    return 0


def write_script(script: str, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o755)
        print(f"wrote {path}; submit it with: sbatch {path}", file=sys.stderr)
    else:
        sys.stdout.write(script)


def slurm_serve(args: argparse.Namespace) -> int:
    from strata.router.slurm import SlurmServeError, render_serve_sbatch

    try:
        script = render_serve_sbatch(args)
    except SlurmServeError as e:
        print(f"strata slurm serve: error: {e}", file=sys.stderr)
        return 2
    write_script(script, args.script_output)
    return 0

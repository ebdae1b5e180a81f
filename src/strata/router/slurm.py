"""`strata slurm serve`: an sbatch script that starts one `strata serve` replica per node or per
tensor-parallel group of GPUs, each registering itself with the router (and deregistering when the job ends).

    strata slurm serve --nodes 4 --gpus-per-node 8 --tensor-parallel-size 8 --router http://router:9000

The router key is never written into the script: the job reads it from $STRATA_ROUTER_KEY (or the variable
named by --router-key-env) in the environment sbatch was called from.
"""
from __future__ import annotations

import argparse
import shlex

_DEF_PORT = 8000


def add_slurm_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model to serve (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--router", required=True, help="router URL the replicas register with")
    parser.add_argument("--region", default=None, help="region of these replicas (default: $STRATA_REGION at "
                                                       "job time, else 'default')")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU replicas)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="GPUs per replica; replicas per node = gpus-per-node / this")
    parser.add_argument("--replicas-per-node", type=int, default=None,
                        help="CPU only: replicas per node (default 1)")
    parser.add_argument("--port", type=int, default=_DEF_PORT,
                        help="port of the first replica on a node; the k-th uses port + k (default 8000)")
    parser.add_argument("--router-key-env", default="STRATA_ROUTER_KEY",
                        help="environment variable holding the router key (default STRATA_ROUTER_KEY)")
    parser.add_argument("--job-name", default="strata-serve")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--time", default=None, help="wall time, e.g. 24:00:00")
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    parser.add_argument("--output", default="strata-serve-%j.out", help="sbatch --output")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line to run before starting (module load ..., source venv/bin/activate); "
                             "repeatable")
    parser.add_argument("--strata-cmd", default="strata", help="how to invoke strata on the nodes")
    parser.add_argument("--serve-args", default="", help="extra arguments for `strata serve` (quoted string)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra '#SBATCH' line, repeatable "
                                                                         "(e.g. --sbatch-arg=--exclusive)")


class SlurmServeError(ValueError):
    pass


def _layout(args) -> tuple[int, int]:
    """(replicas per node, GPUs per replica)."""
    gpn = int(args.gpus_per_node or 0)
    tp = int(args.tensor_parallel_size or 1)
    if args.nodes < 1:
        raise SlurmServeError("--nodes must be >= 1")
    if tp < 1:
        raise SlurmServeError("--tensor-parallel-size must be >= 1")
    if gpn <= 0:
        if tp != 1:
            raise SlurmServeError("--tensor-parallel-size needs --gpus-per-node")
        return int(args.replicas_per_node or 1), 0
    if args.replicas_per_node:
        raise SlurmServeError("--replicas-per-node is for CPU replicas; with GPUs it is gpus-per-node / tp")
    if tp > gpn:
        raise SlurmServeError(f"--tensor-parallel-size {tp} exceeds --gpus-per-node {gpn}: a replica must fit "
                              f"on one node (multi-node tensor parallelism is not supported by this launcher)")
    if gpn % tp:
        raise SlurmServeError(f"--gpus-per-node {gpn} is not a multiple of --tensor-parallel-size {tp}")
    return gpn // tp, tp


def render_serve_sbatch(args) -> str:
    per_node, tp = _layout(args)
    router = str(args.router).rstrip("/")
    if not router.startswith(("http://", "https://")):
        raise SlurmServeError(f"--router must be an http(s) URL, got {args.router!r}")
    key_env = args.router_key_env
    if not key_env.replace("_", "").isalnum():
        raise SlurmServeError(f"--router-key-env must be a variable name, got {key_env!r}")
    q = shlex.quote
    sb = [f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
          f"#SBATCH --ntasks-per-node={per_node}", f"#SBATCH --output={args.output}"]
    if tp:
        sb.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    for flag, val in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                      ("time", args.time), ("cpus-per-task", args.cpus_per_task), ("mem", args.mem)):
        if val is not None:
            sb.append(f"#SBATCH --{flag}={val}")
    sb.extend(f"#SBATCH {a}" for a in args.sbatch_arg)
    sb.append("#SBATCH --signal=B:TERM@60")
    serve = [args.strata_cmd, "serve"]
    if args.model:
        serve.append(q(args.model))
    serve_cmd = " ".join(serve)
    extra = args.serve_args.strip()
    region = f'{q(args.region)}' if args.region else '"${STRATA_REGION:-default}"'
    setup = "\n".join(args.setup)
    lines = [
        "#!/bin/bash",
        *sb,
        f"# generated by `strata slurm serve`: {args.nodes} node(s) x {per_node} replica(s)"
        + (f", {tp} GPU(s) each" if tp else ", CPU") + f"; registering with {router}",
        "set -euo pipefail",
        setup,
        f': "${{{key_env}:?set {key_env} to the router key before sbatch}}"',
        f"export STRATA_ROUTER_KEY=\"${{{key_env}}}\"",
        f"export STRATA_ROUTER_URL={q(router)}",
        f"export STRATA_REGION={region}",
        f"export STRATA_TP={tp}",
        f"export STRATA_BASE_PORT={int(args.port)}",
        "",
        "# one task per replica: SLURM_LOCALID picks the GPUs and the port (the script travels as an argument,",
        "# so it needs no shared filesystem)",
        "read -r -d '' REPLICA_SCRIPT <<'REPLICA' || true",
        "set -euo pipefail",
        "LOCAL=${SLURM_LOCALID:-0}",
        "PORT=$((STRATA_BASE_PORT + LOCAL))",
        "HOST=$(hostname -I 2>/dev/null | awk '{print $1}')",
        "HOST=${HOST:-$(hostname)}",
        "if [ \"$STRATA_TP\" -gt 0 ]; then",
        "  FIRST=$((LOCAL * STRATA_TP))",
        "  export CUDA_VISIBLE_DEVICES=$(seq -s, $FIRST $((FIRST + STRATA_TP - 1)))",
        "fi",
        "echo \"replica $SLURM_PROCID on $HOST:$PORT (gpus ${CUDA_VISIBLE_DEVICES:-none}) region $STRATA_REGION\"",
        f"exec {serve_cmd} --host \"$HOST\" --port \"$PORT\""
        + (" --tensor-parallel-size \"$STRATA_TP\"" if tp > 1 else "")
        + " --register-with \"$STRATA_ROUTER_URL\" --region \"$STRATA_REGION\" --router-key \"$STRATA_ROUTER_KEY\""
        + (f" {extra}" if extra else ""),
        "REPLICA",
        "",
        f"srun --kill-on-bad-exit=0 --ntasks-per-node={per_node} bash -c \"$REPLICA_SCRIPT\" &",
        "SRUN=$!",
        "trap 'kill -TERM $SRUN 2>/dev/null; wait $SRUN' TERM INT",
        "wait $SRUN",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main(argv=None) -> int:
    """Standalone use (`python -m strata.router.slurm ...`): print the script."""
    import sys

    p = argparse.ArgumentParser(prog="strata slurm serve")
    add_slurm_serve_args(p)
    args = p.parse_args(argv)
    try:
        sys.stdout.write(render_serve_sbatch(args))
    except SlurmServeError as e:
        print(f"strata slurm serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`strata` command line. Each subsystem registers its own subcommands; imports stay lazy so that
`strata router` never imports torch and `strata --help` is fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from strata.core.cliutil import Parser

# subcommand -> module exposing `register(subparsers)`; each registered parser sets `func(args) -> int`.
SUBCOMMANDS = {
    "generate": "strata.engine.cli",
    "chat": "strata.engine.cli",
    "bench": "strata.bench_cli",
    "serve": "strata.serve.cli",
    "batch": "strata.batch.cli",
    "slurm": "strata.batch.slurm_cli",
    "router": "strata.router.cli",
    "plan": "strata.plan.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="strata", description="Run LLMs on large data and serve them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done = set()
    for name, mod in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        if mod in done:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("strata"):
                continue  # subsystem not present in this build
            raise
        module.register(sub)
        done.add(mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only import the subsystem that was asked for (keeps `strata router` torch-free).
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

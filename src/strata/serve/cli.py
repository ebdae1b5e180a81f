"""`strata serve [MODEL]`: the OpenAI-compatible server."""
from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over the OpenAI API (completions, chat, Batch API, "
                                          "metrics). With no model, the embedded SmolLM2-135M-Instruct.")
    add_args(p)
    p.set_defaults(func=main_args)


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from strata.config.engine import EngineArgs
    from strata.serve.args import add_server_args

    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model directory, hub id or .gguf file (same as --model)")
    add_server_args(p)
    EngineArgs.add_cli_args(p)
    return p


def main_args(args: argparse.Namespace) -> int:
    from strata.config.engine import EngineArgs
    from strata.serve.args import ServerArgs

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            print(f"error: model given twice: {args.model_tag!r} and --model {args.model!r}", file=sys.stderr)
            return 2
        args.model = args.model_tag
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server_args = ServerArgs.from_cli_args(args)
    if server_args.enable_auto_tool_choice and not server_args.tool_call_parser:
        print("error: --enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)", file=sys.stderr)
        return 2

    # cheap checks first: a taken port or a state directory in use fails now, not after the model loads
    from strata.serve.preflight import PreflightError, StateDir, bind_socket, default_state_dir
    try:
        sock = bind_socket(server_args.host, server_args.port)
        server_args.state_dir = server_args.state_dir or default_state_dir(sock.getsockname()[1])
        state_dir = StateDir(server_args.state_dir)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine_args = EngineArgs.from_cli_args(args)

    from strata.core.errors import ModelLoadError
    from strata.core.sampling_params import ParameterError
    from strata.engine.llm_engine import LLMEngine
    try:
        if engine_args.data_parallel_size > 1:  # N replicas behind this one server (least-loaded dispatch)
            from strata.engine.dp_engine import DataParallelEngine
            engine = DataParallelEngine(engine_args)
        else:
            engine = LLMEngine.from_engine_args(engine_args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ParameterError as e:  # a bad flag (layout, GPUs, lengths): named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2

    from strata.serve.server import serve
    return serve(engine, server_args, sock=sock, state_dir=state_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata serve")
    add_args(parser)
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

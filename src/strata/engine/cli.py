"""`strata generate`: one-shot generation from the command line. `strata chat`: a conversation with a model in the
terminal (or over a pipe), offline, on the engine in this process."""
from __future__ import annotations

import argparse
import sys

CHAT_HELP = """Chat with a model in this process (no server): each line read from stdin is a user message, the
reply is streamed as it is generated, and the conversation is kept until /reset. Works over a pipe
(`printf 'Hi\\nAnd you?\\n' | strata chat`). Commands: /reset (forget the conversation), /exit."""


def _formatter():
    from strata.core.cliutil import HelpFormatter
    return HelpFormatter


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate per output")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens with this much probability")
    g.add_argument("--top-k", type=int, default=-1, help="-1: all tokens")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the top one")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1: discourage tokens already seen")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def register(sub) -> None:
    from strata.config.engine import EngineArgs

    p = sub.add_parser("generate", help="generate text for prompts (embedded SmolLM2 by default)",
                       description="Generate text for prompts, offline (the embedded SmolLM2 unless --model).",
                       formatter_class=_formatter())
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--system-prompt", help="system message (with --chat)")
    _sampling_args(p)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON line per output")
    EngineArgs.add_cli_args(p, skip=("seed",))
    p.add_argument("--seed", type=int, default=None, help="sampling seed (per request)")
    p.set_defaults(func=run)

    c = sub.add_parser("chat", help="chat with a model in the terminal (embedded SmolLM2 by default)",
                       description=CHAT_HELP, formatter_class=_formatter())
    c.add_argument("--system-prompt", help="system message at the start of the conversation")
    c.add_argument("--quick", "-q", metavar="MESSAGE", help="send this one message, print the reply and exit")
    c.add_argument("--json", action="store_true",
                   help="print each reply as one JSON line (role, content, finish_reason, usage) instead of "
                        "streaming it")
    _sampling_args(c)
    EngineArgs.add_cli_args(c, skip=("seed",))
    c.add_argument("--seed", type=int, default=None, help="sampling seed (per reply)")
    c.set_defaults(func=run_chat)


def _params(args: argparse.Namespace, **kw):
    from strata.core.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, stop=args.stop, max_tokens=args.max_tokens,
                          seed=args.seed, **kw)


def run(args: argparse.Namespace) -> int:
    import json

    from strata.config.engine import EngineArgs
    from strata.core.errors import StrataError
    from strata.core.sampling_params import ParameterError
    from strata.engine.llm import LLM

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give --prompt or --prompt-file", file=sys.stderr)
        return 2
    try:
        params = _params(args, n=args.n, ignore_eos=args.ignore_eos)
        eargs = EngineArgs.from_cli_args(args)
        kw = {k: v for k, v in vars(eargs).items() if k != "model"}
        llm = LLM(eargs.model, **kw)
        if args.chat:
            convs = [([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
                     + [{"role": "user", "content": p}] for p in prompts]
            outs = llm.chat(convs, params)
        else:
            outs = llm.generate(prompts, params)
    except (ParameterError, StrataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": c.index, "text": c.text,
                                  "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}))
            else:
                print(c.text)
    return 0


def _reply(engine, rid: str, messages: list[dict], params, stream: bool):
    """Generate the assistant's reply to `messages`; with `stream`, write its text to stdout as it comes.
    Returns (text, finish_reason, usage)."""
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    engine.add_request(rid, ids, params)
    text, finish, n_out = "", None, 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                c = out.outputs[0]
                text += c.text_delta
                if stream and c.text_delta:
                    sys.stdout.write(c.text_delta)
                    sys.stdout.flush()
                finish, n_out = c.finish_reason or finish, len(c.token_ids)
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
        engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
        finish = "abort"
    if stream:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return text, finish, {"prompt_tokens": len(ids), "completion_tokens": n_out}


def run_chat(args: argparse.Namespace) -> int:
    import json

    from strata.config.engine import EngineArgs
    from strata.core.errors import StrataError
    from strata.core.sampling_params import ParameterError
    from strata.engine.llm_engine import LLMEngine

    try:
        params = _params(args)
        eargs = EngineArgs.from_cli_args(args)
        if eargs.data_parallel_size > 1:
            raise ParameterError("data_parallel_size", "strata chat runs one replica: --data-parallel-size 1")
        engine = LLMEngine.from_engine_args(eargs)
    except (ParameterError, StrataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interactive = args.quick is None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print(f"strata chat: {engine.config.served_model_name}. /reset forgets the conversation, /exit or "
              f"Ctrl-D quits.", file=sys.stderr)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    lines = iter([args.quick]) if args.quick is not None else None
    turn = 0
    while True:
        try:
            line = next(lines) if lines is not None else input("> " if interactive else "")
        except (EOFError, StopIteration):
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        try:
            text, finish, usage = _reply(engine, f"chat-{turn}", messages, params, stream=not args.json)
        except (ParameterError, StrataError) as e:  # e.g. the conversation outgrew the context
            messages.pop()
            print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        turn += 1
        messages.append({"role": "assistant", "content": text})
        if args.json:
            print(json.dumps({"role": "assistant", "content": text, "finish_reason": finish, "usage": usage}),
                  flush=True)
    return 0

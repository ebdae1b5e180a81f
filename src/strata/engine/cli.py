"""`strata generate`: one-shot generation from the command line."""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text for prompts (embedded SmolLM2 by default)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--system-prompt", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON line per output")
    from strata.config.engine import EngineArgs
    EngineArgs.add_cli_args(p, skip=("seed",))
    p.add_argument("--seed", type=int, default=None, help="sampling seed (per request)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from strata.config.engine import EngineArgs
    from strata.core.errors import StrataError
    from strata.core.sampling_params import ParameterError, SamplingParams
    from strata.engine.llm import LLM

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give --prompt or --prompt-file", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                                max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
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

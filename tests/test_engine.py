"""Engine behaviour on a tiny random Llama: scheduling never changes greedy outputs, seeds reproduce,
n > 1, stop strings, bad input."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import write_tiny_model
from strata.config.engine import EngineArgs
from strata.core.errors import PromptTooLongError
from strata.core.sampling_params import ParameterError, SamplingParams
from strata.engine.llm import LLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_model("llama", d, seed=3)
    return str(d)


def make(model_dir, **kw):
    base = dict(device="cpu", dtype="float32", check_invariants=True, num_gpu_blocks_override=256)
    return LLM(model_dir, **{**base, **kw})


def prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 40, 17, 64, 9, 33, 50, 5][:n]
    shared = torch.randint(3, 384, (20,), generator=g).tolist()
    out = []
    for i, L in enumerate(lens):
        tail = torch.randint(3, 384, (L,), generator=g).tolist()
        out.append(shared + tail if i % 2 else tail)  # half share a 20-token prefix
    return out


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def run(llm, ps, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(model_dir):
    """Unchunked, no prefix cache, plenty of blocks, everything in one batch."""
    llm = make(model_dir, enable_prefix_caching=False, enable_chunked_prefill=False)
    return run(llm, prompts())


def test_chunked_equals_unchunked(model_dir, reference):
    llm = make(model_dir, enable_prefix_caching=False, max_num_batched_tokens=7)
    assert run(llm, prompts()) == reference


def test_prefix_hit_equals_miss(model_dir, reference):
    llm = make(model_dir, enable_prefix_caching=True)
    assert run(llm, prompts()) == reference  # cold
    assert run(llm, prompts()) == reference  # every prompt now hits the cache
    kv = llm.engine.kv
    assert kv.prefix_hits > 0
    assert kv.pool.num_free == kv.num_usable_blocks  # every block free again (cached ones are free)


def test_preempted_equals_not_preempted(model_dir, reference):
    llm = make(model_dir, num_gpu_blocks_override=12, max_num_batched_tokens=32)  # 11 blocks: must preempt
    assert run(llm, prompts()) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.pool.num_free == llm.engine.kv.num_usable_blocks


def test_seed_reproducible_regardless_of_batch(model_dir):
    llm = make(model_dir)
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = run(llm, prompts()[:1], p)[0]
    with_others = run(llm, prompts()[:4], [p] + [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 3)[0]
    assert alone == with_others
    other_seed = run(llm, prompts()[:1], p.clone(seed=99))[0]
    assert other_seed != alone


def test_n_samples_distinct_and_share_prompt_blocks(model_dir):
    llm = make(model_dir)
    p = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    out = llm.generate([prompts()[3]], p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    seqs = {tuple(c.token_ids) for c in out.outputs}
    assert len(seqs) == 4
    assert llm.engine.kv.prefix_hits >= 3 * 64  # siblings reuse the first sample's full prompt blocks


def test_stop_strings_cut_exactly(model_dir):
    llm = make(model_dir)
    base = llm.generate([prompts()[1]], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[8:11]
    first = text.find(stop)
    out = llm.generate([prompts()[1]], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out2 = llm.generate([prompts()[1]], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop],
                                                         include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out2.text == text[:first + len(stop)]


def test_stop_token_and_min_tokens(model_dir, reference):
    llm = make(model_dir)
    toks = reference[0]
    stop_tok = toks[5]
    first = toks.index(stop_tok)
    out = llm.generate([prompts()[0]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                      stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = llm.generate([prompts()[0]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, min_tokens=10,
                                                      stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 10


def test_logprobs(model_dir):
    llm = make(model_dir)
    out = llm.generate([prompts()[0]], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry
        best = max(entry.values(), key=lambda lp: lp.logprob)
        assert entry[tok].logprob == pytest.approx(best.logprob)  # greedy picks the top logprob
        assert all(lp.logprob <= 0 for lp in entry.values())


def test_bad_input_is_rejected_before_work(model_dir):
    llm = make(model_dir, max_model_len=128)
    with pytest.raises(PromptTooLongError, match="128"):
        llm.generate([[5] * 200], GREEDY, use_tqdm=False)
    with pytest.raises(ParameterError) as e:
        llm.generate([[5, 6, 10_000]], GREEDY, use_tqdm=False)
    assert e.value.param == "prompt"
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(n=0), dict(max_tokens=0),
                dict(top_k=-5), dict(logprobs=50), dict(min_p=2)):
        with pytest.raises(ParameterError) as e:
            SamplingParams(**bad)
        assert e.value.param == next(iter(bad))
    # a bad prompt in a batch fails the call before any request runs; the engine stays usable
    with pytest.raises(PromptTooLongError):
        llm.generate([[5] * 10, [5] * 200], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert len(run(llm, [[5] * 10])[0]) == 24


def test_unknown_architecture_and_missing_weights(tmp_path):
    import json
    from strata.core.errors import ModelLoadError, UnsupportedArchitectureError
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        LLM(str(tmp_path), device="cpu")
    d = tmp_path / "noweights"
    d.mkdir()
    from tests.tiny_models import hf_config
    hf_config("llama").save_pretrained(str(d))
    with pytest.raises(ModelLoadError, match="no weight files"):
        LLM(str(d), device="cpu")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(d), device="cpu")


def test_dummy_load_format_runs(model_dir):
    llm = make(model_dir, load_format="dummy")
    assert len(run(llm, [[5] * 10])[0]) == 24


def test_sharded_safetensors_with_index(tmp_path):
    """A checkpoint split over several files with model.safetensors.index.json loads to the same outputs."""
    import os
    from tests.tiny_models import write_tiny_model
    hf = write_tiny_model("llama", tmp_path / "one", seed=3)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    a = run(make(str(tmp_path / "one")), prompts()[:2])
    b = run(make(str(tmp_path / "sharded")), prompts()[:2])
    assert a == b


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    from strata.core.errors import ModelLoadError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        LLM("no-such-org/no-such-model", device="cpu")

"""The sampler's logits processing against transformers' logits processors on the same logits.

Top-k, top-p, min-p and temperature against `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`
and `TemperatureLogitsWarper` (in transformers' order); the repetition penalty against
`RepetitionPenaltyLogitsProcessor` over prompt + output tokens; presence and frequency penalties (not in
transformers) against the OpenAI/vLLM formula over output tokens only. The kept tokens must be the same
set exactly, the kept logits allclose. Then the sampler is seen drawing from exactly that distribution.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from strata.core.request import Request
from strata.core.sampling_params import SamplingParams
from strata.runner.sampler import Sampler, SamplingBatch, apply_penalties, warp_logits

NO_IDS = torch.zeros(1, 0, dtype=torch.long)  # the warpers do not read input_ids


def request(params: SamplingParams, prompt=(0,), output=()) -> Request:
    r = Request("r", list(prompt), params, max_tokens=64)
    r.output_token_ids = list(output)
    return r


def hf_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row through transformers' warpers, as `generate` builds them for these parameters."""
    x = row[None].clone()
    if not p.greedy:
        x = TemperatureLogitsWarper(float(max(p.temperature, 1e-5)))(NO_IDS, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(NO_IDS, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(NO_IDS, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(NO_IDS, x)
    return x[0]


def openai_penalties(row: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """logits - presence * [count > 0] - frequency * count, counts over the output tokens only."""
    row = row.clone()
    for t in set(output):
        c = output.count(t)
        row[t] -= presence * (c > 0) + frequency * c
    return row


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str = "") -> None:
    kept, hf_kept = ~torch.isinf(ours), ~torch.isinf(theirs)
    assert kept.tolist() == hf_kept.tolist(), (
        f"{what}: kept {kept.nonzero().flatten().tolist()}, transformers {hf_kept.nonzero().flatten().tolist()}")
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6, msg=what)


# Mixed parameters in one batch, each row against transformers on its own: ties, edges (top_p=1, top_k
# -1/0/1/V/>V, min_p 0 and 1, temperature 0 and tiny).
ROW_PARAMS = [
    dict(),
    dict(temperature=0.0, top_k=3),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(top_p=0.5, min_p=0.1),
    dict(top_k=0, top_p=1.0, min_p=0.0),
    dict(top_k=-1, min_p=0.3),
    dict(top_k=1),
    dict(top_k=40),
    dict(top_k=1000),
    dict(min_p=1.0),
    dict(temperature=1e-5, top_p=0.9),
    dict(temperature=2.0, top_k=10, top_p=0.6, min_p=0.05),
    dict(top_p=0.01),
]


@pytest.mark.parametrize("kind", ["randn", "ties", "flat", "peaked"])
def test_batched_warpers_match_transformers_row_by_row(kind):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    V = 40
    B = len(ROW_PARAMS)
    if kind == "randn":
        logits = torch.randn(B, V, generator=g) * 3
    elif kind == "ties":  # few distinct values: ties at the top-k and top-p boundaries
        logits = torch.randint(-2, 3, (B, V), generator=g).float()
    elif kind == "flat":
        logits = torch.zeros(B, V)
    else:
        logits = torch.randn(B, V, generator=g)
        logits[:, 7] = 30.0
    params = [SamplingParams(**kw) for kw in ROW_PARAMS]
    ours = warp_logits(logits.clone(), [request(p) for p in params])
    for i, p in enumerate(params):
        assert_same(ours[i], hf_warp(logits[i], p), f"row {i} {ROW_PARAMS[i]}")


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    # Four equal tokens, top_p=0.5: two of them already hold 0.5, so two stay (the sampler kept three).
    ours = warp_logits(torch.zeros(1, 4), [request(SamplingParams(top_p=0.5))])[0]
    assert_same(ours, hf_warp(torch.zeros(4), SamplingParams(top_p=0.5)))
    assert (~torch.isinf(ours)).sum().item() == 2
    # After top_k=2 of [2, 2, -2] the two tied tokens hold 0.5 each: top_p=0.5 keeps one.
    row = torch.tensor([2.0, 2.0, -2.0])
    p = SamplingParams(top_k=2, top_p=0.5)
    ours = warp_logits(row[None].clone(), [request(p)])[0]
    assert (~torch.isinf(ours)).sum().item() == 1
    assert_same(ours, hf_warp(row, p))


def test_ties_on_a_large_vocabulary():
    g = torch.Generator().manual_seed(3)
    V = 4096
    logits = torch.randint(0, 6, (3, V), generator=g).float()
    params = [SamplingParams(top_p=0.3), SamplingParams(top_k=700, top_p=0.9), SamplingParams(min_p=0.4, top_p=0.7)]
    ours = warp_logits(logits.clone(), [request(p) for p in params])
    for i, p in enumerate(params):
        assert_same(ours[i], hf_warp(logits[i], p), f"row {i}")


row_params = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 1e-5, 0.3, 1.0, 1.9]),
    "top_k": st.sampled_from([-1, 0, 1, 2, 5, 17, 64, 100]),
    "top_p": st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.25, 0.1, 1e-3]) | st.floats(0.01, 1.0),
    "min_p": st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0]) | st.floats(0.0, 1.0),
})


@settings(max_examples=150, deadline=None)
@given(data=st.data(), V=st.integers(2, 64), rows=st.lists(row_params, min_size=1, max_size=4),
       tied=st.booleans(), scale=st.sampled_from([0.01, 1.0, 8.0]))
def test_warpers_match_transformers_property(data, V, rows, tied, scale):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if tied:
        logits = torch.randint(-3, 4, (len(rows), V), generator=g).float() * scale
    else:
        logits = torch.randn(len(rows), V, generator=g) * scale
    params = [SamplingParams(**kw) for kw in rows]
    ours = warp_logits(logits.clone(), [request(p) for p in params])
    for i, p in enumerate(params):
        assert_same(ours[i], hf_warp(logits[i], p), f"row {i} {rows[i]}")


def test_repetition_penalty_matches_transformers_over_prompt_and_output():
    g = torch.Generator().manual_seed(1)
    V = 32
    logits = torch.randn(3, V, generator=g) * 4
    logits[:, 5] = 0.0  # zero stays zero
    cases = [  # (penalty, prompt, output)
        (1.3, [1, 2, 5, 40], [2, 3, 3]),  # 40 is out of the vocabulary: ignored
        (0.7, [9, 9, 9], []),  # < 1 encourages; the prompt alone counts
        (2.0, [0], [31, 30, 0]),
    ]
    reqs = [request(SamplingParams(repetition_penalty=pen), prompt, out) for pen, prompt, out in cases]
    ours = apply_penalties(logits.clone(), reqs)
    for i, (pen, prompt, out) in enumerate(cases):
        ids = torch.tensor([prompt + out])
        theirs = RepetitionPenaltyLogitsProcessor(pen)(ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], theirs, rtol=0, atol=0)
    assert ours[1, 9] != logits[1, 9]  # a prompt-only token is penalized (vLLM and transformers)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    g = torch.Generator().manual_seed(2)
    V = 16
    logits = torch.randn(4, V, generator=g) * 2
    cases = [  # (presence, frequency, prompt, output)
        (0.5, 0.0, [1, 2], [3, 3, 4]),
        (0.0, 0.75, [3, 3, 3], [3, 7, 7, 7]),
        (-1.0, 2.0, [0], [0, 0, 15, 1]),
        (1.5, -0.5, [4, 5, 6], []),  # no output yet: nothing changes
    ]
    reqs = [request(SamplingParams(presence_penalty=pr, frequency_penalty=fr), prompt, out)
            for pr, fr, prompt, out in cases]
    ours = apply_penalties(logits.clone(), reqs)
    for i, (pr, fr, prompt, out) in enumerate(cases):
        torch.testing.assert_close(ours[i], openai_penalties(logits[i], out, pr, fr), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[0, 1:3], logits[0, 1:3], rtol=0, atol=0)  # prompt tokens untouched
    torch.testing.assert_close(ours[3], logits[3], rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), V=st.integers(2, 40), rep=st.sampled_from([1.0, 0.5, 1.2, 3.0]),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2), p=row_params)
def test_penalties_then_warpers_match_the_reference_pipeline(data, V, rep, presence, frequency, p):
    prompt = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=8))
    output = data.draw(st.lists(st.integers(0, V - 1), max_size=8))
    seed = data.draw(st.integers(0, 2**31 - 1))
    row = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3
    params = SamplingParams(repetition_penalty=rep, presence_penalty=presence, frequency_penalty=frequency, **p)
    r = request(params, prompt, output)
    ours = warp_logits(apply_penalties(row[None].clone(), [r]), [r])[0]
    ref = row[None].clone()
    if rep != 1.0:
        ref = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([prompt + output]), ref)
    ref = openai_penalties(ref[0], output, presence, frequency)
    assert_same(ours, hf_warp(ref, params), str(params))


def test_sampler_draws_from_the_processed_distribution():
    """Many rows with the same logits: every draw is a kept token, and the draw frequencies are
    transformers' probabilities after the same processing."""
    V, N = 12, 4000
    row = torch.tensor([3.0, 2.5, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -1.0, -2.0, -4.0, 1.5])
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.2)
    prompt, output = [0, 4], [1, 1, 11]
    reqs = [request(params, prompt, output) for _ in range(N)]
    tokens, _ = Sampler(seed=0).sample(row.repeat(N, 1), SamplingBatch(reqs))
    ref = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([prompt + output]), row[None].clone())[0]
    expected = torch.softmax(hf_warp(openai_penalties(ref, output, 0.3, 0.2), params), dim=-1)
    counts = torch.bincount(tokens, minlength=V).double() / N
    assert set(tokens.tolist()) == set(expected.nonzero().flatten().tolist())
    sd = (expected.double() * (1 - expected.double()) / N).sqrt()
    assert ((counts - expected.double()).abs() <= 5 * sd + 1e-12).all(), (counts.tolist(), expected.tolist())
    assert not math.isclose(expected[1].item(), torch.softmax(row / 0.8, -1)[1].item(), rel_tol=1e-3)

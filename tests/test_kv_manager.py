"""Block bookkeeping: property tests over random request streams, invariants after every operation."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from strata.core.plan import StepResult
from strata.core.request import Request, RequestStatus
from strata.core.sampling_params import SamplingParams
from strata.kvcache.manager import KVCacheManager, hash_block
from strata.sched.scheduler import Scheduler

BS = 4


def _req(rid, tokens, max_tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens=max_tokens)


def test_prefix_hit_and_full_hit_leaves_one_token():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = _req("a", list(range(10)), 1)
    blocks, n = kv.get_computed_blocks(a)
    assert (blocks, n) == ([], 0)
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)  # blocks 0-1 full (8 tokens), third partial
    kv.free(a)
    b = _req("b", list(range(10)) + [99], 1)
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and len(blocks) == 2
    c = _req("c", list(range(8)), 1)  # fully cached prompt: one block dropped so a token is computed
    blocks, n = kv.get_computed_blocks(c)
    assert n == 4
    kv.check_invariants([])


def _cached(kv, tokens, rid, salt=None):
    """Run a request's prompt through the cache as a finished prefill; return its block ids."""
    r = Request(rid, tokens, SamplingParams(max_tokens=1, ignore_eos=True), max_tokens=1, cache_salt=salt)
    blocks, n = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, len(tokens) - n, blocks)
    r.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(r)
    kv.check_invariants([r])
    return r


def test_colliding_cheap_hash_shares_no_block():
    """Python's hash() maps n and n + (2**61 - 1) to the same value, so the old key `hash((parent,
    tuple(tokens)))` gave these two different prompts the same blocks: the second request would have read
    the first one's KV. The SHA-256 chain keeps them apart."""
    m = 2**61 - 1
    a_tokens = [5, 6, 7, 8] * 3
    b_tokens = [t + m for t in a_tokens]
    assert hash((None, tuple(a_tokens[:BS]))) == hash((None, tuple(b_tokens[:BS])))  # the cheap path collides
    assert hash_block(None, a_tokens[:BS]) != hash_block(None, b_tokens[:BS])
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = _cached(kv, a_tokens, "a")
    b = Request("b", b_tokens, SamplingParams(max_tokens=1), max_tokens=1)
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.allocate_slots(b, len(b_tokens))
    assert not set(a.block_ids) & set(b.block_ids)
    # the chain: the same block content after a different parent is a different key
    assert hash_block(hash_block(None, [1] * BS), [2] * BS) != hash_block(hash_block(None, [3] * BS), [2] * BS)
    kv.check_invariants([a, b])


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    tokens = list(range(13))
    _cached(kv, tokens, "a", salt="tenant-1")
    assert kv.get_computed_blocks(Request("b", tokens, SamplingParams(), max_tokens=1, cache_salt="tenant-2"))[1] == 0
    assert kv.get_computed_blocks(Request("c", tokens, SamplingParams(), max_tokens=1))[1] == 0
    assert kv.get_computed_blocks(Request("d", tokens, SamplingParams(), max_tokens=1, cache_salt="tenant-1"))[1] == 12


def test_lru_eviction_prefers_least_recent():
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # 4 usable
    reqs = []
    for i in range(2):
        r = _req(str(i), [i * 100 + j for j in range(8)], 1)
        assert kv.allocate_slots(r, 8)
        r.num_computed_tokens = 8
        kv.cache_full_blocks(r)
        reqs.append(r)
    kv.free(reqs[0])
    kv.free(reqs[1])
    big = _req("x", [7] * 8, 1)  # needs 2 blocks: evicts request 0's (freed first)
    assert kv.allocate_slots(big, 8)
    assert kv.get_computed_blocks(_req("q0", reqs[0].prompt_token_ids + [1], 1))[1] == 0
    assert kv.get_computed_blocks(_req("q1", reqs[1].prompt_token_ids + [1], 1))[1] == 8
    kv.check_invariants([big])


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(4, 24),
    reqs=st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 12)),
                  min_size=1, max_size=12),
    budget=st.integers(1, 40),
    max_seqs=st.integers(1, 6),
    aborts=st.lists(st.integers(0, 11), max_size=3),
    policy=st.sampled_from(["fcfs", "priority"]),
    admit=st.sampled_from([(1, 0), (3, 2), (8, 5)]),
)
def test_scheduler_random_streams(num_blocks, reqs, budget, max_seqs, aborts, policy, admit):
    """Random prompts (small alphabet: many shared prefixes), a tiny pool (preemption), a small budget
    (chunking). Every request finishes with exactly max_tokens outputs; invariants hold after every
    step; at the end every block is free."""
    kv = KVCacheManager(num_blocks, BS)
    max_len = (num_blocks - 1) * BS
    sched = Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len, policy=policy,
                      admit_batch=admit[0], admit_wait_steps=admit[1])
    all_reqs = []
    for i, (prompt, mt) in enumerate(reqs):
        prompt = prompt[: max_len - 1]
        mt = min(mt, max_len - len(prompt))
        r = _req(str(i), prompt, mt)
        r.priority = i % 3
        all_reqs.append(r)
        sched.add(r)
    aborted = set()
    for step in range(2000):
        if not sched.has_unfinished():
            break
        if step == 3:
            for a in aborts:
                if a < len(all_reqs) and not all_reqs[a].is_finished:
                    sched.finish(all_reqs[a], RequestStatus.FINISHED_ABORTED)
                    aborted.add(a)
        plan = sched.schedule()
        sched.check_invariants()
        assert plan.num_batched_tokens <= budget
        # "model": the next token is a function of the sequence so far (deterministic)
        toks = [sum(c.request.all_token_ids) % 7 for c in plan.chunks if c.sample]
        sched.update(plan, StepResult(sampled_token_ids=toks))
        sched.check_invariants()
    else:
        raise AssertionError("scheduler did not finish: hang")
    assert kv.pool.num_free == num_blocks - 1
    for i, r in enumerate(all_reqs):
        if i not in aborted:
            assert r.status == RequestStatus.FINISHED_LENGTH
            assert r.num_output_tokens == r.max_tokens
            # chunked / preempted / prefix-hit runs produce what one uninterrupted pass would
            expect, seq = [], list(r.prompt_token_ids)
            for _ in range(r.max_tokens):
                t = sum(seq) % 7
                expect.append(t)
                seq.append(t)
            assert r.output_token_ids == expect
    kv.check_invariants([])

"""Paged KV-cache bookkeeping (pure Python, no torch): a block pool with reference counts and an
automatic prefix cache keyed by chained block hashes, with LRU eviction of unreferenced cached blocks.

Invariants (checked by `check_invariants`, which tests call after every step):
  * block 0 is the null block: never allocated, used as padding by runners;
  * ref_cnt[b] == number of running requests whose block table holds b;
  * a block is in the free queue iff ref_cnt == 0 (and it is not the null block);
  * every entry hash -> b of the cache map has block_hash[b] == hash.

Block keys are SHA-256 digests chained through the parent block's digest, so a prompt cannot be crafted to
land on another request's cached blocks: with Python's `hash()` (64 bits, `hash(n) == hash(n + 2**61 - 1)`,
`hash(-1) == hash(-2)`) two different prefixes can share a key, and a hit is taken without comparing tokens.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable, Sequence

from strata.core.request import Request

NULL_BLOCK = 0


ROOT_HASH = hashlib.sha256(b"strata kv block root").digest()


def hash_block(parent_hash: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """Chained SHA-256: a block's identity is its tokens, everything before them (the parent's digest) and
    an optional extra key (e.g. a per-tenant cache salt, on the first block). The encoding is unambiguous:
    32-byte parent, 4-byte length of `extra`, `extra`, then the token ids as fixed-width int64."""
    h = hashlib.sha256(parent_hash or ROOT_HASH)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # Free blocks in eviction order (front = least recently freed). Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:  # evict the LRU cached block
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None
        self.ref_cnt[b] = 1
        return b

    def touch(self, b: int) -> None:
        """Take a reference on a (possibly free) cached block."""
        if self.ref_cnt[b] == 0:
            del self.free[b]
        self.ref_cnt[b] += 1

    def release(self, b: int) -> None:
        self.ref_cnt[b] -= 1
        assert self.ref_cnt[b] >= 0, f"block {b} released below zero"
        if self.ref_cnt[b] == 0:
            self.free[b] = None  # most recently freed: evicted last

    def register(self, b: int, h: bytes) -> None:
        if self.block_hash[b] is not None:
            return
        if h in self.cached:  # same content computed twice concurrently: keep the first
            return
        self.block_hash[b] = h
        self.cached[h] = b


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached

    # ---- capacity ----
    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- hashing ----
    def _update_hashes(self, req: Request, upto_tokens: int) -> None:
        """Extend req.block_hashes to cover every full block within the first `upto_tokens` tokens."""
        assert upto_tokens <= req.num_tokens, f"{req}: hashing tokens not known on the host"
        bs = self.block_size
        hashes = req.block_hashes
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            extra = req.cache_salt.encode() if i == 0 and req.cache_salt else b""
            hashes.append(hash_block(parent, req.tokens(i * bs, (i + 1) * bs), extra))

    # ---- prefix lookup ----
    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of req's known tokens, as (block ids, tokens). At least one token is
        always left to compute, so a full hit drops its last block."""
        if not self.enable_prefix_caching:
            return [], 0
        self._update_hashes(req, req.num_tokens)
        blocks = []
        for h in req.block_hashes:
            b = self.pool.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        if blocks and len(blocks) * self.block_size >= req.num_tokens:
            blocks.pop()
        n = len(blocks) * self.block_size
        self.prefix_queries += req.num_tokens
        self.prefix_hits += n
        return blocks, n

    # ---- allocation ----
    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make req's block table hold num_computed_tokens + num_new_tokens tokens (after attaching
        `computed_blocks` on first schedule). Returns False, changing nothing, if blocks run out."""
        computed_blocks = computed_blocks or []
        base = len(computed_blocks) * self.block_size if computed_blocks else req.num_computed_tokens
        total = base + num_new_tokens
        need = self.blocks_needed(total) - len(req.block_ids) - len(computed_blocks)
        # Cached free blocks we are about to touch are not available for allocation.
        reusable_free = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        if need > self.pool.num_free - reusable_free:
            return False
        for b in computed_blocks:
            self.pool.touch(b)
        req.block_ids.extend(computed_blocks)
        for _ in range(max(need, 0)):
            req.block_ids.append(self.pool.allocate())
        return True

    def cache_full_blocks(self, req: Request, num_computed: int | None = None) -> None:
        """Register every block whose tokens are all computed (called after each step). `num_computed`:
        the positions whose KV a finished step wrote (default req.num_computed_tokens, which with async
        scheduling may include a step still in flight); their tokens must be known on the host."""
        if not self.enable_prefix_caching:
            return
        upto = req.num_computed_tokens if num_computed is None else num_computed
        n_full = min(upto // self.block_size, len(req.block_ids))
        if n_full <= req.num_registered_blocks:  # the common decode step: no block filled up
            return
        self._update_hashes(req, upto)
        for i in range(req.num_registered_blocks, n_full):  # earlier ones were registered (or shared) already
            b = req.block_ids[i]
            if self.pool.block_hash[b] is None:
                self.pool.register(b, req.block_hashes[i])
        req.num_registered_blocks = n_full

    def free(self, req: Request) -> None:
        # Tail first, so that the tail of a sequence is evicted before its (more shareable) head.
        for b in reversed(req.block_ids):
            self.pool.release(b)
        req.block_ids = []
        req.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.pool.cached.items()):
            if self.pool.ref_cnt[b] == 0:
                del self.pool.cached[h]
                self.pool.block_hash[b] = None

    # ---- checks ----
    def check_invariants(self, live: Iterable[Request]) -> None:
        pool = self.pool
        refs = [0] * pool.num_blocks
        for r in live:
            for b in r.block_ids:
                refs[b] += 1
            assert len(r.block_ids) * self.block_size >= r.num_computed_tokens, f"{r}: blocks short of computed tokens"
        assert refs[NULL_BLOCK] == 0 and NULL_BLOCK not in pool.free, "null block in use"
        for b in range(1, pool.num_blocks):
            assert refs[b] == pool.ref_cnt[b], f"block {b}: ref_cnt {pool.ref_cnt[b]} but held {refs[b]} times"
            assert (b in pool.free) == (refs[b] == 0), f"block {b}: free-queue membership wrong"
        for h, b in pool.cached.items():
            assert pool.block_hash[b] == h, f"cache map entry for block {b} is stale"

"""Paged KV cache bookkeeping: which physical blocks each request uses.

What it is for: a pool of `num_blocks` blocks of `block_size` token slots with
reference counts, and a prefix cache that lets a request reuse the blocks of an
earlier request whose leading FULL blocks hold the same tokens, the same images
(`MultimodalSpan.content_hash`) and the same `cache_salt`. It answers "no room"
(None) and never decides who gets preempted: that is the scheduler's job.

Not for: tensors. The model runner owns the K/V tensors and indexes them with
the block ids handed out here (block id b, slot s -> flat slot b * block_size + s).
Not thread-safe: only the engine thread calls it.

Block states: *free* (refcount 0, no hash), *in use* (refcount > 0, hashed
once full and computed), *evictable* (refcount 0 but hashed: still a prefix-cache
hit until allocation needs it; least recently freed is evicted first).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.errors import FieldError
from runtime.core.request import Request


class KVCacheConfigError(FieldError):
    """A KV cache setting or call argument is out of range; `field` names it."""


class KVCacheInvariantError(RuntimeError):
    """The block bookkeeping is inconsistent (a bug, never a user error)."""


def hash_block_tokens(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> bytes:
    """Deterministic hash of one full block, chained on its parent block's hash.

    Every part is length-prefixed, so no two different inputs share an encoding.
    """
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(b"\x01" + parent_hash if parent_hash is not None else b"\x00")
    hasher.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra_keys:
        data = key.encode("utf-8")
        hasher.update(struct.pack("<I", len(data)) + data)
    return hasher.digest()


def block_extra_keys(request: Request, block_index: int, block_size: int) -> tuple[str, ...]:
    """Keys besides the token ids that decide whether a block's K/V can be shared.

    The cache salt goes into the first block only (the chain carries it on);
    an image's content hash goes into every block its placeholder tokens touch.
    """
    start = block_index * block_size
    end = start + block_size
    keys: list[str] = []
    if block_index == 0 and request.cache_salt is not None:
        keys.append("salt:" + request.cache_salt)
    for span in request.mm_spans:
        if span.offset < end and span.offset + span.length > start:
            keys.append("mm:" + span.content_hash)
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """A snapshot of the pool and prefix-cache counters, for metrics and tests."""

    total_num_blocks: int
    num_free_blocks: int          # free plus evictable
    num_used_blocks: int
    num_cached_blocks: int        # blocks holding a registered prefix hash (used or evictable)
    num_queried_tokens: int
    num_hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


@dataclass(slots=True)
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of block_ids[:len(block_hashes)] (full, computed blocks),
    # kept whether or not each one won the registration in the prefix cache.
    block_hashes: list[bytes] = field(default_factory=list)


class KVCacheManager:
    """Block pool with reference counts and a hash-chained prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVCacheConfigError(name, f"must be an integer >= 1, got {value!r}")
        self._block_size = block_size
        self._enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(block_id) for block_id in range(num_blocks)]
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        # Hashed blocks with refcount 0, least recently freed first.
        self._evictable_block_ids: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block_id: dict[bytes, int] = {}
        self._requests: dict[str, _RequestBlocks] = {}
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    # ------------------------------------------------------------------ sizes

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._enable_prefix_caching

    @property
    def total_num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: truly free plus evictable cached ones."""
        return len(self._free_block_ids) + len(self._evictable_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return len(self._blocks) - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block_id)

    @property
    def num_queried_tokens(self) -> int:
        return self._num_queried_tokens

    @property
    def num_hit_tokens(self) -> int:
        return self._num_hit_tokens

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-max(num_tokens, 0) // self._block_size)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            total_num_blocks=self.total_num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_used_blocks=self.num_used_blocks,
            num_cached_blocks=self.num_cached_blocks,
            num_queried_tokens=self._num_queried_tokens,
            num_hit_tokens=self._num_hit_tokens,
        )

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy); empty when it holds no blocks."""
        state = self._requests.get(request_id)
        return list(state.block_ids) if state is not None else []

    # ------------------------------------------------------------ prefix cache

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request: (block ids, number of tokens).

        Never covers every known token: the model must compute at least the last
        one to produce its logits. Does not take references; pass the ids to
        `allocate_slots` right away (before any other allocation can evict them).
        """
        if not self._enable_prefix_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self._block_size
        token_ids = request.all_token_ids
        hit_block_ids: list[int] = []
        parent_hash: bytes | None = None
        for index in range(max_hit_blocks):
            start = index * self._block_size
            block_hash = hash_block_tokens(
                parent_hash,
                token_ids[start:start + self._block_size],
                block_extra_keys(request, index, self._block_size),
            )
            block_id = self._hash_to_block_id.get(block_hash)
            if block_id is None:
                break
            hit_block_ids.append(block_id)
            parent_hash = block_hash
        return hit_block_ids, len(hit_block_ids) * self._block_size

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the hashes of the request's blocks that are now full and computed."""
        state = self._requests.get(request.request_id)
        if not self._enable_prefix_caching or state is None:
            return
        num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        num_full_blocks = min(num_computed_tokens, num_tokens, len(state.block_ids) * self._block_size) // self._block_size
        if num_full_blocks <= len(state.block_hashes):
            return
        token_ids = request.all_token_ids
        parent_hash = state.block_hashes[-1] if state.block_hashes else None
        for index in range(len(state.block_hashes), num_full_blocks):
            start = index * self._block_size
            block_hash = hash_block_tokens(
                parent_hash,
                token_ids[start:start + self._block_size],
                block_extra_keys(request, index, self._block_size),
            )
            state.block_hashes.append(block_hash)
            block = self._blocks[state.block_ids[index]]
            # When another block already holds this content, keep that one as the
            # cache entry; this block simply becomes free when released.
            if block.block_hash is None and block_hash not in self._hash_to_block_id:
                block.block_hash = block_hash
                self._hash_to_block_id[block_hash] = block.block_id
            parent_hash = block_hash

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash; evictable blocks become free. Returns how many hashes."""
        num_dropped = len(self._hash_to_block_id)
        for block_id in self._hash_to_block_id.values():
            self._blocks[block_id].block_hash = None
        self._hash_to_block_id.clear()
        self._free_block_ids.extend(self._evictable_block_ids)
        self._evictable_block_ids.clear()
        return num_dropped

    # --------------------------------------------------------------- lifecycle

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Make the request hold blocks for all its computed tokens plus `num_new_tokens`.

        Tokens covered: `request.num_computed_tokens + len(computed_blocks) * block_size
        + num_new_tokens` (the prefix hit is not yet counted in num_computed_tokens;
        the scheduler sets that after this call succeeds). `computed_blocks` (from
        `get_computed_blocks`) are only accepted on the request's first allocation
        and are shared by reference count. Returns the request's whole block table,
        or None when the pool has no room, in which case nothing changed.
        """
        if num_new_tokens < 0:
            raise KVCacheConfigError("num_new_tokens", f"must be >= 0, got {num_new_tokens}")
        state = self._requests.get(request.request_id)
        if state is not None and not computed_blocks:       # a running request (every decode step)
            num_held = len(state.block_ids)
            if -(-(request.num_computed_tokens + num_new_tokens) // self._block_size) <= num_held:
                return state.block_ids[:]                   # its blocks already hold the new tokens
        computed = computed_blocks or []
        if state is not None and computed:
            raise KVCacheConfigError(
                "computed_blocks", f"request {request.request_id!r} already holds blocks")
        for block_id in computed:
            if self._blocks[block_id].block_hash is None:
                raise KVCacheConfigError("computed_blocks", f"block {block_id} holds no cached prefix")
        num_held = len(state.block_ids) if state is not None else 0
        num_tokens = request.num_computed_tokens + len(computed) * self._block_size + num_new_tokens
        num_new_blocks = max(self.num_blocks_needed(num_tokens) - num_held - len(computed), 0)
        # Hit blocks that sit in the evictable pool stop being allocatable once taken.
        num_evictable_hits = sum(1 for b in computed if self._blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - num_evictable_hits:
            return None
        if state is None:
            state = _RequestBlocks()
            self._requests[request.request_id] = state
            for block_id in computed:
                self._take_reference(block_id)
                state.block_ids.append(block_id)
                state.block_hashes.append(self._blocks[block_id].block_hash or b"")
            if self._enable_prefix_caching:
                self._num_queried_tokens += request.num_tokens
                self._num_hit_tokens += len(computed) * self._block_size
        for _ in range(num_new_blocks):
            state.block_ids.append(self._allocate_block())
        return list(state.block_ids)

    def free(self, request: Request) -> None:
        """Drop the request's references. Idempotent.

        Blocks are released tail first, so a request's last blocks are evicted
        before its first ones (the shared prefix stays cached longest).
        """
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return
        for block_id in reversed(state.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is not None:
                self._evictable_block_ids[block_id] = None
            else:
                self._free_block_ids.append(block_id)

    def _take_reference(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._evictable_block_ids[block_id]
        block.ref_count += 1

    def _allocate_block(self) -> int:
        if self._free_block_ids:
            block = self._blocks[self._free_block_ids.popleft()]
        else:
            block_id, _ = self._evictable_block_ids.popitem(last=False)
            block = self._blocks[block_id]
            if block.block_hash is not None:
                del self._hash_to_block_id[block.block_hash]
                block.block_hash = None
        block.ref_count = 1
        return block.block_id

    # -------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """Raise KVCacheInvariantError if the bookkeeping is inconsistent (for tests)."""
        holders = [0] * len(self._blocks)
        for request_id, state in self._requests.items():
            if len(set(state.block_ids)) != len(state.block_ids):
                raise KVCacheInvariantError(f"request {request_id!r} holds a block twice")
            if len(state.block_hashes) > len(state.block_ids):
                raise KVCacheInvariantError(f"request {request_id!r} has more hashes than blocks")
            for block_id in state.block_ids:
                holders[block_id] += 1
        free_ids = set(self._free_block_ids)
        if len(free_ids) != len(self._free_block_ids):
            raise KVCacheInvariantError("a block is in the free list twice")
        evictable_ids = set(self._evictable_block_ids)
        for block in self._blocks:
            self._check_block(block, holders[block.block_id], block.block_id in free_ids,
                              block.block_id in evictable_ids)
        for block_hash, block_id in self._hash_to_block_id.items():
            if self._blocks[block_id].block_hash != block_hash:
                raise KVCacheInvariantError(f"hash entry points to block {block_id} with another hash")
        num_hashed = sum(1 for block in self._blocks if block.block_hash is not None)
        if num_hashed != len(self._hash_to_block_id):
            raise KVCacheInvariantError("a hashed block is missing from the hash table")

    def _check_block(self, block: _Block, num_holders: int, in_free: bool, in_evictable: bool) -> None:
        where = f"block {block.block_id}"
        if block.ref_count != num_holders:
            raise KVCacheInvariantError(
                f"{where}: ref_count {block.ref_count} but {num_holders} requests hold it")
        if block.ref_count > 0 and (in_free or in_evictable):
            raise KVCacheInvariantError(f"{where}: in use and free at once")
        if block.ref_count == 0 and in_free == in_evictable:
            raise KVCacheInvariantError(f"{where}: unused but in {'both' if in_free else 'neither'} pool(s)")
        if in_free and block.block_hash is not None:
            raise KVCacheInvariantError(f"{where}: free but still hashed")
        if in_evictable and block.block_hash is None:
            raise KVCacheInvariantError(f"{where}: evictable without a hash")

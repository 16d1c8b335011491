"""KVCacheManager: block pool, reference counts, hash-chained prefix cache, LRU eviction."""
from __future__ import annotations

import pytest

from runtime.core.kv_cache import (
    KVCacheConfigError,
    KVCacheManager,
    block_extra_keys,
    hash_block_tokens,
)
from runtime.core.request import MultimodalSpan, Request
from tests.helpers.requests import make_request


def compute_all(kv: KVCacheManager, request: Request) -> list[int]:
    """Allocate for the whole prompt (after a prefix hit) and mark it computed and cached."""
    hit_blocks, num_hit = kv.get_computed_blocks(request)
    block_ids = kv.allocate_slots(request, request.num_tokens - num_hit, hit_blocks)
    assert block_ids is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request, request.num_computed_tokens)
    kv.check_invariants()
    return block_ids


def assert_all_free(kv: KVCacheManager) -> None:
    kv.check_invariants()
    assert kv.num_used_blocks == 0
    assert kv.num_free_blocks == kv.total_num_blocks


def test_allocate_free_round_trip() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    request = make_request("a", list(range(10)))
    block_ids = kv.allocate_slots(request, 10)
    assert block_ids is not None and len(block_ids) == 3
    assert len(set(block_ids)) == 3
    assert kv.block_ids("a") == block_ids
    assert (kv.num_used_blocks, kv.num_free_blocks) == (3, 7)
    kv.check_invariants()
    kv.free(request)
    kv.free(request)                       # idempotent
    assert kv.block_ids("a") == []
    assert_all_free(kv)


def test_decode_grows_one_block_at_the_boundary() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    request = make_request("a", [1, 2, 3])
    assert len(kv.allocate_slots(request, 3) or []) == 1
    request.num_computed_tokens = 3
    assert len(kv.allocate_slots(request, 1) or []) == 1      # token 4 still fits block 0
    request.num_computed_tokens = 4
    assert len(kv.allocate_slots(request, 1) or []) == 2      # token 5 needs block 1
    kv.check_invariants()
    kv.free(request)
    assert_all_free(kv)


def test_second_request_reuses_three_full_blocks() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", list(range(14)))                # 3 full blocks + 2 tokens
    first_blocks = compute_all(kv, first)
    assert kv.num_cached_blocks == 3
    second = make_request("b", list(range(12)) + [90, 91, 92])
    hit_blocks, num_hit = kv.get_computed_blocks(second)
    assert hit_blocks == first_blocks[:3] and num_hit == 12
    second_blocks = kv.allocate_slots(second, second.num_tokens - num_hit, hit_blocks)
    assert second_blocks is not None and second_blocks[:3] == first_blocks[:3]
    assert len(second_blocks) == 4 and second_blocks[3] not in first_blocks
    assert kv.num_used_blocks == 5                            # 3 shared + 1 + 1
    assert kv.num_hit_tokens == 12 and kv.num_queried_tokens == 14 + 15
    assert kv.stats().hit_rate == pytest.approx(12 / 29)
    kv.check_invariants()
    kv.free(first)
    assert kv.num_used_blocks == 4                            # the shared three stay held
    kv.check_invariants()
    kv.free(second)
    assert kv.num_cached_blocks == 3                          # evictable, still hits
    assert_all_free(kv)


def test_refcounts_with_shared_prefixes_in_any_free_order() -> None:
    kv = KVCacheManager(num_blocks=12, block_size=2)
    base = make_request("base", [5, 6, 7, 8, 9])
    compute_all(kv, base)
    others = [make_request(f"r{i}", [5, 6, 7, 8, 100 + i]) for i in range(3)]
    for request in others:
        compute_all(kv, request)
        assert kv.block_ids(request.request_id)[:2] == kv.block_ids("base")[:2]
    assert kv.num_used_blocks == 3 + 3                        # 2 shared + 1 tail each
    for request in (others[1], base, others[2], others[0]):
        kv.free(request)
        kv.check_invariants()
    assert_all_free(kv)


def test_different_image_hash_gives_no_hit_on_blocks_it_touches() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = [1, 2, 3, 4, 0, 0, 0, 0, 9, 9, 9]                 # image placeholders in block 1
    cat = (MultimodalSpan(offset=4, length=4, content_hash="cat"),)
    dog = (MultimodalSpan(offset=4, length=4, content_hash="dog"),)
    first = make_request("a", prompt, mm_spans=cat)
    compute_all(kv, first)
    same_image = make_request("b", prompt, mm_spans=cat)
    assert kv.get_computed_blocks(same_image)[1] == 8
    other_image = make_request("c", prompt, mm_spans=dog)
    hit_blocks, num_hit = kv.get_computed_blocks(other_image)
    assert num_hit == 4 and hit_blocks == kv.block_ids("a")[:1]   # text block 0 still shared
    assert block_extra_keys(first, 1, 4) == ("mm:cat",)
    assert block_extra_keys(first, 0, 4) == ()
    kv.free(first)
    assert_all_free(kv)


def test_different_cache_salt_gives_no_hit() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(13))
    first = make_request("a", prompt, salt="tenant-1")
    compute_all(kv, first)
    assert kv.get_computed_blocks(make_request("b", prompt, salt="tenant-1"))[1] == 12
    assert kv.get_computed_blocks(make_request("c", prompt, salt="tenant-2")) == ([], 0)
    assert kv.get_computed_blocks(make_request("d", prompt)) == ([], 0)
    kv.free(first)
    assert_all_free(kv)


def test_lru_evicts_least_recently_freed_cached_block_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    first, second = make_request("a", [1, 2]), make_request("b", [3, 4])
    compute_all(kv, first)
    compute_all(kv, second)
    kv.free(first)
    kv.free(second)                                           # evictable order: a, b
    assert (kv.num_cached_blocks, kv.num_free_blocks) == (2, 4)
    filler = make_request("f", [7, 7, 7, 7, 7, 7])
    assert kv.allocate_slots(filler, 6) is not None           # 2 truly free + evicts a's block
    assert kv.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("qa", [1, 2, 0])) == ([], 0)
    assert kv.get_computed_blocks(make_request("qb", [3, 4, 0]))[1] == 2
    kv.check_invariants()
    kv.free(filler)
    assert_all_free(kv)


def test_hit_refreshes_lru_position() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=2)
    first, second = make_request("a", [1, 2]), make_request("b", [3, 4])
    compute_all(kv, first)
    compute_all(kv, second)
    kv.free(first)
    kv.free(second)                                           # evictable order: a, b
    again = make_request("a2", [1, 2, 5])
    compute_all(kv, again)                                    # reuses a's block, takes the free one
    kv.free(again)                                            # order now: b, a, a2's tail (unhashed)
    filler = make_request("f", [8, 8, 8, 8])
    assert kv.allocate_slots(filler, 4) is not None           # free tail, then evicts b
    assert kv.get_computed_blocks(make_request("qa", [1, 2, 0]))[1] == 2
    assert kv.get_computed_blocks(make_request("qb", [3, 4, 0]))[1] == 0
    kv.free(filler)
    assert_all_free(kv)


def test_allocate_returns_none_and_leaks_nothing_when_full() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    cached = make_request("c", list(range(9)))
    compute_all(kv, cached)
    kv.free(cached)                                           # 2 evictable cached blocks
    holder = make_request("h", [50] * 8)
    assert kv.allocate_slots(holder, 8) is not None           # 2 free blocks
    before = kv.stats()
    big = make_request("big", list(range(9)) + [1] * 8)       # hits 2 blocks, needs 3 more
    hit_blocks, num_hit = kv.get_computed_blocks(big)
    assert num_hit == 8
    assert kv.allocate_slots(big, big.num_tokens - num_hit, hit_blocks) is None
    assert kv.stats() == before and kv.block_ids("big") == []
    assert kv.get_computed_blocks(big) == (hit_blocks, 8)     # hits still cached
    holder.num_computed_tokens = 8
    assert kv.allocate_slots(holder, 9) is None               # growth of a holder: no partial leak
    assert len(kv.block_ids("h")) == 2
    assert kv.stats() == before
    kv.check_invariants()
    kv.free(holder)
    assert_all_free(kv)


def test_whole_prompt_cached_leaves_the_last_block_to_compute() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", list(range(8)))
    compute_all(kv, first)
    hit_blocks, num_hit = kv.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit == 4 and len(hit_blocks) == 1              # not 8: the last token must run
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[1] == 8
    kv.free(first)
    assert_all_free(kv)


def test_duplicate_content_keeps_one_cache_entry() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    first, second = make_request("a", [1, 2, 3]), make_request("b", [1, 2, 3])
    for request in (first, second):                           # computed in the same step: no hit
        assert kv.allocate_slots(request, 3) is not None
    for request in (first, second):
        request.num_computed_tokens = 3
        kv.cache_full_blocks(request, 3)
    assert kv.num_cached_blocks == 1
    kv.check_invariants()
    kv.free(first)
    kv.free(second)
    assert kv.num_cached_blocks == 1
    assert_all_free(kv)


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    first = make_request("a", [1, 2, 3, 4, 5])
    compute_all(kv, first)
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == ([], 0)
    assert kv.stats().hit_rate == 0.0
    kv.free(first)
    assert_all_free(kv)


def test_computed_blocks_only_on_first_allocation() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    first = make_request("a", [1, 2, 3])
    compute_all(kv, first)
    second = make_request("b", [1, 2, 3])
    hit_blocks, num_hit = kv.get_computed_blocks(second)
    assert kv.allocate_slots(second, 1, hit_blocks) is not None
    with pytest.raises(KVCacheConfigError, match="computed_blocks"):
        kv.allocate_slots(second, 1, hit_blocks)
    with pytest.raises(KVCacheConfigError, match="num_new_tokens"):
        kv.allocate_slots(second, -1)
    kv.free(first)
    kv.free(second)
    assert_all_free(kv)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    first = make_request("a", [1, 2, 3, 4, 5])
    compute_all(kv, first)
    kv.free(first)
    assert kv.reset_prefix_cache() == 2
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == ([], 0)
    assert_all_free(kv)


@pytest.mark.parametrize("field_name, num_blocks, block_size", [
    ("num_blocks", 0, 4),
    ("block_size", 4, 0),
    ("block_size", 4, True),
])
def test_constructor_rejects_bad_sizes(field_name: str, num_blocks: int, block_size: int) -> None:
    with pytest.raises(KVCacheConfigError) as info:
        KVCacheManager(num_blocks, block_size)
    assert info.value.field == field_name and str(info.value).startswith(field_name)


def test_block_hash_is_deterministic_and_covers_every_part() -> None:
    base = hash_block_tokens(None, [1, 2, 3], ("mm:x",))
    assert base == hash_block_tokens(None, [1, 2, 3], ("mm:x",))
    assert len(base) == 16
    variants = {
        hash_block_tokens(base, [1, 2, 3], ("mm:x",)),
        hash_block_tokens(None, [1, 2, 4], ("mm:x",)),
        hash_block_tokens(None, [1, 2, 3], ("mm:y",)),
        hash_block_tokens(None, [1, 2, 3], ()),
        hash_block_tokens(None, [1, 2, 3], ("mm:", "x")),     # length-prefixed: no aliasing
    }
    assert base not in variants and len(variants) == 5

from loom.engine.page_pool import PagePool
from loom.engine.prefix_cache import PrefixCache, chain_keys


def test_chain_keys_name_the_whole_prefix() -> None:
    a = chain_keys([1, 2, 3, 4, 5, 6], 2, 3)
    b = chain_keys([9, 9, 3, 4, 5, 6], 2, 3)
    assert len(a) == 3 and len(set(a)) == 3
    # Same page contents after a different first page -> different keys.
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert chain_keys([1, 2, 3, 4], 2, 1) == a[:1]
    # Continuing a chain from its last key equals computing it whole.
    assert chain_keys([5, 6], 2, 1, parent=a[1]) == a[2:]


def test_match_returns_longest_prefix_with_a_reference() -> None:
    pool = PagePool(8, page_size=2)
    cache = PrefixCache(pool)
    pages = pool.allocate(3)
    keys = chain_keys([1, 2, 3, 4, 5, 6], 2, 3)
    cache.insert(keys, pages)
    pool.free(pages)  # the request is done; the cache alone holds them
    assert pool.num_free == 5 and cache.num_evictable == 3
    other = chain_keys([1, 2, 3, 4, 7, 7], 2, 3)
    got = cache.match(other)
    assert got == pages[:2]
    assert pool.refcount(pages[0]) == 2 and cache.num_evictable == 1
    pool.free(got)


def test_eviction_is_lru_and_tail_first_and_spares_used_pages() -> None:
    pool = PagePool(4, page_size=2)
    cache = PrefixCache(pool)
    old = pool.allocate(2)
    cache.insert(chain_keys([1, 1, 2, 2], 2, 2), old)
    pool.free(old)
    new = pool.allocate(2)
    cache.insert(chain_keys([3, 3, 4, 4], 2, 2), new)
    # `new` still held by its request: not evictable.
    assert pool.num_free == 0 and cache.num_evictable == 2
    # Allocation reclaims from the cache: oldest chain, tail page first.
    [p] = pool.allocate(1)
    assert p == old[1]
    assert cache.match(chain_keys([1, 1, 2, 2], 2, 2)) == [old[0]]
    pool.free([old[0]])
    pool.free([p])
    pool.free(new)
    cache.clear()
    assert len(cache) == 0 and pool.num_free == 4

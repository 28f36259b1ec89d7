import pytest

from loom.engine.page_pool import PagePool
from loom.errors import OutOfPagesError


def test_allocate_and_free_return_pages() -> None:
    pool = PagePool(8, page_size=4)
    pages = pool.allocate(3)
    assert len(set(pages)) == 3 and pool.num_free == 5
    assert all(pool.refcount(p) == 1 for p in pages)
    pool.free(pages)
    assert pool.num_free == 8


def test_refcount_sharing_keeps_page_until_last_holder() -> None:
    pool = PagePool(4)
    [p] = pool.allocate(1)
    pool.incref([p])
    assert pool.is_shared(p)
    pool.free([p])
    assert pool.num_free == 3 and not pool.is_shared(p)
    pool.free([p])
    assert pool.num_free == 4


def test_out_of_pages_allocates_nothing() -> None:
    pool = PagePool(4)
    pool.allocate(3)
    with pytest.raises(OutOfPagesError):
        pool.allocate(2)
    assert pool.num_free == 1


def test_double_free_is_caught() -> None:
    pool = PagePool(2)
    [p] = pool.allocate(1)
    pool.free([p])
    with pytest.raises(AssertionError):
        pool.free([p])


def test_pages_for_and_fresh_tracking() -> None:
    pool = PagePool(10, page_size=16)
    assert [pool.pages_for(n) for n in (1, 16, 17, 32)] == [1, 1, 2, 2]
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert pool.drain_fresh() == a + b
    assert pool.drain_fresh() == []

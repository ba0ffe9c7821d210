"""The worker's in-memory cache: LRU, TTL, stats, clears, bypass, threads, and reading through it."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from cachebus.workers.cache import Cache, Purgeable, cached

from .support import FakeClock, run_threads

STATS_KEYS = {"entries", "max_entries", "ttl", "hits", "misses", "hit_ratio", "evictions", "purges",
              "last_clear_id", "last_clear_seq", "last_purge_at", "bypass", "bypass_seconds"}


def test_get_set_delete():
    cache = Cache()
    assert cache.get("a") is None
    assert cache.get("a", "fallback") == "fallback"
    cache.set("a", 1)
    cache.set(("tuple", "key"), {"x": 1})
    assert cache.get("a") == 1
    assert cache.get(("tuple", "key")) == {"x": 1}
    cache.set("a", 2)
    assert cache.get("a") == 2
    assert len(cache) == 2
    assert "a" in cache and "b" not in cache
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert "a" not in cache
    assert len(cache) == 1


def test_none_and_falsy_values_are_cached():
    cache = Cache()
    sentinel = object()
    cache.set("none", None)
    cache.set("zero", 0)
    assert cache.get("none", sentinel) is None
    assert cache.get("zero", sentinel) == 0
    assert cache.delete("none") is True
    assert cache.stats()["hits"] == 2


def test_clear_drops_everything_and_records_the_clear():
    cache = Cache()
    for i in range(5):
        cache.set(i, i)
    before = time.time()
    assert cache.clear(clear_id="c-1", seq=7) == 5
    assert len(cache) == 0 and cache.get(0) is None
    stats = cache.stats()
    assert stats["purges"] == 1
    assert stats["last_clear_id"] == "c-1"
    assert stats["last_clear_seq"] == 7
    assert before <= stats["last_purge_at"] <= time.time()

    # A purge with no clear behind it keeps the last id and seq.
    cache.set("x", 1)
    assert cache.clear() == 1
    assert cache.clear(seq=9) == 0
    stats = cache.stats()
    assert stats["purges"] == 3
    assert stats["last_clear_id"] == "c-1"
    assert stats["last_clear_seq"] == 9


def test_lru_evicts_least_recently_used():
    cache = Cache(max_entries=3)
    for key in "abc":
        cache.set(key, key.upper())
    cache.set("d", "D")
    assert "a" not in cache
    assert [k for k in "abcd" if k in cache] == ["b", "c", "d"]
    assert cache.stats()["evictions"] == 1
    assert len(cache) == 3


def test_get_refreshes_recency():
    cache = Cache(max_entries=3)
    for key in "abc":
        cache.set(key, key)
    assert cache.get("a") == "a"
    cache.set("d", "d")
    assert "b" not in cache
    assert {k for k in "abcd" if k in cache} == {"a", "c", "d"}


def test_set_replacing_refreshes_recency_without_evicting():
    cache = Cache(max_entries=2)
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set("a", 10)
    assert cache.stats()["evictions"] == 0
    cache.set("c", 3)
    assert "b" not in cache
    assert cache.get("a") == 10


def test_contains_counts_no_hit_or_miss_and_keeps_recency():
    cache = Cache(max_entries=2)
    cache.set("a", 1)
    cache.set("b", 2)
    assert "a" in cache and "z" not in cache
    cache.set("c", 3)
    assert "a" not in cache
    stats = cache.stats()
    assert stats["hits"] == stats["misses"] == 0


def test_ttl_expiry():
    clock = FakeClock()
    cache = Cache(ttl=10, clock=clock)
    cache.set("a", 1)
    clock.advance(5)
    cache.set("b", 2)
    clock.advance(4.9)
    assert cache.get("a") == 1
    assert "a" in cache and len(cache) == 2
    clock.advance(0.1)
    # a (set at t=0) has expired; b (set at t=5) has not.
    assert "a" not in cache
    assert len(cache) == cache.stats()["entries"] == 1
    assert cache.get("a", "gone") == "gone"
    assert cache.get("b") == 2
    clock.advance(5)
    assert cache.get("b") is None
    assert len(cache) == 0
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (2, 2)
    assert stats["evictions"] == 0


def test_ttl_restarts_when_a_key_is_set_again_but_not_when_read():
    clock = FakeClock()
    cache = Cache(ttl=10, clock=clock)
    cache.set("a", 1)
    cache.set("b", 1)
    clock.advance(8)
    cache.set("a", 2)
    assert cache.get("b") == 1
    clock.advance(2)
    assert "b" not in cache
    assert cache.get("a") == 2
    clock.advance(8)
    assert "a" not in cache


def test_expired_entries_are_not_counted_by_delete_or_clear():
    clock = FakeClock()
    cache = Cache(ttl=1, clock=clock)
    cache.set("old", 1)
    cache.set("older", 1)
    clock.advance(1)
    cache.set("new", 1)
    assert cache.delete("old") is False
    assert cache.clear() == 1


def test_expired_entries_make_room_before_live_ones_are_evicted():
    clock = FakeClock()
    cache = Cache(max_entries=2, ttl=1, clock=clock)
    cache.set("a", 1)
    clock.advance(0.5)
    cache.set("b", 2)
    clock.advance(0.5)
    cache.set("c", 3)
    assert {k for k in "abc" if k in cache} == {"b", "c"}
    assert cache.stats()["evictions"] == 0


def test_hit_miss_accounting():
    cache = Cache()
    assert cache.stats()["hit_ratio"] == 0.0
    cache.set("a", 1)
    cache.get("a")
    cache.get("a")
    cache.get("a")
    cache.get("missing")
    stats = cache.stats()
    assert stats["hits"] == 3
    assert stats["misses"] == 1
    assert stats["hit_ratio"] == 0.75


def test_stats_keys_and_json():
    cache = Cache(max_entries=5, ttl=30, clock=FakeClock())
    cache.set("a", 1)
    stats = cache.stats()
    assert set(stats) == STATS_KEYS
    assert json.loads(json.dumps(stats)) == stats
    assert stats["entries"] == len(cache) == 1
    assert stats["max_entries"] == 5
    assert stats["ttl"] == 30
    assert stats["last_clear_id"] is None
    assert stats["last_clear_seq"] is None
    assert stats["last_purge_at"] is None
    assert stats["bypass"] is False
    assert stats["bypass_seconds"] == 0.0


def test_bypass_get_misses_and_set_is_not_kept():
    cache = Cache()
    cache.set("a", 1)
    cache.set_bypass(True)
    assert cache.bypass is True
    assert cache.get("a") is None
    assert cache.get("a", "default") == "default"
    cache.set("b", 2)
    assert "b" not in cache
    stats = cache.stats()
    assert stats["bypass"] is True
    assert (stats["hits"], stats["misses"]) == (0, 2)
    assert cache.bypass_misses == 2

    cache.set_bypass(False)
    assert cache.bypass is False
    assert cache.get("a") == 1
    assert cache.get("b") is None
    assert cache.bypass_misses == 2
    assert cache.stats()["misses"] == 3


def test_entering_bypass_keeps_entries():
    cache = Cache()
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set_bypass(True)
    assert len(cache) == cache.stats()["entries"] == 2
    assert "a" in cache
    cache.set_bypass(False)
    assert cache.get("a") == 1 and cache.get("b") == 2


def test_set_while_bypassed_drops_the_older_value():
    cache = Cache()
    cache.set("a", "old")
    cache.set_bypass(True)
    cache.set("a", "new")
    cache.set_bypass(False)
    assert cache.get("a") is None


def test_clear_works_while_bypassed():
    cache = Cache()
    cache.set("a", 1)
    cache.set_bypass(True)
    assert cache.clear(clear_id="c", seq=1) == 1
    assert cache.bypass is True
    cache.set_bypass(False)
    assert len(cache) == 0


def test_bypass_seconds_accumulates():
    clock = FakeClock()
    cache = Cache(clock=clock)
    clock.advance(100)
    assert cache.stats()["bypass_seconds"] == 0.0
    cache.set_bypass(True)
    clock.advance(3)
    assert cache.stats()["bypass_seconds"] == 3.0  # the current stretch counts
    cache.set_bypass(True)  # no-op: does not restart the stretch
    clock.advance(2)
    cache.set_bypass(False)
    assert cache.stats()["bypass_seconds"] == 5.0
    clock.advance(50)
    cache.set_bypass(False)
    assert cache.stats()["bypass_seconds"] == 5.0
    cache.set_bypass(True)
    clock.advance(1.5)
    assert cache.stats()["bypass_seconds"] == 6.5
    cache.set_bypass(False)
    clock.advance(10)
    assert cache.stats()["bypass_seconds"] == 6.5


def test_generation_guards_against_values_read_before_a_clear():
    cache = Cache()
    generation = cache.generation
    cache.clear()
    cache.set("a", "read before the clear", generation=generation)
    assert "a" not in cache
    cache.set("a", "fresh", generation=cache.generation)
    assert cache.get("a") == "fresh"

    generation = cache.generation
    cache.set_bypass(True)
    cache.set_bypass(False)
    cache.set("b", "read before bypass", generation=generation)
    assert "b" not in cache


@pytest.mark.parametrize("max_entries", [0, -1])
def test_max_entries_must_be_positive(max_entries: int):
    with pytest.raises(ValueError):
        Cache(max_entries=max_entries)


@pytest.mark.parametrize("ttl", [0, -1, -0.5, float("nan")])
def test_ttl_must_be_none_or_positive(ttl: float):
    with pytest.raises(ValueError):
        Cache(ttl=ttl)


def test_smallest_valid_arguments():
    cache = Cache(max_entries=1, ttl=0.001)
    cache.set("a", 1)
    cache.set("b", 2)
    assert len(cache) <= 1


def test_cache_is_a_purge_target():
    assert isinstance(Cache(), Purgeable)
    assert not isinstance(object(), Purgeable)


def test_thread_safety():
    threads_n, ops, max_entries = 8, 5_000, 64
    clock = FakeClock()
    cache = Cache(max_entries=max_entries, ttl=3600, clock=clock)
    gets = [0] * threads_n
    clears = [0] * threads_n

    def work(index: int) -> None:
        rng = random.Random(index)
        for n in range(ops):
            key = rng.randrange(200)
            op = rng.random()
            if op < 0.5:
                cache.set(key, (index, key))
            elif op < 0.98:
                gets[index] += 1
                value = cache.get(key)
                assert value is None or value[1] == key
            else:
                clears[index] += 1
                cache.clear(seq=index)
            if n % 64 == 0:
                assert len(cache) <= max_entries

    run_threads(work, threads_n)  # re-raises the first assertion a thread failed
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert stats["purges"] == sum(clears)
    assert stats["entries"] == len(cache) <= max_entries
    assert len(cache) == sum(1 for key in range(200) if key in cache)
    # The LRU order and the expiry order still hold the same keys: once
    # everything has expired, nothing is left behind.
    clock.advance(3600)
    assert len(cache) == 0


def test_a_lapsed_lease_bypasses_the_cache_by_itself():
    clock = FakeClock()
    cache = Cache(clock=clock)
    cache.set("a", 1)
    assert cache.get("a") == 1  # no lease held: a standalone cache trusts itself
    cache.hold_lease(clock.now + 1.5)
    clock.advance(1.0)
    assert cache.get("a") == 1 and not cache.bypass
    clock.advance(1.0)
    assert cache.get("a") is None
    assert cache.bypass and cache.stats()["bypass"]
    generation = cache.generation
    cache.set("b", 2, generation=generation)
    assert "b" not in cache
    assert cache.clear() == 1
    cache.hold_lease(clock.now + 1.5)
    assert cache.generation > generation
    assert cache.stats()["bypass_seconds"] == pytest.approx(0.5)
    cache.set("c", 3)
    assert cache.get("c") == 3


def test_revoked_lease_bypasses_until_renewed_and_stale_reads_are_not_stored():
    clock = FakeClock()
    cache = Cache(clock=clock)
    cache.set("a", 1)
    before = cache.generation
    cache.revoke_lease()
    assert cache.get("a") is None and cache.bypass
    clock.advance(2.0)
    cache.hold_lease(clock.now + 1.0)
    assert cache.get("a") == 1  # renewing is the caller's promise that it purged first
    cache.set("x", "read before the revoke", generation=before)
    assert "x" not in cache
    assert cache.stats()["bypass_seconds"] == pytest.approx(2.0)


def test_set_many_warms_the_cache_under_the_same_rules_as_set():
    clock = FakeClock()
    cache = Cache(max_entries=3, clock=clock)
    assert cache.set_many({"a": 1, "b": 2}) == 2
    assert cache.set_many([("c", 3), ("d", 4)]) == 2
    assert len(cache) == 3 and cache.get("a") is None and cache.get("d") == 4
    generation = cache.generation
    cache.clear()
    assert cache.set_many({"x": 1}, generation=generation) == 0
    cache.set_bypass(True)
    assert cache.set_many({"y": 1}) == 0


# --- reading through the cache: get_or_set, aget_or_set, @cached ------------------


def test_get_or_set_loads_once_and_caches_none_too():
    cache = Cache()
    calls: list[str] = []

    def load() -> None:
        calls.append("load")

    assert cache.get_or_set("absent-upstream", load) is None
    assert cache.get_or_set("absent-upstream", load) is None
    assert calls == ["load"]
    assert cache.get_or_set("n", lambda: 0) == 0 and cache.get_or_set("n", lambda: 1) == 0
    assert cache.stats()["hits"] == 2


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on a loop of its own. Not asyncio.run(), which leaves the main thread with no
    current loop: a later test whose Tornado code asks for one would fail."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


class RacingLoader:
    """A loader that stops half-way, so a test can run a real clear while it holds a pre-clear value."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.reading = threading.Event()
        self.go_on = threading.Event()

    def __call__(self) -> str:
        self.reading.set()
        assert self.go_on.wait(30)
        return self.value


def test_get_or_set_never_stores_what_was_read_before_a_racing_clear():
    cache = Cache()
    loader = RacingLoader("read before the clear")
    results: list[str] = []
    reader = threading.Thread(target=lambda: results.append(cache.get_or_set("k", loader)))
    reader.start()
    assert loader.reading.wait(30)
    assert cache.clear() == 0  # a clear lands while the reader holds the old value
    loader.go_on.set()
    reader.join()
    assert results == ["read before the clear"]  # this one caller asked before the clear
    assert "k" not in cache  # but nobody after it is served that value
    assert cache.get_or_set("k", lambda: "fresh") == "fresh"
    assert cache.get("k") == "fresh"


def test_get_or_set_stores_when_nothing_raced():
    cache = Cache()
    loader = RacingLoader("value")
    reader = threading.Thread(target=cache.get_or_set, args=("k", loader))
    reader.start()
    assert loader.reading.wait(30)
    cache.set("other", 1)  # a write is not a clear: no reason to drop the value
    loader.go_on.set()
    reader.join()
    assert cache.get("k") == "value"


def test_get_or_set_does_not_store_across_a_revoked_lease():
    clock = FakeClock()
    cache = Cache(clock=clock)
    cache.hold_lease(clock.now + 10)
    loader = RacingLoader("read before the revoke")
    reader = threading.Thread(target=cache.get_or_set, args=("k", loader))
    reader.start()
    assert loader.reading.wait(30)
    cache.revoke_lease()
    cache.hold_lease(clock.now + 10)  # renewed before the loader returns: the generation still refuses it
    loader.go_on.set()
    reader.join()
    assert "k" not in cache


@pytest.mark.parametrize("purge", [Cache.clear, lambda cache: cache.purge(tags=["t"])], ids=["clear", "scoped"])
def test_aget_or_set_with_a_racing_clear(purge):
    cache = Cache()

    async def main() -> None:
        reading, go_on = asyncio.Event(), asyncio.Event()

        async def load() -> str:
            reading.set()
            await go_on.wait()
            return "read before the clear"

        task = asyncio.create_task(cache.aget_or_set("k", load, tags=["t"]))
        await reading.wait()
        # From another thread, as a ThreadedSubscriber's purge would come; a scoped purge bumps
        # the generation as a clear does.
        await asyncio.to_thread(purge, cache)
        go_on.set()
        assert await task == "read before the clear"
        assert "k" not in cache

        async def fresh() -> None:
            return None

        assert await cache.aget_or_set("k", fresh) is None
        assert "k" in cache  # None is a value like any other

    run(main())


def test_cached_decorator_keys_by_function_and_arguments():
    cache = Cache()
    calls: list[tuple[object, ...]] = []

    @cached(cache)
    def page(path: str, *, lang: str = "en", draft: bool = False) -> str | None:
        calls.append((path, lang, draft))
        return None if path == "/gone" else f"{path}:{lang}"

    @cached(cache)
    def other(path: str) -> str:
        return "other"

    assert page("/a", lang="de", draft=False) == "/a:de"
    assert page("/a", draft=False, lang="de") == "/a:de"  # keyword order does not matter
    assert page("/gone") is None and page("/gone") is None  # a None result is cached
    assert other("/a") == "other"  # another function's entries never collide
    assert calls == [("/a", "de", False), ("/gone", "en", False)]
    assert page.__name__ == "page"
    cache.clear()
    assert page("/a", lang="de", draft=False) == "/a:de"
    assert len(calls) == 3


def test_cached_with_a_key_function():
    cache = Cache()

    @cached(cache, key=lambda user_id, request=None: ("user", user_id))
    def user(user_id: int, request: object = None) -> dict[str, int]:
        return {"id": user_id}

    assert user(7, request=object()) == {"id": 7}
    assert cache.get(("user", 7)) == {"id": 7}


def test_cached_async_function_caches_the_result_and_guards_the_race():
    cache = Cache()
    calls: list[int] = []
    reading, go_on = asyncio.Event(), asyncio.Event()

    @cached(cache)
    async def fetch(n: int) -> int:
        calls.append(n)
        if n == 1:
            reading.set()
            await go_on.wait()
        return n * 10

    async def main() -> None:
        assert await fetch(2) == 20 and await fetch(2) == 20
        assert calls == [2]
        task = asyncio.create_task(fetch(1))
        await reading.wait()
        cache.clear()
        go_on.set()
        assert await task == 10
        assert len(cache) == 0  # read before the clear: not kept
        assert await fetch(1) == 10 and len(cache) == 1

    run(main())

"""Scoped purges in the worker's cache: keys, prefixes and tags, the indexes behind them, and a model check."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachebus.bus.scope import EVERYTHING, Scope
from cachebus.workers.cache import Cache
from cachebus.workers.lease import LeasedMapping

from .support import FakeClock, run_threads
from .test_cache import STATS_KEYS, RacingLoader, run


def assert_indexes_match(cache: Cache) -> None:
    """The tag and prefix indexes hold exactly what the cache stores: nothing left behind, nothing missing.

    Reads the cache's private fields (under its lock): the indexes are an implementation detail,
    but a key they leak is only visible as memory, never as behaviour.
    """
    with cache._lock:
        stored = set(cache._data)
        tags_of = dict(cache._tags_of)
        keys_with = {tag: set(keys) for tag, keys in cache._keys_with.items()}
        by_name = None if cache._by_name is None else list(cache._by_name)
    assert set(tags_of) <= stored
    assert all(tags_of.values()), "an untagged entry is in the tag index"
    inverted: dict[str, set[Hashable]] = {}
    for key, tags in tags_of.items():
        for tag in tags:
            inverted.setdefault(tag, set()).add(key)
    assert keys_with == inverted
    if by_name is not None:
        assert by_name == sorted(key for key in stored if isinstance(key, str))


def stored_keys(cache: Cache) -> set[Hashable]:
    with cache._lock:
        cache._expire()
        return set(cache._data)


def test_purge_by_keys_drops_only_those_keys():
    cache = Cache()
    cache.set_many({"a": 1, "b": 2, "c": 3})
    cache.set(("a",), "a tuple key")
    assert cache.purge(keys=["a", "c", "missing"]) == 2
    assert stored_keys(cache) == {"b", ("a",)}
    assert cache.get("b") == 2
    assert cache.purge(keys=["a"]) == 0
    assert_indexes_match(cache)


def test_purge_by_prefix_drops_the_str_keys_that_start_with_it():
    cache = Cache()
    for key in ["page/1", "page/2", "page/10", "pages", "page", "post/1", "Page/1", "pagf"]:
        cache.set(key, key)
    cache.set(("page/1",), "not a str: has no prefix")
    cache.set(7, "nor an int")
    assert cache.purge(prefixes=["page/"]) == 3
    assert stored_keys(cache) == {"pages", "page", "post/1", "Page/1", "pagf", ("page/1",), 7}
    # Overlapping prefixes drop each entry once.
    assert cache.purge(prefixes=["p", "pa", "page"]) == 4
    assert stored_keys(cache) == {"Page/1", ("page/1",), 7}
    assert cache.purge(prefixes=["zzz"]) == 0
    assert_indexes_match(cache)


def test_prefixes_outside_ascii_and_at_the_ends_of_the_order():
    cache = Cache()
    keys = ["", "a", "é/1", "é/2", "éa", "\U0001f600/x", "\U0001f600", "\uffff"]
    for key in keys:
        cache.set(key, 1)
    assert cache.purge(prefixes=["é/"]) == 2
    assert cache.purge(prefixes=["\U0001f600"]) == 2
    assert cache.purge(prefixes=["\uffff"]) == 1
    assert stored_keys(cache) == {"", "a", "éa"}
    assert_indexes_match(cache)


def test_purge_by_tags_drops_every_entry_with_one_of_them():
    cache = Cache()
    cache.set("page/1", 1, tags=["page", "user:7"])
    cache.set("page/2", 2, tags=("page",))
    cache.set("menu", 3, tags={"nav"})
    cache.set(("render", "page/1"), 4, tags=["user:7"])  # a non-str key: tags name it all the same
    cache.set("plain", 5)
    assert cache.purge(tags=["user:7"]) == 2
    assert stored_keys(cache) == {"page/2", "menu", "plain"}
    assert cache.purge(tags=["page", "nav", "nobody"]) == 2
    assert stored_keys(cache) == {"plain"}
    assert_indexes_match(cache)
    assert cache._keys_with == {} and cache._tags_of == {}


def test_keys_prefixes_and_tags_together_count_each_entry_once():
    cache = Cache()
    cache.set("page/1", 1, tags=["page"])
    cache.set("page/2", 2, tags=["page"])
    cache.set("post/1", 3, tags=["post"])
    cache.set("post/2", 4)
    cache.set("home", 5, tags=["nav"])
    dropped = cache.clear_scope(Scope(keys=("page/1", "home"), prefixes=("page/", "post/1"), tags=("page", "post")))
    assert dropped == 4
    assert stored_keys(cache) == {"post/2"}
    assert_indexes_match(cache)


def test_a_key_has_the_tags_of_its_last_set():
    cache = Cache()
    cache.set("a", 1, tags=["old", "both"])
    cache.set("a", 2, tags=["new", "both"])
    assert cache.purge(tags=["old"]) == 0
    assert cache.get("a") == 2
    assert_indexes_match(cache)
    cache.set("a", 3)  # untagged now
    assert cache.purge(tags=["new", "both"]) == 0
    assert cache.get("a") == 3
    assert_indexes_match(cache)
    assert cache._keys_with == {}
    cache.set("a", 4, tags=["again"])
    assert cache.purge(tags=["again"]) == 1


def test_set_many_tags_every_entry_of_the_call():
    cache = Cache()
    assert cache.set_many({"a": 1, "b": 2}, tags=["batch-1"]) == 2
    assert cache.set_many([("c", 3)], tags=["batch-2"]) == 1
    cache.set_many({"d": 4})
    assert cache.purge(tags=["batch-1"]) == 2
    assert stored_keys(cache) == {"c", "d"}
    assert_indexes_match(cache)


def test_tags_must_be_names_a_clear_could_send():
    cache = Cache()
    with pytest.raises(TypeError, match="not one str"):
        cache.set("a", 1, tags="page")  # would otherwise be the tags p, a, g, e
    for bad in ([""], [7], [["unhashable"]], ["x" * 201], ["line\nbreak"]):
        with pytest.raises(ValueError, match=r"^tags: "):
            cache.set("a", 1, tags=bad)
        with pytest.raises(ValueError, match=r"^tags: "):
            cache.set_many({"a": 1}, tags=bad)
    assert len(cache) == 0
    assert_indexes_match(cache)


def test_get_or_set_and_aget_or_set_store_with_tags():
    cache = Cache()
    assert cache.get_or_set("a", lambda: 1, tags=["t"]) == 1
    assert cache.get_or_set("a", lambda: 2, tags=["other"]) == 1  # a hit stores nothing

    async def main() -> None:
        async def load() -> int:
            return 3

        assert await cache.aget_or_set("b", load, tags=["t"]) == 3

    run(main())
    assert cache.purge(tags=["t"]) == 2
    assert len(cache) == 0


def test_a_leased_mapping_accepts_tags_and_ignores_them():
    mapping: dict[str, Any] = {}
    leased = LeasedMapping(mapping)
    assert leased.get_or_set("a", lambda: 1, tags=["t"]) == 1
    leased.set("b", 2, tags=["t"])
    assert mapping == {"a": 1, "b": 2}


def test_eviction_expiry_delete_and_bypass_keep_the_indexes_in_step():
    clock = FakeClock()
    cache = Cache(max_entries=3, ttl=10, clock=clock)
    cache.purge(prefixes=["x"])  # builds the prefix index, so it is checked too
    cache.set("a", 1, tags=["t", "a"])
    cache.set("b", 2, tags=["t"])
    clock.advance(5)
    cache.set("c", 3, tags=["t"])
    cache.set("d", 4, tags=["d"])  # evicts a
    assert "a" not in cache and cache.stats()["evictions"] == 1
    assert_indexes_match(cache)
    assert "a" not in cache._keys_with
    clock.advance(5)  # b expires
    assert len(cache) == 2
    assert_indexes_match(cache)
    assert cache.delete("c") is True
    assert_indexes_match(cache)
    assert cache._keys_with == {"d": {"d"}}
    cache.set_bypass(True)
    cache.set("d", "seen while bypassed", tags=["d2"])  # drops the older value, and its tags
    cache.set_bypass(False)
    assert len(cache) == 0
    assert_indexes_match(cache)
    assert cache._keys_with == {} and cache._tags_of == {}
    assert cache.purge(tags=["t", "d"]) == 0


def test_expired_entries_are_not_counted_by_a_scoped_purge():
    clock = FakeClock()
    cache = Cache(ttl=1, clock=clock)
    cache.set("page/old", 1, tags=["t"])
    clock.advance(1)
    cache.set("page/new", 2, tags=["t"])
    assert cache.purge(tags=["t"]) == 1
    cache.set("page/old", 1)
    clock.advance(1)
    cache.set("page/new", 2)
    assert cache.purge(prefixes=["page/"]) == 1
    assert cache.purge(keys=["page/old", "page/new"]) == 0


def test_the_prefix_index_is_built_at_the_first_prefix_purge_and_kept():
    cache = Cache()
    cache.set_many({f"k/{i}": i for i in range(10)})
    cache.purge(keys=["k/0"])
    cache.purge(tags=["t"])
    assert cache._by_name is None, "a cache never purged by prefix keeps no ordered index"
    assert cache.purge(prefixes=["k/1"]) == 1
    assert cache._by_name is not None
    cache.set("k/10", 10)
    cache.set("k/11", 11)
    assert_indexes_match(cache)
    assert cache.purge(prefixes=["k/1"]) == 2
    cache.clear()
    assert cache._by_name is not None and len(cache._by_name) == 0
    cache.set("k/12", 12)
    assert_indexes_match(cache)
    assert cache.purge(prefixes=["k/"]) == 1


def test_a_scoped_purge_counts_and_records_like_a_clear():
    cache = Cache()
    cache.set("a", 1)
    before = time.time()
    assert cache.clear_scope(Scope(keys=("a",)), clear_id="c-1", seq=7) == 1
    stats = cache.stats()
    assert set(stats) == STATS_KEYS
    assert stats["purges"] == 1
    assert (stats["last_clear_id"], stats["last_clear_seq"]) == ("c-1", 7)
    assert before <= stats["last_purge_at"] <= time.time()
    # Even one that drops nothing is a purge; None leaves the last id and seq.
    assert cache.purge(tags=["nothing"]) == 0
    assert cache.clear_scope(Scope(prefixes=("z",)), seq=9) == 0
    stats = cache.stats()
    assert stats["purges"] == 3
    assert (stats["last_clear_id"], stats["last_clear_seq"]) == ("c-1", 9)


def test_the_everything_scope_is_clear():
    scoped, cleared = Cache(), Cache()
    for cache in (scoped, cleared):
        cache.set("a", 1, tags=["t"])
        cache.set(("tuple",), 2)
        cache.set("b", 3)
    assert scoped.clear_scope(EVERYTHING, clear_id="c", seq=3) == cleared.clear(clear_id="c", seq=3) == 3
    assert scoped.clear_scope(Scope(), seq=4) == cleared.clear(seq=4) == 0
    one, other = scoped.stats(), cleared.stats()
    del one["last_purge_at"], other["last_purge_at"]
    assert one == other
    assert scoped.generation == cleared.generation
    assert_indexes_match(scoped)

    class Counting(Cache):
        clears = 0

        def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
            self.clears += 1
            return super().clear(clear_id=clear_id, seq=seq)

    counting = Counting()
    counting.clear_scope(EVERYTHING)
    counting.clear_scope(Scope(keys=("a",)))
    assert counting.clears == 1, "an everything scope goes through the subclass's clear"


def test_purge_naming_nothing_is_refused():
    cache = Cache()
    cache.set("a", 1)
    with pytest.raises(ValueError, match=r"^name keys, prefixes or tags; clear\(\) drops everything$"):
        cache.purge()
    with pytest.raises(ValueError, match="name keys"):
        cache.purge(keys=[], prefixes=(), tags=iter(()))
    with pytest.raises(ValueError, match="every str key"):
        cache.purge(prefixes=[""])
    with pytest.raises(TypeError, match="not one str"):
        cache.purge(keys="a")
    assert cache.get("a") == 1
    assert cache.stats()["purges"] == 0


def test_generation_guards_against_values_read_before_a_scoped_purge():
    cache = Cache()
    generation = cache.generation
    assert cache.purge(keys=["k"]) == 0
    cache.set("k", "read before the purge", generation=generation)
    assert "k" not in cache
    # The generation is the cache's: a read of another key that raced the purge is refused too.
    generation = cache.generation
    cache.purge(tags=["t"])
    cache.set("other", "read before the purge", generation=generation, tags=["t"])
    assert "other" not in cache
    assert_indexes_match(cache)


def test_get_or_set_never_stores_what_was_read_before_a_racing_scoped_purge():
    cache = Cache()
    loader = RacingLoader("read before the purge")
    results: list[str] = []
    reader = threading.Thread(target=lambda: results.append(cache.get_or_set("page/1", loader, tags=["page"])))
    reader.start()
    assert loader.reading.wait(30)
    assert cache.purge(prefixes=["page/"]) == 0
    loader.go_on.set()
    reader.join()
    assert results == ["read before the purge"]
    assert "page/1" not in cache
    assert_indexes_match(cache)


def test_scoped_purges_work_while_bypassed():
    cache = Cache()
    cache.set("a", 1, tags=["t"])
    cache.set("b", 2)
    cache.set_bypass(True)
    assert cache.purge(tags=["t"]) == 1
    cache.set_bypass(False)
    assert stored_keys(cache) == {"b"}


def test_thread_safety_of_tags_and_scoped_purges():
    threads_n, ops, max_entries = 8, 3_000, 64
    clock = FakeClock()
    cache = Cache(max_entries=max_entries, ttl=3600, clock=clock)
    purges = [0] * threads_n
    tags = ["t0", "t1", "t2", "t3"]

    def work(index: int) -> None:
        rng = random.Random(index)
        for _ in range(ops):
            key = f"{rng.choice('ab')}/{rng.randrange(100)}"
            op = rng.random()
            if op < 0.5:
                cache.set(key, key, tags=rng.sample(tags, rng.randrange(3)))
            elif op < 0.7:
                value = cache.get(key)
                assert value is None or value == key
            elif op < 0.8:
                cache.delete(key)
            else:
                purges[index] += 1
                choice = rng.randrange(4)
                if choice == 0:
                    cache.purge(tags=[rng.choice(tags)])
                elif choice == 1:
                    cache.purge(prefixes=[f"{rng.choice('ab')}/{rng.randrange(10)}"])
                elif choice == 2:
                    cache.purge(keys=[key])
                else:
                    cache.clear()

    run_threads(work, threads_n)  # re-raises the first assertion a thread failed
    assert cache.stats()["purges"] == sum(purges)
    assert len(cache) <= max_entries
    assert_indexes_match(cache)
    clock.advance(3600)
    assert len(cache) == 0
    assert_indexes_match(cache)
    assert cache._keys_with == {} and cache._tags_of == {}


# --- the cache against a naive model, over random sequences of operations ----------------------

#: Keys of every kind the cache meets: str keys that share prefixes, the empty str, tuples and an int.
KEYS: list[Hashable] = ["a", "a/1", "a/2", "a/10", "ab", "b/1", "b/2", "", ("t", 1), ("a/1",), 7]
PREFIXES = ["a", "a/", "a/1", "ab", "b/", "c"]
TAGS = ["x", "y", "z"]
MAX_ENTRIES = 5
TTL = 10.0

keys_st = st.sampled_from(KEYS)
tags_st = st.lists(st.sampled_from(TAGS), max_size=3)
operations = st.one_of(
    st.tuples(st.just("set"), keys_st, tags_st),
    st.tuples(st.just("set_many"), st.lists(keys_st, max_size=3), tags_st),
    st.tuples(st.just("get"), keys_st),
    st.tuples(st.just("delete"), keys_st),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 4.0, TTL])),
    st.tuples(st.just("scope"), st.lists(st.sampled_from([k for k in KEYS if isinstance(k, str)]), max_size=2),
              st.lists(st.sampled_from(PREFIXES), max_size=2), st.lists(st.sampled_from(TAGS), max_size=2)),
    st.tuples(st.just("clear")),
)


class Model:
    """What the cache should hold: key -> (value, tags, expiry), least recently used first."""

    def __init__(self, ttl: float | None) -> None:
        self.ttl = ttl
        self.now = 0.0
        self.entries: dict[Hashable, tuple[Any, frozenset[str], float]] = {}

    def expire(self) -> None:
        self.entries = {k: e for k, e in self.entries.items() if self.ttl is None or e[2] > self.now}

    def set(self, key: Hashable, value: Any, tags: list[str]) -> None:
        self.expire()
        self.entries.pop(key, None)
        self.entries[key] = (value, frozenset(tags), self.now + (self.ttl or 0))
        while len(self.entries) > MAX_ENTRIES:
            del self.entries[next(iter(self.entries))]

    def get(self, key: Hashable) -> Any:
        self.expire()
        if key not in self.entries:
            return None
        self.entries[key] = self.entries.pop(key)
        return self.entries[key][0]

    def delete(self, key: Hashable) -> bool:
        self.expire()
        return self.entries.pop(key, None) is not None

    def clear_scope(self, scope: Scope) -> int:
        self.expire()
        named = [key for key, (_, tags, _) in self.entries.items()
                 if scope.everything or key in scope.keys
                 or (isinstance(key, str) and any(key.startswith(p) for p in scope.prefixes))
                 or not tags.isdisjoint(scope.tags)]
        for key in named:
            del self.entries[key]
        return len(named)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations, max_size=40), ttl=st.sampled_from([None, TTL]))
def test_clear_scope_matches_a_naive_model(ops: list[tuple[Any, ...]], ttl: float | None):
    clock = FakeClock()
    cache = Cache(max_entries=MAX_ENTRIES, ttl=ttl, clock=clock)
    model = Model(ttl)
    for n, op in enumerate(ops):
        value = f"v{n}"
        match op:
            case ("set", key, tags):
                cache.set(key, value, tags=tags)
                model.set(key, value, tags)
            case ("set_many", keys, tags):
                assert cache.set_many([(key, value) for key in keys], tags=tags) == len(keys)
                for key in keys:
                    model.set(key, value, tags)
            case ("get", key):
                assert cache.get(key) == model.get(key)
            case ("delete", key):
                assert cache.delete(key) == model.delete(key)
            case ("advance", seconds):
                clock.advance(seconds)
                model.now += seconds
            case ("scope", keys, prefixes, tags):
                scope = Scope(tuple(keys), tuple(prefixes), tuple(tags))
                assert cache.clear_scope(scope) == model.clear_scope(scope)
            case ("clear",):
                assert cache.clear() == model.clear_scope(EVERYTHING)
        model.expire()
        assert stored_keys(cache) == set(model.entries)
        assert_indexes_match(cache)
    # Every tag names exactly the entries the model says it does.
    for tag in TAGS:
        assert cache.purge(tags=[tag]) == model.clear_scope(Scope(tags=(tag,)))


def test_the_benchmark_times_scoped_purges_of_one_percent():
    from bench.run import scoped_purge_ms, scoped_purge_report

    scoped = scoped_purge_ms(1_000, rounds=3)
    assert (scoped.entries, scoped.tag_entries, scoped.prefix_entries) == (1_000, 10, 10)
    text = "\n".join(scoped_purge_report(scoped))
    assert "## Scoped purges in one process's Cache" in text
    assert "| one tag | 10 |" in text and "| everything (`clear()`) | 1,000 |" in text

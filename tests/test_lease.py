"""LeasedMapping: the lease, and so the guarantee's bound, for a dict, a cachetools cache or any MutableMapping."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import cachetools
import pytest
from prometheus_client import generate_latest

from cachebus import LeasedMapping, cached
from cachebus.testing import DEADLINE, Cluster, http, wait_for
from cachebus.workers.cache import Cache, Purgeable
from cachebus.workers.metrics import worker_registry
from cachebus.workers.subscriber import Leased, ThreadedSubscriber

from .support import FakeClock, run_threads


class PlainMapping(MutableMapping[Any, Any]):
    """The least a cache can be: a MutableMapping written from its five abstract methods."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


#: Each kind of cache the lease covers, built on one fake clock.
LEASED: dict[str, Callable[[FakeClock], Any]] = {
    "Cache": lambda clock: Cache(clock=clock),
    "dict": lambda clock: LeasedMapping({}, clock=clock),
    "TTLCache": lambda clock: LeasedMapping(cachetools.TTLCache(maxsize=100, ttl=3600, timer=clock), clock=clock),
    "LRUCache": lambda clock: LeasedMapping(cachetools.LRUCache(maxsize=100), clock=clock),
    "MutableMapping": lambda clock: LeasedMapping(PlainMapping(), clock=clock),
}


@pytest.mark.parametrize("kind", LEASED)
def test_the_lease_works_the_same_for_cache_and_every_wrapped_mapping(kind: str):
    clock = FakeClock()
    cache = LEASED[kind](clock)
    assert isinstance(cache, Purgeable) and isinstance(cache, Leased)
    cache.set("a", 1)
    assert cache.get("a") == 1  # no lease held yet: a standalone cache trusts itself
    cache.hold_lease(clock.now + 1.5)
    clock.advance(1.0)
    assert cache.get("a") == 1
    generation = cache.generation

    clock.advance(0.5)  # the lease lapses by itself: no call tells the cache
    assert cache.get("a") is None and cache.get("a", "default") == "default"
    cache.set("b", 2)
    cache.set("a", "newer, while lapsed")
    assert len(cache) == 0  # nothing kept while lapsed, and the older "a" is dropped too
    cache.set("c", 3, generation=generation)
    assert cache.clear() == 0

    cache.hold_lease(clock.now + 1.5)  # renewed after a lapse: what was read before it is refused
    assert cache.generation != generation
    cache.set("c", "read before the lapse", generation=generation)
    assert cache.get("c") is None
    cache.set("d", 4, generation=cache.generation)
    assert cache.get("d") == 4

    generation = cache.generation
    cache.revoke_lease()
    assert cache.get("d") is None and cache.generation != generation
    generation = cache.generation
    cache.revoke_lease()  # revoking a revoked lease changes nothing
    assert cache.generation == generation
    cache.hold_lease(clock.now + 1.5)
    assert cache.get("d") == 4  # renewing is the caller's promise that it purged first
    assert cache.clear(clear_id="c1", seq=7) == 1 and cache.generation != generation


def test_while_lapsed_the_wrapper_reads_as_empty_but_counts_what_it_stores():
    clock = FakeClock()
    inner: dict[str, int] = {}
    leased = LeasedMapping(inner, clock=clock)
    leased["a"] = 1
    leased["b"] = 2
    assert leased["a"] == 1 and "a" in leased and sorted(leased) == ["a", "b"] and len(leased) == 2
    leased.revoke_lease()
    with pytest.raises(KeyError):
        leased["a"]
    assert "a" not in leased and list(leased) == []
    assert len(leased) == 2 and inner == {"a": 1, "b": 2}  # still there: the next purge drops them
    leased["c"] = 3
    assert "c" not in inner
    del leased["a"]  # deleting is always allowed
    with pytest.raises(KeyError):
        del leased["a"]
    assert leased.clear() == 1 and inner == {}


def test_clear_counts_what_a_ttl_cache_still_holds():
    clock = FakeClock()
    ttl = cachetools.TTLCache(maxsize=10, ttl=5, timer=clock)
    leased = LeasedMapping(ttl, clock=clock)
    leased["old"] = 1
    clock.advance(3)
    leased["new"] = 2
    clock.advance(3)  # "old" has expired
    assert leased.get("old") is None and leased["new"] == 2
    assert leased.clear() == 1


def test_get_or_set_on_the_wrapper_with_a_racing_clear():
    leased = LeasedMapping(cachetools.LRUCache(maxsize=10))
    reading, go_on = threading.Event(), threading.Event()

    def load() -> str:
        reading.set()
        assert go_on.wait(DEADLINE)
        return "read before the clear"

    results: list[str] = []
    reader = threading.Thread(target=lambda: results.append(leased.get_or_set("k", load)))
    reader.start()
    assert reading.wait(DEADLINE)
    assert leased.clear() == 0
    go_on.set()
    reader.join()
    assert results == ["read before the clear"] and "k" not in leased
    assert leased.get_or_set("k", lambda: None) is None and "k" in leased  # None is cached too


def test_cached_decorator_over_the_wrapper():
    leased = LeasedMapping(cachetools.TTLCache(maxsize=10, ttl=60))
    calls: list[int] = []

    @cached(leased)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    assert square(3) == 9 and square(3) == 9 and calls == [3]
    leased.revoke_lease()
    assert square(3) == 9 and calls == [3, 3]  # lapsed: every call goes to the source
    assert len(leased) == 0  # and nothing is kept; the older copy is dropped, as the caller has newer


def test_the_wrapper_makes_a_cachetools_cache_safe_for_threads():
    threads_n, ops = 8, 3_000
    leased = LeasedMapping(cachetools.LRUCache(maxsize=64))

    def work(index: int) -> None:
        rng = random.Random(index)
        for _ in range(ops):
            key = rng.randrange(200)
            op = rng.random()
            if op < 0.5:
                leased[key] = (index, key)
            elif op < 0.95:
                value = leased.get(key)
                assert value is None or value[1] == key
            elif op < 0.98:
                list(leased)
            else:
                leased.clear()

    run_threads(work, threads_n)  # re-raises the first assertion a thread failed
    assert len(leased) <= 64


@pytest.mark.processes
def test_a_wrapped_ttl_cache_stops_serving_while_the_service_is_gone(cluster: Cluster):
    """The bound, end to end: no service heard for a lease, no hit; back and purged, hits again."""
    cluster.start_service()
    ttl = cachetools.TTLCache(maxsize=100, ttl=3600)
    pages = LeasedMapping(ttl)
    subscriber = ThreadedSubscriber([pages], name="ttl-app", **cluster.subscriber_options())
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("ttl-app")
        pages["page:/"] = "old"
        assert pages["page:/"] == "old"
        status, _, _ = cluster.clear()
        assert status == 204
        wait_for(lambda: len(ttl) == 0, what="the clear to purge the wrapped TTLCache")
        pages["page:/"] = "cached before the service stopped"
        assert pages.get("page:/") == "cached before the service stopped"

        assert cluster.service is not None
        cluster.service.stop()
        wait_for(lambda: pages.get("page:/") is None, what="the lease to lapse")
        assert "page:/" in ttl  # still stored: the lease, not a purge, stopped the hits
        pages["page:/"] = "written while cut off"
        assert "page:/" not in ttl  # nor is anything kept meanwhile

        ttl["page:/"] = "written around the wrapper"  # the purge on return must drop this as well
        cluster.start_service()
        assert subscriber.subscriber is not None
        sub = subscriber.subscriber
        wait_for(lambda: sub.trusted, what="the subscriber to trust its targets again")
        assert "page:/" not in ttl  # purged before the lease was renewed
        pages["page:/"] = "fresh"
        assert pages.get("page:/") == "fresh"
    finally:
        subscriber.stop()


# --- bus.on_silence: serve ----------------------------------------------------------


@pytest.mark.processes
def test_with_on_silence_serve_the_caches_keep_serving_through_an_outage_and_are_purged_when_it_ends(
        cluster: Cluster):
    """The trade-off, end to end: no bypass while the service is gone, degraded and saying so;
    the purge on its return still drops everything cached meanwhile."""
    cluster.start_service()
    cache = Cache()
    pages = LeasedMapping({})
    subscriber = ThreadedSubscriber([cache, pages], name="serve-app", on_silence="serve",
                                    **cluster.subscriber_options())
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        assert subscriber.subscriber is not None
        sub = subscriber.subscriber
        cluster.wait_worker_live_named("serve-app")
        cache.set("page:/", "before the outage")
        pages["page:/"] = "before the outage"

        assert cluster.service is not None
        cluster.service.stop()
        wait_for(lambda: sub.degraded, what="the subscriber to notice the silence")
        # Still serving, and still storing: an outage does not send the fleet to its origin.
        assert cache.get("page:/") == "before the outage" and pages.get("page:/") == "before the outage"
        assert not cache.bypass
        cache.set("page:/during", "cached during the outage")
        assert cache.get("page:/during") == "cached during the outage"
        stats = sub.stats()
        assert (stats["on_silence"], stats["degraded"], stats["bypass"]) == ("serve", True, False)
        metrics = generate_latest(worker_registry(cache, sub)).decode()
        assert "cachebus_worker_degraded 1.0" in metrics

        cluster.start_service()
        wait_for(lambda: sub.trusted, what="the subscriber to hear the service again")
        # Whatever was cached without the bound is gone before the caches are trusted again.
        assert cache.get("page:/") is None and cache.get("page:/during") is None and "page:/" not in pages
        assert not sub.degraded and sub.degraded_seconds > 0
        assert sub.last_cause in ("reconnect", "epoch")
        metrics = generate_latest(worker_registry(cache, sub)).decode()
        assert "cachebus_worker_degraded 0.0" in metrics
    finally:
        subscriber.stop()


@pytest.mark.processes
def test_the_record_shows_a_silent_serving_worker_as_degraded_and_a_bypassing_one_not(cluster: Cluster):
    cluster.start_service()
    cluster.start_worker("w-serve", settings={"bus": {"on_silence": "serve"}})
    cluster.start_worker("w-bypass")

    def listed(name: str) -> dict[str, Any]:
        return next(w for w in cluster.worker_list() if w["name"] == name)

    wait_for(lambda: listed("w-serve")["on_silence"] == "serve", what="the worker's first heartbeat")
    assert listed("w-bypass")["on_silence"] == "bypass"
    assert not listed("w-serve")["degraded"]

    frozen = [cluster.workers[name][0] for name in ("w-serve", "w-bypass")]
    for proc in frozen:
        proc.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: listed("w-serve")["state"] != "live" and listed("w-bypass")["state"] != "live",
                 what="both frozen workers to go suspect")
        assert listed("w-serve")["degraded"] is True  # it may be serving pre-clear entries right now
        assert listed("w-bypass")["degraded"] is False  # it bypasses: the bound holds
        status, _, body = http("GET", cluster.url + "/metrics")
        assert status == 200
        degraded = [line for line in body.decode().splitlines()
                    if line.startswith("cachebus_worker_processes_degraded")]
        assert degraded == ['cachebus_worker_processes_degraded{name="w-serve"} 1.0']
    finally:
        for proc in frozen:
            proc.signal(signal.SIGCONT)
    wait_for(lambda: listed("w-serve")["state"] == "live" and not listed("w-serve")["degraded"],
             what="the thawed worker to be live and no longer degraded")

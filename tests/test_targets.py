"""Purge targets: real cache objects (cachetools, functools, mappings) adapted once, and refused at once.

No bus here: these check the adaptation and the error text an ack carries.
tests/test_subscriber.py purges the same kinds of target through a real service.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, UserDict
from typing import Any

import cachetools
import pytest

from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import Subscriber, ThreadedSubscriber
from cachebus.workers.targets import (
    MAX_ERROR,
    Target,
    TargetKind,
    adapt,
    describe_error,
    describe_traceback,
    scrub,
)


def purge(target: Target, clear_id: str | None = "c1", seq: int = 1) -> int:
    return asyncio.run(target.purge(clear_id, seq))


class AsyncStore:
    """A target whose clear does I/O: an async clear() that returns nothing."""

    def __init__(self) -> None:
        self.data = {"a": 1}

    async def clear(self) -> None:
        await asyncio.sleep(0)
        self.data.clear()


class Told:
    """A Purgeable that records which clear it applied."""

    def __init__(self) -> None:
        self.applied: list[tuple[str | None, int | None]] = []

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        self.applied.append((clear_id, seq))
        return 7


class Forwarding:
    """A clear that takes anything but passes it to a dict: told nothing, it works."""

    def __init__(self) -> None:
        self.inner = {"a": 1, "b": 2}

    def __len__(self) -> int:
        return len(self.inner)

    def clear(self, *args: Any, **kwargs: Any) -> None:
        self.inner.clear(*args, **kwargs)


@pytest.mark.parametrize("make, entries", [
    (lambda: {"a": 1, "b": 2}, 2),
    (lambda: OrderedDict(a=1), 1),
    (lambda: UserDict(a=1, b=2, c=3), 3),  # any MutableMapping
    (lambda: cachetools.TTLCache(maxsize=10, ttl=60), 0),
    (lambda: cachetools.LRUCache(maxsize=10), 0),
    (lambda: cachetools.LFUCache(maxsize=10), 0),
])
def test_mappings_and_cachetools_caches_are_cleared_and_counted_by_their_size(make, entries):
    obj = make()
    if isinstance(obj, cachetools.Cache):
        obj.update({"x": 1, "y": 2})
        entries = 2
    [target] = adapt([obj])
    assert target.kind is TargetKind.CLEAR
    assert target.leased is None
    assert purge(target) == entries
    assert len(obj) == 0


def test_functools_caches_are_cleared_with_cache_clear_and_counted_by_currsize():
    @functools.lru_cache(maxsize=100)
    def square(n: int) -> int:
        return n * n

    @functools.cache
    def cube(n: int) -> int:
        return n ** 3

    for n in range(5):
        square(n)
        cube(n)
    square_target, cube_target = adapt([square, cube])
    assert square_target.kind is cube_target.kind is TargetKind.CACHE_CLEAR
    assert "square" in square_target.label
    assert purge(square_target) == 5 and purge(cube_target) == 5
    assert square.cache_info().currsize == cube.cache_info().currsize == 0


def test_a_purgeable_is_told_which_clear_it_applies_and_its_count_wins():
    told, cache = Told(), Cache()
    cache.set_many({"a": 1, "b": 2})
    told_target, cache_target = adapt([told, cache])
    assert told_target.kind is cache_target.kind is TargetKind.PURGEABLE
    assert purge(told_target, "c9", 4) == 7
    assert told.applied == [("c9", 4)]
    assert purge(cache_target, "c9", 4) == 2
    assert cache.stats()["last_clear_id"] == "c9"
    assert cache_target.leased is cache


def test_async_clears_are_awaited_and_a_catch_all_signature_is_called_without_arguments():
    store, forwarding = AsyncStore(), Forwarding()
    async_target, forwarding_target = adapt([store, forwarding])
    assert async_target.kind is TargetKind.CLEAR
    assert purge(async_target) == 0  # no count returned, no len()
    assert store.data == {}
    assert forwarding_target.kind is TargetKind.CLEAR
    assert purge(forwarding_target) == 2
    assert forwarding.inner == {}


class NeedsKey:
    def clear(self, key: str) -> None: ...


class NotCallable:
    clear = 3


@pytest.mark.parametrize("obj, named, why", [
    (object(), "builtins.object", "it has no clear() or cache_clear() method"),
    ("a string", "builtins.str", "it has no clear() or cache_clear() method"),
    (NeedsKey(), "test_targets.NeedsKey", "its clear(key) needs arguments"),
    (NotCallable(), "test_targets.NotCallable", "its clear attribute is not callable"),
    (dict, "the class builtins.dict", "pass an instance, not the class"),
    (Cache, "the class cachebus.workers.cache.Cache", "pass an instance, not the class"),
])
def test_a_target_that_cannot_be_purged_is_a_type_error_at_construction(obj: Any, named: str, why: str):
    for build in (adapt, Subscriber, ThreadedSubscriber):
        with pytest.raises(TypeError) as raised:
            build([{}, obj])
        message = str(raised.value)
        assert message.startswith("cannot use ") and named in message
        assert why in message
        # The message says what would have worked.
        assert "clear(*, clear_id, seq)" in message and "cachetools" in message and "lru_cache" in message


def test_errors_are_scrubbed_of_credentials():
    assert scrub("redis://app:s3cret@cache:6379/0") == "redis://***@cache:6379/0"
    assert scrub("postgresql://:p@ss@db/x refused") == "postgresql://***@db/x refused"
    assert scrub("connect(password='hunter2', host='db')") == "connect(password=***, host='db')"
    assert scrub('{"api_key": "k1", "secret": "s"}, token=t, AUTH: x') == \
        '{"api_key": ***, "secret": ***}, token=***, AUTH: ***'
    assert scrub("Authorization: Bearer abc.def") == "Authorization: ***"
    assert scrub("access_token=a&token=b") == "access_token=***&token=***"
    # What is not a credential stays readable.
    plain = "Error 111 connecting to localhost:6379. Connection refused."
    assert scrub(plain) == plain


def test_a_failed_acks_error_names_the_type_is_bounded_and_holds_no_credential():
    assert describe_error(ConnectionError("redis://app:s3cret@cache:6379 refused")) == \
        "ConnectionError: redis://***@cache:6379 refused"
    assert describe_error(TypeError()) == "TypeError"
    long = describe_error(ValueError("password=hunter2 " + "x" * 10_000))
    assert len(long) == MAX_ERROR and long.endswith("…") and "hunter2" not in long


def test_a_traceback_is_scrubbed_too():
    def connect(url: str) -> None:
        raise ConnectionError(f"cannot reach {url}")

    try:
        connect("redis://app:s3cret@cache:6379")
    except ConnectionError as exc:
        text = describe_traceback(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert "in connect" in text and "redis://***@cache:6379" in text and "s3cret" not in text

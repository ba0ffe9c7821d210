"""The in-memory cache a worker holds, and the purge-target protocol.

:class:`Cache` is a bounded LRU with an optional TTL. Every operation is short,
holds one :class:`threading.Lock` and never awaits, so one cache can be shared
by threads (a :class:`~cachebus.workers.subscriber.ThreadedSubscriber`, a WSGI app) and
by asyncio code alike.

Besides ``get``/``set``/``delete``/``clear`` it has two ways to avoid serving
data that a clear should have removed:

* *bypass*: while on, ``get`` always misses and ``set`` keeps nothing. A worker
  turns it on while it cannot be sure it has seen every clear.
* a *lease*, held by the bus subscriber: the cache trusts its entries only
  until the lease runs out, and behaves as bypassed from then on. The check
  happens inside ``get`` itself, so a stale entry is never served after the
  lease ends, even if the process was frozen or its event loop is busy.
* a *generation*, bumped by every clear, by entering bypass and by a lease
  that lapsed. A caller that reads the generation before fetching a value from
  its source passes it to ``set``; if a clear ran in between, the value may
  predate it and is dropped. :meth:`Cache.get_or_set` and :func:`cached` do
  this for the caller.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

#: "No entry": a cached None (or any falsy value) is a hit, so a miss needs a value of its own.
_ABSENT: Final = object()


#: Every object whose lock :func:`fork_safe_lock` made, to renew it in a forked child.
_LOCK_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()


def fork_safe_lock(owner: Any) -> threading.Lock:
    """A lock for ``owner`` that a forked child gets afresh.

    A child process starts with only the thread that forked: a lock another
    thread held at that moment would stay held for good, and the child's first
    ``get`` (or the subscriber's fork hook, which revokes the lease) would hang.
    Like :mod:`logging`'s handlers, each owner's lock is replaced in the child.
    """
    _LOCK_OWNERS.add(owner)
    return threading.Lock()


def _renew_locks_in_child() -> None:
    for owner in list(_LOCK_OWNERS):
        owner._lock = threading.Lock()


# Registered at import, before the subscriber's own hook (which revokes leases, taking these
# locks): after-fork hooks run in the order they were registered.
os.register_at_fork(after_in_child=_renew_locks_in_child)


@runtime_checkable
class Purgeable(Protocol):
    """A purge target: anything the subscriber can tell to drop what it holds.

    An in-memory :class:`Cache` is one; a directory of cached files on disk
    could be another. Give any object with this ``clear`` method to the
    subscriber and it will be cleared on every clear command (and on a missed
    command or a service restart), so the subscriber needs to know nothing
    else about it.
    """

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        """Drop everything and return how many entries were dropped.

        ``clear_id`` and ``seq`` identify the clear being applied; both are
        ``None`` when the purge has no single clear behind it.
        """
        ...


class ReadThrough:
    """Reads through a cache to a loader, with the generation guard built in.

    A subclass provides :meth:`_lookup` and ``set(key, value, *, generation=)``.
    :meth:`get_or_set` takes the generation in the same step as the lookup that
    missed, before the loader runs; if a clear (or a lapsed or revoked lease)
    comes while the loader runs, ``set`` refuses the value, which may predate
    that clear. The value is still returned: this one caller asked before the
    clear, so it may see what it read, but nobody after it will.

    Two callers that miss the same key at once both run the loader: there is
    no lock held around it, so a slow loader never blocks a purge.
    """

    def _lookup(self, key: Hashable) -> tuple[Any, int]:
        """The value for ``key`` (or ``_ABSENT``) and the generation, read together."""
        raise NotImplementedError

    def set(self, key: Hashable, value: Any, *, generation: int | None = None) -> None:
        raise NotImplementedError

    def get_or_set(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The cached value for ``key``, or ``loader()``'s, stored unless a clear ran meanwhile.

        Whatever ``loader`` returns is cached, ``None`` included.
        """
        value, generation = self._lookup(key)
        if value is not _ABSENT:
            return cast(T, value)
        loaded = loader()
        self.set(key, loaded, generation=generation)
        return loaded

    async def aget_or_set(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        """:meth:`get_or_set` with an async ``loader`` (``lambda: fetch(key)``)."""
        value, generation = self._lookup(key)
        if value is not _ABSENT:
            return cast(T, value)
        loaded = await loader()
        self.set(key, loaded, generation=generation)
        return loaded


class LeaseHolder(ReadThrough):
    """The lease and the generation, as :class:`Cache` and
    :class:`~cachebus.workers.lease.LeasedMapping` both keep them.

    A subclass calls :meth:`_init_lease` and sets ``_lock`` (held around every
    access) and ``_clock`` (the clock ``until`` is measured on). With no lease
    ever held the entries are trusted (standalone use). A renewal after a lapse
    and a revoke bump the generation, so a value read before them is not stored.
    """

    _lock: threading.Lock
    _clock: Callable[[], float]

    def _init_lease(self) -> None:
        self._generation = 0
        # None: no lease is held, and the entries are trusted (standalone use).
        self._lease: float | None = None
        #: Seconds the lease spent lapsed, up to its last renewal.
        self._lapsed_total = 0.0

    @property
    def generation(self) -> int:
        """Changes whenever what is stored may predate a clear: every clear, a revoke, a renewal
        after a lapse (and for :class:`Cache`, entering bypass); see ``set``."""
        with self._lock:
            return self._generation

    def hold_lease(self, until: float) -> None:
        """Trust the entries until ``until`` (on this object's clock).

        The bus subscriber renews the lease each time it hears the service. If
        the previous lease had lapsed, entries may have missed a clear; the
        caller must have cleared them before renewing.
        """
        with self._lock:
            now = self._clock()
            if self._lease_lapsed(now):
                assert self._lease is not None
                self._lapsed_total += now - self._lease
                self._generation += 1
            self._lease = until

    def revoke_lease(self) -> None:
        """Stop trusting the entries now, until :meth:`hold_lease` is called."""
        with self._lock:
            now = self._clock()
            if self._lease is None or self._lease > now:
                self._lease = now
                self._generation += 1

    def _lease_lapsed(self, now: float) -> bool:
        """Whether a lease is held and has run out (or was revoked); the caller holds the lock."""
        return self._lease is not None and now >= self._lease


def cached(cache: ReadThrough,
           key: Callable[..., Hashable] | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function (sync or ``async def``) to read through ``cache``.

    Calls go through :meth:`ReadThrough.get_or_set` (or ``aget_or_set``), so a
    call that races a clear never stores what it read before the clear. The key
    is ``key(*args, **kwargs)``, by default the function's module and qualified
    name, the positional arguments and the sorted keyword arguments: as with
    :func:`functools.lru_cache`, arguments must be hashable, and ``f(1)`` and
    ``f(x=1)`` are cached apart. For an ``async def`` function the awaited
    result is cached, never the coroutine.
    """
    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        name = f"{func.__module__}.{func.__qualname__}"

        def key_of(*args: Any, **kwargs: Any) -> Hashable:
            if key is not None:
                return key(*args, **kwargs)
            return (name, args, tuple(sorted(kwargs.items())))

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def read_through_async(*args: Any, **kwargs: Any) -> Any:
                return await cache.aget_or_set(key_of(*args, **kwargs), lambda: func(*args, **kwargs))
            return cast(Callable[P, R], read_through_async)

        @functools.wraps(func)
        def read_through(*args: P.args, **kwargs: P.kwargs) -> R:
            return cache.get_or_set(key_of(*args, **kwargs), lambda: func(*args, **kwargs))
        return read_through

    return decorate


class Cache(LeaseHolder):
    """A thread-safe LRU cache with optional TTL, hit/miss stats and bypass.

    ``clock`` measures TTLs and time spent in bypass; it must never go
    backwards (the default, :func:`time.monotonic`, does not). Tests inject a
    fake one.

    Expired entries are removed as soon as any operation notices them, so
    ``len()``, ``in``, ``stats()["entries"]`` and the count ``clear`` returns
    include only entries that have not expired. Removing an expired entry is
    not an eviction; ``evictions`` counts only entries pushed out by
    ``max_entries``.
    """

    def __init__(self, max_entries: int = 10_000, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be None or a positive number of seconds, not {ttl!r}")
        self._max_entries = max_entries
        self._ttl = ttl
        self._clock = clock
        self._lock = fork_safe_lock(self)
        # Plain dicts keep insertion order: re-inserting a key makes it the
        # newest. They are used rather than OrderedDict because a purge of a
        # full cache, which is on the path to every ack, drops a plain dict
        # about 30 times faster.
        # Least recently used first.
        self._data: dict[Hashable, Any] = {}
        # Expiry times, earliest first. Every set gets the latest expiry so far
        # (fixed TTL, clock never goes back), so re-inserting the key keeps
        # this sorted and expired entries can be popped from the front.
        self._expires: dict[Hashable, float] = {}
        self._init_lease()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._purges = 0
        self._last_clear_id: str | None = None
        self._last_clear_seq: int | None = None
        self._last_purge_at: float | None = None
        self._bypass = False
        self._bypass_since = 0.0
        self._bypass_total = 0.0
        self._bypass_misses = 0

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def ttl(self) -> float | None:
        return self._ttl

    @property
    def bypass(self) -> bool:
        """Whether the cache is bypassed (by :meth:`set_bypass` or a lapsed lease):
        ``get`` misses and ``set`` keeps nothing."""
        with self._lock:
            return self._untrusted(self._clock())

    @property
    def bypass_misses(self) -> int:
        """How many ``get`` calls missed because the cache was bypassed."""
        with self._lock:
            return self._bypass_misses

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value for ``key``, or ``default``; a hit makes it most recently used."""
        with self._lock:
            value = self._get(key)
        return default if value is _ABSENT else value

    def _lookup(self, key: Hashable) -> tuple[Any, int]:
        with self._lock:
            return self._get(key), self._generation

    def set(self, key: Hashable, value: Any, *, generation: int | None = None) -> None:
        """Store ``value`` as the most recently used entry, evicting the least.

        While bypassed the value is not kept, and any older value for ``key``
        is dropped, since it is older than one the caller has since seen.

        ``generation``, when given, is :attr:`generation` as read before
        ``value`` was fetched from its source. If it has changed since, a clear
        ran (or bypass began) meanwhile, ``value`` may be older than that clear,
        and it is not stored.
        """
        with self._lock:
            now = self._clock()
            if self._untrusted(now):
                self._remove(key)
                return
            if generation is not None and generation != self._generation:
                return
            self._expire(now)
            self._store(key, value, now)

    def set_many(self, items: Mapping[Any, Any] | Iterable[tuple[Hashable, Any]], *,
                 generation: int | None = None) -> int:
        """:meth:`set` for many entries under one lock, as when warming a cache; returns how many were kept."""
        pairs = items.items() if isinstance(items, Mapping) else items
        with self._lock:
            now = self._clock()
            if self._untrusted(now) or (generation is not None and generation != self._generation):
                return 0
            self._expire(now)
            kept = 0
            for key, value in pairs:
                self._store(key, value, now)
                kept += 1
            return kept

    def _store(self, key: Hashable, value: Any, now: float) -> None:
        self._data.pop(key, None)
        self._data[key] = value
        if self._ttl is not None:
            self._expires.pop(key, None)
            self._expires[key] = now + self._ttl
        while len(self._data) > self._max_entries:
            oldest = next(iter(self._data))
            del self._data[oldest]
            self._expires.pop(oldest, None)
            self._evictions += 1

    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; return whether it was there (and not expired)."""
        with self._lock:
            self._expire()
            return self._remove(key)

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        """Drop every entry and return how many there were (see :class:`Purgeable`).

        ``clear_id`` and ``seq`` are recorded for :meth:`stats`; ``None``
        leaves the previous value.
        """
        with self._lock:
            self._expire()
            dropped = len(self._data)
            self._data = {}
            self._expires = {}
            self._generation += 1
            self._purges += 1
            if clear_id is not None:
                self._last_clear_id = clear_id
            if seq is not None:
                self._last_clear_seq = seq
            self._last_purge_at = time.time()
            return dropped

    def set_bypass(self, on: bool) -> None:
        """Turn bypass on or off. Entering bypass keeps the entries; clear them separately."""
        with self._lock:
            on = bool(on)
            if on == self._bypass:
                return
            now = self._clock()
            if on:
                self._bypass_since = now
                # A value fetched before bypass began may predate a clear
                # missed meanwhile: don't let set() store it afterwards.
                self._generation += 1
            else:
                self._bypass_total += now - self._bypass_since
            self._bypass = on

    def __len__(self) -> int:
        """The number of entries stored and not expired, bypassed or not."""
        with self._lock:
            self._expire()
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored and not expired. Counts no hit or miss, ignores bypass."""
        with self._lock:
            self._expire()
            return key in self._data

    def stats(self) -> dict[str, Any]:
        """Counters for ``GET /stats`` and metrics, JSON-serialisable."""
        with self._lock:
            self._expire()
            lookups = self._hits + self._misses
            now = self._clock()
            bypass_seconds = self._bypass_total + self._lapsed_total
            if self._bypass:
                bypass_seconds += now - self._bypass_since
            if self._lease_lapsed(now):
                assert self._lease is not None
                bypass_seconds += now - self._lease
            return {
                "entries": len(self._data),
                "max_entries": self._max_entries,
                "ttl": self._ttl,
                "hits": self._hits,
                "misses": self._misses,
                "hit_ratio": self._hits / lookups if lookups else 0.0,
                "evictions": self._evictions,
                "purges": self._purges,
                "last_clear_id": self._last_clear_id,
                "last_clear_seq": self._last_clear_seq,
                "last_purge_at": self._last_purge_at,
                "bypass": self._untrusted(now),
                "bypass_seconds": bypass_seconds,
            }

    # --- helpers; the caller holds the lock ----------------------------------

    def _get(self, key: Hashable) -> Any:
        """:meth:`get`'s lookup, ``_ABSENT`` on a miss."""
        now = self._clock()
        if self._untrusted(now):
            self._misses += 1
            self._bypass_misses += 1
            return _ABSENT
        self._expire(now)
        try:
            value = self._data.pop(key)
        except KeyError:
            self._misses += 1
            return _ABSENT
        self._data[key] = value
        self._hits += 1
        return value

    def _untrusted(self, now: float) -> bool:
        return self._bypass or self._lease_lapsed(now)

    def _remove(self, key: Hashable) -> bool:
        self._expires.pop(key, None)
        try:
            del self._data[key]
        except KeyError:
            return False
        return True

    def _expire(self, now: float | None = None) -> None:
        """Remove expired entries: amortised O(1), as each expires only once."""
        if not self._expires:
            return
        if now is None:
            now = self._clock()
        while self._expires:
            key = next(iter(self._expires))
            if self._expires[key] > now:
                break
            del self._expires[key]
            del self._data[key]

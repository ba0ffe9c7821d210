"""The lease for any mapping-like cache: :class:`LeasedMapping`.

The subscriber purges any target with ``clear()``, but purging alone bounds
nothing while the service cannot be heard: a process cut off from the bus
misses clears and goes on serving what it holds. :class:`~cachebus.workers.cache.Cache`
closes that gap with a lease (it misses once the service has been silent for
``heartbeat_interval * liveness``). :class:`LeasedMapping` gives the same lease
to a cache you already use: a ``dict``, a ``cachetools`` cache, any
``MutableMapping``::

    pages = LeasedMapping(cachetools.TTLCache(maxsize=10_000, ttl=300))
    subscriber = ThreadedSubscriber([pages], name="web")

The subscriber sees it as a leased purge target (``hold_lease``/``revoke_lease``
and ``clear(*, clear_id, seq) -> int``); the application reads and writes it as
a mapping, or through :meth:`~cachebus.workers.cache.ReadThrough.get_or_set`.
Only reads through the wrapper are covered: code that keeps a reference to the
mapping inside and reads it directly is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, MutableMapping
from typing import Any

from .cache import _ABSENT, LeaseHolder, fork_safe_lock


class LeasedMapping(LeaseHolder):
    """``mapping`` behind the same lease, clock and generation rules as :class:`~cachebus.workers.cache.Cache`.

    While no lease has ever been held the wrapper trusts its entries, as a
    standalone ``Cache`` does (the subscriber revokes the lease when it starts).
    While the lease is lapsed or revoked the wrapper reads as empty: ``get``
    returns the default, ``[]`` raises :class:`KeyError`, ``in`` is false and
    iteration yields nothing; ``set`` stores nothing and drops any older value
    for its key. ``len()`` still counts what is stored, which is what the next
    purge will drop.

    Every access holds one lock, so the wrapper is thread-safe even when the
    mapping is not (``cachetools`` caches are not). ``clock`` must be the clock
    the lease's ``until`` is measured on: :func:`time.monotonic` for the
    subscriber; tests inject a fake one.
    """

    def __init__(self, mapping: MutableMapping[Any, Any], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._mapping = mapping
        self._clock = clock
        self._lock = fork_safe_lock(self)
        self._init_lease()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value for ``key``, or ``default`` (always while the lease is lapsed)."""
        value, _ = self._lookup(key)
        return default if value is _ABSENT else value

    def __getitem__(self, key: Hashable) -> Any:
        value, _ = self._lookup(key)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return not self._lapsed() and key in self._mapping

    def set(self, key: Hashable, value: Any, *, generation: int | None = None, tags: Iterable[str] = ()) -> None:
        """Store ``value``, unless the lease is lapsed or ``generation`` is no longer current.

        ``generation`` is :attr:`generation` as read before ``value`` was
        fetched from its source; if a clear ran since, ``value`` may predate it.
        While lapsed, any older value for ``key`` is dropped as well.

        ``tags`` are accepted, as :meth:`~cachebus.workers.cache.ReadThrough.get_or_set` passes
        them, and ignored: a mapping keeps no tags, so a clear that names tags purges it entirely.
        """
        with self._lock:
            if self._lapsed():
                self._mapping.pop(key, None)
                return
            if generation is not None and generation != self._generation:
                return
            self._mapping[key] = value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Hashable) -> None:
        with self._lock:
            del self._mapping[key]

    def __iter__(self) -> Iterator[Any]:
        """The keys as they were when iteration began (a snapshot: other threads may write meanwhile)."""
        with self._lock:
            keys = [] if self._lapsed() else list(self._mapping)
        return iter(keys)

    def __len__(self) -> int:
        """How many entries the mapping stores, lease or not."""
        with self._lock:
            return len(self._mapping)

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        """Drop every entry and return how many there were (a purge target's ``clear``)."""
        with self._lock:
            dropped = len(self._mapping)
            self._mapping.clear()
            self._generation += 1
            return dropped

    def _lookup(self, key: Hashable) -> tuple[Any, int]:
        with self._lock:
            if self._lapsed():
                return _ABSENT, self._generation
            try:
                return self._mapping[key], self._generation
            except KeyError:
                return _ABSENT, self._generation

    def _lapsed(self) -> bool:
        """Whether the lease has run out or was revoked; the caller holds the lock."""
        return self._lease_lapsed(self._clock())

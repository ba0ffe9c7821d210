"""The service's event log: every change to the record, numbered, for live readers.

The record emits an event for each clear published, acked and completed, and
for each worker that joins, changes state or purges. :class:`EventLog` numbers
them, keeps the last ``history`` for clients that reconnect with
``Last-Event-ID``, and copies each one into every open :class:`EventQueue`.

Some events are state rather than history: a ``worker.stats`` event replaces
the one before it for the same worker. Those are kept, newest per worker,
beside the history instead of in it, so a busy fleet's cache counters never
push clears out of what a reconnecting client can replay.

Nothing here ever waits: a reader that falls behind fills its own bounded
queue, is marked overflowed and dropped, and the bus never notices.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cachebus.events")


class Event:
    """One numbered change. ``sse`` is its Server-Sent Events encoding, made on
    first use and then shared by every reader: with no stream open, events cost
    no JSON at all (a clear to a thousand workers makes two thousand)."""

    __slots__ = ("_sse", "data", "epoch", "id", "kind")

    def __init__(self, epoch: str, id: int, kind: str, data: dict[str, Any]) -> None:
        self.epoch = epoch
        self.id = id
        self.kind = kind
        self.data = data
        self._sse: bytes | None = None

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            payload = json.dumps(self.data, separators=(",", ":"))
            self._sse = f"id: {self.epoch}:{self.id}\nevent: {self.kind}\ndata: {payload}\n\n".encode()
        return self._sse


def unnumbered(kind: str, data: dict[str, Any]) -> bytes:
    """An SSE event without an id, so it does not move the client's ``Last-Event-ID``."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventQueue:
    """One reader's bounded queue of events not yet delivered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflowed = False
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()

    def wake(self) -> None:
        """Make :meth:`wait` return now, as when the client went away."""
        self._ready.set()

    def push(self, event: Event) -> None:
        if self.overflowed:
            return
        if len(self._events) >= self.limit:
            self.overflowed = True
            self._events.clear()
        else:
            self._events.append(event)
        self._ready.set()

    async def wait(self, timeout: float) -> None:
        """Return once there is something to deliver (or overflow), or after ``timeout``."""
        if not self._events and not self.overflowed:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                pass
        self._ready.clear()

    def take(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        return events


#: Event kinds whose newest event supersedes older ones, and the field that says whose they are.
LATEST_ONLY: dict[str, str] = {"worker.stats": "worker"}


class EventLog:
    """Numbers events, keeps a bounded history and fans them out to readers."""

    def __init__(self, epoch: str, history: int = 1000, client_queue: int = 1000) -> None:
        #: The service run: ids are only comparable within one.
        self.epoch = epoch
        self.client_queue = client_queue
        self.last_id = 0
        self.dropped_clients = 0
        self._history: deque[Event] = deque(maxlen=history)
        #: The id of the newest event no longer replayable; a client that saw it can still catch up.
        self._forgotten_through = 0
        #: The newest :data:`LATEST_ONLY` event per (kind, owner), in emit order.
        self._latest: dict[tuple[str, Any], Event] = {}
        self._queues: set[EventQueue] = set()
        #: Called with every event, on the event loop, before readers see it (metrics).
        self.listeners: list[Callable[[Event], None]] = []

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.last_id += 1
        event = Event(self.epoch, self.last_id, kind, data)
        owner_field = LATEST_ONLY.get(kind)
        if owner_field is not None:
            key = (kind, data.get(owner_field))
            self._latest.pop(key, None)
            self._latest[key] = event
            if len(self._latest) > self._history.maxlen:
                self._forget(next(iter(self._latest.values())).id)
        else:
            if len(self._history) == self._history.maxlen:
                self._forget(self._history[0].id)
            self._history.append(event)
        for listener in self.listeners:
            listener(event)
        for queue in self._queues:
            was_overflowed = queue.overflowed
            queue.push(event)
            if queue.overflowed and not was_overflowed:
                self.dropped_clients += 1
                log.warning("an event stream client fell %d events behind and is being dropped", queue.limit)

    def since(self, last_event_id: str) -> list[Event] | None:
        """Events after the SSE id ``last_event_id``, or None when the history no
        longer reaches back that far, or the id is from another service run."""
        epoch, _, number = last_event_id.partition(":")
        if epoch != self.epoch or not number.isdigit():
            return None
        last_id = int(number)
        if last_id > self.last_id:
            return None
        if last_id == self.last_id:
            return []
        if last_id < self._forgotten_through:
            return None
        missed = [event for event in self._history if event.id > last_id]
        latest = [event for event in self._latest.values() if event.id > last_id]
        return sorted(missed + latest, key=lambda event: event.id) if latest else missed

    def _forget(self, through: int) -> None:
        """Stop promising replay to clients that saw no more than event ``through``."""
        self._forgotten_through = max(self._forgotten_through, through)
        while self._latest:
            key, event = next(iter(self._latest.items()))
            if event.id > self._forgotten_through:
                break
            del self._latest[key]

    def snapshot(self, state: dict[str, Any]) -> bytes:
        """A ``snapshot`` event of ``state`` taken now, numbered as the newest event it includes."""
        return Event(self.epoch, self.last_id, "snapshot", state).sse

    def open(self) -> EventQueue:
        queue = EventQueue(self.client_queue)
        self._queues.add(queue)
        return queue

    def close(self, queue: EventQueue) -> None:
        self._queues.discard(queue)

    @property
    def clients(self) -> int:
        return len(self._queues)

"""The service's event log: every change to the record, numbered, for live readers.

The record emits an event for each clear published, acked and completed, and
for each worker that joins, changes state or purges: one dataclass per
:class:`EventKind`, which readers (the metrics, the stream) take as it is.
:class:`EventLog` numbers them, keeps the last ``history`` for clients that
reconnect with ``Last-Event-ID``, and copies each one into every open
:class:`EventQueue`. An event becomes JSON only when a stream first sends it.

Some events are state rather than history: a ``worker.stats`` event replaces
the one before it for the same worker. Those are kept, newest per worker,
beside the history instead of in it, so a busy fleet's cache counters never
push clears out of what a reconnecting client can replay.

Nothing here ever waits: a reader that falls behind fills its own bounded
queue, is marked overflowed and dropped, and the bus never notices.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from cachebus.bus.protocol import Ack
from cachebus.bus.scope import EVERYWHERE, ClearScope

from .views import AckView, WorkerState, WorkerView

log = logging.getLogger("cachebus.events")

#: The ``<n>`` of an event id ``<epoch>:<n>`` a client sends back in ``Last-Event-ID``.
_EVENT_NUMBER = re.compile(r"[0-9]{1,19}")


class EventKind(enum.StrEnum):
    """The ``event:`` name of every event on the stream (docs/ops.md has what each means)."""

    CLEAR_PUBLISHED = "clear.published"
    CLEAR_ACKED = "clear.acked"
    CLEAR_COMPLETED = "clear.completed"
    WORKER_JOINED = "worker.joined"
    WORKER_STATE = "worker.state"
    WORKER_PURGED = "worker.purged"
    WORKER_STATS = "worker.stats"
    #: Not numbered in the log: the state a new stream starts from.
    SNAPSHOT = "snapshot"
    #: Not numbered in the log: the last event a reader that fell behind gets.
    OVERFLOW = "overflow"


# --- one dataclass per change to the record ----------------------------------
#
# The record builds these and nothing else does. They hold the values of the
# moment they were emitted and are never changed after (not frozen only because
# a frozen dataclass costs twice as much to build, and an ack makes two), and
# become the ``data:`` JSON only when a stream first needs it: to_json() gives
# the names, order and rounding of fields that the stream has always sent.


class RecordEvent:
    """Base of the events the record emits. Subclasses set :attr:`KIND`."""

    __slots__ = ()
    KIND: ClassVar[EventKind]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(slots=True)
class ClearPublished(RecordEvent):
    """A clear went on the bus; ``expected`` are the workers (process ids) live at that moment,
    ``token`` the first characters of the token that asked for it."""

    KIND: ClassVar[EventKind] = EventKind.CLEAR_PUBLISHED
    clear_id: str
    seq: int
    epoch: str
    published_at: float
    expected: tuple[str, ...]
    token: str = ""
    reach: ClearScope = EVERYWHERE

    def to_json(self) -> dict[str, Any]:
        return {"clear_id": self.clear_id, "seq": self.seq, "epoch": self.epoch,
                "published_at": self.published_at, "expected": list(self.expected), "token": self.token,
                "scope": self.reach.to_json()}


@dataclass(slots=True)
class ClearAcked(RecordEvent):
    """One worker's purge covers a clear; ``acked`` of ``expected`` workers have now purged
    successfully, and ``failed`` report a purge that failed and was not yet retried."""

    KIND: ClassVar[EventKind] = EventKind.CLEAR_ACKED
    clear_id: str
    seq: int
    #: The ack as the clear keeps it (the same object).
    ack: AckView
    acked: int
    expected: int
    failed: int

    def to_json(self) -> dict[str, Any]:
        ack = self.ack.to_json()
        extent = ack.pop("scope")  # last, where the stream has always sent it
        return {"clear_id": self.clear_id, "seq": self.seq, **ack, "acked": self.acked, "expected": self.expected,
                "failed": self.failed, "scope": extent}


@dataclass(slots=True)
class ClearCompleted(RecordEvent):
    """The record stopped waiting for a clear: every expected worker acked, or time ran out."""

    KIND: ClassVar[EventKind] = EventKind.CLEAR_COMPLETED
    clear_id: str
    seq: int
    expected: int
    acked: int
    complete: bool
    missing: tuple[str, ...]
    #: Expected workers whose purge failed and was not retried successfully in time.
    failed: tuple[str, ...]
    #: From publish to the last ack, or to giving up; already rounded to the microsecond.
    duration_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {"clear_id": self.clear_id, "seq": self.seq, "expected": self.expected, "acked": self.acked,
                "complete": self.complete, "missing": list(self.missing), "failed": list(self.failed),
                "duration_ms": self.duration_ms}


@dataclass(slots=True)
class WorkerJoined(RecordEvent):
    """A worker the record did not know (or a new instance of one) said hello: the worker as
    ``GET /api/v1/cache/workers`` shows it, at that moment."""

    KIND: ClassVar[EventKind] = EventKind.WORKER_JOINED
    worker: WorkerView

    def to_json(self) -> dict[str, Any]:
        return self.worker.to_json()


@dataclass(slots=True)
class WorkerStateChanged(RecordEvent):
    """A worker moved from ``previous`` to ``state`` (which may be ``forgotten``)."""

    KIND: ClassVar[EventKind] = EventKind.WORKER_STATE
    worker: str
    name: str
    state: WorkerState
    previous: WorkerState
    last_seen: float

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "name": self.name, "state": self.state, "previous": self.previous,
                "last_seen": self.last_seen}


@dataclass(slots=True)
class WorkerPurged(RecordEvent):
    """A worker reported a purge (its ack, as it came), whichever clears it turns out to cover."""

    KIND: ClassVar[EventKind] = EventKind.WORKER_PURGED
    ack: Ack

    def to_json(self) -> dict[str, Any]:
        ack = self.ack
        return {"worker": ack.instance, "name": ack.name, "cause": ack.cause, "seq": ack.seq,
                "clear_id": ack.clear_id, "entries_dropped": ack.dropped, "purge_ms": round(ack.purge_ms, 3),
                "outcome": ack.outcome, "error": ack.error, "scope": ack.extent}


@dataclass(slots=True)
class WorkerStats(RecordEvent):
    """A worker's heartbeat carried changed cache counters.

    State rather than history: the newest one per worker supersedes the ones before it.
    """

    KIND: ClassVar[EventKind] = EventKind.WORKER_STATS
    worker: str
    name: str
    last_seen: float
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "name": self.name, "last_seen": self.last_seen, "stats": self.stats}


def _encode(kind: EventKind | str, data: dict[str, Any], id: str | None = None) -> bytes:
    """One Server-Sent Event: an optional ``id:`` line, then ``event:`` and one compact ``data:`` line."""
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Event:
    """One numbered change. ``sse`` is its Server-Sent Events encoding, made on
    first use and then shared by every reader: with no stream open, events cost
    no JSON at all (a clear to a thousand workers makes two thousand)."""

    __slots__ = ("_sse", "epoch", "id", "payload")

    def __init__(self, epoch: str, id: int, payload: RecordEvent) -> None:
        self.epoch = epoch
        self.id = id
        self.payload = payload
        self._sse: bytes | None = None

    @property
    def kind(self) -> EventKind:
        return self.payload.KIND

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = _encode(self.payload.KIND, self.payload.to_json(), f"{self.epoch}:{self.id}")
        return self._sse


def unnumbered(kind: EventKind, data: dict[str, Any]) -> bytes:
    """An SSE event without an id, so it does not move the client's ``Last-Event-ID``."""
    return _encode(kind, data)


class EventQueue:
    """One reader's bounded queue of events not yet delivered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflowed = False
        #: Called once, when the queue overflows: the reader may be stuck writing to a
        #: client that reads nothing, and only its owner can end that connection.
        self.on_overflow: Callable[[], None] | None = None
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
            if self.on_overflow is not None:
                self.on_overflow()
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


class EventLog:
    """Numbers events, keeps a bounded history and fans them out to readers."""

    def __init__(self, epoch: str, history: int = 1000, client_queue: int = 1000) -> None:
        #: The service run: ids are only comparable within one.
        self.epoch = epoch
        self.history = history
        self.client_queue = client_queue
        self.last_id = 0
        self.dropped_clients = 0
        self._history: deque[Event] = deque(maxlen=history)
        #: The id of the newest event no longer replayable; a client that saw it can still catch up.
        self._forgotten_through = 0
        #: The newest :class:`WorkerStats` event per worker, in emit order.
        self._latest: dict[str, Event] = {}
        self._queues: set[EventQueue] = set()
        #: Called with every event, on the event loop, before readers see it (metrics).
        self.listeners: list[Callable[[Event], None]] = []

    def emit(self, payload: RecordEvent) -> None:
        self.last_id += 1
        event = Event(self.epoch, self.last_id, payload)
        if isinstance(payload, WorkerStats):
            # Kept beside the history, newest per worker, so counters never push clears out of it.
            self._latest.pop(payload.worker, None)
            self._latest[payload.worker] = event
            if len(self._latest) > self.history:
                self._forget(next(iter(self._latest.values())).id)
        else:
            if len(self._history) == self.history:
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
        # ASCII digits only, and few: the header is the client's, and str.isdigit is
        # also true for "²", which int() refuses.
        if epoch != self.epoch or not _EVENT_NUMBER.fullmatch(number):
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
        return _encode(EventKind.SNAPSHOT, state, f"{self.epoch}:{self.last_id}")

    def open(self) -> EventQueue:
        queue = EventQueue(self.client_queue)
        self._queues.add(queue)
        return queue

    def close(self, queue: EventQueue) -> None:
        self._queues.discard(queue)

    @property
    def clients(self) -> int:
        return len(self._queues)

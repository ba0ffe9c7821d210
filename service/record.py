"""The record of clears and acks: who was expected to purge, and who did.

The publisher tells the record about each clear before it goes on the wire, the
ack listener tells it about every hello, ack and bye, and the HTTP read
endpoints only read it. Everything here runs on the event loop thread, so no
locks are needed; memory is bounded by ``max_clears``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from bus.protocol import Ack, Bye, Clear, Hello

log = logging.getLogger("cachebus.record")

#: A worker that said hello and has not left.
LIVE = "live"
#: A worker that said bye.
LEFT = "left"


@dataclass
class WorkerAck:
    """One worker's proof that it purged after a clear was published."""

    worker: str
    acked_at: float
    latency_ms: float
    dropped: int
    purge_ms: float
    cause: str

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "acked_at": self.acked_at,
            "latency_ms": round(self.latency_ms, 3),
            "entries_dropped": self.dropped,
            "purge_ms": round(self.purge_ms, 3),
            "cause": self.cause,
        }


@dataclass
class ClearEntry:
    """A published clear, the workers connected at that moment, and their acks."""

    id: str
    seq: int
    epoch: str
    published_at: float
    expected: list[str]
    acks: dict[str, WorkerAck] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [name for name in self.expected if name not in self.acks]

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "epoch": self.epoch,
            "published_at": self.published_at,
            "workers": list(self.expected),
            "acks": [ack.to_json() for ack in self.acks.values()],
            "missing": self.missing,
            "complete": self.complete,
        }


@dataclass
class WorkerEntry:
    """What the service knows about one worker, keyed by its name."""

    name: str
    instance: str
    host: str
    pid: int
    endpoint: str
    joined_at: float
    last_seen: float
    #: The seq the worker had seen when it said hello.
    synced_seq: int = 0
    state: str = LIVE
    last_acked_seq: int | None = None
    last_acked_clear: str | None = None
    last_purge_cause: str | None = None
    acks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "instance": self.instance,
            "host": self.host,
            "pid": self.pid,
            "endpoint": self.endpoint,
            "state": self.state,
            "joined_at": self.joined_at,
            "last_seen": self.last_seen,
            "last_acked_seq": self.last_acked_seq,
            "last_acked_clear": self.last_acked_clear,
            "last_purge_cause": self.last_purge_cause,
            "acks": self.acks,
        }


class Record:
    """In-memory record of recent clears and of every known worker."""

    def __init__(self, max_clears: int = 1000) -> None:
        self.max_clears = max_clears
        self._clears: OrderedDict[str, ClearEntry] = OrderedDict()
        self._workers: dict[str, WorkerEntry] = {}

    # --- writers: the publisher and the ack listener -------------------------

    def published(self, clear: Clear) -> ClearEntry:
        """Start tracking ``clear``; every live worker is expected to ack it."""
        entry = ClearEntry(
            id=clear.id,
            seq=clear.seq,
            epoch=clear.epoch,
            published_at=clear.ts,
            expected=[w.name for w in self._workers.values() if w.state == LIVE],
        )
        self._clears[clear.id] = entry
        while len(self._clears) > self.max_clears:
            self._clears.popitem(last=False)
        return entry

    def hello(self, msg: Hello) -> WorkerEntry:
        """Register a worker, or refresh it when it reconnects or restarts."""
        now = time.time()
        known = self._workers.get(msg.name)
        if known is not None and known.instance != msg.instance and known.state == LIVE:
            log.warning("worker %s (pid %d on %s) replaces instance %s with the same name",
                        msg.name, msg.pid, msg.host, known.instance)
        worker = WorkerEntry(
            name=msg.name, instance=msg.instance, host=msg.host, pid=msg.pid,
            endpoint=msg.endpoint, joined_at=now, last_seen=now, synced_seq=msg.seq,
        )
        if known is not None and known.instance == msg.instance:
            worker.joined_at = known.joined_at
            worker.last_acked_seq = known.last_acked_seq
            worker.last_acked_clear = known.last_acked_clear
            worker.last_purge_cause = known.last_purge_cause
            worker.acks = known.acks
        self._workers[msg.name] = worker
        log.info("worker %s joined: pid %d on %s, read API %s", msg.name, msg.pid, msg.host, msg.endpoint)
        return worker

    def acked(self, msg: Ack) -> list[ClearEntry]:
        """Credit ``msg`` to every clear its purge covers; return those clears.

        A purge after seeing ``seq`` proves the worker dropped everything that
        any clear up to ``seq`` of that epoch invalidated, including clears
        it never received. Clears from before the worker joined are credited
        only where it was expected.
        """
        now = time.time()
        worker = self._workers.get(msg.name)
        current = worker is not None and worker.instance == msg.instance
        if current:
            worker.last_seen = now
            worker.last_purge_cause = msg.cause
        updated = []
        for entry in reversed(self._clears.values()):
            if entry.epoch != msg.epoch or entry.seq > msg.seq or msg.name in entry.acks:
                continue
            if current and worker.last_acked_seq is not None and entry.seq <= worker.last_acked_seq:
                break
            if msg.name not in entry.expected and (not current or entry.seq <= worker.synced_seq):
                continue
            entry.acks[msg.name] = WorkerAck(
                worker=msg.name, acked_at=now, latency_ms=(now - entry.published_at) * 1000,
                dropped=msg.dropped, purge_ms=msg.purge_ms, cause=msg.cause,
            )
            updated.append(entry)
        if current and updated:
            worker.acks += len(updated)
            newest = updated[0]
            if worker.last_acked_seq is None or newest.seq > worker.last_acked_seq:
                worker.last_acked_seq = newest.seq
                worker.last_acked_clear = newest.id
        return updated

    def bye(self, msg: Bye) -> None:
        """A worker left cleanly: stop expecting it in new clears."""
        worker = self._workers.get(msg.name)
        if worker is not None and worker.instance == msg.instance:
            worker.state = LEFT
            worker.last_seen = time.time()
            log.info("worker %s left", msg.name)

    # --- readers: the HTTP API ------------------------------------------------

    def clear(self, clear_id: str) -> ClearEntry | None:
        return self._clears.get(clear_id)

    def recent(self, limit: int) -> list[ClearEntry]:
        """The ``limit`` most recent clears, newest first."""
        newest = reversed(self._clears.values())
        return [entry for _, entry in zip(range(limit), newest)]

    def workers(self) -> list[WorkerEntry]:
        return sorted(self._workers.values(), key=lambda w: w.name)

"""What the record knows, as readers see it: one frozen value per concept, with one ``to_json``.

A worker's ack of a clear (:class:`AckView`) and a worker as it stands
(:class:`WorkerView`) are each defined once here. The record builds them from
the wire message and keeps them; its events carry the same objects
(``ClearAcked(clear, ack, counts)``, ``WorkerJoined(worker)``), and every
answer (``GET /clears``, ``GET /workers``, ``wait=all``, the stream's
snapshot) serializes them through the same ``to_json``. tests/test_openapi.py
validates these serializers against openapi.yaml's schemas.

Immutable: a value is shared by the record, the event log and every stream,
so nobody may change it after it is made. An :class:`AckView` is made once per
ack per clear, on the hot path, so it is a ``NamedTuple``: 0.40 µs to build
positionally, against 2.35 µs for a frozen slotted dataclass of its ten fields
and 0.30 µs for an unfrozen one (``timeit``, this machine, 2026-12-08).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, NewType

from cachebus.bus.protocol import Ack, OnSilence, PurgeCause, PurgeOutcome
from cachebus.bus.scope import PurgeExtent

#: A worker process's id on the bus (``host:pid:random``, made when its subscriber starts):
#: the record's key. Many processes share a name; each has its own id.
WorkerId = NewType("WorkerId", str)


class WorkerState(enum.StrEnum):
    """Where a worker stands, by how long it has been silent (docs/delivery.md)."""

    #: Heard from within the liveness window. Only live workers are expected to ack a new clear.
    LIVE = "live"
    #: Silent for longer than the liveness window; may be slow or gone.
    SUSPECT = "suspect"
    #: Silent for longer than ``lost_after``.
    LOST = "lost"
    #: Said bye: stopped cleanly.
    LEFT = "left"
    #: Not a state a worker is in: the record dropped it after ``forget_after``. Only
    #: events and answers about a worker the record no longer has say it.
    FORGOTTEN = "forgotten"


class AckView(NamedTuple):
    """One worker's report that it purged after a clear was published: a proof when ``ok``."""

    worker: WorkerId
    name: str
    acked_at: float
    latency_ms: float
    dropped: int
    purge_ms: float
    cause: PurgeCause
    outcome: PurgeOutcome = PurgeOutcome.OK
    error: str = ""
    #: Whether the worker dropped everything or only what the clears named.
    extent: PurgeExtent = PurgeExtent.ALL

    @classmethod
    def of(cls, msg: Ack, acked_at: float, published_at: float) -> AckView:
        """The ack ``msg`` as it covers a clear published at ``published_at``."""
        return cls(WorkerId(msg.instance), msg.name, acked_at, (acked_at - published_at) * 1000, msg.dropped,
                   msg.purge_ms, msg.cause, msg.outcome, msg.error, msg.extent)

    @property
    def ok(self) -> bool:
        return self.outcome is PurgeOutcome.OK

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "name": self.name, "acked_at": self.acked_at,
                "latency_ms": round(self.latency_ms, 3), "entries_dropped": self.dropped,
                "purge_ms": round(self.purge_ms, 3), "cause": self.cause, "outcome": self.outcome,
                "error": self.error, "scope": self.extent}


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker process as ``GET /api/v1/cache/workers`` shows it, at one moment."""

    name: str
    #: The process's id on the bus, unique per process start; the record's key.
    instance: WorkerId
    host: str
    pid: int
    endpoint: str
    state: WorkerState
    joined_at: float
    last_seen: float
    last_acked_seq: int | None
    last_acked_clear: str | None
    last_purge_cause: PurgeCause | None
    last_outcome: PurgeOutcome | None
    last_error: str
    acks: int
    epoch: str
    seq: int
    stats: dict[str, Any]
    key: str | None = None
    on_silence: OnSilence = OnSilence.BYPASS
    degraded: bool = False
    via: str = ""
    labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.instance, "name": self.name, "instance": self.instance, "host": self.host,
                "pid": self.pid, "endpoint": self.endpoint, "state": self.state, "joined_at": self.joined_at,
                "last_seen": self.last_seen, "last_acked_seq": self.last_acked_seq,
                "last_acked_clear": self.last_acked_clear, "last_purge_cause": self.last_purge_cause,
                "last_outcome": self.last_outcome, "last_error": self.last_error,
                "acks": self.acks, "epoch": self.epoch, "seq": self.seq, "stats": self.stats, "key": self.key,
                "on_silence": self.on_silence, "degraded": self.degraded, "via": self.via,
                "labels": list(self.labels)}

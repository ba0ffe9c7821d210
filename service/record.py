"""The record of clears and acks: who was expected to purge, and who did.

The publisher tells the record about each clear before it goes on the wire, the
ack listener tells it about every hello, ack and bye, and the HTTP read
endpoints only read it. Everything here runs on the event loop thread, so no
locks are needed.

Memory is bounded by ``max_workers`` and twice over for clears: by
``max_clears`` (clears kept) and by ``max_acks`` (acks kept over all those
clears, about 140 bytes each), since a clear to two thousand workers holds two
thousand acks. Clears published while the same workers are live share one
:class:`Membership` instead of each copying the names: 1,000 clears to 2,002
workers that never ack took 213.7 MB with the copies and take 0.6 MB shared
(tests/test_record.py).

A worker is one process, known by its ``instance`` (host, pid and a random
part, unique per process start); its ``name`` is a label that many processes
share, a role such as ``web``. Clears expect processes, and answers group them
by name. Under ``gunicorn -w 3`` with one name, three processes are expected
and listed, not one.

A worker's hello binds its instance to the public key the bus authenticated
(CURVE) of the :class:`Peer` that sent it, and notes the connection's routing
id for replies. Acks, byes and heartbeats count only from that key, so a
worker can ack only as itself or as a process sharing its keypair
(docs/security.md).

An ack says whether the purge worked. A failed one is recorded and shown, but
proves nothing: the clear counts the worker as purged only once an ack with
outcome ``ok`` covers it (the worker retries the failed target and acks again).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachebus.bus.protocol import (
    Ack,
    Bye,
    Clear,
    Hello,
    OnSilence,
    PurgeCause,
    PurgeOutcome,
    WorkerHeartbeat,
    WorkerIdentity,
)
from cachebus.bus.scope import EVERYWHERE, ClearScope, in_group

from .events import (
    ClearAcked,
    ClearCompleted,
    ClearPublished,
    RecordEvent,
    WorkerJoined,
    WorkerPurged,
    WorkerStateChanged,
    WorkerStats,
)
from .views import AckView, WorkerId, WorkerState, WorkerView

log = logging.getLogger("cachebus.record")


#: Receives every change to the record, after it is applied.
Emit = Callable[[RecordEvent], None]

#: How many characters of the token that asked for a clear the record keeps and shows.
TOKEN_SHOWN = 8

#: Most groups whose expected workers the record keeps worked out at once; past it the
#: cache starts again, so clears for ever new groups cannot grow it.
_MAX_MEMBERSHIPS = 64


@dataclass(frozen=True)
class Peer:
    """Who sent a message on the ack channel, as the transport vouches for it."""

    #: The ROUTER's routing id of the sender's connection.
    routing_id: bytes = b""
    #: The sender's z85 CURVE public key, as ZAP authenticated it; None without CURVE.
    key: str | None = None
    #: The relay the message came through (docs/scale-out.md); empty when the worker is connected directly.
    via: str = ""


class Refused(Exception):
    """A worker message the record will not apply. ``str()`` is one line saying why."""


class RecordFull(Refused):
    """A hello from a new worker while the record holds ``max_workers`` that are all still around."""


def _ignore(event: RecordEvent) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Membership:
    """The workers expected to ack a clear (their ids, in join order, with their names),
    the same ids as a set, and the workers known but not expected: suspect or lost then.

    Immutable, so every clear published while the workers' states stay the same
    holds this one snapshot.
    """

    ids: tuple[str, ...]
    names: tuple[str, ...]
    lookup: frozenset[str]
    excluded: tuple[str, ...] = ()

    @classmethod
    def of(cls, workers: list[WorkerEntry], group: tuple[str, ...] = ()) -> Membership:
        """The live workers a clear for ``group`` (empty: everyone) expects, and the ones it would
        have expected but that are suspect or lost."""
        if group:
            workers = [w for w in workers if in_group(group, w.name, w.labels)]
        live = [w for w in workers if w.state == WorkerState.LIVE]
        ids = tuple(w.instance for w in live)
        return cls(ids, tuple(w.name for w in live), frozenset(ids),
                   tuple(w.instance for w in workers if w.state in (WorkerState.SUSPECT, WorkerState.LOST)))

    def name_of(self, worker: str) -> str:
        """The name an expected worker had at publish time (it may be forgotten since)."""
        return self.names[self.ids.index(worker)]


@dataclass(slots=True)
class ClearEntry:
    """A published clear, the workers live at that moment, and their acks."""

    id: str
    seq: int
    epoch: str
    published_at: float
    membership: Membership
    #: The first characters of the token that asked for the clear, so operators can tell who did.
    token: str = ""
    #: What the clear drops, and which processes it is for.
    reach: ClearScope = EVERYWHERE
    #: Each worker's ack, by worker id: its successful one once there is one, else its latest failed one.
    acks: dict[str, AckView] = field(default_factory=dict)
    #: When the last expected ack arrived, or when the record stopped waiting for it.
    completed_at: float | None = None
    #: How many of the expected workers acked a successful purge: a count, so an ack
    #: costs O(1) with a thousand workers and no clear keeps a set of its own.
    acked_count: int = 0
    #: How many of the expected workers' acks are failed purges not yet made good.
    failed_count: int = 0
    #: Futures of callers waiting for completion (see :meth:`Record.wait`), resolved True once complete.
    waiters: list[asyncio.Future[bool]] = field(default_factory=list, repr=False)

    @property
    def expected(self) -> tuple[str, ...]:
        """The ids of the workers expected to ack."""
        return self.membership.ids

    def expects(self, worker: str) -> bool:
        return worker in self.membership.lookup

    def add_ack(self, ack: AckView) -> bool:
        """Keep ``ack`` unless the worker already proved its purge; return whether it was kept.

        The first successful ack from each expected worker counts towards completion;
        a failed one is kept (and counted as failed) until a successful one replaces it.
        """
        previous = self.acks.get(ack.worker)
        if previous is not None and previous.ok:
            return False
        if self.expects(ack.worker):
            if previous is not None:
                self.failed_count -= 1
            if ack.ok:
                self.acked_count += 1
            else:
                self.failed_count += 1
        self.acks[ack.worker] = ack
        if self.waiters and self.complete:
            for waiter in self.waiters:
                if not waiter.done():
                    waiter.set_result(True)
        return True

    @property
    def missing(self) -> list[str]:
        """Expected workers that sent no ack at all."""
        return [worker for worker in self.expected if worker not in self.acks]

    @property
    def failed(self) -> list[str]:
        """Expected workers whose purge failed and was not made good yet."""
        if not self.failed_count:
            return []
        return [worker for worker in self.expected if (ack := self.acks.get(worker)) is not None and not ack.ok]

    @property
    def complete(self) -> bool:
        """Every expected worker proved its purge; never true when nobody was expected,
        since then nothing was proven."""
        return self.acked_count == len(self.expected) > 0

    @property
    def duration_ms(self) -> float | None:
        """From publish to the last expected ack (or to giving up); None while still waiting."""
        if self.completed_at is None:
            return None
        return round((self.completed_at - self.published_at) * 1000, 3)


@dataclass
class WorkerEntry:
    """What the service knows about one worker process, keyed by its instance."""

    name: str
    #: The process's id on the bus (host, pid, a random part): the record's key.
    instance: str
    host: str
    pid: int
    endpoint: str
    joined_at: float
    last_seen: float
    #: The seq the worker had seen when it said hello.
    synced_seq: int = 0
    state: WorkerState = WorkerState.LIVE
    last_acked_seq: int | None = None
    last_acked_clear: str | None = None
    last_purge_cause: PurgeCause | None = None
    last_outcome: PurgeOutcome | None = None
    #: The error of the last purge when it failed, as the worker reported it.
    last_error: str = ""
    acks: int = 0
    #: The worker's view of the bus and its cache counters, from its heartbeats.
    epoch: str = ""
    seq: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    #: The CURVE public key this worker said hello with (None without CURVE); its name is bound to it.
    key: str | None = None
    #: The routing id of the connection the worker last spoke on (hello, heartbeat, ack or bye).
    routing_id: bytes = field(default=b"", repr=False)
    #: The relay it speaks through (docs/scale-out.md); empty when connected to the service directly.
    via: str = ""
    #: What its caches do once no service is heard, and whether it said they serve without the
    #: bound now: from its heartbeats.
    on_silence: OnSilence = OnSilence.BYPASS
    said_degraded: bool = False
    #: More names it answers to in a clear's ``group``, besides :attr:`name`.
    labels: tuple[str, ...] = ()
    #: When, and with what, the last ``worker.stats`` event went out.
    _stats_emitted_at: float = field(default=float("-inf"), repr=False)
    _stats_emitted: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def degraded(self) -> bool:
        """Whether its caches may serve without the bound: it said so, or it chose ``serve`` and
        the service has not heard it for a while (suspect or lost: it may hear nobody either)."""
        if self.on_silence is not OnSilence.SERVE or self.state in (WorkerState.LEFT, WorkerState.FORGOTTEN):
            return False
        return self.said_degraded or self.state in (WorkerState.SUSPECT, WorkerState.LOST)

    def view(self) -> WorkerView:
        """The worker as it stands now, as every answer and event shows it."""
        return WorkerView(
            name=self.name, instance=WorkerId(self.instance), host=self.host, pid=self.pid, endpoint=self.endpoint,
            state=self.state, joined_at=self.joined_at, last_seen=self.last_seen,
            last_acked_seq=self.last_acked_seq, last_acked_clear=self.last_acked_clear,
            last_purge_cause=self.last_purge_cause, last_outcome=self.last_outcome, last_error=self.last_error,
            acks=self.acks, epoch=self.epoch, seq=self.seq, stats=self.stats, key=self.key,
            on_silence=self.on_silence, degraded=self.degraded, via=self.via, labels=self.labels)

    def to_json(self) -> dict[str, Any]:
        return self.view().to_json()

    def check_peer(self, peer: Peer, what: str) -> None:
        """Raise :class:`Refused` unless ``peer`` holds the key this worker said hello with.

        A message from another connection of that key moves the binding there,
        as a heartbeat does: the worker's back channel reconnected, and its
        first message on the new connection may well be an ack. (Refusing it
        lost that clear's ack; and a process that holds the key could move the
        binding with a heartbeat anyway, so the connection adds no protection.)
        """
        if peer.key != self.key:
            raise Refused(f"{what} for worker {self.instance} with another key than its hello's")
        self.routing_id = peer.routing_id

    def brief(self) -> dict[str, Any]:
        """Who and where the worker is, as answers list a missing or excluded one."""
        return {"worker": self.instance, "name": self.name, "host": self.host, "pid": self.pid,
                "state": self.state, "last_seen": self.last_seen}


class Record:
    """In-memory record of recent clears and of every known worker.

    A worker's state follows its silence: ``live``, then ``suspect`` after
    ``suspect_after`` seconds, ``lost`` after ``lost_after``, and forgotten
    after ``forget_after`` (also once it has left).
    """

    def __init__(self, max_clears: int = 1000, suspect_after: float = 1.5,
                 lost_after: float = 5.0, forget_after: float = 3600.0,
                 complete_within: float = 30.0, stats_interval: float = 2.0,
                 emit: Emit = _ignore, max_acks: int = 200_000, max_workers: int = 10_000) -> None:
        self.max_clears = max_clears
        #: Acks kept over all clears; the oldest clears go first when there are more.
        self.max_acks = max_acks
        #: Most workers the record holds; a lost or left one makes room for a new one.
        self.max_workers = max_workers
        self.suspect_after = suspect_after
        self.lost_after = lost_after
        self.forget_after = forget_after
        self.complete_within = complete_within
        #: A worker's changed cache counters are streamed at most this often.
        self.stats_interval = stats_interval
        #: Every change is reported here (the event log), after it is applied.
        self.emit = emit
        self._clears: OrderedDict[str, ClearEntry] = OrderedDict()
        #: Clears still waiting for acks, oldest first.
        self._pending: dict[str, ClearEntry] = {}
        self._by_seq: dict[tuple[str, int], ClearEntry] = {}
        self._workers: dict[str, WorkerEntry] = {}
        #: Acks held by the kept clears, for ``max_acks``.
        self.acks_kept = 0
        #: The expected workers of a clear for each group (``()``: everyone), as of the last change
        #: to the workers' states; emptied by every change.
        self._memberships: dict[tuple[str, ...], Membership] = {}

    # --- writers: the publisher and the ack listener -------------------------

    def published(self, clear: Clear, token: str = "") -> None:
        """Start tracking ``clear``; every live worker is expected to ack it.

        ``token`` is the token that asked for the clear; only its first
        :data:`TOKEN_SHOWN` characters are kept, enough to tell tokens apart.
        """
        membership = self._memberships.get(clear.group)
        if membership is None:
            if len(self._memberships) >= _MAX_MEMBERSHIPS:
                self._memberships.clear()
            membership = self._memberships[clear.group] = Membership.of(list(self._workers.values()), clear.group)
        entry = ClearEntry(id=clear.id, seq=clear.seq, epoch=clear.epoch, published_at=clear.ts,
                           membership=membership, token=token[:TOKEN_SHOWN], reach=clear.reach)
        self._clears[clear.id] = entry
        self._by_seq[(clear.epoch, clear.seq)] = entry
        self._trim()
        self.emit(ClearPublished(clear_id=entry.id, seq=entry.seq, epoch=entry.epoch,
                                 published_at=entry.published_at, expected=entry.expected, token=entry.token,
                                 reach=entry.reach))
        self._pending[entry.id] = entry
        if not entry.expected:
            self._complete(entry, time.time())

    def _trim(self) -> None:
        """Forget the oldest clears while more than ``max_clears`` or ``max_acks`` are kept.

        The newest clear always stays, so a caller waiting on it keeps its proof.
        """
        while len(self._clears) > 1 and (len(self._clears) > self.max_clears or self.acks_kept > self.max_acks):
            _, oldest = self._clears.popitem(last=False)
            del self._by_seq[(oldest.epoch, oldest.seq)]
            self._pending.pop(oldest.id, None)
            self.acks_kept -= len(oldest.acks)

    def _complete(self, entry: ClearEntry, now: float) -> None:
        """Stop waiting for ``entry``: every expected worker acked, nobody was expected, or time ran out."""
        del self._pending[entry.id]
        entry.completed_at = now
        acked, expected = entry.acked_count, len(entry.expected)
        event = ClearCompleted(clear_id=entry.id, seq=entry.seq, expected=expected, acked=acked,
                               complete=entry.complete, missing=tuple(entry.missing), failed=tuple(entry.failed),
                               duration_ms=entry.duration_ms)
        fields = event.to_json()
        if entry.complete:
            log.info("clear %s seq %d: %d of %d workers acked in %.1f ms", entry.id, entry.seq, acked, expected,
                     entry.duration_ms, extra={"fields": {**fields, "all_acked_ms": entry.duration_ms}})
        elif not expected:
            log.warning("clear %s seq %d: no live worker at publish time, so nobody purged", entry.id, entry.seq,
                        extra={"fields": fields})
        else:
            log.warning("clear %s seq %d: %d of %d workers purged within %.0f s; failed %s; missing %s", entry.id,
                        entry.seq, acked, expected, self.complete_within, ", ".join(entry.failed) or "none",
                        ", ".join(entry.missing) or "none", extra={"fields": fields})
        self.emit(event)

    def hello(self, msg: WorkerIdentity, peer: Peer = Peer()) -> WorkerEntry:
        """Register a worker process, or refresh it when it reconnects.

        An instance stays bound to the key of its first hello for as long as
        the record keeps it; a hello (or heartbeat, which carries the same
        identity) from that key moves the binding to the connection it came
        on, as after the worker's DEALER reconnected. Raises :class:`Refused`
        for another key or another name, and for a new instance whose name
        known instances hold with another key (processes sharing a name share
        its keypair); :class:`RecordFull` for a new worker beyond ``max_workers``.
        """
        now = time.time()
        known = self._workers.get(msg.instance)
        if known is not None:
            if known.key != peer.key:
                raise Refused(f"{msg.KIND.decode()} for worker {msg.instance}, which belongs to another key")
            if known.name != msg.name:
                raise Refused(f"{msg.KIND.decode()} for worker {msg.instance} under the name {msg.name!r}; "
                              f"it said hello as {known.name!r}")
            known.routing_id = peer.routing_id
            known.via = peer.via
            self._set_state(known, WorkerState.LIVE, now)
            known.last_seen = now
            known.epoch, known.seq = msg.epoch, msg.seq
            if known.labels != msg.labels:
                known.labels = msg.labels
                self._memberships.clear()  # the groups it is in change
            if isinstance(msg, Hello):
                known.synced_seq = msg.seq
            return known
        if peer.key is not None and any(w.name == msg.name and w.key != peer.key for w in self._workers.values()):
            # All processes of one name share the name's keypair: another key may not join them.
            raise Refused(f"{msg.KIND.decode()} for worker {msg.instance} named {msg.name}, a name that belongs "
                          f"to another key")
        self._make_room()
        worker = WorkerEntry(
            name=msg.name, instance=msg.instance, host=msg.host, pid=msg.pid,
            endpoint=msg.endpoint, joined_at=now, last_seen=now, synced_seq=msg.seq,
            epoch=msg.epoch, seq=msg.seq, key=peer.key, routing_id=peer.routing_id, via=peer.via, labels=msg.labels,
        )
        self._memberships.clear()  # the live set changes
        self._workers[msg.instance] = worker
        log.info("worker %s joined: %s, pid %d on %s, read API %s", msg.instance, msg.name, msg.pid, msg.host,
                 msg.endpoint or "none",
                 extra={"fields": {"worker": msg.instance, "name": msg.name, "state": worker.state}})
        self.emit(WorkerJoined(worker.view()))
        return worker

    def _make_room(self) -> None:
        """Forget the longest-silent lost or left worker if the record is full; raise :class:`RecordFull` if none is."""
        if len(self._workers) < self.max_workers:
            return
        gone = [w for w in self._workers.values() if w.state in (WorkerState.LOST, WorkerState.LEFT)]
        if not gone:
            raise RecordFull(f"the record already holds bus.max_workers ({self.max_workers}) workers")
        oldest = min(gone, key=lambda w: w.last_seen)
        self._forget(oldest, time.time() - oldest.last_seen)

    def _forget(self, worker: WorkerEntry, silent: float) -> None:
        del self._workers[worker.instance]
        self._memberships.clear()  # the excluded set changes
        log.info("worker %s forgotten after %.0f s", worker.instance, silent,
                 extra={"fields": {"worker": worker.instance, "name": worker.name, "state": WorkerState.FORGOTTEN}})
        self.emit(WorkerStateChanged(worker=worker.instance, name=worker.name, state=WorkerState.FORGOTTEN,
                                     previous=worker.state, last_seen=worker.last_seen))

    def heartbeat(self, msg: WorkerHeartbeat, peer: Peer = Peer()) -> WorkerEntry:
        """A worker is alive; a worker the record does not know joins."""
        worker = self.hello(msg, peer)
        worker.stats = msg.stats
        worker.on_silence, worker.said_degraded = msg.on_silence, msg.degraded
        now = time.monotonic()
        if now - worker._stats_emitted_at >= self.stats_interval and msg.stats != worker._stats_emitted:
            worker._stats_emitted, worker._stats_emitted_at = msg.stats, now
            self.emit(WorkerStats(worker=worker.instance, name=worker.name, last_seen=worker.last_seen,
                                  stats=msg.stats))
        return worker

    def sweep(self) -> None:
        """Move silent workers to ``suspect`` or ``lost``, and forget old ones."""
        now = time.time()
        for worker in list(self._workers.values()):
            silent = now - worker.last_seen
            if silent > self.forget_after and worker.state in (WorkerState.LOST, WorkerState.LEFT):
                self._forget(worker, silent)
            elif worker.state == WorkerState.LEFT:
                continue
            elif silent > self.lost_after:
                self._set_state(worker, WorkerState.LOST, now)
            elif silent > self.suspect_after:
                self._set_state(worker, WorkerState.SUSPECT, now)
        for entry in list(self._pending.values()):
            if now - entry.published_at < self.complete_within:
                break
            self._complete(entry, now)

    def _set_state(self, worker: WorkerEntry, state: WorkerState, now: float) -> None:
        if worker.state == state:
            return
        log.info("worker %s (%s): %s -> %s (last heard %.1f s ago)", worker.instance, worker.name, worker.state,
                 state, now - worker.last_seen,
                 extra={"fields": {"worker": worker.instance, "name": worker.name, "state": state,
                                   "previous": worker.state}})
        previous, worker.state = worker.state, state
        self._memberships.clear()  # who is expected, or who is excluded, changes
        self.emit(WorkerStateChanged(worker=worker.instance, name=worker.name, state=state, previous=previous,
                                     last_seen=worker.last_seen))

    def acked(self, msg: Ack, peer: Peer = Peer()) -> list[ClearEntry]:
        """Credit ``msg`` to every clear its purge covers; return those clears.

        A purge after seeing ``seq`` proves the worker dropped everything that
        any clear up to ``seq`` of that epoch invalidated, including clears
        it never received. Clears from before the worker joined are credited
        only where it was expected. A failed purge is recorded on the same
        clears, as a failure, until a successful one covers them.

        Only the instance that said hello, on the same connection with the same
        key, is credited; anything else raises :class:`Refused`. An ack from a
        worker the record does not know (sent before its hello reached a
        restarted service, say) has nothing to credit and is ignored.
        """
        now = time.time()
        worker = self._workers.get(msg.instance)
        if worker is None:
            log.debug("ack from unknown worker %s ignored", msg.instance)
            return []
        if worker.name != msg.name:
            raise Refused(f"ack for worker {msg.instance} under the name {msg.name!r}; "
                          f"it said hello as {worker.name!r}")
        worker.check_peer(peer, "ack")
        self._set_state(worker, WorkerState.LIVE, now)
        worker.last_seen = now
        worker.last_purge_cause = msg.cause
        worker.last_outcome = msg.outcome
        worker.last_error = msg.error
        ok = msg.outcome is PurgeOutcome.OK
        if not ok:
            log.warning("worker %s (%s) failed to purge: %s", msg.instance, msg.name, msg.error or "no reason given",
                        extra={"fields": {"worker": msg.instance, "name": msg.name, "outcome": msg.outcome}})
        self.emit(WorkerPurged(msg))
        updated = []
        # Walk back from the newest clear the purge covers to the last one this
        # worker already acked: the cost follows the clears acked, not the record's size.
        floor = worker.last_acked_seq if worker.last_acked_seq is not None else 0
        for seq in range(msg.seq, floor, -1):
            entry = self._by_seq.get((msg.epoch, seq))
            if entry is None:
                break  # older than the record keeps, or from another epoch
            previous = entry.acks.get(msg.instance)
            if previous is not None and (previous.ok or not ok):
                continue
            if not entry.expects(msg.instance) and entry.seq <= worker.synced_seq:
                continue
            if not entry.reach.applies_to(worker.name, worker.labels):
                continue  # not for this worker: it counted the clear and dropped nothing for it
            ack = AckView.of(msg, now, entry.published_at)
            entry.add_ack(ack)
            if previous is None:
                self.acks_kept += 1
            updated.append(entry)
            self.emit(ClearAcked(entry.id, entry.seq, ack, acked=entry.acked_count, expected=len(entry.expected),
                                 failed=entry.failed_count))
            if entry.complete and entry.id in self._pending:
                self._complete(entry, now)
        self._trim()
        if updated and ok:
            worker.acks += len(updated)
            newest = updated[0]
            if worker.last_acked_seq is None or newest.seq > worker.last_acked_seq:
                worker.last_acked_seq = newest.seq
                worker.last_acked_clear = newest.id
        return updated

    def bye(self, msg: Bye, peer: Peer = Peer()) -> None:
        """A worker left cleanly: stop expecting it in new clears. Raises :class:`Refused`
        for a bye with another key than the instance's hello."""
        worker = self._workers.get(msg.instance)
        if worker is None:
            # Each worker's messages arrive in the order it sent them (one path: bus.upstream), so
            # this is a worker whose hello never arrived, or a stranger's: nothing to mark gone.
            log.debug("bye from unknown worker %s ignored", msg.instance)
        elif worker.name == msg.name:
            worker.check_peer(peer, "bye")
            worker.last_seen = time.time()
            self._set_state(worker, WorkerState.LEFT, worker.last_seen)

    # --- readers: the HTTP API ------------------------------------------------

    def clear(self, clear_id: str) -> ClearEntry | None:
        return self._clears.get(clear_id)

    def recent(self, limit: int) -> list[ClearEntry]:
        """The ``limit`` most recent clears, newest first."""
        return list(itertools.islice(reversed(self._clears.values()), limit))

    def workers(self) -> list[WorkerEntry]:
        """Every known worker process, grouped by name (then by id)."""
        return sorted(self._workers.values(), key=lambda w: (w.name, w.instance))

    def worker(self, instance: str) -> WorkerEntry | None:
        return self._workers.get(instance)

    def clear_json(self, entry: ClearEntry) -> dict[str, Any]:
        """A clear as every answer shows it: the one serializer of the proof.

        ``missing``, ``failed`` and ``excluded`` list workers with where they
        stand now; ``groups`` counts the expected ones by name.
        """
        membership = entry.membership
        groups: dict[str, dict[str, int]] = {}
        for worker, name in zip(membership.ids, membership.names, strict=True):
            group = groups.setdefault(name, {"expected": 0, "acked": 0, "failed": 0, "missing": 0})
            group["expected"] += 1
            ack = entry.acks.get(worker)
            group["acked" if ack is not None and ack.ok else "failed" if ack is not None else "missing"] += 1
        failed = []
        for worker in entry.failed:
            ack = entry.acks[worker]
            failed.append({**self._brief(worker, membership), "error": ack.error, "cause": ack.cause,
                           "acked_at": ack.acked_at})
        return {
            "id": entry.id,
            "seq": entry.seq,
            "epoch": entry.epoch,
            "published_at": entry.published_at,
            "token": entry.token,
            "scope": entry.reach.to_json(),
            "workers": list(entry.expected),
            "acks": [ack.to_json() for ack in entry.acks.values()],
            "missing": [self._brief(worker, membership) for worker in entry.missing],
            "failed": failed,
            "excluded": [self._brief(worker, membership) for worker in membership.excluded],
            "groups": groups,
            "complete": entry.complete,
            "duration_ms": entry.duration_ms,
        }

    def _brief(self, worker: str, membership: Membership) -> dict[str, Any]:
        known = self._workers.get(worker)
        if known is not None:
            return known.brief()
        name = membership.name_of(worker) if worker in membership.lookup else ""
        return {"worker": worker, "name": name, "host": None, "pid": None, "state": WorkerState.FORGOTTEN,
                "last_seen": None}

    async def wait(self, entry: ClearEntry, timeout: float) -> bool:
        """Wait until every expected worker acked ``entry`` with a successful purge; False on timeout.

        A future and a timer, not ``wait_for`` on an Event: that made a task
        per ``wait=all`` request, and two more trips through the loop (issue 14).
        """
        if entry.complete:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        entry.waiters.append(waiter)
        timer = loop.call_later(timeout, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            entry.waiters.remove(waiter)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)

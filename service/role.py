"""The instance's role among several sharing one tokens directory: leading or following.

Several ``cachebus serve`` processes may share a tokens directory
(docs/scale-out.md); the one holding the lock on ``.cachebus-lead``
(:mod:`cachebus.service.lead`) leads. The role is one object, assembled at
start and at every takeover, and everything that differs between the two
lives in it:

* :class:`Leading` counts calls, publishes, keeps the record: it owns the
  **term** (the epoch of its bus stream and the last seq published), writes
  it into the lead record *before* each clear or heartbeat is sent, records
  what workers send, and steps down the moment its lock is lost (the file
  removed or replaced, an I/O error on it): before its next publish or count.
* :class:`Following` passes everything on: its workers' messages to the
  leader's ROUTER in ``relayed`` envelopes (as a relay does), its HTTP
  requests to the leader's URL, its event streams from the leader's.

:class:`Election` takes the lead when it is free, follows the leader's record
while it is not, and swaps the role; nothing else in the service switches on
leading or following.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from cachebus.bus.protocol import Clear, Codec, Heartbeat, Welcome, now
from cachebus.bus.reader import Batch
from cachebus.bus.scope import EVERYWHERE, ClearScope
from cachebus.bus.security import ServiceSecurity
from cachebus.bus.sockets import Sockets
from cachebus.bus.uplink import Uplink
from cachebus.logs import Budget
from cachebus.settings import Settings, SettingsError

from .acks import AckRecorder, AckSocket
from .lead import LEAD_FILE, Lead, LeadRecord, boot_id
from .publisher import Publisher
from .record import Record

log = logging.getLogger("cachebus.service")

#: Milliseconds a follower lets its workers' messages wait to share an envelope to the leader.
_FORWARD_BATCH_MS = 1.0


class NotLeading(Exception):
    """This instance does not hold the lead (any more): it may not count or publish."""


@dataclass(frozen=True)
class Term:
    """Where the leader's bus stream stands: its epoch and the last seq it published."""

    epoch: str
    seq: int

    @classmethod
    def new(cls) -> Term:
        """A stream nobody has heard: every worker purges once when it hears it."""
        return cls(secrets.token_hex(8), 0)


@dataclass(frozen=True)
class Parts:
    """What either role works with: built once by the service, bound for the process's life."""

    settings: Settings
    name: str
    lead: Lead
    publisher: Publisher
    door: AckSocket
    record: Record
    codec: Codec
    security: ServiceSecurity
    ctx: zmq.asyncio.Context

    def own_record(self, term: Term) -> LeadRecord:
        """What this instance writes into the lock file while it leads."""
        service, bus = self.settings.service, self.settings.bus
        url = service.peer_url or f"http://{reachable_host(service.host)}:{service.port}"
        acks = service.peer_acks or reachable(bus.acks)
        return LeadRecord(name=self.name, url=url, acks=acks, epoch=term.epoch, seq=term.seq, pid=os.getpid(),
                          boot=boot_id())


class Leading:
    """This instance holds the lead: it counts, publishes, and records what workers say.

    ``lost`` is told once when the lock is lost, so that the election makes
    this instance a follower.
    """

    leads = True

    def __init__(self, parts: Parts, term: Term, lost: Callable[[], None], warm_until: float = 0.0) -> None:
        self.parts = parts
        self.term = term
        self._lost = lost
        self._own = parts.own_record(term)
        bus = parts.settings.bus
        self.heartbeat_interval = bus.heartbeat_interval
        self.liveness = bus.liveness
        #: time.monotonic() until which a ``wait=all`` clear waits before it is published: after a
        #: takeover the record learns the workers from their heartbeats and hellos (see warm_up_for).
        self.warm_until = warm_until
        self.recorder = AckRecorder(parts.door, parts.codec, parts.record, self.welcome, parts.security)
        self.stepped_down = False
        self._heartbeats: asyncio.Task[None] | None = None

    @property
    def record(self) -> Record:
        return self.parts.record

    def start(self) -> None:
        """Write the lead record, then heartbeat on the running loop until :meth:`close`."""
        self._write(self.term)
        self._heartbeats = asyncio.create_task(self._beat(), name="heartbeats")

    def check(self) -> None:
        """Raise :class:`NotLeading` (stepping down first) unless the lock still guards the lead.

        One ``stat``: a lock on a file that is no longer at its path guards
        nothing, since another instance could lock the file there now.
        """
        if self.stepped_down:
            raise NotLeading("this instance does not hold the lead any more")
        if self.parts.lead.replaced():
            self._step_down(f"{self.parts.lead.path} was removed or replaced")

    def publish_clear(self, token: str = "", reach: ClearScope = EVERYWHERE) -> Clear:
        """Publish one clear, asked for by ``token``, and return it: of what ``reach`` names in the
        processes it names (by default everything, everywhere). Every worker gets the next
        ``seq`` all the same (docs/scoped-clears.md).

        The record knows the clear before any ack for it can arrive. Raises
        :class:`NotLeading` if this instance may not publish.
        """
        self.check()
        term = self._write(dataclasses.replace(self.term, seq=self.term.seq + 1))
        clear = Clear.of(term.epoch, term.seq, uuid.uuid4().hex, now(), reach)
        self.parts.record.published(clear, token)
        self.parts.publisher.send(clear)
        return clear

    def welcome(self) -> Welcome:
        """The answer to a worker's hello or heartbeat: where the stream stands, and the lease terms."""
        return Welcome(epoch=self.term.epoch, seq=self.term.seq, heartbeat_interval=self.heartbeat_interval,
                       liveness=self.liveness)

    def on_workers(self, batch: Batch) -> None:
        self.recorder.on_batch(batch)

    async def warmed(self) -> None:
        """Return once the record has heard every worker since this instance took over."""
        wait = self.warm_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _beat(self) -> None:
        while not self.stepped_down:
            try:
                self.check()
                self._write(self.term)
            except NotLeading:
                return
            self.parts.publisher.send(Heartbeat(epoch=self.term.epoch, seq=self.term.seq, ts=now(),
                                                heartbeat_interval=self.heartbeat_interval, liveness=self.liveness))
            await asyncio.sleep(self.heartbeat_interval)

    def _write(self, term: Term) -> Term:
        """Put ``term`` in the lead record before anything of it is sent; step down if that fails."""
        own = dataclasses.replace(self._own, epoch=term.epoch, seq=term.seq)
        try:
            self.parts.lead.write(own)
        except OSError as exc:
            self._step_down(f"cannot write the lead's record ({exc.strerror or exc})")
        self._own, self.term = own, term
        return term

    def _step_down(self, why: str) -> None:
        """Never publish again; the election makes this instance a follower."""
        if not self.stepped_down:
            self.stepped_down = True
            log.error("%s: %s: giving up the lead", self.parts.name, why)
            self._lost()
        raise NotLeading(why)

    def close(self) -> None:
        self.stepped_down = True
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            self._heartbeats = None


class Following:
    """Another instance leads (or none is known yet): pass everything on to it.

    Workers' messages go up one DEALER to the leader's ROUTER, in envelopes
    that keep the key each worker authenticated with (the leader allows this
    instance's key as a peer's), and the welcomes come back down by tag.
    With no leader known, they are dropped: workers then find this instance
    silent and move to the next one in their list (bus.upstream).
    """

    leads = False

    def __init__(self, parts: Parts, leader: LeadRecord | None) -> None:
        self.parts = parts
        self.leader = leader
        self.uplink = Uplink("", parts.codec, parts.door.socket, parts.security, _FORWARD_BATCH_MS, log,
                             keep_via=True)
        self._sockets = Sockets(parts.ctx)
        if leader is not None:
            upstream = self._sockets.open(zmq.DEALER, parts.security.peer_client(), connect=[leader.acks],
                                          heartbeat=parts.settings.bus.heartbeat_interval)
            self.uplink.start(upstream, kick_router=parts.door.reader.kick)
        log.info("%s follows %s", parts.name, f"{leader.name} at {leader.url}" if leader else "nobody yet")

    def on_workers(self, batch: Batch) -> None:
        self.uplink.on_workers(batch)

    def close(self) -> None:
        self.uplink.flush()
        self.uplink.close()
        self._sockets.close()


Role = Leading | Following


class Election:
    """Takes the lead when it is free, follows the leader's record while it is not.

    :attr:`role` is the instance's role now; it changes only here (and when
    a leader steps down, through :meth:`_lost`).
    """

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.lead = parts.lead
        self.role: Role = Following(parts, None)
        #: One line a minute about a lead record this instance cannot verify.
        self._unverified = Budget(60.0)

    def start(self) -> None:
        """Open the lock file and take the lead or follow. Raises :class:`SettingsError` when the
        tokens directory is unusable."""
        try:
            self.lead.open()
        except OSError as exc:
            raise SettingsError(f"service.tokens_dir: cannot open {self.lead.path} (the lead among instances): "
                                f"{exc.strerror or exc}") from None
        if self.lead.try_take():
            self._take()
        else:
            self._follow(self.lead.read())

    def warm_up(self) -> float:
        """Seconds a new leader waits before a ``wait=all`` clear's expected set is complete.

        Each worker and relay talks to one instance (bus.upstream), and the
        record learns of a worker from its hello or heartbeat. Those of a live
        follower are heard at their next heartbeat: within a lease, since a
        worker skips heartbeats after acks, at most ``liveness - 1`` in a row.
        A relay that talked to the instance that died moves at once (its
        connection drops), and its workers' next heartbeats follow within a
        lease. A worker that talked to it directly finds it silent a lease
        after its first unanswered heartbeat (itself up to a lease after the
        death), moves at its next heartbeat tick and says hello: two leases
        and an interval after the death, which came before this takeover. One
        interval more covers the ticks' drift on a loaded host (without it,
        tests/test_instances.py's failover proof missed a moving worker).
        """
        bus = self.parts.settings.bus
        return 2 * bus.lease + 2 * bus.heartbeat_interval

    def _take(self) -> None:
        previous = self.lead.read()
        term = Term.new()
        if previous is not None and previous.boot and previous.boot == boot_id() and previous.epoch:
            # Same host and boot: every write of the last leader is in this file, so its stream
            # goes on, and workers that heard all of it keep their caches.
            term = Term(previous.epoch, previous.seq)
            log.info("%s took the lead from %s (pid %d): continuing epoch %s at seq %d", self.parts.name,
                     previous.name, previous.pid, term.epoch, term.seq)
        else:
            log.info("%s took the lead: epoch %s%s", self.parts.name, term.epoch,
                     "" if previous is None else f" (new: the last leader, {previous.name}, wrote on another "
                     "host or boot)")
        warm_until = time.monotonic() + self.warm_up() if previous is not None else 0.0
        leading = Leading(self.parts, term, self._lost, warm_until)
        self._swap(leading)
        leading.start()

    def _follow(self, record: LeadRecord | None) -> None:
        self._swap(Following(self.parts, record))

    def _swap(self, role: Role) -> None:
        old, self.role = self.role, role
        old.close()

    def _lost(self) -> None:
        """The leader stepped down: let go of the lock and follow nobody until the file names someone."""
        self._reopen()

    def _reopen(self) -> None:
        """The lock file was removed or replaced (or the lead lost): another instance may lock the new
        one, so compete for it from scratch."""
        held = self.lead.held
        if not held:
            # Still passing everything to the leader it knows: the leader is most likely the same.
            log.warning("%s: %s was removed or replaced: opening it again", self.parts.name, self.lead.path)
        self.lead.close()  # releases the lock, if held
        if held:
            self._follow(None)
        self._open()

    def _open(self) -> bool:
        """Open the lock file again; False (with a line) while the tokens directory is unusable."""
        try:
            self.lead.open()
        except OSError as exc:
            log.error("%s: cannot open %s: %s (trying again every service.lead_poll)", self.parts.name,
                      self.lead.path, exc.strerror or exc)
            return False
        return True

    async def run(self) -> None:
        """Every ``service.lead_poll``: take the lead when it is free, else follow its record."""
        while True:
            await asyncio.sleep(self.parts.settings.service.lead_poll)
            self.poll()

    def poll(self) -> None:
        if isinstance(self.role, Leading):
            with contextlib.suppress(NotLeading):
                self.role.check()  # a replaced file makes it step down (and reopen)
            return
        if not self.lead.opened and not self._open():
            return
        if self.lead.replaced():
            self._reopen()
            return
        if self.lead.try_take():
            self._take()
            return
        record = self.lead.read()
        if self.lead.unverified and (unverified := self._unverified.take("lead", 1)) is not None:
            log.warning("%s: the lead record in %s does not verify with this instance's key: do all instances "
                        "share bus.keys_dir's service keypair (or bus.key)?%s", self.parts.name, self.lead.path,
                        f" ({unverified} more since)" if unverified else "")
        following = self.role
        if record is not None and (following.leader is None or record.acks != following.leader.acks):
            self._follow(record)
        elif record is not None:
            following.leader = record

    def stop(self) -> None:
        """Stop the role: a leader sends nothing more. The service closes the lock file last, once its
        sockets are closed, so nobody takes over while this instance might still send."""
        self.role.close()


def instance_name(settings: Settings) -> str:
    """The instance's name for logs, metrics and the lead record (``service.name``)."""
    service = settings.service
    return service.name or f"{socket.gethostname()}:{service.port}"


def lead_file(settings: Settings, security: ServiceSecurity, name: str) -> Lead:
    """The lock and record file, signed with a secret every instance shares (docs/scale-out.md):
    the service's own keypair in CURVE mode, the bus key in HMAC mode."""
    key = security.keypair.secret if security.keypair is not None else settings.bus.key.encode()
    return Lead(Path(settings.service.tokens_dir) / LEAD_FILE, key)


#: Hosts that mean "every interface" when bound: a peer on this host reaches them at 127.0.0.1.
_WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})


def reachable_host(host: str) -> str:
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def reachable(endpoint: str) -> str:
    """A ``tcp://host:port`` endpoint as a peer on this host connects to it (others unchanged)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return f"tcp://{reachable_host(host)}:{port}"

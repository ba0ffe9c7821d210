"""The running instance: every part a request handler may use, built from the settings.

Data flows one way: a request is authenticated by the :class:`TokenStore`,
published by the :class:`Publisher`, purged and acked by workers, received by
the :class:`AckSocket` (the leading role records it), written into the :class:`Record`, and read back by
the HTTP read endpoints. The HTTP side (routes, server) is :mod:`.app`'s;
handlers depend on this module, never on that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import zmq
import zmq.asyncio

from cachebus.bus.peers import PeerLog
from cachebus.bus.protocol import Codec
from cachebus.bus.security import ServiceSecurity
from cachebus.bus.sockets import Sockets
from cachebus.settings import Settings, SettingsError

from .acks import AckSocket
from .auth.limits import BcryptPool, FailureLog
from .auth.store import TokenStore
from .events import EventLog
from .metrics import ServiceMetrics
from .publisher import Publisher
from .record import Record
from .role import Election, Parts, Role, instance_name, lead_file

log = logging.getLogger("cachebus.service")


@dataclass
class Service:
    """The running parts a request handler may use; :attr:`role` says what this instance does now."""

    settings: Settings
    tokens: TokenStore
    publisher: Publisher
    record: Record
    door: AckSocket
    events: EventLog
    metrics: ServiceMetrics
    security: ServiceSecurity
    ctx: zmq.asyncio.Context
    #: The bus sockets the service binds (the publisher's and the ack socket).
    sockets: Sockets
    #: The lead among instances sharing the tokens directory, and so the role (docs/scale-out.md).
    election: Election
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    #: Seconds :meth:`stop` gives the requests it answers to be written.
    STOP_GRACE: ClassVar[float] = 0.5

    @classmethod
    def create(cls, settings: Settings, ctx: zmq.asyncio.Context) -> Service:
        """Build every part from ``settings``; nothing is bound yet.

        Raises :class:`~cachebus.bus.security.KeyFileError` when the service's
        keypair cannot be read or created.
        """
        bus = settings.bus
        if "," in bus.publish or "," in bus.acks:
            raise SettingsError("bus.publish, bus.acks: a service binds one endpoint each; a list (one "
                                "endpoint per instance) is for workers and relays")
        security = ServiceSecurity(bus.mode, Path(bus.keys_dir), PeerLog(logging.getLogger("cachebus.security")))
        codec = Codec(bus.key.encode(), max_age=bus.lease)
        sockets = Sockets(ctx)
        publisher = Publisher(sockets, bus.publish, codec, bus.send_hwm, bus.socket_buffer, security=security)
        # The service run (the event ids' epoch): the record, and so what a dashboard shows, starts
        # anew with each process, while the bus epoch may go on across a takeover.
        events = EventLog(secrets.token_hex(8), settings.events.history, settings.events.client_queue)
        record = Record(settings.record.max_clears,
                        suspect_after=bus.heartbeat_interval * bus.liveness,
                        lost_after=settings.record.lost_after,
                        forget_after=settings.record.forget_after,
                        complete_within=settings.record.complete_within,
                        stats_interval=settings.events.stats_interval,
                        emit=events.emit,
                        max_acks=settings.record.max_acks,
                        max_workers=bus.max_workers)
        auth = settings.api.auth
        tokens = TokenStore(settings.service.tokens_dir, io_threads=settings.service.auth_threads,
                            pool=BcryptPool(auth.bcrypt_threads, auth.bcrypt_queue, auth.per_address,
                                            auth.per_address_queue),
                            failures=FailureLog(auth.failures, auth.failure_window),
                            max_bcrypt_cost=settings.api.max_bcrypt_cost)
        if removed := tokens.remove_stale_temporaries():
            log.info("removed %d temporary token file(s) left by a killed writer", removed)
        name = instance_name(settings)
        # What the ROUTER receives goes to the role of the moment: recorded, or passed to the leader.
        door = AckSocket(sockets, bus.acks, bus.send_hwm, bus.heartbeat_interval, security,
                         lambda batch: election.role.on_workers(batch))
        election = Election(Parts(settings=settings, name=name, lead=lead_file(settings, security, name),
                                  publisher=publisher, door=door, record=record, codec=codec, security=security,
                                  ctx=ctx))
        service = cls(settings=settings, tokens=tokens, publisher=publisher, record=record, door=door,
                      events=events, metrics=ServiceMetrics(record, events), security=security, ctx=ctx,
                      sockets=sockets, election=election)
        service.metrics.state.leading = lambda: election.role.leads
        return service

    @property
    def role(self) -> Role:
        """Leading or following, now (:mod:`cachebus.service.role`)."""
        return self.election.role

    @property
    def name(self) -> str:
        return self.election.parts.name

    def start(self) -> None:
        """Start the authenticator, bind both bus sockets, take the lead or follow, and start the loops.

        On the running event loop: the ZAP authenticator answers there, and it
        must be up before the first client connects.
        """
        self.security.start(self.ctx)
        self.publisher.bind()
        self.door.bind()
        self.election.start()
        self.door.start()
        self.tasks = [
            asyncio.create_task(self._sweep(), name="sweep"),
            asyncio.create_task(self.election.run(), name="lead"),
        ]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.bus.heartbeat_interval)
            self.record.sweep()

    async def stop(self) -> None:
        """Stop at once, whatever is queued: bcrypt and file work that has not
        started is cancelled, and the requests waiting for it are answered."""
        # First, so that the requests it answers are written while the loop runs.
        self.tokens.close()
        await self.tokens.wait_idle(self.STOP_GRACE)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.election.stop()
        self.door.close()
        self.sockets.close()
        self.election.lead.close()  # last: nobody takes over while this instance might still send
        self.security.stop()

"""Wiring of the service: sockets, record, token store and HTTP routes.

Data flows one way: a request is authenticated by the :class:`TokenStore`,
published by the :class:`Publisher`, purged and acked by workers, received by
the :class:`AckListener`, written into the :class:`Record`, and read back by
the HTTP read endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tornado.web
import zmq
import zmq.asyncio
from tornado import httputil

from cachebus.bus.peers import PeerLog
from cachebus.bus.protocol import Codec
from cachebus.bus.security import ServiceSecurity
from cachebus.logs import Budget
from cachebus.settings import Settings, SettingsError

from .accesslog import log_request
from .acks import AckListener
from .events import EventLog
from .handlers import (
    ClearHandler,
    ClearRecordHandler,
    ClearsHandler,
    EventsHandler,
    NotFoundHandler,
    UnreadableRequestHandler,
    WorkersHandler,
)
from .lead import LEAD_FILE, Lead, LeadRecord, boot_id
from .limits import LimitedHTTPServer
from .metrics import ServiceMetrics, ServiceMetricsHandler
from .pages import DashboardAssetHandler, DashboardHandler, IndexHandler, OpenApiHandler
from .publisher import Publisher
from .record import Record
from .token_limits import BcryptPool, FailureLog
from .tokens import TokenStore

log = logging.getLogger("cachebus.service")


@dataclass
class Service:
    """The running parts a request handler may use."""

    settings: Settings
    tokens: TokenStore
    publisher: Publisher
    record: Record
    acks: AckListener
    events: EventLog
    metrics: ServiceMetrics
    security: ServiceSecurity
    ctx: zmq.asyncio.Context
    #: The lead among instances sharing the tokens directory (docs/scale-out.md).
    lead: Lead
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The leader's record as this instance last read it (its own while it leads).
    leader: LeadRecord | None = None
    #: time.monotonic() until which a wait=all clear waits before it is published: after taking
    #: over another instance's stream, the record learns its workers from their heartbeats.
    warm_until: float = 0.0
    #: One line a minute about a lead record this instance cannot verify.
    _unverified: Budget = field(default_factory=lambda: Budget(60.0))

    #: Seconds :meth:`stop` gives the requests it answers to be written.
    STOP_GRACE: ClassVar[float] = 0.5

    @classmethod
    def create(cls, settings: Settings, ctx: zmq.asyncio.Context) -> Service:
        """Build every part from ``settings``; nothing is bound yet.

        Raises :class:`~cachebus.bus.security.KeyFileError` when the service's
        keypair cannot be read or created.
        """
        bus = settings.bus
        security = ServiceSecurity(bus.mode, Path(bus.keys_dir), PeerLog(logging.getLogger("cachebus.security")))
        codec = Codec(bus.key.encode(), max_age=bus.lease)
        publisher = Publisher(ctx, bus.publish, codec, bus.heartbeat_interval, bus.send_hwm, bus.socket_buffer,
                              security=security, liveness=bus.liveness)
        events = EventLog(publisher.epoch, settings.events.history, settings.events.client_queue)
        record = Record(settings.record.max_clears,
                        suspect_after=bus.heartbeat_interval * bus.liveness,
                        lost_after=settings.record.lost_after,
                        forget_after=settings.record.forget_after,
                        complete_within=settings.record.complete_within,
                        stats_interval=settings.events.stats_interval,
                        emit=events.emit,
                        max_acks=settings.record.max_acks,
                        max_workers=bus.max_workers)
        publisher.on_publish.append(record.published)
        acks = AckListener(ctx, bus.acks, codec, record,
                           welcome=publisher.welcome, send_hwm=bus.send_hwm,
                           heartbeat=bus.heartbeat_interval, security=security)
        auth = settings.api.auth
        tokens = TokenStore(settings.service.tokens_dir, io_threads=settings.service.auth_threads,
                            pool=BcryptPool(auth.bcrypt_threads, auth.bcrypt_queue, auth.per_address,
                                            auth.per_address_queue),
                            failures=FailureLog(auth.failures, auth.failure_window),
                            max_bcrypt_cost=settings.api.max_bcrypt_cost)
        if removed := tokens.remove_stale_temporaries():
            log.info("removed %d temporary token file(s) left by a killed writer", removed)
        if "," in bus.publish or "," in bus.acks:
            raise SettingsError("bus.publish, bus.acks: a service binds one endpoint each; a list (one "
                                "endpoint per instance) is for workers and relays")
        # Signed with a secret every instance shares (docs/scale-out.md): the service's own keypair
        # in CURVE mode, the bus key in HMAC mode.
        lead_key = security.keypair.secret if security.keypair is not None else bus.key.encode()
        lead = Lead(Path(settings.service.tokens_dir) / LEAD_FILE, lead_key)
        service = cls(settings=settings, tokens=tokens, publisher=publisher, record=record, acks=acks,
                      events=events, metrics=ServiceMetrics(record, events), security=security, ctx=ctx, lead=lead)
        service.metrics.state.leading = lambda: service.leading
        return service

    # --- the lead among several instances (docs/scale-out.md) --------------------------

    @property
    def leading(self) -> bool:
        return self.lead.held and self.publisher.speaking

    @property
    def name(self) -> str:
        service = self.settings.service
        return service.name or f"{socket.gethostname()}:{service.port}"

    def own_record(self) -> LeadRecord:
        """What this instance writes into the lock file while it leads."""
        service, bus = self.settings.service, self.settings.bus
        url = service.peer_url or f"http://{_reachable_host(service.host)}:{service.port}"
        acks = service.peer_acks or _reachable(bus.acks)
        return LeadRecord(name=self.name, url=url, acks=acks, epoch=self.publisher.epoch, seq=self.publisher.seq,
                          pid=os.getpid(), boot=boot_id())

    def _write_position(self, epoch: str, seq: int) -> None:
        assert self.leader is not None
        self.leader = dataclasses.replace(self.leader, epoch=epoch, seq=seq)
        self.lead.write(self.leader)

    def _take_lead(self) -> None:
        previous = self.lead.read()
        if previous is not None and previous.boot and previous.boot == boot_id() and previous.epoch:
            # Same host and boot: every write of the last leader is in this file, so its stream
            # goes on, and workers that heard all of it keep their caches.
            self.publisher.continue_from(previous.epoch, previous.seq)
            self.warm_until = time.monotonic() + self.settings.bus.lease
            log.info("%s took the lead from %s (pid %d): continuing epoch %s at seq %d", self.name,
                     previous.name, previous.pid, previous.epoch, previous.seq)
        else:
            log.info("%s took the lead: epoch %s%s", self.name, self.publisher.epoch,
                     "" if previous is None else f" (new: the last leader, {previous.name}, wrote on another "
                     "host or boot)")
        self.leader = self.own_record()
        self.lead.write(self.leader)
        self.publisher.position = self._write_position
        self.acks.lead()
        self.publisher.speaking = True

    def _follow(self, record: LeadRecord | None) -> None:
        self.leader = record
        self.acks.follow(record.acks if record is not None else None, self.security.peer_client())
        log.info("%s follows %s", self.name, f"{record.name} at {record.url}" if record else "nobody yet")

    async def _watch_lead(self) -> None:
        """Take the lead when it is free; follow the leader's record while it is not."""
        while True:
            await asyncio.sleep(self.settings.service.lead_poll)
            if self.lead.replaced():
                self._reopen_lead()
                continue
            if self.lead.held:
                continue  # led, or lost on a shared filesystem: the publisher says which
            if self.lead.try_take():
                self._take_lead()
                continue
            record = self.lead.read()
            if self.lead.unverified and (unverified := self._unverified.take("lead", 1)) is not None:
                log.warning("%s: the lead record in %s does not verify with this instance's key: do all instances "
                            "share bus.keys_dir's service keypair (or bus.key)?%s", self.name, self.lead.path,
                            f" ({unverified} more since)" if unverified else "")
            if record is not None and (self.leader is None or record.acks != self.leader.acks):
                self._follow(record)
            elif record is not None:
                self.leader = record

    def _reopen_lead(self) -> None:
        """The lock file was removed or replaced: another instance may lock the new one, so let go
        of the lead (silent from now on) and compete for the new file from scratch."""
        held = self.lead.held
        if held:
            log.error("%s: %s was removed or replaced: giving up the lead", self.name, self.lead.path)
            self.publisher.speaking = False
            self.publisher.position = None
        else:
            # Still passing everything to the leader it knows: the leader is most likely the same.
            log.warning("%s: %s was removed or replaced: opening it again", self.name, self.lead.path)
        self.lead.close()
        self.lead.open()
        if held:
            self._follow(None)

    async def warmed(self) -> None:
        """Return once the record has heard every worker's heartbeat since this instance took over."""
        wait = self.warm_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def start(self) -> None:
        """Start the authenticator, bind both bus sockets and start the heartbeat and ack loops.

        On the running event loop: the ZAP authenticator answers there, and it
        must be up before the first client connects.
        """
        self.security.start(self.ctx)
        self.publisher.bind()
        self.acks.bind()
        try:
            self.lead.open()
        except OSError as exc:
            raise SettingsError(f"service.tokens_dir: cannot open {self.lead.path} (the lead among instances): "
                                f"{exc.strerror or exc}") from None
        if self.lead.try_take():
            self._take_lead()
        else:
            self.publisher.speaking = False
            self._follow(self.lead.read())
        self.tasks = [
            asyncio.create_task(self.publisher.run_heartbeats(), name="heartbeats"),
            asyncio.create_task(self.acks.run(), name="acks"),
            asyncio.create_task(self._sweep(), name="sweep"),
            asyncio.create_task(self._watch_lead(), name="lead"),
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
        self.publisher.speaking = False
        self.publisher.close()
        self.acks.close()
        self.lead.close()  # last: nobody takes over while this instance might still send
        self.security.stop()


#: Hosts that mean "every interface" when bound: a peer on this host reaches them at 127.0.0.1.
_WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})


def _reachable_host(host: str) -> str:
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def _reachable(endpoint: str) -> str:
    """A ``tcp://host:port`` endpoint as a peer on this host connects to it (others unchanged)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return f"tcp://{_reachable_host(host)}:{port}"


class _BuildOrRefuse(httputil.HTTPMessageDelegate):
    """Routes a request whose head Tornado refuses to build into a request to
    :class:`UnreadableRequestHandler`, so it gets Flextype's 400 and one log line
    (from Tornado it would get a bare ``400`` and no body)."""

    def __init__(self, app: Application, server_conn: object, request_conn: httputil.HTTPConnection) -> None:
        self.app = app
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.inner = tornado.web.Application.start_request(app, server_conn, request_conn)

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        try:
            return self.inner.headers_received(start_line, headers)
        except httputil.HTTPInputError:
            pass
        assert isinstance(start_line, httputil.RequestStartLine)
        # Only the query string (too many fields) and Host (missing, malformed, repeated)
        # fail there: drop the one, and if need be replace the other, to build it.
        start = httputil.RequestStartLine(start_line.method, start_line.path.partition("?")[0], start_line.version)
        try:
            request = self._request(start, headers)
        except httputil.HTTPInputError:
            headers["Host"] = "unreadable.invalid"
            request = self._request(start, headers)
        self.inner = self.app.get_handler_delegate(request, UnreadableRequestHandler,
                                                   self.app.settings["default_handler_args"])
        return self.inner.headers_received(start, headers)

    def _request(self, start: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> httputil.HTTPServerRequest:
        return httputil.HTTPServerRequest(connection=self.request_conn, server_connection=self.server_conn,
                                          start_line=start, headers=headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class Application(tornado.web.Application):
    """Tornado's application, answering even requests Tornado cannot build with Flextype's 400."""

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        return _BuildOrRefuse(self, server_conn, request_conn)


def make_app(service: Service) -> tornado.web.Application:
    """The Tornado application serving the Flextype API and the record."""
    args = {"service": service}
    metrics = {"registry": service.metrics.registry, "settings": service.settings.metrics,
               "listen_host": service.settings.service.host}
    routes: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
        (r"/", IndexHandler, args),
        (r"/api/v1/cache/clear", ClearHandler, args),
        (r"/api/v1/cache/clears", ClearsHandler, args),
        (r"/api/v1/cache/clears/([^/]+)", ClearRecordHandler, args),
        (r"/api/v1/cache/workers", WorkersHandler, args),
        (r"/api/v1/cache/events", EventsHandler, args),
        (r"/metrics", ServiceMetricsHandler, metrics),
        (r"/api/openapi.json", OpenApiHandler, {}),
        (r"/dashboard", DashboardHandler, {}),
        (r"/dashboard/(.+)", DashboardAssetHandler, {}),
    ]
    return Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=log_request,
        cors=service.settings.cors,
        max_body_size=service.settings.service.max_body_size,
        metrics=service.metrics,
        # Requests are counted by route pattern, never by raw path.
        route_names={handler: pattern for pattern, handler, _ in routes},
    )


def make_server(service: Service, app: tornado.web.Application | None = None) -> LimitedHTTPServer:
    """The HTTP server for ``app`` (by default :func:`make_app`), with the limits of ``http.*``."""
    return LimitedHTTPServer(app or make_app(service), limits=service.settings.http, metrics=service.metrics)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the service until ``stop`` is set. Raises ``OSError``/``ZMQError`` on bind failure."""
    ctx = zmq.asyncio.Context()
    service = Service.create(settings, ctx)
    server: LimitedHTTPServer | None = None
    try:
        service.start()
        server = make_server(service)
        server.listen(settings.service.port, address=settings.service.host)
        log.info("cachebus service ready on http://%s:%d (at most %d connections)", settings.service.host,
                 settings.service.port, server.max_connections)
        await stop.wait()
    finally:
        if server is not None:
            server.stop()
        await service.stop()
        ctx.term()
        log.info("cachebus service stopped")

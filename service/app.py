"""Wiring of the service: sockets, record, token store and HTTP routes.

Data flows one way: a request is authenticated by the :class:`TokenStore`,
published by the :class:`Publisher`, purged and acked by workers, received by
the :class:`AckListener`, written into the :class:`Record`, and read back by
the HTTP read endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
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
from cachebus.settings import Settings, SettingsError

from .accesslog import log_request
from .acks import AckSocket
from .auth.limits import BcryptPool, FailureLog
from .auth.store import TokenStore
from .events import EventLog
from .forward import ForwardedHandler, RelayedEventsHandler
from .handlers import (
    ClearHandler,
    ClearRecordHandler,
    ClearsHandler,
    EventsHandler,
    NotFoundHandler,
    UnreadableRequestHandler,
    WorkersHandler,
)
from .limits import LimitedHTTPServer
from .metrics import ServiceMetrics, ServiceMetricsHandler
from .pages import DashboardAssetHandler, DashboardHandler, IndexHandler, OpenApiHandler
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
        publisher = Publisher(ctx, bus.publish, codec, bus.send_hwm, bus.socket_buffer, security=security)
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
        door = AckSocket(ctx, bus.acks, bus.send_hwm, bus.heartbeat_interval, security,
                         lambda batch: election.role.on_workers(batch))
        election = Election(Parts(settings=settings, name=name, lead=lead_file(settings, security, name),
                                  publisher=publisher, door=door, record=record, codec=codec, security=security,
                                  ctx=ctx))
        service = cls(settings=settings, tokens=tokens, publisher=publisher, record=record, door=door,
                      events=events, metrics=ServiceMetrics(record, events), security=security, ctx=ctx,
                      election=election)
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
        self.publisher.close()
        self.door.close()
        self.election.lead.close()  # last: nobody takes over while this instance might still send
        self.security.stop()


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
    """Tornado's application, answering even requests Tornado cannot build with Flextype's 400,
    and passing the leader's routes on while this instance follows."""

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        return _BuildOrRefuse(self, server_conn, request_conn)

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        """The route's handler; on a follower, for a route of the leader's, the one that passes it on.

        One decision per request, for the instance's role as a whole: no
        handler asks whether it leads. OPTIONS is answered here either way.
        """
        found = super().find_handler(request, **kwargs)
        service: Service = self.settings["default_handler_args"]["service"]
        passed = self.settings["passed_on"].get(found.handler_class)
        if passed is None or service.role.leads or request.method == "OPTIONS":
            return found
        return self.get_handler_delegate(request, passed, {"service": service, "passed": found.handler_class},
                                         found.path_args, found.path_kwargs)


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
        # The leader's routes, and who answers them on a follower (cachebus.service.forward).
        passed_on={ClearHandler: ForwardedHandler, ClearsHandler: ForwardedHandler,
                   ClearRecordHandler: ForwardedHandler, WorkersHandler: ForwardedHandler,
                   EventsHandler: RelayedEventsHandler},
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

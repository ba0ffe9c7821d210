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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.web
import zmq
import zmq.asyncio

from cachebus.bus.peers import PeerLog
from cachebus.bus.protocol import Codec
from cachebus.bus.security import ServiceSecurity
from cachebus.settings import Settings

from .accesslog import log_request
from .acks import AckListener
from .events import EventLog
from .handlers import ClearHandler, ClearRecordHandler, ClearsHandler, EventsHandler, NotFoundHandler, WorkersHandler
from .metrics import ServiceMetrics, ServiceMetricsHandler
from .pages import DashboardAssetHandler, DashboardHandler, OpenApiHandler
from .publisher import Publisher
from .record import Record
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
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

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
                              security=security)
        events = EventLog(publisher.epoch, settings.events.history, settings.events.client_queue)
        record = Record(settings.record.max_clears,
                        suspect_after=bus.heartbeat_interval * bus.liveness,
                        lost_after=settings.record.lost_after,
                        forget_after=settings.record.forget_after,
                        complete_within=settings.record.complete_within,
                        stats_interval=settings.events.stats_interval,
                        emit=events.emit,
                        max_workers=bus.max_workers)
        publisher.on_publish.append(record.published)
        acks = AckListener(ctx, bus.acks, codec, record,
                           position=lambda: (publisher.epoch, publisher.seq), send_hwm=bus.send_hwm,
                           heartbeat=bus.heartbeat_interval, security=security)
        executor = ThreadPoolExecutor(settings.service.auth_threads, thread_name_prefix="cachebus-auth")
        tokens = TokenStore(settings.service.tokens_dir, executor=executor)
        return cls(settings=settings, tokens=tokens, publisher=publisher, record=record, acks=acks,
                   events=events, metrics=ServiceMetrics(record, events), security=security, ctx=ctx)

    def start(self) -> None:
        """Start the authenticator, bind both bus sockets and start the heartbeat and ack loops.

        On the running event loop: the ZAP authenticator answers there, and it
        must be up before the first client connects.
        """
        self.security.start(self.ctx)
        self.publisher.bind()
        self.acks.bind()
        self.tasks = [
            asyncio.create_task(self.publisher.run_heartbeats(), name="heartbeats"),
            asyncio.create_task(self.acks.run(), name="acks"),
            asyncio.create_task(self._sweep(), name="sweep"),
        ]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.bus.heartbeat_interval)
            self.record.sweep()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.publisher.close()
        self.acks.close()
        self.security.stop()
        self.tokens.close()


def make_app(service: Service) -> tornado.web.Application:
    """The Tornado application serving the Flextype API and the record."""
    args = {"service": service}
    metrics = {"registry": service.metrics.registry, "settings": service.settings.metrics,
               "listen_host": service.settings.service.host}
    routes: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
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
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=log_request,
        cors=service.settings.cors,
        metrics=service.metrics,
        # Requests are counted by route pattern, never by raw path.
        route_names={handler: pattern for pattern, handler, _ in routes},
    )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the service until ``stop`` is set. Raises ``OSError``/``ZMQError`` on bind failure."""
    ctx = zmq.asyncio.Context()
    service = Service.create(settings, ctx)
    server: tornado.httpserver.HTTPServer | None = None
    try:
        service.start()
        server = make_app(service).listen(settings.service.port, address=settings.service.host)
        log.info("cachebus service ready on http://%s:%d", settings.service.host, settings.service.port)
        await stop.wait()
    finally:
        if server is not None:
            server.stop()
        await service.stop()
        ctx.term()
        log.info("cachebus service stopped")

"""The service's HTTP side: its routes, the application and the server, and running it all.

The parts behind the routes are :class:`~cachebus.service.instance.Service`'s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import tornado.web
import zmq.asyncio
from tornado import httputil
from tornado.web import RequestHandler

from cachebus.settings import Settings

from .accesslog import log_request
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
from .instance import Service
from .limits import LimitedHTTPServer
from .pages import DashboardAssetHandler, DashboardHandler, IndexHandler, OpenApiHandler, ServiceMetricsHandler
from .tornado_overrides import Reroute, RoutedApplication

log = logging.getLogger("cachebus.service")


class Application(RoutedApplication):
    """Tornado's application, answering even requests Tornado cannot build with Flextype's 400,
    and passing the leader's routes on while this instance follows."""

    unreadable = UnreadableRequestHandler

    def reroute(self, request: httputil.HTTPServerRequest, handler_class: type[RequestHandler]) -> Reroute | None:
        """On a follower, for a route of the leader's, the handler that passes it on.

        One decision per request, for the instance's role as a whole: no
        handler asks whether it leads. OPTIONS is answered here either way.
        """
        service: Service = self.settings["default_handler_args"]["service"]
        passed = self.settings["passed_on"].get(handler_class)
        if passed is None or service.role.leads or request.method == "OPTIONS":
            return None
        return passed, {"service": service, "passed": handler_class}


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

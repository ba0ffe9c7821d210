"""An instance without the lead passes the leader's routes to the one that has it.

Behind a load balancer any instance may get a clear (docs/scale-out.md). On
a follower, the application routes every request for a route of the
leader's (the clear, the record, the workers, the event stream) to a handler
here instead (:meth:`cachebus.service.app.Application.find_handler`): the
request goes, as it came, to the leader's ``service.peer_url``, and the
answer is the leader's status, body and the headers that belong to the
answer; the leader checks the token, counts the call and publishes, so
``calls`` and the proof are the leader's. The follower's own parts are only
what is its own: the method gate, the body limit, CORS. A leader it cannot
reach, or that does not answer within the request's wait and
``service.forward_timeout``, is a 503 (``"title":"Service Unavailable"``):
never a 2xx for a clear that may not have been published.

The event stream is relayed as it comes, so a dashboard or ``cachebus clear
--wait`` works through any instance; it ends when the leader's does, and the
client reconnects (with ``Last-Event-ID``) wherever its next request lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable

from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders, HTTPMessageDelegate, RequestStartLine, ResponseStartLine
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient
from tornado.web import RequestHandler

from . import tornado_overrides
from .errors import ApiError, Reason
from .handlers import BaseHandler
from .instance import Service
from .lead import LeadRecord
from .role import Following

log = logging.getLogger("cachebus.forward")

#: Marks a request one instance passed to another: the receiver, if it does not
#: lead either, answers 503 rather than passing it on again.
FORWARDED_BY = "X-Cachebus-Forwarded-By"

#: Request headers passed on: what the leader's answer may depend on. Not Host, not hop-by-hop ones.
_REQUEST_HEADERS = ("Content-Type", "Content-Encoding", "Accept", "Origin", "Authorization", "X-Requested-With",
                    "Last-Event-ID")
#: Answer headers passed back; CORS headers are the receiving instance's own.
_ANSWER_HEADERS = ("Content-Type", "Cache-Clear-Id", "Retry-After", "Cache-Control", "X-Accel-Buffering")


class Unreachable(Exception):
    """The leader did not answer: ``str()`` says why, without the request's URI."""


def _request(handler: RequestHandler, leader_url: str, body: bytes, timeout: float, name: str) -> HTTPRequest:
    """``handler``'s request as the leader gets it."""
    request = handler.request
    headers = {k: request.headers[k] for k in _REQUEST_HEADERS if k in request.headers}
    headers[FORWARDED_BY] = name
    return HTTPRequest(
        leader_url.rstrip("/") + (request.uri or "/"), method=request.method or "GET",
        headers=headers, body=body if request.method in ("POST", "PUT", "PATCH") else None,
        allow_nonstandard_methods=True, follow_redirects=False, decompress_response=False,
        connect_timeout=min(timeout, 5.0), request_timeout=timeout)


async def forward(handler: RequestHandler, leader_url: str, body: bytes, timeout: float, name: str) -> None:
    """Send ``handler``'s request to the leader at ``leader_url`` and answer with its answer.

    Raises :class:`Unreachable` when no answer came.
    """
    fetch = _request(handler, leader_url, body, timeout, name)
    try:
        response = await AsyncHTTPClient().fetch(fetch, raise_error=False)
    except OSError as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc.strerror or exc}") from None
    except HTTPClientError as exc:  # a timeout is raised even with raise_error=False
        raise Unreachable(str(exc)) from None
    if response.code == 599:
        raise Unreachable(str(response.error))
    handler.set_status(response.code)
    for key in _ANSWER_HEADERS:
        if key in response.headers:
            handler.set_header(key, response.headers[key])
    if response.code not in (204, 304):
        handler.write(response.body or b"")
    handler.finish()


class ForwardedHandler(BaseHandler):
    """A route of the leader's, on a follower: the request goes to the leader as it came.

    ``passed`` is the route's own handler: its methods are the gate here, and
    the metrics count the request under its route.
    """

    passed: type[BaseHandler]

    def initialize(self, service: Service, passed: type[BaseHandler] = BaseHandler) -> None:
        super().initialize(service)
        self.passed = passed

    def allowed_methods(self) -> list[str]:
        return self.passed.methods(self.service.settings)

    @property
    def route(self) -> type[RequestHandler]:
        return self.passed

    def _leader(self) -> LeadRecord:
        role = self.service.role
        if not isinstance(role, Following) or role.leader is None or FORWARDED_BY in self.request.headers:
            # No leader known, or one that passed the request here and lost the lead since (or this
            # instance took the lead while the request was routed: the client retries).
            raise ApiError(503, Reason.NO_LEAD, retry_after=1)
        return role.leader

    async def _forward(self, *args: str) -> None:
        if self._too_large:
            return
        leader = self._leader()
        settings = self.service.settings
        wait = self.passed.waits(self)
        try:
            await forward(self, leader.url, b"".join(self._chunks), wait + settings.service.forward_timeout,
                          self.service.name)
        except Unreachable as exc:
            raise ApiError(503, Reason.NO_LEAD, retry_after=1,
                           log_message=f"the leader {leader.name} at {leader.url} did not answer: {exc}") from None

    def get(self, *args: str) -> Awaitable[None]:
        return self._forward()

    def post(self, *args: str) -> Awaitable[None]:
        return self._forward()

    def head(self, *args: str) -> Awaitable[None]:
        return self._forward()

    def put(self, *args: str) -> Awaitable[None]:
        return self._forward()

    def patch(self, *args: str) -> Awaitable[None]:
        return self._forward()

    def delete(self, *args: str) -> Awaitable[None]:
        return self._forward()


class RelayedEventsHandler(ForwardedHandler):
    """The leader's event stream, relayed to a client of this follower as it comes.

    The leader's status and headers go first; every chunk is written and
    flushed as it arrives. The leader must answer within
    ``service.forward_timeout`` and then send something (an event or its
    keep-alive) at least every ``STALLED_KEEPALIVES`` keep-alive intervals, or
    the stream is ended: a leader that is alive but frozen cannot hold a
    follower's clients for good. When the client goes away, the leader's
    stream is closed; when the leader's ends, so does this one.
    """

    #: Keep-alive intervals the leader's stream may stay silent before it counts as stalled.
    STALLED_KEEPALIVES = 2

    async def _forward(self, *args: str) -> None:
        leader = self._leader()
        settings = self.service.settings
        url = urllib.parse.urlsplit(leader.url.rstrip("/") + (self.request.uri or "/"))
        relay = _StreamRelay(self)
        try:
            stream = await asyncio.wait_for(TCPClient().connect(
                url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80),
                ssl_options=ssl.create_default_context() if url.scheme == "https" else None),
                settings.service.forward_timeout)
        except (OSError, TimeoutError, StreamClosedError) as exc:
            raise ApiError(503, Reason.NO_LEAD, retry_after=1,
                           log_message=f"the leader's event stream at {leader.url} did not answer: "
                                       f"{type(exc).__name__}") from None
        self._leader_stream = stream
        try:
            connection = HTTP1Connection(stream, True, HTTP1ConnectionParameters(no_keep_alive=True))
            headers = HTTPHeaders({k: self.request.headers[k] for k in _REQUEST_HEADERS if k in self.request.headers})
            headers["Host"] = url.netloc
            headers[FORWARDED_BY] = self.service.name
            connection.write_headers(RequestStartLine("GET", url.path + (f"?{url.query}" if url.query else ""),
                                                      "HTTP/1.1"), headers)
            connection.finish()
            reading = asyncio.ensure_future(connection.read_response(relay))
            reading.add_done_callback(lambda f: f.cancelled() or f.exception())  # a closed stream is no news
            # Headers within the forward timeout, then something every few keep-alives.
            allowed = settings.service.forward_timeout
            while not reading.done():
                heard = relay.heard
                await asyncio.wait([reading], timeout=allowed)
                if not reading.done() and relay.heard == heard:
                    break  # stalled
                allowed = settings.events.keepalive * self.STALLED_KEEPALIVES
        finally:
            stream.close()
        if relay.status is None:
            raise ApiError(503, Reason.NO_LEAD, retry_after=1,
                           log_message=f"the leader's event stream at {leader.url} did not answer in time")
        if not tornado_overrides.finished(self):
            with contextlib.suppress(StreamClosedError):
                self.finish()

    _leader_stream: IOStream | None = None

    def on_connection_close(self) -> None:
        if self._leader_stream is not None:
            self._leader_stream.close()  # the client left: so does the leader's stream


class _StreamRelay(HTTPMessageDelegate):
    """Writes what the leader's stream sends to ``handler``'s client, as it arrives."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self.status: int | None = None
        #: Chunks (and the head) received so far: the watchdog's sign of life.
        self.heard = 0

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders) -> None:
        assert isinstance(start_line, ResponseStartLine)
        self.status = start_line.code
        self.heard += 1
        self.handler.set_status(start_line.code)
        for key in _ANSWER_HEADERS:
            if key in headers:
                self.handler.set_header(key, headers[key])

    def data_received(self, chunk: bytes) -> None:
        self.heard += 1
        self.handler.write(chunk)
        self.handler.flush().add_done_callback(lambda f: f.cancelled() or f.exception())

    def finish(self) -> None:
        pass

    def on_connection_close(self) -> None:
        pass

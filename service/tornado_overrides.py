"""Every place the service reaches into Tornado's private behaviour, in one module.

Each override here depends on something Tornado does not promise: a private
attribute, the fields of an internal class, or the order in which Tornado
builds, routes, reads and finishes a request. They were read against the
Tornado versions in :data:`CHECKED_WITH`, and ``tests/test_tornado_overrides.py``
fails on any other: after an upgrade, read each of them again against the new
source, then add the version. The rest of the service uses Tornado's public API
only, and reaches these through the names below.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.tcpserver import TCPServer
from tornado.web import RequestHandler

#: The Tornado versions (``tornado.version`` prefixes) these overrides were read against.
CHECKED_WITH = ("6.6",)

#: Who answers instead, and the arguments it is made with.
Reroute = tuple[type[RequestHandler], dict[str, Any]]


# --- the application: building and routing requests ---------------------------------


class _BuildOrRefuse(httputil.HTTPMessageDelegate):
    """Routes a request whose head Tornado refuses to build into a request to ``refuse``.

    Tornado's own routing delegate builds the ``HTTPServerRequest`` in
    ``headers_received`` and lets the ``HTTPInputError`` out, which the
    connection answers with a bare ``400`` and no body. Only the query string
    (more than 1,000 fields) and ``Host`` (missing, malformed, repeated) fail
    there: drop the one, and if need be replace the other, to build it.
    """

    def __init__(self, app: tornado.web.Application, server_conn: object, request_conn: httputil.HTTPConnection,
                 refuse: type[RequestHandler]) -> None:
        self.app = app
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.refuse = refuse
        self.inner = tornado.web.Application.start_request(app, server_conn, request_conn)

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        try:
            return self.inner.headers_received(start_line, headers)
        except httputil.HTTPInputError:
            pass
        assert isinstance(start_line, httputil.RequestStartLine)
        start = httputil.RequestStartLine(start_line.method, start_line.path.partition("?")[0], start_line.version)
        try:
            request = self._request(start, headers)
        except httputil.HTTPInputError:
            headers["Host"] = "unreadable.invalid"
            request = self._request(start, headers)
        self.inner = self.app.get_handler_delegate(request, self.refuse, self.app.settings["default_handler_args"])
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


class RoutedApplication(tornado.web.Application):
    """Tornado's application with two hooks: :attr:`unreadable` answers the requests Tornado
    cannot build, and :meth:`reroute` may hand a routed request to another handler."""

    #: The handler of a request whose head Tornado refuses to build; made with ``default_handler_args``.
    unreadable: type[RequestHandler] = tornado.web.ErrorHandler

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        return _BuildOrRefuse(self, server_conn, request_conn, self.unreadable)

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        # What find_handler returns is a tornado.web._HandlerDelegate: its handler_class and
        # path arguments are no public API.
        found = super().find_handler(request, **kwargs)
        instead = self.reroute(request, found.handler_class)
        if instead is None:
            return found
        handler_class, handler_kwargs = instead
        return self.get_handler_delegate(request, handler_class, handler_kwargs, found.path_args, found.path_kwargs)

    def reroute(self, request: httputil.HTTPServerRequest, handler_class: type[RequestHandler]) -> Reroute | None:
        """Who answers ``request`` instead of ``handler_class``, which its route found; None: that one."""
        return None


# --- the server: accepting, timing, and reading connections ---------------------------


def accept_with(server: TCPServer, sock: socket.socket, stop: Callable[[], None]) -> None:
    """Make ``sock`` one of ``server``'s listening sockets, accepted by the caller's own loop:
    ``stop`` is what ``TCPServer.stop`` calls to stop accepting on it.

    ``TCPServer.add_sockets`` would install Tornado's accept loop; its two
    private tables are what ``stop`` reads."""
    server._sockets[sock.fileno()] = sock
    server._handlers[sock.fileno()] = stop


StreamT = TypeVar("StreamT", bound=IOStream)


def new_stream(server: TCPServer, connection: socket.socket, stream_class: type[StreamT]) -> StreamT:
    """The stream ``TCPServer._handle_connection`` makes for a plain connection its accept loop
    took, of ``stream_class``: for an accept loop of the caller's own, which then hands it to
    ``handle_stream`` as that method does."""
    return stream_class(connection, max_buffer_size=server.max_buffer_size, read_chunk_size=server.read_chunk_size)


def no_header_timeout(server: HTTPServer) -> None:
    """Turn Tornado's own header timer off (``idle_connection_timeout=None`` means an hour):
    ``conn_params`` is built by ``HTTPServer.initialize``, and read for each new connection."""
    server.conn_params.header_timeout = None


def connection_stream(server_conn: object) -> IOStream | None:
    """The stream of the connection ``HTTPServer.start_request`` and ``on_close`` are given:
    an ``HTTP1ServerConnection``, though typed ``object``."""
    return server_conn.stream if isinstance(server_conn, HTTP1ServerConnection) else None


class NotifyingStream(IOStream):
    """An accepted connection's stream that calls :meth:`bytes_arrived` whenever bytes arrive.

    ``read_from_fd`` is what ``BaseIOStream``'s read loop calls for every read
    from the socket, whoever waits for the bytes.
    """

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        count = super().read_from_fd(buf)
        if count:
            self.bytes_arrived()
        return count

    def bytes_arrived(self) -> None:
        """Bytes were read from the socket."""


# --- handlers: methods, the body, finishing ---------------------------------------------


class EveryMethod(tuple[str, ...]):
    """``SUPPORTED_METHODS`` of a handler that takes any method, even one HTTP never defined:
    Tornado answers 405 by itself for a method not ``in`` it, before ``prepare``."""

    def __contains__(self, method: object) -> bool:
        return True


def finished(handler: RequestHandler) -> bool:
    """Whether ``handler``'s answer is complete (``RequestHandler._finished``)."""
    return bool(handler._finished)


def request_stream(handler: RequestHandler) -> IOStream:
    """The stream of ``handler``'s connection, for a handler that writes for as long as it likes."""
    connection = handler.request.connection
    assert isinstance(connection, HTTP1Connection)
    return connection.stream


def refuse_while_streaming(handler: RequestHandler, error: tornado.web.HTTPError) -> None:
    """Answer ``error`` from ``data_received``, as raising it elsewhere would.

    Tornado does not route an exception raised in ``data_received`` to
    ``send_error``: the connection would log it and close without an answer.
    So take the two steps a raised error takes, by hand.
    """
    if finished(handler):
        return
    exc_info = (type(error), error, None)
    handler.log_exception(*exc_info)
    handler.send_error(error.status_code, exc_info=exc_info)


def frame_unread_body_as_empty(request: httputil.HTTPServerRequest) -> None:
    """Make sure no byte of a body left unread is ever parsed, once the answer is sent.

    An answer sent before the body was read makes Tornado close the connection
    (``HTTP1Connection.finish``), but only after it has parsed the body's
    framing, which it would refuse a second time, with a log line of its own.
    The body is never read now, so frame it as empty: none of its bytes is ever
    parsed.
    """
    request.headers.pop("Transfer-Encoding", None)
    request.headers["Content-Length"] = "0"

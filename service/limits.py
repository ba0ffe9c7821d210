"""The service's HTTP server, with limits: connections, timeouts, and the descriptor limit.

Tornado's :class:`~tornado.httpserver.HTTPServer` holds a connection for as long as
its client likes, and its accept loop, at the process's descriptor limit, meets
``EMFILE`` on every turn: the listening socket stays readable, so the loop spins a
core and logs a traceback each time. :class:`LimitedHTTPServer` adds:

- **a connection limit** (``http.max_connections``): past it, a new connection is
  accepted and closed at once (reset, so it leaves no ``TIME_WAIT`` behind);
- **the descriptor limit**: on ``EMFILE`` the server frees a descriptor it keeps in
  reserve, accepts the waiting connection with it, closes it and takes the reserve
  back, so the backlog drains instead of spinning; if even that fails it stops
  accepting for :data:`PAUSE` seconds;
- **timeouts** per connection, each a single timer moved as the connection goes
  through its phases: ``header`` (a new connection, or a kept-alive one whose next
  request has begun, until the request's headers are in), ``body`` (the headers
  are in, until the body is), ``idle`` (a kept-alive connection between an answer
  and the next request's first byte). While a handler answers (an event stream, a
  ``wait=all`` clear) no timer runs.

Each refused or timed-out connection is counted by reason
(``cachebus_http_connections_refused_total``, ``cachebus_http_connections_timed_out_total``)
and logged on at most one line per :data:`LOG_INTERVAL` seconds.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from cachebus.settings import HttpSettings

from . import tornado_overrides

log = logging.getLogger("cachebus.http")

#: Descriptors kept free of HTTP connections when the limit is automatic: the bus
#: sockets and ZeroMQ's own, token files and their locks, the event loop, logs.
DESCRIPTOR_RESERVE = 128
#: The automatic connection limit never goes above this, whatever the descriptor limit.
MAX_AUTOMATIC_CONNECTIONS = 10_000
#: Seconds between two log lines about the same kind of refused or timed-out connection.
LOG_INTERVAL = 10.0
#: Seconds the accept loop rests when it cannot even shed a connection.
PAUSE = 0.25
#: Connections accepted per turn of the event loop, as Tornado's own accept loop does.
ACCEPTS_PER_TURN = 128
#: ``accept`` errors that mean "out of descriptors or memory", not "this one connection failed".
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept`` errors about the one connection it took (accept(2) says to retry after them).
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                   errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.ENETDOWN, errno.EPERM})
#: ``SO_LINGER`` on, zero seconds: ``close`` resets the connection and keeps no ``TIME_WAIT``.
_RESET = struct.pack("ii", 1, 0)


class Refusal(enum.StrEnum):
    """Why a connection was closed as soon as it was accepted."""

    #: ``http.max_connections`` were open.
    LIMIT = "limit"
    #: The process had no descriptor left (``EMFILE``): shed with the reserve descriptor.
    DESCRIPTORS = "descriptors"


class Phase(enum.StrEnum):
    """Where a connection is in its request; each phase but ``answering`` has a timeout."""

    #: Waiting for a request's headers: the first request's from the connection's start,
    #: a later one's from its first byte (``http.header_timeout``).
    HEADER = "header"
    #: The headers are in; waiting for the body (``http.body_timeout``).
    BODY = "body"
    #: Kept alive after an answer, no byte of the next request yet (``http.idle_timeout``).
    IDLE = "idle"
    #: A handler is answering; no timeout (event streams, ``wait=all`` clears).
    ANSWERING = "answering"


DEFAULT_LIMITS = HttpSettings()

#: The phases that have a timeout.
TIMED_PHASES = (Phase.HEADER, Phase.BODY, Phase.IDLE)


def max_connections(setting: int) -> int:
    """``http.max_connections``, or for 0 the descriptor limit less a reserve (at least 1)."""
    if setting:
        return setting
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_AUTOMATIC_CONNECTIONS
    return max(1, min(soft - DESCRIPTOR_RESERVE, MAX_AUTOMATIC_CONNECTIONS))


class ThrottledLog:
    """One kind of warning, written at most once per ``interval`` seconds, with a count.

    A flood of events costs a counter increment each, never a line each.
    """

    def __init__(self, logger: logging.Logger, message: str, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.message = message
        self.interval = interval
        self.clock = clock
        self._unlogged = 0
        self._next_line = 0.0

    def event(self, detail: str = "") -> None:
        """One more; ``detail`` (never a client's bytes) ends the line if this one writes it."""
        self._unlogged += 1
        now = self.clock()
        if now < self._next_line:
            return
        message = f"{self.message} ({detail})" if detail else self.message
        if self._next_line:
            self.logger.warning("%s: %d since the last line", message, self._unlogged)
        else:
            self.logger.warning("%s; more are counted, and logged at most every %.0f s", message, self.interval)
        self._unlogged = 0
        self._next_line = now + self.interval


class ConnectionCounts(Protocol):
    """Where the server counts the connections it closes (the service's metrics)."""

    def connection_refused(self, why: Refusal) -> None: ...

    def connection_timed_out(self, phase: Phase) -> None: ...


class _Stream(tornado_overrides.NotifyingStream):
    """An accepted connection's stream, which tells its :class:`_Deadline` when bytes arrive."""

    deadline: _Deadline | None = None

    def bytes_arrived(self) -> None:
        if self.deadline is not None:
            self.deadline.bytes_arrived()


class _Deadline:
    """The one timer of a connection, moved as the connection changes :class:`Phase`."""

    def __init__(self, server: LimitedHTTPServer, stream: _Stream) -> None:
        self.server = server
        self.stream = stream
        self.requests = 0
        self.phase = Phase.HEADER
        self._timer: object | None = None
        self._arm(server.limits.header_timeout)

    def request_started(self) -> None:
        """Tornado waits for the next request's headers."""
        if self.requests:
            self.phase = Phase.IDLE
            self._arm(self.server.limits.idle_timeout)
        self.requests += 1

    def bytes_arrived(self) -> None:
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEADER
            self._arm(self.server.limits.header_timeout)
        # The first request's header time runs from the connection's start: trickled
        # bytes never extend it.

    def headers_received(self) -> None:
        self.phase = Phase.BODY
        self._arm(self.server.limits.body_timeout)

    def body_received(self) -> None:
        self.phase = Phase.ANSWERING
        self._disarm()

    def closed(self) -> None:
        self._disarm()
        self.stream.deadline = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = IOLoop.current().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            IOLoop.current().remove_timeout(self._timer)
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self.stream.closed():
            self.server.timed_out(self.phase)
            # Tornado's reader sees a closed stream and ends the connection quietly.
            self.stream.close()


class _Watched(httputil.HTTPMessageDelegate):
    """Forwards one request to the application, telling its :class:`_Deadline` what happened."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, deadline: _Deadline) -> None:
        self.inner = inner
        self.deadline = deadline

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.deadline.headers_received()
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.deadline.body_received()
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class _Acceptor:
    """Accepts connections on one listening socket without ever spinning."""

    def __init__(self, server: LimitedHTTPServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.io_loop = IOLoop.current()
        self._listening = False
        self._resume: object | None = None
        self._listen()

    def _listen(self) -> None:
        self._resume = None
        self.io_loop.add_handler(self.sock, self._accept, IOLoop.READ)
        self._listening = True

    def stop(self) -> None:
        if self._listening:
            self.io_loop.remove_handler(self.sock)
            self._listening = False
        if self._resume is not None:
            self.io_loop.remove_timeout(self._resume)
            self._resume = None

    def _pause(self) -> None:
        """Stop watching the socket for a moment: waiting connections stay in the backlog."""
        self.stop()
        self._resume = self.io_loop.call_later(PAUSE, self._listen)

    def _accept(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    continue  # that connection failed or went away; the next may be fine
                if exc.errno in _EXHAUSTED and self.server.shed(self.sock):
                    continue
                # Out of descriptors with nothing to shed with, or an error accept(2) does not
                # name for a single connection: retrying at once would spin.
                self.server.accept_failed(exc)
                self._pause()
                return
            self.server.admit(connection, address)


class LimitedHTTPServer(HTTPServer):
    """Tornado's HTTP server with a connection limit, timeouts and descriptor-limit shedding.

    Plain HTTP only: the service leaves TLS to a proxy in front of it.
    """

    limits: HttpSettings

    def initialize(self, *args: Any, limits: HttpSettings = DEFAULT_LIMITS, metrics: ConnectionCounts | None = None,
                   **kwargs: Any) -> None:
        """``LimitedHTTPServer(app, limits=settings.http, metrics=…)``; other arguments are Tornado's."""
        # No timer of Tornado's: each connection's _Deadline covers waiting, headers and
        # body. Tornado's header timer, kept as a backstop until issue 14, wrapped every
        # request's header read in gen.with_timeout: a future, a chain and two more
        # callbacks per request. Its body timeout would log each slow client on a line
        # of its own.
        kwargs.update(max_header_size=limits.max_header_size)
        super().initialize(*args, **kwargs)
        tornado_overrides.no_header_timeout(self)
        self.limits = limits
        self.max_connections = max_connections(limits.max_connections)
        self.metrics = metrics
        self.open_connections = 0
        self._reserve: int | None = _reserve_descriptor()
        self._refused_log = {
            Refusal.LIMIT: ThrottledLog(log, f"refused connections: {self.max_connections} open "
                                             "(http.max_connections)"),
            Refusal.DESCRIPTORS: ThrottledLog(log, "refused connections: out of file descriptors"),
        }
        self._paused_log = ThrottledLog(log, f"accept failed, accepting paused for {PAUSE} s at a time")
        self._timeout_log = {phase: ThrottledLog(log, f"closed connections: {phase} timeout") for phase in TIMED_PHASES}

    # --- accepting --------------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            tornado_overrides.accept_with(self, sock, _Acceptor(self, sock).stop)

    def stop(self) -> None:
        super().stop()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def admit(self, connection: socket.socket, address: Any) -> None:
        """Serve an accepted connection, or close it at once at the connection limit."""
        if self.open_connections >= self.max_connections:
            _reset(connection)
            self._refused(Refusal.LIMIT)
            return
        self.open_connections += 1
        stream = tornado_overrides.new_stream(self, connection, _Stream)
        stream.deadline = _Deadline(self, stream)
        self.handle_stream(stream, address)

    def shed(self, sock: socket.socket) -> bool:
        """Out of descriptors: accept one waiting connection on the reserve and close it.

        False when that cannot be done (no reserve could be taken back since the last
        time, or accept fails even so): the caller then stops accepting for a moment.
        """
        if self._reserve is None:
            self._reserve = _reserve_descriptor()
            if self._reserve is None:
                return False
        os.close(self._reserve)
        self._reserve = None
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            pass  # gone already
        except OSError:
            self._reserve = _reserve_descriptor()
            return False  # the freed descriptor went to another thread, or memory is short
        else:
            _reset(connection)
            self._refused(Refusal.DESCRIPTORS)
        self._reserve = _reserve_descriptor()
        return True

    def accept_failed(self, error: OSError) -> None:
        """Accepting stops for :data:`PAUSE` seconds; say why, at most once per :data:`LOG_INTERVAL`."""
        self._paused_log.event(errno.errorcode.get(error.errno or 0, str(error.errno)))

    def _refused(self, why: Refusal) -> None:
        if self.metrics is not None:
            self.metrics.connection_refused(why)
        self._refused_log[why].event()

    # --- each connection's phases -------------------------------------------------

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = tornado_overrides.connection_stream(server_conn)
        deadline = stream.deadline if isinstance(stream, _Stream) else None
        if deadline is None:
            return delegate
        deadline.request_started()
        return _Watched(delegate, deadline)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        stream = tornado_overrides.connection_stream(server_conn)
        if isinstance(stream, _Stream) and stream.deadline is not None:
            stream.deadline.closed()
        self.open_connections -= 1

    def timed_out(self, phase: Phase) -> None:
        if self.metrics is not None:
            self.metrics.connection_timed_out(phase)
        self._timeout_log[phase].event()


def _reserve_descriptor() -> int | None:
    """A descriptor held only to be given up at the descriptor limit (None if none is left)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _reset(connection: socket.socket) -> None:
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:
        pass  # already reset by the peer; close it all the same
    connection.close()

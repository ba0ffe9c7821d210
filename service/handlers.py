"""HTTP handlers: Flextype's cache clear endpoint and the record of acks.

Every response carries the CORS headers Flextype sends, every failure gets a
Flextype-shaped JSON body, and no credential reaches a log line. A handler
refuses a request by raising :class:`~cachebus.service.errors.ApiError`;
:class:`~cachebus.service.responses.FlextypeResponses` logs, counts and answers it (see
:mod:`cachebus.service.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Iterator
from typing import Any

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.web import HTTPError, RequestHandler

from cachebus.settings import Settings

from . import tornado_overrides
from .auth.counter import Counted
from .auth.limits import Overloaded
from .auth.rules import TokenError
from .errors import BUSY_ANSWER, CONTENT_TYPE, REFUSAL_STATUS, ApiError, Reason
from .events import EventKind, EventQueue, unnumbered
from .instance import Service
from .params import credentials, request_params, scope, wait_timeout
from .record import ClearEntry
from .responses import FlextypeResponses
from .role import Leading, NotLeading

log = logging.getLogger("cachebus.api")


class BaseHandler(FlextypeResponses):
    """A route of the API: the service, a bounded body, Flextype's parameters and token check."""

    service: Service

    def initialize(self, service: Service) -> None:
        self.service = service
        self._chunks: list[bytes] = []

    @classmethod
    def methods(cls, settings: Settings) -> list[str]:
        """The methods the route answers with these settings (by default, those it implements)."""
        return cls.implemented()

    @classmethod
    def waits(cls, handler: BaseHandler) -> float:
        """Seconds ``handler``'s request of this route may wait for its answer (``wait=all``): a
        follower passing it on waits as long for the leader's answer."""
        return 0.0

    def allowed_methods(self) -> list[str]:
        return type(self).methods(self.service.settings)

    def keep(self, chunk: bytes | None) -> None:
        if chunk is None:
            self._chunks.clear()
        else:
            self._chunks.append(chunk)

    def params(self) -> dict[str, Any]:
        """Query and body parameters, merged the Flextype way."""
        self.request.body = b"".join(self._chunks)
        return request_params(self.request)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(json.dumps(data, separators=(",", ":")))

    def leading(self) -> Leading:
        """The leading role, still holding its lock; a 503 otherwise (docs/scale-out.md).

        A follower never runs a leader's route (the application passes those
        requests on, :mod:`cachebus.service.forward`); this catches the lead
        lost while a request was under way.
        """
        role = self.service.role
        try:
            if not isinstance(role, Leading):
                raise NotLeading("this instance does not hold the lead")
            role.check()
        except NotLeading as exc:
            raise ApiError(503, Reason.NO_LEAD, retry_after=1, log_message=str(exc)) from None
        return role

    async def verify(self, params: dict[str, Any]) -> None:
        """Flextype's validation steps 1 to 6, within the abuse limits, counting no call; raises
        :class:`ApiError`. For the read endpoints.

        The limits count by the client's address (``remote_ip``, the socket's
        peer): a refusal of them is a 429 with ``Retry-After``, counted with
        the failed authentications.
        """
        token, access_token = self._credentials(params)
        with _token_errors():
            await self.service.tokens.verify(token, access_token, client=self.request.remote_ip or "")

    async def admit_call(self, params: dict[str, Any]) -> Counted:
        """Flextype's validation steps 1 to 7, as :meth:`verify`, for a call that counts.

        Returns once the call is admitted, its count still being made durable:
        pass the result to :meth:`durably` before answering.
        """
        token, access_token = self._credentials(params)
        with _token_errors():
            return await self.service.tokens.admit_call(token, access_token, client=self.request.remote_ip or "")

    def _credentials(self, params: dict[str, Any]) -> tuple[str, str]:
        """Steps 1 and 2: the credentials are there, and the API is enabled."""
        found = credentials(params)
        if not self.service.settings.api.cache.enabled:
            raise ApiError(400, Reason.API_DISABLED, auth=True)
        return found

    async def durably(self, counted: Counted) -> None:
        """Wait until an admitted call's count is durable; a failed write is answered as a refusal."""
        with _token_errors():
            await counted.durable()


@contextlib.contextmanager
def _token_errors() -> Iterator[None]:
    """The token layer's refusals, as the answers the API gives them."""
    try:
        yield
    except TokenError as exc:
        raise ApiError(REFUSAL_STATUS[exc.reason], exc.reason, auth=True) from None
    except Overloaded as exc:
        status, reason = BUSY_ANSWER[exc.why]
        raise ApiError(status, reason, auth=status == 429, retry_after=exc.retry_after) from None


class NotFoundHandler(BaseHandler):
    """Unknown routes: Flextype's 404 body, whatever the method (not 405: no method is allowed here)."""

    SUPPORTED_METHODS = tornado_overrides.EveryMethod(RequestHandler.SUPPORTED_METHODS)

    async def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            raise HTTPError(404)


class UnreadableRequestHandler(BaseHandler):
    """A request Tornado refused to build: a query string of more than 1,000 fields, a
    missing or malformed ``Host``. Flextype's 400, through the one error path."""

    SUPPORTED_METHODS = tornado_overrides.EveryMethod(RequestHandler.SUPPORTED_METHODS)

    async def prepare(self) -> None:
        raise ApiError(400, Reason.UNREADABLE_REQUEST)


class ClearHandler(BaseHandler):
    """``POST /api/v1/cache/clear``: authenticate, then publish a clear."""

    @classmethod
    def waits(cls, handler: BaseHandler) -> float:
        api = handler.service.settings.api.cache
        return wait_timeout(handler.params(), api.wait_timeout, api.max_wait_timeout) or 0.0

    @classmethod
    def methods(cls, settings: Settings) -> list[str]:
        return [*settings.api.cache.methods, "OPTIONS"]

    async def post(self) -> None:
        if self._too_large:
            return
        api = self.service.settings.api.cache
        params = self.params()
        token, _ = credentials(params)
        # Before the token is checked, so a malformed request never counts a call.
        timeout = wait_timeout(params, api.wait_timeout, api.max_wait_timeout)
        reach = scope(self.request, params)
        leading = self.leading()  # before the count: a leader that lost its lock counts nothing
        counted = await self.admit_call(params)
        try:
            if timeout is not None:
                await leading.warmed()  # a proof names every worker, also right after a takeover
            # Published as soon as the call is admitted: the count's fsync overlaps the bus.
            clear = leading.publish_clear(token=token, reach=reach)
        except NotLeading as exc:
            raise ApiError(503, Reason.NO_LEAD, retry_after=1, log_message=str(exc)) from None
        finally:
            await self.durably(counted)  # 2xx still means counted durably, and published
        entry = self.service.record.clear(clear.id)
        assert entry is not None
        log.debug("clear %s published: seq %d, %d workers expected, %s", clear.id, clear.seq, len(entry.expected),
                  entry.reach)
        self.set_header("Cache-Clear-Id", clear.id)
        if timeout is not None:
            await self._answer_with_proof(entry, timeout)
        elif api.success_status == 200:
            self.write_json({})
        else:
            self.set_status(204)
            self.finish()

    def get(self) -> Awaitable[None]:
        return self.post()

    async def _answer_with_proof(self, entry: ClearEntry, timeout: float) -> None:
        """200 once every worker live at publish time acked a successful purge; else 202 with ``reason``.

        With nobody live at publish time there is nothing to wait for, and nothing
        proven: 202 at once, so a deploy script is never told "all purged" when
        nobody was listening.
        """
        record = self.service.record
        complete = bool(entry.expected) and await record.wait(entry, timeout)
        body = record.clear_json(entry)
        body["elapsed_ms"] = round((time.time() - entry.published_at) * 1000, 3)
        if not complete:
            body["reason"] = _unproven(entry, timeout)
        self.write_json(body, 200 if complete else 202)


def _unproven(entry: ClearEntry, timeout: float) -> str:
    """One sentence saying why a clear is not (yet) proof that every process purged."""
    expected = len(entry.expected)
    if not expected:
        return "no live worker at publish time: nobody was expected to purge"
    parts = []
    if failed := len(entry.failed):
        parts.append(f"{failed} failed to purge")
    if missing := len(entry.missing):
        parts.append(f"{missing} did not answer")
    return (f"{entry.acked_count} of {expected} processes purged within {timeout:g} s; "
            f"{' and '.join(parts) or 'the rest is pending'}")


class RecordHandler(BaseHandler):
    """Base of the read endpoints: Flextype's token check, without consuming a call."""

    async def prepare(self) -> None:
        await super().prepare()  # the method first: a PUT is 405 whatever its credentials
        if self.request.method == "OPTIONS":
            return
        # The body has not arrived yet: read endpoints take credentials from the query.
        await self.verify(self.params())


class ClearsHandler(RecordHandler):
    """``GET /api/v1/cache/clears``: the most recent clears, newest first."""

    def get(self) -> None:
        limit = self.service.settings.record.list_limit
        record = self.service.record
        self.write_json({"clears": [record.clear_json(c) for c in record.recent(limit)]})


class ClearRecordHandler(RecordHandler):
    """``GET /api/v1/cache/clears/<id>``: one clear and every worker's ack."""

    def get(self, clear_id: str) -> None:
        entry = self.service.record.clear(clear_id)
        if entry is None:
            raise HTTPError(404)
        self.write_json(self.service.record.clear_json(entry))


class WorkersHandler(RecordHandler):
    """``GET /api/v1/cache/workers``: every known worker and its last ack."""

    def get(self) -> None:
        self.write_json({"workers": [w.to_json() for w in self.service.record.workers()]})


class EventsHandler(RecordHandler):
    """``GET /api/v1/cache/events``: the record's changes as Server-Sent Events.

    A new stream starts with a ``snapshot``; a reconnecting one (``Last-Event-ID``)
    gets what it missed from the event log's history, or a snapshot when the
    history no longer reaches back. The stream reads from its own bounded
    queue, so a slow client can only overflow that queue, which ends its stream.
    """

    #: Kernel send buffer for a stream, so a client that stops reading fills
    #: its queue within a few hundred events rather than megabytes.
    SEND_BUFFER = 64 * 1024
    #: How long an overflowed client gets to read its ``overflow`` event.
    GOODBYE_SECONDS = 5.0
    #: How many keep-alive intervals a write may wait for a client that reads nothing.
    STALLED_KEEPALIVES = 2

    _queue: EventQueue | None = None

    async def get(self) -> None:
        events = self.service.events
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        stream = tornado_overrides.request_stream(self)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SEND_BUFFER)
        # Opened before the snapshot, with no await in between: nothing falls in the gap.
        self._queue = queue = events.open()
        # A client that reads nothing leaves this handler waiting in flush() for good, so
        # the overflow itself ends the connection, GOODBYE_SECONDS later.
        queue.on_overflow = lambda: self._close_later(stream)
        keepalive = self.service.settings.events.keepalive
        try:
            last = self.request.headers.get("Last-Event-ID", "")
            backlog = events.since(last) if last else None
            if backlog is None:
                first = events.snapshot(self._snapshot())
            else:
                first = b"".join(event.sse for event in backlog)
            self.write(b"retry: 2000\n\n" + first)
            await self._flush_or_close(keepalive)
            while not stream.closed():
                await queue.wait(keepalive)
                if queue.overflowed:
                    self.write(unnumbered(EventKind.OVERFLOW, {"dropped": True}))
                    break
                self.write(b"".join(event.sse for event in queue.take()) or b": keep-alive\n\n")
                await self._flush_or_close(keepalive)
        except StreamClosedError:
            return
        finally:
            events.close(queue)
        if not stream.closed():
            self.finish()
            self._close_later(stream)

    def _close_later(self, stream: IOStream) -> None:
        IOLoop.current().call_later(self.GOODBYE_SECONDS, stream.close)

    async def _flush_or_close(self, keepalive: float) -> None:
        """Flush, closing the connection if the client has not taken the bytes within
        a few keep-alive intervals (it stopped reading while no event arrived to
        overflow its queue); raises :class:`StreamClosedError` then."""
        flushing = self.flush()
        # Retrieve the outcome even when the wait below gives up on it.
        flushing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(flushing), keepalive * self.STALLED_KEEPALIVES)
        except TimeoutError:
            tornado_overrides.request_stream(self).close()
            raise StreamClosedError() from None

    def on_connection_close(self) -> None:
        if self._queue is not None:
            self._queue.wake()

    def _snapshot(self) -> dict[str, Any]:
        record = self.service.record
        return {
            # The service run (the event ids' epoch): the bus epoch goes on across a takeover,
            # but the record, and so what a dashboard shows, starts anew with each process.
            "epoch": self.service.events.epoch,
            "workers": [w.to_json() for w in record.workers()],
            "clears": [record.clear_json(c) for c in record.recent(self.service.settings.record.list_limit)],
        }

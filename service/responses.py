"""What every response of the service shares, one mixin per job, composed in :class:`FlextypeResponses`.

- :class:`Cors`: Flextype's CORS headers on every answer, and its empty answer to OPTIONS.
- :class:`MethodGate`: the methods a route answers; 405 with ``Allow`` for any other.
- :class:`BodyLimits`: the body's framing and encoding, and ``service.max_body_size``,
  checked as soon as the headers are in and again as the body streams.
- :class:`RequestMetrics`: every request counted by route, method and status, and
  every failed authentication by its reason.

Each refuses by raising :class:`~cachebus.service.errors.ApiError` (or
Tornado's ``HTTPError``), and every refusal takes the one error path of
:class:`~cachebus.service.errors.FlextypeErrors`: ``log_exception``, then
``send_error``, whose ``write_error`` writes Flextype's body.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any

from tornado.httputil import HTTPHeaders
from tornado.web import HTTPError, RequestHandler, stream_request_body

from . import tornado_overrides
from .errors import ApiError, FlextypeErrors, Reason
from .metrics import ServiceMetrics

#: Methods counted under their own name; any other is counted as ``other``, so a
#: client inventing methods cannot grow the number of metric series without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})

#: A ``Content-Length`` value: ASCII digits only. ``str.isdigit`` also accepts ``²`` and ``٣``,
#: which ``int`` then refuses.
_LENGTH = re.compile(r"[0-9]+")
#: Longer than this many digits, a declared length exceeds any body limit (and ``int`` of
#: thousands of digits is refused outright).
_LENGTH_DIGITS = 18


def declared_length(headers: HTTPHeaders) -> int | None:
    """The body length ``Content-Length`` declares, or None without one.

    Raises :class:`ApiError` 400 for a value Tornado would refuse after the handler
    has run (so a client gets Flextype's body rather than Tornado's bare 400).
    """
    if "Content-Length" not in headers:
        return None
    # Repeated headers arrive joined with commas; equal copies are fine, as Tornado has it.
    values = {value.strip() for value in headers["Content-Length"].split(",")}
    if len(values) != 1 or not _LENGTH.fullmatch(value := values.pop()):
        raise ApiError(400, Reason.BAD_CONTENT_LENGTH)
    return int(value) if len(value) <= _LENGTH_DIGITS else 10 ** _LENGTH_DIGITS


class Cors(RequestHandler):
    """Flextype's CORS headers (``cors.*``) on every answer, errors included, and OPTIONS answered empty."""

    def set_default_headers(self) -> None:
        # Runs before initialize(), so the settings come from the application.
        cors = self.application.settings["cors"]
        if cors.enabled:
            self.set_header("Access-Control-Allow-Origin", cors.origin)
            self.set_header("Access-Control-Allow-Headers", ", ".join(cors.headers))
            self.set_header("Access-Control-Allow-Methods", ", ".join(cors.methods))

    def options(self, *args: str) -> None:
        """Flextype answers OPTIONS on any route with an empty response."""
        self.finish()


class MethodGate(RequestHandler):
    """The methods a route answers: those it implements, and OPTIONS; 405 with ``Allow`` otherwise."""

    def allowed_methods(self) -> list[str]:
        return type(self).implemented()

    @classmethod
    def implemented(cls) -> list[str]:
        """The methods the route answers: those it implements, and OPTIONS."""
        methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        return [m for m in methods if cls._implements(m)] + ["OPTIONS"]

    @classmethod
    def _implements(cls, method: str) -> bool:
        return getattr(cls, method.lower()) is not getattr(RequestHandler, method.lower())

    def check_method(self) -> None:
        """Raise 405 for a method the route does not answer."""
        method = self.request.method or ""
        if method != "OPTIONS" and method not in self.allowed_methods():
            raise HTTPError(405)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        super().write_error(status_code, **kwargs)


class BodyLimits(RequestHandler):
    """The body's framing and encoding, and its size: a declared body over
    ``service.max_body_size`` is refused before a byte of it is read, a body
    that streams past the limit as soon as it does. Routes that read the body
    keep its chunks (:meth:`keep`)."""

    _received = 0
    _too_large = False

    @property
    def _limit(self) -> int:
        return int(self.application.settings["max_body_size"])

    def check_body(self) -> None:
        """Malformed framing (400), an encoded body (415), a declared body over the limit (413)."""
        headers = self.request.headers
        declared = declared_length(headers)
        if "Transfer-Encoding" in headers and (
                declared is not None or headers["Transfer-Encoding"].strip().lower() != "chunked"):
            raise ApiError(400, Reason.BAD_TRANSFER_ENCODING)
        if headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            # Never decompressed: a small gzip body can inflate a thousandfold.
            raise ApiError(415, Reason.UNSUPPORTED_ENCODING)
        if declared is not None and declared > self._limit:
            self._too_large = True
            raise ApiError(413, Reason.BODY_TOO_LARGE)

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._received += len(chunk)
        if self._received <= self._limit:
            self.keep(chunk)
            return
        self._too_large = True
        self.keep(None)
        tornado_overrides.refuse_while_streaming(self, ApiError(413, Reason.BODY_TOO_LARGE))

    def keep(self, chunk: bytes | None) -> None:
        """A chunk of the body (None: forget what was kept). Routes that read no body drop it."""

    def on_finish(self) -> None:
        tornado_overrides.frame_unread_body_as_empty(self.request)
        super().on_finish()


class RequestMetrics(RequestHandler):
    """Every response counted by route pattern (never the raw path), method and status, and
    every failed authentication by its reason, in the service's metrics (if it has any)."""

    @property
    def route(self) -> type[RequestHandler]:
        """The route this handler answers, as the metrics count it (a follower's forwarder stands
        for the leader's route)."""
        return type(self)

    @property
    def _metrics(self) -> ServiceMetrics | None:
        metrics: ServiceMetrics | None = self.application.settings.get("metrics")
        return metrics

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        """The warning line, and a failed authentication counted by its reason."""
        metrics = self._metrics
        if isinstance(value, ApiError) and value.auth and metrics is not None:
            metrics.auth_failures.labels(value.why).inc()
        super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        metrics = self._metrics
        if metrics is not None:
            route = self.application.settings["route_names"].get(self.route, "unmatched")
            method = self.request.method if self.request.method in HTTP_METHODS else "other"
            metrics.http_requests.labels(route, method, str(self.get_status())).inc()
        super().on_finish()


@stream_request_body
class FlextypeResponses(RequestMetrics, BodyLimits, MethodGate, Cors, FlextypeErrors):
    """What every response of the service shares: the mixins above, over the one error path.

    Every route streams its body, so :meth:`prepare` runs as soon as the headers
    are in: a wrong method (405), then malformed framing (400), an encoded body
    (415) or a declared body over ``service.max_body_size`` (413) is answered
    before a byte of the body is read and before any credential is looked at.
    """

    async def prepare(self) -> None:
        self.check_method()
        self.check_body()

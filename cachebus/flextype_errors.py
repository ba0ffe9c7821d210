"""How a failed request travels, and Flextype's error bodies, byte for byte.

A handler that refuses a request raises :class:`ApiError` (or Tornado's
``HTTPError`` for a route or method that does not exist) and returns nothing
by hand. Tornado then calls, once per raised exception,
:meth:`FlextypeErrors.log_exception`, which writes the one warning line, and
``send_error``, whose :meth:`FlextypeErrors.write_error` writes the body.

Flextype answers every API failure with a compact JSON object of ``title``,
``message`` and ``http_status_code``. Clients parse these, so cachebus keeps the
exact wording for the statuses Flextype defines and the same shape for all
others. This module is the only place a body or its content type is spelled.

It is part of the core (it imports only :mod:`cachebus.bus` and the core), so the
service, the reference worker and the relay all answer with the same bodies, and
``/metrics`` (:mod:`cachebus.metrics`) refuses a scraper as the API refuses a
client, without importing the service. How the token store's refusals map to a
status is the service's business: :mod:`cachebus.service.errors`.
"""

from __future__ import annotations

import enum
import http.client
import json
import logging
import weakref
from types import TracebackType
from typing import Any

from tornado.web import Application, HTTPError, RequestHandler

from cachebus.bus.scope import MAX_SCOPE_ITEM_BYTES, MAX_SCOPE_ITEMS
from cachebus.logs import Budget
from cachebus.redact import redact_uri

#: The content type of every JSON answer, errors and successes alike.
CONTENT_TYPE = "application/json;charset=UTF-8"

_MESSAGES = {
    400: ("Bad Request", "Validation for this particular item failed"),
    401: ("Unauthorized", "Token is wrong"),
    404: ("Not Found", "The requested resource or endpoint could not be found"),
    405: ("Method Not Allowed", "The requested method is not allowed for this endpoint"),
    413: ("Payload Too Large", "The request body is larger than this endpoint accepts"),
    415: ("Unsupported Media Type", "The request body's encoding is not supported"),
    429: ("Too Many Requests", "Too many requests; retry after the number of seconds in Retry-After"),
    500: ("Internal Server Error", "The server could not complete the request"),
    503: ("Service Unavailable", "The service is stopping; retry after the number of seconds in Retry-After"),
}


class Reason(enum.StrEnum):
    """Why a request was refused, other than its token (that is a
    :class:`~cachebus.service.auth.rules.Refusal`).

    The value is what the warning line and the ``reason`` label of
    ``cachebus_auth_failures`` show; it never holds a credential and is not sent
    to the client.
    """

    MISSING_CREDENTIALS = "missing_credentials"
    CREDENTIALS_NOT_STRINGS = "credentials_not_strings"
    MALFORMED_JSON = "malformed_json"
    JSON_NOT_OBJECT = "json_not_object"
    PARAMETER_NOT_UTF8 = "parameter_not_utf8"
    TIMEOUT_NOT_A_NUMBER = "timeout_not_a_number"
    TIMEOUT_OUT_OF_RANGE = "timeout_out_of_range"
    WAIT_NOT_ALL = "wait_not_all"
    API_DISABLED = "api_disabled"
    BODY_TOO_LARGE = "body_too_large"
    #: A form body (urlencoded or multipart) that does not parse: no boundary, a part without a
    #: name or headers, no final boundary, part headers that are not UTF-8…
    MALFORMED_FORM = "malformed_form"
    #: More fields in a urlencoded body than :data:`~cachebus.service.params.MAX_FIELDS` (a query
    #: string with more is an ``UNREADABLE_REQUEST``: Tornado refuses to build the request).
    TOO_MANY_FIELDS = "too_many_fields"
    #: ``Content-Length`` that is not ASCII digits (``²`` passes ``str.isdigit``), or repeated with
    #: different values.
    BAD_CONTENT_LENGTH = "bad_content_length"
    #: ``Transfer-Encoding`` other than ``chunked``, or together with ``Content-Length``.
    BAD_TRANSFER_ENCODING = "bad_transfer_encoding"
    #: A request Tornado could not even build: more than 1,000 query fields, a bad ``Host``.
    UNREADABLE_REQUEST = "unreadable_request"
    #: A ``Content-Encoding`` (gzip, br…): bodies are never decompressed (415).
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    #: ``/metrics`` asks for a bearer token and ``metrics.token`` is not set.
    METRICS_TOKEN_NOT_SET = "metrics_token_not_set"
    #: ``/metrics``: no ``Authorization: Bearer …`` header.
    MISSING_BEARER_TOKEN = "missing_bearer_token"
    #: ``/metrics``: a bearer token that is not ``metrics.token``.
    WRONG_BEARER_TOKEN = "wrong_bearer_token"
    #: 429: the client's address failed to authenticate too often lately (``api.auth.failures``).
    TOO_MANY_FAILURES = "too_many_failures"
    #: 429: the client's address has its share of bcrypt, and its queue is full (``api.auth.per_address*``).
    ADDRESS_BUSY = "address_busy"
    #: 429: bcrypt's queue is full (``api.auth.bcrypt_queue``).
    BCRYPT_BUSY = "bcrypt_busy"
    #: 503: the service is stopping, and the request's work was cancelled.
    STOPPING = "stopping"
    #: 503: another instance holds the lead and did not answer, or none does (docs/scale-out.md).
    NO_LEAD = "no_lead"
    #: A clear's ``keys``, ``prefixes``, ``tags`` or ``group`` past the limits of
    #: :mod:`cachebus.bus.scope`, or with an entry that is not one string of text.
    BAD_SCOPE = "bad_scope"


#: Bodies whose message says more than the status's usual one.
_REASON_MESSAGES: dict[str, str] = {
    Reason.METRICS_TOKEN_NOT_SET: "Metrics need authentication, and metrics.token is not set",
    Reason.NO_LEAD: "No service instance that can publish the clear answered; retry after the number of seconds "
                    "in Retry-After",
    Reason.BAD_SCOPE: f"keys, prefixes, tags and group take at most {MAX_SCOPE_ITEMS} entries in all, each a "
                      f"string of 1 to {MAX_SCOPE_ITEM_BYTES} bytes without control characters",
}


#: Every refusal's warning line is rate-limited per reason, so a client that sends
#: bad requests in a loop cannot fill the disk: within each window of this many
#: seconds, the first lines of a reason are written, the rest counted, and the
#: next line written says how many were not.
QUIET_SECONDS = 10.0
#: Lines per reason per window: enough that an operator sees each of a few bad
#: requests; a flood of one kind writes this many lines a window, whatever its rate.
LINES_PER_WINDOW = 10
#: Refusals that come in floods by nature (those with ``Retry-After``): one line a window.
FLOOD_LINES_PER_WINDOW = 1


class ApiError(HTTPError):
    """Refuse a request with a Flextype error body: raise it, never send it by hand.

    ``why`` is the typed cause the warning line and metrics show: a
    :class:`Reason`, or the token store's
    :class:`~cachebus.service.auth.rules.Refusal` (the core cannot name that
    type: it lives in the service, hence any ``StrEnum``). It is not
    called ``reason`` because Tornado's ``HTTPError.reason`` is the status
    line's phrase, which stays the standard one. ``auth`` marks a failed
    authentication, which the service counts by ``why``. ``log_message`` adds
    an explanation for the operator to the warning line; like ``why``, it
    never holds a credential. ``retry_after`` (seconds) is sent as the
    ``Retry-After`` header, and makes the warning line rate-limited: such
    refusals come in floods.
    """

    def __init__(self, status: int, why: enum.StrEnum, *, auth: bool = False,
                 log_message: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(status, log_message)
        self.why = why
        self.auth = auth
        self.retry_after = retry_after


def reason_message(why: enum.StrEnum) -> str | None:
    """The body's message for a refusal that says more than its status's usual one, if it does."""
    return _REASON_MESSAGES.get(why)


def error_body(status: int, message: str | None = None) -> bytes:
    """The compact JSON body Flextype sends for ``status``, optionally with its own ``message``."""
    title, default = _MESSAGES.get(status) or (
        http.client.responses.get(status, "Error"),
        http.client.responses.get(status, "The request failed"),
    )
    return json.dumps(
        {"title": title, "message": message or default, "http_status_code": status},
        separators=(",", ":"),
    ).encode()


class FlextypeErrors(RequestHandler):
    """Mixin: how every error of a handler is logged and answered.

    Tornado calls :meth:`log_exception` exactly once for each exception a
    handler raises, then ``send_error``, which calls :meth:`write_error`; both
    also run for Tornado's own errors (an unknown method, a missing static
    file) and for uncaught exceptions (500).
    """

    #: The logger of the warning lines; a subclass may name its own.
    error_log = logging.getLogger("cachebus.api")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Flextype's body for ``status_code``; the one place an error body is written."""
        error = kwargs.get("exc_info", (None, None, None))[1]
        message = reason_message(error.why) if isinstance(error, ApiError) else None
        if isinstance(error, ApiError) and error.retry_after is not None:
            self.set_header("Retry-After", str(error.retry_after))
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(error_body(status_code, message))

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        """One line per refused request: method, path, status, why and peer.

        The path, never the URI: its query may hold credentials. Tornado's own
        line would print ``repr(request)``, raw URI included.
        """
        request = self.request
        if isinstance(value, ApiError):
            explained = value.get_message()
            budget = _quiet.setdefault(self.application, Budget(QUIET_SECONDS))
            unlogged = budget.take(value.why, LINES_PER_WINDOW if value.retry_after is None else FLOOD_LINES_PER_WINDOW)
            if unlogged is None:
                return
            if unlogged:
                explained = f"{explained + '; ' if explained else ''}{unlogged} more since the last such line"
            self.error_log.warning("%s %s -> %d (%s) from %s%s", request.method, request.path, value.status_code,
                                   value.why, request.remote_ip, f": {explained}" if explained else "")
        elif isinstance(value, HTTPError):
            if explained := value.get_message():
                self.error_log.warning("%d %s: %s", value.status_code, self._request_summary(), explained)
        else:
            self.error_log.error("uncaught exception %s", self._request_summary(), exc_info=value)

    def _request_summary(self) -> str:
        return f"{self.request.method} {redact_uri(self.request.uri or '')} ({self.request.remote_ip})"


#: One budget per application (keyed by reason, a closed set), so tests' apps do not share one.
_quiet: weakref.WeakKeyDictionary[Application, Budget] = weakref.WeakKeyDictionary()

"""Access logging that never writes a credential.

Tornado's default access log prints the request URI, query string included,
and Flextype clients put ``token`` and ``access_token`` there. Every URI that
reaches a log line passes through :func:`redact_uri` first.
"""

from __future__ import annotations

import logging
import urllib.parse

from tornado.web import RequestHandler

access_log = logging.getLogger("tornado.access")

REDACTED = "REDACTED"


def is_secret(name: str) -> bool:
    """Any parameter whose name mentions a token is treated as a credential."""
    return "token" in name.lower()


def redact_uri(uri: str) -> str:
    """``uri`` with the value of every credential parameter replaced."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    parts = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if eq and is_secret(urllib.parse.unquote_plus(name)):
            pair = f"{name}={REDACTED}"
        parts.append(pair)
    return f"{path}?{'&'.join(parts)}"


def log_request(handler: RequestHandler) -> None:
    """Application ``log_function``: Tornado's access line, redacted; at DEBUG for a success,
    WARNING for a 4xx and ERROR for a 5xx.

    It only writes the line; the service's handlers count requests in their
    ``on_finish``.
    """
    status = handler.get_status()
    if status < 400:
        # DEBUG: a clear that succeeds has its one INFO line when it completes (the record's), and a
        # line per request was a share of the service's CPU per clear (issue 14). Refusals stay visible.
        emit = access_log.debug
    elif status < 500:
        emit = access_log.warning
    else:
        emit = access_log.error
    request = handler.request
    emit("%d %s %s (%s) %.2fms", status, request.method, redact_uri(request.uri or ""),
         request.remote_ip, 1000.0 * request.request_time())

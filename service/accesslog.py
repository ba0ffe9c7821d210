"""Access logging that never writes a credential.

Tornado's default access log prints the request URI, query string included,
and Flextype clients put ``token`` and ``access_token`` there. Every URI that
reaches a log line passes through :func:`~cachebus.redact.redact_uri` first.
"""

from __future__ import annotations

import logging

from tornado.web import RequestHandler

from cachebus.redact import redact_uri

access_log = logging.getLogger("tornado.access")


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

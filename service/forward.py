"""An instance without the lead passes API requests to the one that has it.

Behind a load balancer any instance may get a clear (docs/scale-out.md). One
that does not hold the lead sends the request, as it came, to the leader's
``service.peer_url`` and answers with the leader's status, body and the
headers that belong to the answer; the leader checks the token, counts the
call and publishes, so ``calls`` and the proof are the leader's. A leader it
cannot reach, or that does not answer within the request's wait and
``service.forward_timeout``, is a 503 (``"title":"Service Unavailable"``):
never a 2xx for a clear that may not have been published.
"""

from __future__ import annotations

import logging

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.web import RequestHandler

log = logging.getLogger("cachebus.forward")

#: Marks a request one instance passed to another: the receiver, if it does not
#: lead either, answers 503 rather than passing it on again.
FORWARDED_BY = "X-Cachebus-Forwarded-By"

#: Request headers passed on: what the leader's answer may depend on. Not Host, not hop-by-hop ones.
_REQUEST_HEADERS = ("Content-Type", "Content-Encoding", "Accept", "Origin", "Authorization", "X-Requested-With")
#: Answer headers passed back; CORS headers are the receiving instance's own.
_ANSWER_HEADERS = ("Content-Type", "Cache-Clear-Id", "Retry-After", "Cache-Control")


class Unreachable(Exception):
    """The leader did not answer: ``str()`` says why, without the request's URI."""


async def forward(handler: RequestHandler, leader_url: str, body: bytes, timeout: float, name: str) -> None:
    """Send ``handler``'s request to the leader at ``leader_url`` and answer with its answer.

    Raises :class:`Unreachable` when no answer came.
    """
    request = handler.request
    headers = {k: request.headers[k] for k in _REQUEST_HEADERS if k in request.headers}
    headers[FORWARDED_BY] = name
    fetch = HTTPRequest(
        leader_url.rstrip("/") + (request.uri or "/"), method=request.method or "GET",
        headers=headers, body=body if request.method in ("POST", "PUT", "PATCH") else None,
        allow_nonstandard_methods=True, follow_redirects=False, decompress_response=False,
        connect_timeout=min(timeout, 5.0), request_timeout=timeout)
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

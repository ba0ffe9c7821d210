"""Flextype's error bodies, byte for byte.

Flextype answers every API failure with a compact JSON object of ``title``,
``message`` and ``http_status_code``. Clients parse these, so cachebus keeps the
exact wording for the statuses Flextype defines and the same shape for all
others.
"""

from __future__ import annotations

import http.client
import json

from .token_rules import Refusal

CONTENT_TYPE = "application/json;charset=UTF-8"

_MESSAGES = {
    400: ("Bad Request", "Validation for this particular item failed"),
    401: ("Unauthorized", "Token is wrong"),
    404: ("Not Found", "The requested resource or endpoint could not be found"),
    405: ("Method Not Allowed", "The requested method is not allowed for this endpoint"),
    413: ("Payload Too Large", "The request body is larger than this endpoint accepts"),
    500: ("Internal Server Error", "The server could not complete the request"),
}


#: The one place a token refusal becomes an HTTP status (Flextype's choices).
REFUSAL_STATUS: dict[Refusal, int] = {
    Refusal.UNKNOWN_TOKEN: 401,
    Refusal.INVALID_TOKEN_FILE: 400,
    Refusal.DISABLED: 400,
    Refusal.LIMIT_REACHED: 400,
    Refusal.NO_HASH: 401,
    Refusal.WRONG_ACCESS_TOKEN: 401,
}


class ApiError(Exception):
    """Abort a request with a Flextype error body.

    ``reason`` is a short machine-readable cause for logs; it never holds a
    credential and is not sent to the client. ``auth`` marks a failed
    authentication, which metrics count by reason.
    """

    def __init__(self, status: int, reason: str, *, auth: bool = False) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.auth = auth


def error_body(status: int) -> bytes:
    """The compact JSON body Flextype sends for ``status``."""
    title, message = _MESSAGES.get(status) or (
        http.client.responses.get(status, "Error"),
        http.client.responses.get(status, "The request failed"),
    )
    return json.dumps(
        {"title": title, "message": message, "http_status_code": status},
        separators=(",", ":"),
    ).encode()

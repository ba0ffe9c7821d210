"""URIs with their credentials redacted, for every line that logs one.

Tornado's default access log prints the request URI, query string included,
and Flextype clients put ``token`` and ``access_token`` there. Every URI that
reaches a log line passes through :func:`redact_uri` first: the service's access
log (:mod:`cachebus.service.accesslog`) and the error path's line for an
uncaught exception (:mod:`cachebus.flextype_errors`), which is core and so cannot
import the service.
"""

from __future__ import annotations

import urllib.parse

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

"""How the token store's refusals become HTTP statuses, and the service's door to the error path.

The error path itself (:class:`~cachebus.flextype_errors.ApiError`, the
:class:`~cachebus.flextype_errors.FlextypeErrors` mixin, Flextype's bodies and
their content type) lives in the core, :mod:`cachebus.flextype_errors`, because the
reference worker and ``/metrics`` answer with the same bodies and must not import
the service. This module adds what only the service knows, the statuses of the
token store's and the abuse limits' refusals, and re-exports the rest so the
service's modules import their errors from one place.
"""

from __future__ import annotations

from cachebus.flextype_errors import (
    CONTENT_TYPE,
    FLOOD_LINES_PER_WINDOW,
    LINES_PER_WINDOW,
    QUIET_SECONDS,
    ApiError,
    FlextypeErrors,
    Reason,
    error_body,
    reason_message,
)

from .auth.limits import Busy
from .auth.rules import Refusal

__all__ = ["BUSY_ANSWER", "CONTENT_TYPE", "FLOOD_LINES_PER_WINDOW", "LINES_PER_WINDOW", "QUIET_SECONDS",
           "REFUSAL_STATUS", "ApiError", "FlextypeErrors", "Reason", "error_body", "reason_message"]

#: The one place a token refusal becomes an HTTP status (Flextype's choices).
REFUSAL_STATUS: dict[Refusal, int] = {
    Refusal.UNKNOWN_TOKEN: 401,
    Refusal.INVALID_TOKEN_FILE: 400,
    Refusal.DISABLED: 400,
    Refusal.LIMIT_REACHED: 400,
    Refusal.NO_HASH: 401,
    Refusal.WRONG_ACCESS_TOKEN: 401,
    # Like Flextype's other problems with the hash (none, or one that cannot verify).
    Refusal.HASH_TOO_COSTLY: 401,
}


#: The one place a refusal of the abuse limits becomes an HTTP status and a reason.
BUSY_ANSWER: dict[Busy, tuple[int, Reason]] = {
    Busy.FAILURES: (429, Reason.TOO_MANY_FAILURES),
    Busy.ADDRESS: (429, Reason.ADDRESS_BUSY),
    Busy.POOL: (429, Reason.BCRYPT_BUSY),
    Busy.STOPPING: (503, Reason.STOPPING),
}

"""Flextype's rules for a token: why a token is refused, as a type.

The token layer says *why* a token cannot be used, never how to answer: the
HTTP layer maps each :class:`Refusal` to a status in one table
(:data:`cachebus.service.errors.REFUSAL_STATUS`).
"""

from __future__ import annotations

import enum


class Refusal(enum.StrEnum):
    """Why a token was refused; the value is the reason logs and metrics show."""

    #: No ``<tokens_dir>/<token>/token.yaml``, or an id that could not name one.
    UNKNOWN_TOKEN = "unknown_token"
    #: The file lacks ``state``, ``limit_calls`` or ``calls``, or does not parse.
    INVALID_TOKEN_FILE = "invalid_token_file"
    DISABLED = "disabled"
    LIMIT_REACHED = "limit_reached"
    #: No ``hashed_access_token`` in the file.
    NO_HASH = "no_hash"
    WRONG_ACCESS_TOKEN = "wrong_access_token"


class TokenError(Exception):
    """A failed check: its :class:`Refusal`, and never a credential."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason.value)
        self.reason = reason

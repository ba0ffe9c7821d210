"""Flextype's rules for a token: its parsed ``token.yaml`` in, a refusal out.

Nothing here touches a file or keeps state, so each rule can be tested with a
plain dict. The token layer says *why* a token cannot be used, never how to
answer: the HTTP layer maps each :class:`Refusal` to a status in one table
(:data:`cachebus.service.errors.REFUSAL_STATUS`).

The steps are Flextype's, and the caller runs them in Flextype's order:
step 3 (the token exists) is the file's business (:mod:`.token_file`); step 4
is :func:`check_fields`; step 5 is :func:`check_state` and, only for a call
that counts, :func:`check_limit`; step 6 is :func:`stored_hash` and then
:func:`.token_hash.password_verify`; step 7 (counting the call) is the store's
write.

This module imports nothing outside the standard library, so the HTTP layer's
error table can name a :class:`Refusal` without pulling in bcrypt.
"""

from __future__ import annotations

import enum
from typing import Any

#: A parsed ``token.yaml``: ``hashed_access_token``, ``state``, ``calls``,
#: ``limit_calls``, ``uuid``, ``created_by``, and whatever else Flextype put there.
TokenData = dict[str, Any]


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


class TokenState(enum.StrEnum):
    """The ``state`` values cachebus writes. Flextype refuses only ``disabled``,
    so a file may hold others, and they count as enabled."""

    ENABLED = "enabled"
    DISABLED = "disabled"


#: The fields step 4 requires.
REQUIRED_FIELDS = ("state", "limit_calls", "calls")


def is_plain_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``: YAML's true/false load as bool, a subclass of int."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(data: TokenData) -> None:
    """Step 4: ``state``, ``limit_calls`` and ``calls`` are set, and the counts are integers.

    Like PHP's ``isset()``, a key set to null counts as missing.
    """
    if any(data.get(key) is None for key in REQUIRED_FIELDS):
        raise TokenError(Refusal.INVALID_TOKEN_FILE)
    if not is_plain_int(data["calls"]) or not is_plain_int(data["limit_calls"]):
        raise TokenError(Refusal.INVALID_TOKEN_FILE)


def check_state(data: TokenData) -> None:
    """Step 5, first half: a disabled token is refused whatever the access token."""
    if data["state"] == TokenState.DISABLED:
        raise TokenError(Refusal.DISABLED)


def check_usable(data: TokenData) -> None:
    """Steps 4 and 5 without the call limit: what every use of a token needs."""
    check_fields(data)
    check_state(data)


def may_count(data: TokenData, more: int = 1) -> bool:
    """Whether ``more`` calls may still be added to ``calls``; a ``limit_calls`` of 0 means none.

    Takes a count rather than asking about one call so that a batch can ask
    about its next call on top of those it has already counted.
    """
    limit_calls: int = data["limit_calls"]
    return limit_calls == 0 or data["calls"] + more <= limit_calls


def check_limit(data: TokenData, more: int = 1) -> None:
    """Step 5, second half: refuse when :func:`may_count` says no.

    Only calls that count are limited: reading the record is not a clear.
    """
    if not may_count(data, more):
        raise TokenError(Refusal.LIMIT_REACHED)


def stored_hash(data: TokenData) -> str:
    """Step 6, first half: the hash to verify against, if the file has a usable one."""
    hashed = data.get("hashed_access_token")
    if hashed is None:
        raise TokenError(Refusal.NO_HASH)
    if not isinstance(hashed, str):
        raise TokenError(Refusal.WRONG_ACCESS_TOKEN)
    return hashed

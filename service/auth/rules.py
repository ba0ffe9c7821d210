"""Flextype's rules for a token: its parsed ``token.yaml`` in, a refusal out.

Nothing here touches a file or keeps state, so each rule can be tested with a
plain dict. The token layer says *why* a token cannot be used, never how to
answer: the HTTP layer maps each :class:`Refusal` to a status in one table
(:data:`cachebus.service.errors.REFUSAL_STATUS`).

The steps are Flextype's, and the caller runs them in Flextype's order:
step 3 (the token exists) is the file's business (:mod:`.file`); step 4
is :func:`check_fields`; step 5 is :func:`check_state` and, only for a call
that counts, :func:`check_limit` (:func:`check_usable` and :func:`check_call`
are the two uses); step 6 is :func:`stored_hash`,
:func:`check_cost` (cachebus's own ceiling, not Flextype's) and then
:func:`.hash.password_verify`; step 7 (counting the call) is the counter's
write.

This module imports nothing outside the standard library, so the HTTP layer's
error table can name a :class:`Refusal` without pulling in bcrypt.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Any

#: A parsed ``token.yaml``: ``hashed_access_token``, ``state``, ``calls``,
#: ``limit_calls``, ``uuid``, ``created_by``, and whatever else Flextype put there.
TokenData = dict[str, Any]
#: Steps 4 and 5 for one use of a token, raising :class:`TokenError`: :func:`check_usable`
#: for reading, :func:`check_call` for a call that counts.
Rules = Callable[[TokenData], None]


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
    #: A bcrypt hash whose cost is above ``api.max_bcrypt_cost``: refused
    #: without hashing, as one hash could take minutes.
    HASH_TOO_COSTLY = "hash_too_costly"


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


#: The default ``api.max_bcrypt_cost``: about a second per hash on a current
#: core; Flextype writes cost 10, and each step doubles the time.
DEFAULT_MAX_BCRYPT_COST = 14

# $2$, $2a$, $2b$, $2x$ or $2y$, then the cost as two digits.
_BCRYPT_COST = re.compile(r"\$2[abxy]?\$(\d\d)\$")

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


def check_call(data: TokenData) -> None:
    """Steps 4 and 5 for a call that counts: usable, and under its call limit."""
    check_usable(data)
    check_limit(data)


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


def check_cost(hashed: str, max_cost: int = DEFAULT_MAX_BCRYPT_COST) -> None:
    """Step 6, between the halves: refuse a bcrypt hash whose cost is above ``max_cost``.

    bcrypt's time doubles with each step of the cost, and ``$2y$31$`` takes
    days, so the hash is refused by reading its cost, never by running it.
    Anything that does not look like bcrypt is left to ``password_verify``,
    which refuses it at once.
    """
    match = _BCRYPT_COST.match(hashed)
    if match is not None and int(match[1]) > max_cost:
        raise TokenError(Refusal.HASH_TOO_COSTLY)

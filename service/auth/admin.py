"""The admin commands on a tokens directory: create, list, disable.

These back ``cachebus tokens create|list|disable`` and the demo, and run in a
process of their own while the service may be counting calls on the same
files. So they go through :mod:`.file` like the service does: reads and
writes are whole files, and a change is a read-modify-write under the token's
lock. A running service notices the new file by its signature and forgets
what it remembered about the token; nothing needs to tell it.
"""

from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import file
from .hash import password_hash
from .rules import Refusal, TokenError, TokenState, check_fields, is_plain_int

#: The state :func:`list_tokens` shows for a file that fails Flextype's step 4.
INVALID_STATE = "invalid"


@dataclass(frozen=True)
class CreatedToken:
    """A new token. ``access_token`` exists only here: the file holds its hash."""

    token: str
    access_token: str
    path: Path


@dataclass(frozen=True)
class TokenSummary:
    """One row of :func:`list_tokens`; never includes the hash."""

    token: str
    state: str
    calls: int
    limit_calls: int
    uuid: str
    created_by: str


def create_token(tokens_dir: str | os.PathLike[str], *, limit_calls: int = 0,
                 created_by: str = "cachebus") -> CreatedToken:
    """Write a new enabled token and return it with its only plain access token copy.

    ``tokens_dir`` is made if missing. The file has Flextype's fields in
    Flextype's order, so Flextype can use the token too.
    """
    if not is_plain_int(limit_calls) or limit_calls < 0:
        raise ValueError("limit_calls must be an integer >= 0")
    tokens_dir = Path(tokens_dir)
    tokens_dir.mkdir(parents=True, exist_ok=True)
    while True:
        token = secrets.token_hex(16)
        directory = tokens_dir / token
        try:
            directory.mkdir()
            break
        except FileExistsError:  # pragma: no cover - 128 random bits
            continue
    file.fsync_dir(tokens_dir)
    access_token = secrets.token_hex(16)
    data = {
        "hashed_access_token": password_hash(access_token),
        "state": TokenState.ENABLED.value,  # a plain str: YAML's safe dumper knows no enums
        "calls": 0,
        "limit_calls": limit_calls,
        "uuid": str(uuid.uuid4()),
        "created_by": created_by,
    }
    path = directory / file.TOKEN_FILE
    # Under the lock like every write: a service starting meanwhile then leaves
    # our temporary file alone (file.remove_stale_temporaries).
    with file.locked(directory):
        file.write(path, data)
    return CreatedToken(token=token, access_token=access_token, path=path)


def list_tokens(tokens_dir: str | os.PathLike[str]) -> list[TokenSummary]:
    """Every token, sorted by id; directories without a readable token file are skipped.

    A token file that fails Flextype's step 4 is listed with state ``invalid``.
    """
    tokens_dir = Path(tokens_dir)
    try:
        names = sorted(os.listdir(tokens_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    rows = []
    for name in names:
        if not file.TOKEN_ID_RE.fullmatch(name):
            continue
        try:
            data, _ = file.read(tokens_dir / name / file.TOKEN_FILE)
        except (TokenError, OSError):
            continue
        try:
            check_fields(data)
            state = str(data["state"])
        except TokenError:
            state = INVALID_STATE
        rows.append(TokenSummary(
            token=name,
            state=state,
            calls=data["calls"] if is_plain_int(data.get("calls")) else 0,
            limit_calls=data["limit_calls"] if is_plain_int(data.get("limit_calls")) else 0,
            uuid=str(data.get("uuid") or ""),
            created_by=str(data.get("created_by") or ""),
        ))
    return rows


def disable_token(tokens_dir: str | os.PathLike[str], token: str) -> None:
    """Set the token's state to ``disabled``; raises ``KeyError`` if there is no such token.

    Under the token's lock, like the service's counting of calls, so neither
    overwrites the other's change.
    """
    try:
        directory = file.token_dir(Path(tokens_dir), token)
        with file.locked(directory):
            path = directory / file.TOKEN_FILE
            data, _ = file.read(path, lock=False)  # we hold the exclusive lock
            data["state"] = TokenState.DISABLED.value
            file.write(path, data)
    except TokenError as exc:
        if exc.reason is Refusal.UNKNOWN_TOKEN:
            raise KeyError("no such token") from None
        raise

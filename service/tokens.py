"""Flextype tokens: ``<tokens_dir>/<token>/token.yaml``, checked the Flextype way.

A token file holds ``hashed_access_token`` (bcrypt, ``$2y$`` as PHP writes it),
``state``, ``calls``, ``limit_calls``, ``uuid`` and ``created_by``. A tokens
directory copied from a Flextype project works unchanged.

bcrypt is slow by design, so checks run on a thread pool, never on the event
loop, and successful verifications are remembered. Counting a call is a
read-modify-write under an exclusive file lock, written to a temporary file,
fsynced and renamed, so the count is exact across threads and processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import bcrypt
import yaml

log = logging.getLogger("cachebus.tokens")

TOKEN_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")

#: PHP's password_verify only looks at the first 72 bytes of the password.
_BCRYPT_MAX_BYTES = 72
_MEMO_MAX = 10_000


class TokenError(Exception):
    """A failed check: ``status`` is 400 or 401, ``reason`` a credential-free cause."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class CreatedToken:
    token: str
    access_token: str
    path: Path


@dataclass(frozen=True)
class TokenSummary:
    token: str
    state: str
    calls: int
    limit_calls: int
    uuid: str
    created_by: str


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino


def _validate(data: Any, *, limit: bool = True) -> dict[str, Any]:
    """Flextype steps 4 and 5: required fields, then state and (with ``limit``) call limit."""
    if (not isinstance(data, dict) or any(k not in data for k in ("state", "limit_calls", "calls"))
            or not all(isinstance(data[k], int) and not isinstance(data[k], bool)
                       for k in ("limit_calls", "calls"))):
        raise TokenError(400, "invalid_token_file")
    if data["state"] == "disabled":
        raise TokenError(400, "disabled")
    if limit and data["limit_calls"] != 0 and data["calls"] >= data["limit_calls"]:
        raise TokenError(400, "limit_reached")
    return data


def _dump_atomically(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=".token.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _suppress_os_error() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


class TokenStore:
    """Reads, checks, counts, creates and disables tokens in one directory."""

    def __init__(self, tokens_dir: str | os.PathLike[str],
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.tokens_dir = Path(tokens_dir)
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="cachebus-auth")
        self._memo: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self._signatures: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        #: How many times bcrypt actually ran; the memo keeps this low.
        self.bcrypt_calls = 0

    def close(self) -> None:
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def authorize(self, token: str, access_token: str, *, consume: bool) -> None:
        """:meth:`check` on the thread pool; raises :class:`TokenError`."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, lambda: self.check(token, access_token, consume=consume))

    def check(self, token: str, access_token: str, *, consume: bool) -> None:
        """Flextype's steps 3 to 7 for ``token``; blocking.

        ``consume`` counts the call (step 7). Without it, as for reading the
        record, the call limit is not enforced either: it limits clears.
        """
        path = self._path(token)
        data, signature = self._read(path)
        self._forget_if_changed(token, signature)
        _validate(data, limit=consume)
        self._verify(token, access_token, data)
        if consume:
            self._count_call(token, access_token, path)

    def _path(self, token: str) -> Path:
        # Step 3 for ids that cannot be token directories: never touch the disk.
        if not isinstance(token, str) or not TOKEN_ID_RE.fullmatch(token):
            raise TokenError(401, "unknown_token")
        return self.tokens_dir / token / "token.yaml"

    def _read(self, path: Path) -> tuple[Any, tuple[int, int, int]]:
        try:
            with open(path, "rb") as f:
                signature = _signature(os.fstat(f.fileno()))
                text = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise TokenError(401, "unknown_token") from None
        try:
            return yaml.safe_load(text), signature
        except (yaml.YAMLError, UnicodeDecodeError):
            raise TokenError(400, "invalid_token_file") from None

    def _forget_if_changed(self, token: str, signature: tuple[int, int, int]) -> None:
        with self._lock:
            if self._signatures.get(token) != signature:
                self._signatures[token] = signature
                for key in [k for k in self._memo if k[0] == token]:
                    del self._memo[key]

    def _verify(self, token: str, access_token: str, data: dict[str, Any]) -> None:
        """Step 6: the access token against the stored bcrypt hash."""
        hashed = data.get("hashed_access_token")
        if not isinstance(hashed, str) or not hashed:
            raise TokenError(401, "no_hash")
        key = (token, hashlib.sha256(access_token.encode("utf-8", "surrogatepass")).digest(), hashed)
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return
            self.bcrypt_calls += 1
        password = access_token.encode("utf-8", "surrogatepass")[:_BCRYPT_MAX_BYTES]
        try:
            ok = bcrypt.checkpw(password, hashed.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            ok = False
        if not ok:
            raise TokenError(401, "wrong_access_token")
        with self._lock:
            self._memo[key] = None
            while len(self._memo) > _MEMO_MAX:
                self._memo.popitem(last=False)

    @contextmanager
    def _locked(self, token_dir: Path) -> Iterator[None]:
        with open(token_dir / ".token.yaml.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _count_call(self, token: str, access_token: str, path: Path) -> None:
        """Step 7: ``calls += 1``, re-checking under the lock what may have changed."""
        with self._locked(path.parent):
            data, signature = self._read(path)
            self._forget_if_changed(token, signature)
            _validate(data)
            self._verify(token, access_token, data)
            data["calls"] += 1
            _dump_atomically(path, data)
            with self._lock:
                self._signatures[token] = _signature(os.stat(path))

    # --- management, for the CLI ---------------------------------------------

    def create(self, *, limit_calls: int = 0, created_by: str = "cachebus") -> CreatedToken:
        """A new token; the access token is returned once and stored only hashed."""
        if limit_calls < 0:
            raise ValueError("limit_calls must be >= 0")
        token = secrets.token_hex(16)
        access_token = secrets.token_hex(16)
        hashed = bcrypt.hashpw(access_token.encode(), bcrypt.gensalt(rounds=10)).decode()
        # $2b$ and $2y$ are the same algorithm; $2y$ is what PHP writes and reads.
        hashed = "$2y$" + hashed[4:]
        path = self.tokens_dir / token / "token.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        _dump_atomically(path, {
            "hashed_access_token": hashed,
            "state": "enabled",
            "calls": 0,
            "limit_calls": limit_calls,
            "uuid": str(uuid.uuid4()),
            "created_by": created_by,
        })
        return CreatedToken(token=token, access_token=access_token, path=path)

    def list(self) -> list[TokenSummary]:
        """Every readable token, sorted by id."""
        summaries = []
        if not self.tokens_dir.is_dir():
            return summaries
        for entry in sorted(self.tokens_dir.iterdir()):
            if not TOKEN_ID_RE.fullmatch(entry.name):
                continue
            try:
                data, _ = self._read(entry / "token.yaml")
            except TokenError:
                continue
            if not isinstance(data, dict):
                continue
            summaries.append(TokenSummary(
                token=entry.name, state=str(data.get("state", "")), calls=int(data.get("calls") or 0),
                limit_calls=int(data.get("limit_calls") or 0), uuid=str(data.get("uuid", "")),
                created_by=str(data.get("created_by", "")),
            ))
        return summaries

    def disable(self, token: str) -> None:
        """Set ``state: disabled``; raises KeyError for an unknown token."""
        try:
            path = self._path(token)
        except TokenError:
            raise KeyError(token) from None
        if not path.is_file():
            raise KeyError(token)
        with self._locked(path.parent):
            data, _ = self._read(path)
            if not isinstance(data, dict):
                raise KeyError(token)
            data["state"] = "disabled"
            _dump_atomically(path, data)

"""Flextype's API tokens: the on-disk store and the authorization check.

A token is a directory ``<tokens_dir>/<token>/`` holding ``token.yaml`` with
``hashed_access_token`` (bcrypt, ``$2y$`` as PHP's ``password_hash`` writes
it), ``state``, ``calls``, ``limit_calls``, ``uuid`` and ``created_by``, so a
token directory copied from a Flextype project works unchanged.

:meth:`TokenStore.check` runs Flextype's validation steps 3 to 7 in Flextype's
order. bcrypt is slow by design, so successful verifications are remembered in
memory until the token file changes. Counting a call is a read-modify-write of
``token.yaml`` under an exclusive ``flock``, written to a temporary file and
renamed into place, which keeps ``calls`` exact across threads and across
service processes sharing the directory.

No token id or access token ever appears in an exception or a log line; a
failure carries a :class:`~cachebus.service.token_rules.Refusal` only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import secrets
import stat
import tempfile
import threading
import typing
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from .token_rules import Refusal, TokenError

# libyaml's parser and emitter when PyYAML has them: several times faster, and
# every clear reads and rewrites a token file.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

#: Token ids the store will look up. Anything else is refused before touching
#: the disk, which rules out path traversal (no ``.``, no ``/``).
TOKEN_ID_RE: re.Pattern[str] = re.compile(r"[a-zA-Z0-9_-]{1,128}")

TOKEN_FILE = "token.yaml"
LOCK_FILE = ".token.yaml.lock"

#: Memo entries kept at most; the least recently used go first.
MEMO_SIZE = 10_000
#: Larger token files are refused as invalid rather than parsed (Flextype's are
#: a few hundred bytes).
MAX_TOKEN_FILE = 1 << 20
#: bcrypt (and PHP's password_verify) only look at the first 72 bytes.
BCRYPT_MAX_BYTES = 72
BCRYPT_ROUNDS = 10

# (st_mtime_ns, st_size, st_ino) of a token file: changes whenever it is rewritten.
_Signature = tuple[int, int, int]
# (token, sha256(access_token), hashed_access_token)
_MemoKey = tuple[str, bytes, str]


@dataclass(frozen=True)
class CreatedToken:
    """A new token. ``access_token`` exists only here: the file holds its hash."""

    token: str
    access_token: str
    path: Path


@dataclass(frozen=True)
class TokenSummary:
    """One row of :meth:`TokenStore.list`; never includes the hash."""

    token: str
    state: str
    calls: int
    limit_calls: int
    uuid: str
    created_by: str


@dataclass
class _Ticket:
    """One call waiting to be counted: who asked, and what became of it."""

    access_token: str
    hashed: str
    future: asyncio.Future[None] | None = None
    error: Exception | None = None


class TokenStore:
    """Flextype tokens under ``tokens_dir``: authorization, creation, listing.

    Blocking methods (:meth:`check`, :meth:`create`, :meth:`list`,
    :meth:`disable`) are safe to call from several threads. The event loop uses
    :meth:`authorize`, which runs :meth:`check` on ``executor`` so that neither
    bcrypt nor file I/O blocks the loop. Without an ``executor`` the store makes
    a small one of its own, shut down by :meth:`close`.
    """

    def __init__(self, tokens_dir: str | os.PathLike[str],
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.tokens_dir = Path(tokens_dir)
        self._own_executor = executor is None
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cachebus-auth")
        self._executor = executor
        #: Actual ``bcrypt.checkpw`` invocations, memo hits excluded.
        self.bcrypt_calls: int = 0
        self._lock = threading.Lock()
        self._memo: OrderedDict[_MemoKey, None] = OrderedDict()
        self._memo_by_token: dict[str, set[_MemoKey]] = {}
        # Per token, the signatures whose content the memo is known to agree
        # with: the last one read, plus the ones this store wrote since. Several
        # are kept because a thread may read one of our own earlier writes
        # after a later one was recorded; that is no change from outside.
        self._signatures: dict[str, deque[_Signature]] = {}
        #: Writes of token files that counted calls; fewer than calls under load.
        self.commits: int = 0
        # The last parse of each token file, by signature; see _load().
        self._parsed: dict[str, tuple[_Signature, dict[str, Any]]] = {}
        # Group commit state, touched only on the event loop thread.
        self._queued: dict[str, list[_Ticket]] = {}
        self._flushing: dict[str, asyncio.Future[None]] = {}

    def close(self) -> None:
        """Shut down the executor if this store created it."""
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # --- authorization ------------------------------------------------------

    async def authorize(self, token: str, access_token: str, *, consume: bool) -> None:
        """:meth:`check` for the event loop; raises :class:`TokenError`.

        Steps 3 to 6 run on ``executor``, so neither bcrypt nor file I/O blocks
        the loop. Counting calls (step 7) is group-committed: calls for one
        token that arrive while its file is being written are counted together
        in the next write, so one fsync serves many requests and the count
        stays exact.
        """
        loop = asyncio.get_running_loop()
        # Known file, remembered verdict: one stat, no thread hop.
        hashed = self._authenticate(token, access_token, consume, blocking=False)
        if hashed is None:
            hashed = await loop.run_in_executor(
                self._executor, functools.partial(self._authenticate, token, access_token, consume))
        if consume:
            await self._count(token, _Ticket(access_token, hashed, loop.create_future()))

    def check(self, token: str, access_token: str, *, consume: bool) -> None:
        """Flextype's validation steps 3 to 7; raises :class:`TokenError`.

        Blocking. With ``consume`` a success also adds one to ``calls`` in the
        token file, after re-checking the state and limit under the file lock.
        Without it, as for reading the record, the call limit is not enforced:
        it limits clears, and reading never counts as one.
        """
        hashed = self._authenticate(token, access_token, consume)
        if consume:
            ticket = _Ticket(access_token, hashed)
            self._commit(token, [ticket])
            if ticket.error is not None:
                raise ticket.error

    def _authenticate(self, token: str, access_token: str, limit: bool, *, blocking: bool = True) -> str | None:
        """Steps 3 to 6 without counting; returns the verified hash.

        With ``blocking`` false it only uses what is remembered, answering None
        where it would have to read and parse the file or run bcrypt.
        """
        # 3. The id is checked before any path is built from it.
        if not TOKEN_ID_RE.fullmatch(token):
            raise TokenError(Refusal.UNKNOWN_TOKEN)
        loaded = self._load(token, self.tokens_dir / token / TOKEN_FILE, parse=blocking)
        if loaded is None:
            return None
        data, signature = loaded
        self._observe(token, signature)
        self._validate(data, limit=limit)  # 4 and 5
        # 6. Outside the file lock: a slow bcrypt must not hold up other requests.
        return self._verify(token, access_token, data, bcrypt_allowed=blocking)

    async def _count(self, token: str, ticket: _Ticket) -> None:
        """Queue ``ticket`` for the token's next write, and wait for that write."""
        self._queued.setdefault(token, []).append(ticket)
        if token not in self._flushing:
            self._flushing[token] = asyncio.ensure_future(self._flush(token))
        assert ticket.future is not None
        await ticket.future

    async def _flush(self, token: str) -> None:
        """Write the token's queued calls, batch after batch, until none are left."""
        loop = asyncio.get_running_loop()
        try:
            while self._queued.get(token):
                tickets = self._queued.pop(token)
                try:
                    await loop.run_in_executor(self._executor, self._commit, token, tickets)
                except Exception as exc:  # an I/O failure: every caller in the batch sees it
                    for ticket in tickets:
                        ticket.error = ticket.error or exc
                for ticket in tickets:
                    assert ticket.future is not None
                    if ticket.error is not None:
                        ticket.future.set_exception(ticket.error)
                    else:
                        ticket.future.set_result(None)
        finally:
            del self._flushing[token]

    def _commit(self, token: str, tickets: list[_Ticket]) -> None:
        """Step 7 for a batch: add one to ``calls`` per ticket still allowed, in one write.

        Under the token's file lock, the file is read again: another thread or
        process may have counted calls, disabled the token or changed its hash
        since each ticket was authenticated. A ticket that no longer passes
        gets its :class:`TokenError` in ``ticket.error``.
        """
        token_dir = self.tokens_dir / token
        path = token_dir / TOKEN_FILE
        try:
            with self._locked(token_dir):
                data, signature = self._load(token, path)
                self._observe(token, signature)
                self._validate(data, limit=False)
                counted = 0
                for ticket in tickets:
                    try:
                        _check_limit(data["calls"] + counted, data["limit_calls"])
                        if data.get("hashed_access_token") != ticket.hashed:
                            self._verify(token, ticket.access_token, data)
                        counted += 1
                    except TokenError as exc:
                        ticket.error = exc
                if counted:
                    data["calls"] += counted
                    self._write(path, data, functools.partial(self._remember_write, token, data))
                    self.commits += 1
        except TokenError as exc:
            for ticket in tickets:
                ticket.error = ticket.error or exc

    @typing.overload
    def _load(self, token: str, path: Path) -> tuple[dict[str, Any], _Signature]: ...

    @typing.overload
    def _load(self, token: str, path: Path, parse: bool) -> tuple[dict[str, Any], _Signature] | None: ...

    def _load(self, token: str, path: Path, parse: bool = True) -> tuple[dict[str, Any], _Signature] | None:
        """:meth:`_read`, skipped when the file is unchanged since we last parsed or wrote it.

        One ``stat`` instead of open, read and parse: every clear loads its
        token file twice, and the same few tokens are loaded over and over.
        """
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise TokenError(Refusal.UNKNOWN_TOKEN) from None
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            cached = self._parsed.get(token)
            if cached is not None and cached[0] == signature:
                return dict(cached[1]), signature
        if not parse:
            return None
        data, signature = self._read(path)
        with self._lock:
            self._parsed[token] = (signature, dict(data))
        return data, signature

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any], _Signature]:
        """Steps 3 and 4 on the disk: the parsed token file and its signature."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise TokenError(Refusal.UNKNOWN_TOKEN) from None
        try:
            # Stat the open file, not the path: a rename between the two would
            # pair one version's content with another's signature.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TokenError(Refusal.UNKNOWN_TOKEN)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_TOKEN_FILE + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_TOKEN_FILE:
            raise TokenError(Refusal.INVALID_TOKEN_FILE)
        try:
            data = yaml.load(raw, Loader=_Loader)
        except (yaml.YAMLError, RecursionError):
            raise TokenError(Refusal.INVALID_TOKEN_FILE) from None
        if not isinstance(data, dict):
            raise TokenError(Refusal.INVALID_TOKEN_FILE)
        return data, (st.st_mtime_ns, st.st_size, st.st_ino)

    @staticmethod
    def _validate(data: dict[str, Any], *, limit: bool = True) -> None:
        """Steps 4 and 5: required fields, then state and (with ``limit``) call limit."""
        # Like PHP's isset(): a key set to null counts as missing.
        if any(data.get(key) is None for key in ("state", "limit_calls", "calls")):
            raise TokenError(Refusal.INVALID_TOKEN_FILE)
        calls = data["calls"]
        if not _is_int(calls) or not _is_int(data["limit_calls"]):
            raise TokenError(Refusal.INVALID_TOKEN_FILE)
        if data["state"] == "disabled":
            raise TokenError(Refusal.DISABLED)
        if limit:
            _check_limit(calls, data["limit_calls"])

    @typing.overload
    def _verify(self, token: str, access_token: str, data: dict[str, Any]) -> str: ...

    @typing.overload
    def _verify(self, token: str, access_token: str, data: dict[str, Any], bcrypt_allowed: bool) -> str | None: ...

    def _verify(self, token: str, access_token: str, data: dict[str, Any],
                bcrypt_allowed: bool = True) -> str | None:
        """Step 6: the access token against the stored hash; returns the hash.

        Without ``bcrypt_allowed``, answers None when the verdict is not remembered.
        """
        hashed = data.get("hashed_access_token")
        if hashed is None:
            raise TokenError(Refusal.NO_HASH)
        if not isinstance(hashed, str):
            raise TokenError(Refusal.WRONG_ACCESS_TOKEN)
        # surrogatepass: a lone surrogate (possible from a JSON body) must fail
        # to verify, not crash the request.
        secret = access_token.encode("utf-8", "surrogatepass")
        key = (token, hashlib.sha256(secret).digest(), hashed)
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return hashed
            if not bcrypt_allowed:
                return None
            self.bcrypt_calls += 1
        try:
            # PHP's password_verify ignores bytes past the 72nd; bcrypt 5 raises.
            ok = bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], hashed.encode("utf-8", "surrogatepass"))
        except ValueError:  # a malformed hash
            ok = False
        if not ok:
            raise TokenError(Refusal.WRONG_ACCESS_TOKEN)
        with self._lock:
            self._memo[key] = None
            self._memo_by_token.setdefault(token, set()).add(key)
            while len(self._memo) > MEMO_SIZE:
                old, _ = self._memo.popitem(last=False)
                self._discard_memo_key(old)
        return hashed

    def _observe(self, token: str, signature: _Signature) -> None:
        """Forget the token's memo entries if its file changed behind our back."""
        with self._lock:
            known = self._signatures.get(token)
            if known is not None and signature in known:
                return
            self._forget_locked(token)
            self._signatures[token] = deque([signature], maxlen=16)

    def _remember_write(self, token: str, data: dict[str, Any], signature: _Signature) -> None:
        """Record our own write, so it does not invalidate the memo and need not be parsed."""
        with self._lock:
            self._signatures.setdefault(token, deque(maxlen=16)).append(signature)
            self._parsed[token] = (signature, dict(data))

    def _forget_locked(self, token: str) -> None:
        for key in self._memo_by_token.pop(token, ()):
            self._memo.pop(key, None)

    def _discard_memo_key(self, key: _MemoKey) -> None:
        keys = self._memo_by_token.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._memo_by_token[key[0]]

    # --- administration -----------------------------------------------------

    def create(self, *, limit_calls: int = 0, created_by: str = "cachebus") -> CreatedToken:
        """Write a new enabled token and return it with its only plain access token copy."""
        if not _is_int(limit_calls) or limit_calls < 0:
            raise ValueError("limit_calls must be an integer >= 0")
        self.tokens_dir.mkdir(parents=True, exist_ok=True)
        while True:
            token = secrets.token_hex(16)
            token_dir = self.tokens_dir / token
            try:
                token_dir.mkdir()
                break
            except FileExistsError:  # pragma: no cover - 128 random bits
                continue
        _fsync_dir(self.tokens_dir)
        access_token = secrets.token_hex(16)
        hashed = bcrypt.hashpw(access_token.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode("ascii")
        # Same algorithm; $2y$ is what PHP's password_hash writes.
        hashed = "$2y$" + hashed.removeprefix("$2b$")
        data = {
            "hashed_access_token": hashed,
            "state": "enabled",
            "calls": 0,
            "limit_calls": limit_calls,
            "uuid": str(uuid.uuid4()),
            "created_by": created_by,
        }
        path = token_dir / TOKEN_FILE
        self._write(path, data)
        return CreatedToken(token=token, access_token=access_token, path=path)

    def list(self) -> list[TokenSummary]:
        """Every token, sorted by id; directories without a readable token file are skipped.

        A token file that fails Flextype's step 4 is listed with state ``invalid``.
        """
        try:
            entries = sorted(os.listdir(self.tokens_dir))
        except (FileNotFoundError, NotADirectoryError):
            return []
        rows = []
        for name in entries:
            if not TOKEN_ID_RE.fullmatch(name):
                continue
            try:
                data, _ = self._read(self.tokens_dir / name / TOKEN_FILE)
            except (TokenError, OSError):
                continue
            try:
                self._validate(data)
                state = str(data["state"])
            except TokenError as exc:
                state = "invalid" if exc.reason is Refusal.INVALID_TOKEN_FILE else str(data["state"])
            rows.append(TokenSummary(
                token=name,
                state=state,
                calls=data["calls"] if _is_int(data.get("calls")) else 0,
                limit_calls=data["limit_calls"] if _is_int(data.get("limit_calls")) else 0,
                uuid=str(data.get("uuid") or ""),
                created_by=str(data.get("created_by") or ""),
            ))
        return rows

    def disable(self, token: str) -> None:
        """Set the token's state to ``disabled``; raises ``KeyError`` if there is no such token."""
        if not TOKEN_ID_RE.fullmatch(token):
            raise KeyError("no such token")
        token_dir = self.tokens_dir / token
        try:
            with self._locked(token_dir):
                data, _ = self._read(token_dir / TOKEN_FILE)
                data["state"] = "disabled"
                self._write(token_dir / TOKEN_FILE, data)
        except TokenError as exc:
            if exc.reason is Refusal.UNKNOWN_TOKEN:
                raise KeyError("no such token") from None
            raise
        with self._lock:
            self._forget_locked(token)
            self._signatures.pop(token, None)

    # --- files --------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _locked(token_dir: Path) -> Iterator[None]:
        """An exclusive ``flock`` on the token's lock file, across threads and processes."""
        try:
            fd = os.open(token_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            raise TokenError(Refusal.UNKNOWN_TOKEN) from None
        try:
            # flock locks belong to the open file description, so this also
            # excludes other threads of this process, each with its own open().
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _write(path: Path, data: dict[str, Any],
               before_rename: Callable[[_Signature], None] | None = None) -> _Signature:
        """Replace ``path`` atomically and durably; returns the new file's signature.

        ``before_rename`` receives the signature before the new file becomes
        visible, so a concurrent reader can never see a file of ours that the
        store does not yet know it wrote.
        """
        text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o600  # mkstemp's; the file holds a hash
        fd, tmp = tempfile.mkstemp(prefix=".token.yaml.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                # rename keeps the inode, size and mtime, so this is the
                # signature token.yaml will have.
                st = os.fstat(f.fileno())
            if before_rename is not None:
                before_rename((st.st_mtime_ns, st.st_size, st.st_ino))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        return (st.st_mtime_ns, st.st_size, st.st_ino)


def _check_limit(calls: int, limit_calls: int) -> None:
    """Step 5's call limit; a limit of 0 means none."""
    if limit_calls != 0 and calls >= limit_calls:
        raise TokenError(Refusal.LIMIT_REACHED)


def _is_int(value: object) -> bool:
    # YAML's true/false load as bool, a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool)


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the rename still happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)

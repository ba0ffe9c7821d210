"""Authorizing API calls with Flextype tokens: fast, and with exact call counts.

:class:`TokenStore` runs Flextype's validation steps 3 to 7 in Flextype's
order. The steps themselves are elsewhere: the rules in :mod:`.token_rules`,
the file in :mod:`.token_file`, bcrypt in :mod:`.token_hash`. What the store
adds is speed without losing exactness:

- A parse cache: the last parse of each token file, by its
  :class:`~.token_file.Signature`. Every clear loads its token file twice
  (to authenticate, then to count the call) and the same few tokens are
  loaded over and over, so an unchanged file costs one ``stat`` instead of
  an open, a read and a YAML parse.
- A verdict memo (:class:`~.token_memo.VerdictMemo`): bcrypt runs once per
  token and access token, until the file changes behind our back.
- Group commit: counting a call is a read-modify-write of ``token.yaml``
  under its ``flock``, with an ``fsync`` and a rename, which takes
  milliseconds. Calls for one token that arrive while its file is being
  written wait and are counted together in the next write, so one ``fsync``
  serves many requests and a busy token is not limited to one call per disk
  flush.

The count stays exact across threads and across service processes sharing
the directory: every write reads the file again under the token's lock and
checks each call again against what it finds (state, limit, hash).

No token id or access token ever appears in an exception or a log line; a
failure carries a :class:`~.token_rules.Refusal` only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from . import token_file, token_rules
from .token_file import Signature
from .token_hash import password_verify
from .token_memo import VerdictMemo
from .token_rules import Refusal, TokenData, TokenError


@dataclass
class _Ticket:
    """One call waiting to be counted: who asked, and what became of it."""

    access_token: str
    #: The hash the access token was verified against before queueing.
    hashed: str
    future: asyncio.Future[None] | None = None
    error: Exception | None = None


class TokenStore:
    """Authorization against the tokens under ``tokens_dir``.

    :meth:`check` is blocking and safe to call from several threads. The event
    loop uses :meth:`authorize`, which answers from memory when it can and
    otherwise runs the blocking work on ``executor``, so that neither bcrypt
    nor file I/O blocks the loop. Without an ``executor`` the store makes a
    small one of its own, shut down by :meth:`close`.

    Creating, listing and disabling tokens are :mod:`.token_admin`'s.
    """

    def __init__(self, tokens_dir: str | os.PathLike[str],
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.tokens_dir = Path(tokens_dir)
        self._own_executor = executor is None
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cachebus-auth")
        self._executor = executor
        #: Actual bcrypt verifications, memo hits excluded.
        self.bcrypt_calls: int = 0
        #: Writes of token files that counted calls; fewer than calls under load.
        self.commits: int = 0
        self._memo = VerdictMemo()
        # Guards _parsed and the two counters.
        self._lock = threading.Lock()
        # Per token, the last parse of its file and that file's signature.
        self._parsed: dict[str, tuple[Signature, TokenData]] = {}
        # Group commit state, touched only on the event loop thread.
        self._queued: dict[str, list[_Ticket]] = {}
        self._flushing: dict[str, asyncio.Future[None]] = {}

    def close(self) -> None:
        """Shut down the executor if this store created it."""
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def authorize(self, token: str, access_token: str, *, consume: bool) -> None:
        """:meth:`check` for the event loop; raises :class:`TokenError`.

        Steps 3 to 6 run on ``executor`` unless :meth:`_remembered` can answer.
        Counting calls (step 7) is group-committed: see :meth:`_count`.
        """
        loop = asyncio.get_running_loop()
        hashed = self._remembered(token, access_token, consume=consume)
        if hashed is None:
            hashed = await loop.run_in_executor(
                self._executor, functools.partial(self._authenticate, token, access_token, consume=consume))
        if consume:
            await self._count(token, _Ticket(access_token, hashed, loop.create_future()))

    def check(self, token: str, access_token: str, *, consume: bool) -> None:
        """Flextype's validation steps 3 to 7; raises :class:`TokenError`.

        Blocking. With ``consume`` a success also adds one to ``calls`` in the
        token file, after re-checking the state and limit under the file lock.
        Without it, as for reading the record, the call limit is not enforced:
        it limits clears, and reading never counts as one.
        """
        hashed = self._authenticate(token, access_token, consume=consume)
        if consume:
            ticket = _Ticket(access_token, hashed)
            self._commit(token, [ticket])
            if ticket.error is not None:
                raise ticket.error

    # --- steps 3 to 6 ---------------------------------------------------------

    def _remembered(self, token: str, access_token: str, *, consume: bool) -> str | None:
        """Steps 3 to 6 from memory alone: the verified hash, or None when that takes more.

        One ``stat`` and no bcrypt, so the event loop may call it: a known file
        and a remembered verdict need no thread hop. None means the file must
        be parsed or the access token verified; whatever memory does hold is
        checked fully, so a refusal here is the one :meth:`_authenticate` gives.
        """
        path = self._path(token)
        signature = token_file.signature(path)
        data = self._cached_parse(token, signature)
        if data is None:
            return None
        hashed = self._usable_hash(token, data, signature, consume=consume)
        return hashed if self._memo.knows(token, access_token, hashed) else None

    def _authenticate(self, token: str, access_token: str, *, consume: bool) -> str:
        """Steps 3 to 6 without counting; returns the verified hash. Blocking."""
        data, signature = self._load(token, self._path(token))
        hashed = self._usable_hash(token, data, signature, consume=consume)
        # Outside the file lock: a slow bcrypt must not hold up other requests.
        self._verify(token, access_token, hashed)
        return hashed

    def _path(self, token: str) -> Path:
        """Step 3's first half: the token file's path, for an id that can name one."""
        return token_file.token_dir(self.tokens_dir, token) / token_file.TOKEN_FILE

    def _usable_hash(self, token: str, data: TokenData, signature: Signature, *, consume: bool) -> str:
        """Steps 4 and 5 on the token's file as loaded; returns the hash step 6 checks against."""
        self._memo.observe(token, signature)
        token_rules.check_usable(data)
        if consume:
            token_rules.check_limit(data)
        return token_rules.stored_hash(data)

    def _verify(self, token: str, access_token: str, hashed: str) -> None:
        """Step 6: the access token against the stored hash, remembered or by bcrypt. Blocking."""
        if self._memo.knows(token, access_token, hashed):
            return
        with self._lock:
            self.bcrypt_calls += 1
        if not password_verify(access_token, hashed):
            raise TokenError(Refusal.WRONG_ACCESS_TOKEN)
        self._memo.remember(token, access_token, hashed)

    # --- the parse cache --------------------------------------------------------

    def _load(self, token: str, path: Path) -> tuple[TokenData, Signature]:
        """The token file parsed, and its signature; parsed again only if it changed. Blocking."""
        signature = token_file.signature(path)
        data = self._cached_parse(token, signature)
        if data is not None:
            return data, signature
        data, signature = token_file.read(path)
        with self._lock:
            self._parsed[token] = (signature, dict(data))
        return data, signature

    def _cached_parse(self, token: str, signature: Signature) -> TokenData | None:
        """A copy of the token file's last parse if the file still has ``signature``, else None."""
        with self._lock:
            cached = self._parsed.get(token)
            if cached is None or cached[0] != signature:
                return None
            return dict(cached[1])

    def _wrote(self, token: str, data: TokenData, signature: Signature) -> None:
        """Record our own write before it lands, so it is neither parsed again nor taken
        for a change from outside that would empty the memo."""
        self._memo.wrote(token, signature)
        with self._lock:
            self._parsed[token] = (signature, dict(data))

    # --- step 7: counting calls -----------------------------------------------------

    async def _count(self, token: str, ticket: _Ticket) -> None:
        """Queue ``ticket`` for the token's next write, and wait for that write.

        While a write for the token is under way, calls queue up; the next
        write counts them all at once. One write per batch keeps the number of
        ``fsync`` calls, not the number of requests, the limit on a busy token.
        """
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
        try:
            path = self._path(token)
            with token_file.locked(path.parent):
                data, signature = self._load(token, path)
                self._memo.observe(token, signature)
                token_rules.check_usable(data)
                counted = 0
                for ticket in tickets:
                    try:
                        token_rules.check_limit(data, more=counted + 1)
                        if data.get("hashed_access_token") != ticket.hashed:
                            self._verify(token, ticket.access_token, token_rules.stored_hash(data))
                        counted += 1
                    except TokenError as exc:
                        ticket.error = exc
                if counted:
                    data["calls"] += counted
                    token_file.write(path, data, functools.partial(self._wrote, token, data))
                    with self._lock:
                        self.commits += 1
        except TokenError as exc:
            for ticket in tickets:
                ticket.error = ticket.error or exc

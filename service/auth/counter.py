"""Step 7, counting calls: exact across threads and processes, and one ``fsync`` for many.

Counting a call is a read-modify-write of ``token.yaml`` under its
``flock``, with an ``fsync`` and a rename, which takes milliseconds. So:

- Group commit: calls for one token that arrive while its file is being
  written wait and are counted together in the next write, so one ``fsync``
  serves many requests and a busy token is not limited to one call per disk
  flush.
- Admission before durability: a call is admitted as soon as its limit is
  checked under the file lock, before the write's ``fsync``. The caller
  publishes then, and answers only once the count is durable
  (:meth:`Counted.durable`), so the disk's latency overlaps the bus's instead
  of adding to it. Flextype's order of decisions holds, and so does the exact
  count across processes: the lock is held until the new count is in place.
  A crash between the publish and the rename can lose that one count, never a
  clear.

The count stays exact across threads and across service processes sharing
the directory: every write reads the file again under the token's lock and
checks each call again against what it finds (state, limit, hash), through
the :class:`~.authenticator.Authenticator`'s parse cache and memo.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cachebus.eager import run_eagerly

from . import file, rules
from .authenticator import Authenticator
from .filework import FileWork
from .rules import TokenError


@dataclass
class _Ticket:
    """One call waiting to be counted: who asked, and what became of it."""

    access_token: str
    #: The hash the access token was verified against before queueing.
    hashed: str
    #: Done once the call is counted durably (or refused).
    future: asyncio.Future[None]
    #: Done once the call passed the checks under the file lock, before its count is durable.
    admitted: asyncio.Future[None]
    error: Exception | None = None


class Counted:
    """A call admitted by :meth:`~.store.TokenStore.admit_call` whose count is being made durable.

    Await :meth:`durable` before answering: it raises what the write raised
    (an I/O error, or :class:`~.limits.Overloaded` when the store closes).
    ``settled`` is called once the wait is over, however it ended.
    """

    def __init__(self, future: asyncio.Future[None], settled: Callable[[], None]) -> None:
        self._future = future
        self._settled: Callable[[], None] | None = settled

    async def durable(self) -> None:
        settled, self._settled = self._settled, None
        if settled is None:
            return
        try:
            await self._future
        finally:
            settled()


class CallCounter:
    """Adds one to ``calls`` per admitted call, in group commits; on the event loop.

    The checks under the lock run on the loop when they need neither a wait
    nor bcrypt, the write (and anything else) on ``files``.
    """

    def __init__(self, authenticator: Authenticator, files: FileWork) -> None:
        self._auth = authenticator
        self._files = files
        #: Writes of token files that counted calls; fewer than calls under load.
        self.commits: int = 0
        self._lock = threading.Lock()  # guards commits, added to on file threads
        # Group commit state, touched only on the event loop thread.
        self._queued: dict[str, list[_Ticket]] = {}
        #: The tokens being written, each with the rest of its :meth:`_flush` (None while it starts).
        self._flushing: dict[str, asyncio.Future[None] | None] = {}

    async def admit(self, token: str, access_token: str, hashed: str) -> asyncio.Future[None]:
        """Count a call authenticated against ``hashed``: returns once it is admitted under the
        token's lock, with the future that is done once its count is durable.

        Raises :class:`TokenError` for a call refused under the lock (the limit
        reached meanwhile, the token disabled, its hash changed).
        """
        loop = asyncio.get_running_loop()
        ticket = _Ticket(access_token, hashed, loop.create_future(), loop.create_future())
        self._queued.setdefault(token, []).append(ticket)
        if token not in self._flushing:
            # Eagerly: the checks on the loop admit the call before this returns, so
            # neither a task step nor this coroutine's wake-up costs a trip through the loop.
            self._flushing[token] = None
            rest = run_eagerly(self._flush(token))
            if rest is not None and token in self._flushing:
                self._flushing[token] = rest
        await ticket.admitted
        return ticket.future

    async def _flush(self, token: str) -> None:
        """Write the token's queued calls, batch after batch, until none are left.

        While a write for the token is under way, calls queue up; the next
        write counts them all at once. One write per batch keeps the number of
        ``fsync`` calls, not the number of requests, the limit on a busy token.
        """
        loop = asyncio.get_running_loop()
        try:
            while self._queued.get(token):
                tickets = self._queued.pop(token)
                try:
                    write = None if self._files.closed else self._admit_here(token, tickets)
                    if write is None:  # the lock is busy, or bcrypt must run: all of it on the executor
                        admit = functools.partial(loop.call_soon_threadsafe, _admit, tickets)
                        await self._files.run(functools.partial(self._commit, token, tickets, admit))
                    else:
                        _admit(tickets)
                        await self._write_holding_lock(write)
                except Exception as exc:  # an I/O failure, or closing: every caller in the batch sees it
                    for ticket in tickets:
                        ticket.error = ticket.error or exc
                for ticket in tickets:
                    if ticket.error is not None:
                        if ticket.admitted.done():
                            ticket.future.set_exception(ticket.error)
                        else:  # refused before admission: the caller hears it from admit()
                            ticket.admitted.set_exception(ticket.error)
                            ticket.future.cancel()
                    else:
                        if not ticket.admitted.done():
                            ticket.admitted.set_result(None)
                        ticket.future.set_result(None)
        finally:
            del self._flushing[token]

    def _commit(self, token: str, tickets: list[_Ticket], admit: Callable[[], object]) -> None:
        """A batch's count: add one to ``calls`` per ticket still allowed, in one write. Blocking.

        Under the token's file lock, the file is read again: another thread or
        process may have counted calls, disabled the token or changed its hash
        since each ticket was authenticated. A ticket that no longer passes
        gets its :class:`TokenError` in ``ticket.error``. ``admit`` is called
        once the tickets are checked, before the write, still under the lock.
        """
        try:
            path = self._auth.path(token)
            with file.locked(path.parent):
                write = self._checked(token, path, tickets, verify=True)
                if write is not None:
                    admit()
                    write()
        except TokenError as exc:
            for ticket in tickets:
                ticket.error = ticket.error or exc

    def _admit_here(self, token: str, tickets: list[_Ticket]) -> _HeldWrite | None:
        """:meth:`_commit`'s checks on the event loop, when they need neither a wait nor bcrypt.

        Handing the whole commit to a thread cost about 0.5 ms of CPU per
        clear (issue 14: two thread hand-offs, the first only to admit the
        call). Under the token's lock, taken without waiting, the file's
        signature (a stat) says whether the parse cache still holds it, and
        the tickets are checked; what is left, writing the file with its
        fsyncs, is returned for the executor, holding the lock. None when the
        lock is held elsewhere, the file changed since it was parsed, or a
        ticket's hash changed (bcrypt): then nothing was done here, and
        :meth:`_commit` does it all. A refusal of the whole token (a
        :class:`TokenError`) is raised, for :meth:`_flush` to give every ticket.
        """
        path = self._auth.path(token)
        lock = file.try_lock(path.parent)
        if lock is None:
            return None
        try:
            write = self._checked(token, path, tickets, verify=False)
        except _NotOnTheLoop:
            file.unlock(lock)
            return None
        except BaseException:  # a refusal reaches every ticket through _flush
            file.unlock(lock)
            raise
        if write is None:  # no ticket passed: nothing to write, and no thread to wake for it
            file.unlock(lock)
            return _NOTHING_TO_WRITE
        return _HeldWrite(lock, write)

    async def _write_holding_lock(self, held: _HeldWrite) -> None:
        """Run ``held``'s write on the executor, releasing its lock however that ends."""
        lock = held.lock
        if lock is None:
            return
        # Whoever claims first releases the lock: the executor's thread as it starts the
        # write, or this coroutine if the write never started (closing, cancelled).
        claim = threading.Lock()

        def write() -> None:
            if not claim.acquire(blocking=False):
                return
            try:
                held.write()
            finally:
                file.unlock(lock)

        try:
            await self._files.run(write)
        finally:
            if claim.acquire(blocking=False):
                file.unlock(lock)

    def _checked(self, token: str, path: Path, tickets: list[_Ticket], *, verify: bool) -> Callable[[], None] | None:
        """Under the held lock: the file read again and each ticket checked; the write that counts
        those that passed, or None when none did. Without ``verify`` (on the loop), only the parse
        cache is used, and :class:`_NotOnTheLoop` is raised for a file changed since it was parsed
        or a hash changed since a ticket was verified."""
        auth = self._auth
        if verify:
            data, _ = auth.load(token, path, lock=False)
        else:
            cached = auth.cached(token, file.signature(path))
            if cached is None:
                raise _NotOnTheLoop
            data = cached
        rules.check_usable(data)
        counted = 0
        for ticket in tickets:
            try:
                rules.check_limit(data, more=counted + 1)
                if data.get("hashed_access_token") != ticket.hashed:
                    # The hash changed since: rare, and bounded by the cost ceiling.
                    hashed = rules.stored_hash(data)
                    rules.check_cost(hashed, auth.max_bcrypt_cost)
                    if not verify and not auth.remembers(token, ticket.access_token, hashed):
                        raise _NotOnTheLoop
                    auth.verify_here(token, ticket.access_token, hashed)
                counted += 1
            except TokenError as exc:
                ticket.error = exc
        if not counted:
            return None
        data["calls"] += counted

        def write() -> None:
            file.write(path, data, functools.partial(auth.wrote, token, data))
            with self._lock:
                self.commits += 1

        return write


class _NotOnTheLoop(Exception):
    """The check needs what never runs on the loop: bcrypt, or reading a file changed by someone else
    (which may be torn, and is read again with pauses)."""


class _HeldWrite(NamedTuple):
    """A token file's write, checked on the loop, holding the token's lock (None: nothing to write)."""

    lock: int | None
    write: Callable[[], None]


_NOTHING_TO_WRITE = _HeldWrite(None, lambda: None)


def _admit(tickets: list[_Ticket]) -> None:
    """On the event loop: let every ticket that passed its checks go on (its count is being written)."""
    for ticket in tickets:
        if ticket.error is None and not ticket.admitted.done():
            ticket.admitted.set_result(None)

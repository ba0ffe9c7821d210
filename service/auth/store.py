"""Authorizing API calls with Flextype tokens: fast, and with exact call counts.

:class:`TokenStore` runs Flextype's validation steps 3 to 7 in Flextype's
order. The steps themselves are elsewhere: the rules in :mod:`.rules`,
the file in :mod:`.file`, bcrypt in :mod:`.hash`. What the store
adds is speed without losing exactness:

- A parse cache: the last parse of each token file, by its
  :class:`~.file.Signature`. Every clear loads its token file twice
  (to authenticate, then to count the call) and the same few tokens are
  loaded over and over, so an unchanged file costs one ``stat`` instead of
  an open, a read and a YAML parse.
- A verdict memo (:class:`~.memo.VerdictMemo`): bcrypt runs once per
  token and access token, until the file changes behind our back.
- Group commit: counting a call is a read-modify-write of ``token.yaml``
  under its ``flock``, with an ``fsync`` and a rename, which takes
  milliseconds. Calls for one token that arrive while its file is being
  written wait and are counted together in the next write, so one ``fsync``
  serves many requests and a busy token is not limited to one call per disk
  flush.
- Admission before durability (:meth:`admit`): a call is admitted as soon as
  the limit is checked under the file lock, before the write's ``fsync``. The
  caller publishes then, and answers only once the count is durable
  (:meth:`Counted.durable`), so the disk's latency overlaps the bus's instead
  of adding to it. Flextype's order of decisions holds, and so does the exact
  count across processes: the lock is held until the new count is in place.
  A crash between the publish and the rename can lose that one count, never a
  clear.

And a ceiling on abuse (:mod:`.limits`): file reads and writes run on
one executor, bcrypt on a :class:`~.limits.BcryptPool` of its own with
a bounded queue and a share per client address, so doomed verifications never
delay a remembered credential, and a client address that keeps failing is
refused (:class:`~.limits.Overloaded`) without bcrypt. Identical
verifications in flight at the same time share one bcrypt.

The count stays exact across threads and across service processes sharing
the directory: every write reads the file again under the token's lock and
checks each call again against what it finds (state, limit, hash).

No token id or access token ever appears in an exception or a log line; a
failure carries a :class:`~.rules.Refusal` only.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from cachebus.eager import run_eagerly

from . import file, rules
from .file import Signature, UnreadableFile
from .hash import password_verify
from .limits import FAILED_AUTHENTICATION, BcryptPool, Busy, FailureLog, Overloaded, address_key
from .memo import VerdictKey, VerdictMemo, verdict_key
from .rules import DEFAULT_MAX_BCRYPT_COST, Refusal, TokenData, TokenError

T = TypeVar("T")


@dataclass
class _Ticket:
    """One call waiting to be counted: who asked, and what became of it."""

    access_token: str
    #: The hash the access token was verified against before queueing.
    hashed: str
    #: Done once the call is counted durably (or refused).
    future: asyncio.Future[None] | None = None
    error: Exception | None = None
    #: Done once the call passed the checks under the file lock, before its count is durable.
    admitted: asyncio.Future[None] | None = None


class Counted:
    """A call admitted by :meth:`TokenStore.admit` whose count is being made durable.

    Await :meth:`durable` before answering: it raises what the write raised
    (an I/O error, or :class:`~.limits.Overloaded` when the store closes).
    """

    def __init__(self, store: TokenStore | None = None, future: asyncio.Future[None] | None = None) -> None:
        self._store = store
        self._future = future

    async def durable(self) -> None:
        store, self._store = self._store, None
        if store is None or self._future is None:
            return
        try:
            await self._future
        finally:
            store._active -= 1


#: What :meth:`TokenStore.admit` returns for a call that counts nothing.
NOTHING_TO_COUNT = Counted()


class TokenStore:
    """Authorization against the tokens under ``tokens_dir``.

    :meth:`check` is blocking and safe to call from several threads. The event
    loop uses :meth:`authorize`, which answers from memory when it can and
    otherwise reads files on ``executor`` and runs bcrypt on ``pool``, so that
    neither blocks the loop. Without an ``executor`` the store makes one of
    ``io_threads`` of its own; without a ``pool`` or ``failures``, default ones.
    :meth:`close` shuts down what the store made, and the pool in any case.

    Creating, listing and disabling tokens are :mod:`.admin`'s.
    """

    def __init__(self, tokens_dir: str | os.PathLike[str],
                 executor: concurrent.futures.Executor | None = None, *, io_threads: int = 4,
                 pool: BcryptPool | None = None, failures: FailureLog | None = None,
                 max_bcrypt_cost: int = DEFAULT_MAX_BCRYPT_COST) -> None:
        self.tokens_dir = Path(tokens_dir)
        self._own_executor = executor is None
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=io_threads,
                                                             thread_name_prefix="cachebus-auth-io")
        self._executor = executor
        self.pool = pool if pool is not None else BcryptPool()
        self.failures = failures if failures is not None else FailureLog()
        self.max_bcrypt_cost = max_bcrypt_cost
        #: Actual bcrypt verifications, memo hits excluded.
        self.bcrypt_calls: int = 0
        #: Writes of token files that counted calls; fewer than calls under load.
        self.commits: int = 0
        self._memo = VerdictMemo()
        # Guards _parsed and the two counters.
        self._lock = threading.Lock()
        # Per token, the last parse of its file and that file's signature; None
        # for a file known not to parse, so it is not read again until it changes.
        self._parsed: dict[str, tuple[Signature, TokenData | None]] = {}
        # Group commit state, touched only on the event loop thread.
        self._queued: dict[str, list[_Ticket]] = {}
        #: The tokens being written, each with the rest of its :meth:`_flush` (None while it starts).
        self._flushing: dict[str, asyncio.Future[None] | None] = {}
        # Verifications under way, by verdict key: the same one asked again waits for it.
        self._verifying: dict[VerdictKey, asyncio.Future[bool]] = {}
        self._verifying_by_address: collections.Counter[str] = collections.Counter()
        # authorize() calls under way, and whether close() was called; on the event loop.
        self._active = 0
        self._closed = False

    def close(self) -> None:
        """Stop at once: refuse new work, answer what waits, never wait for bcrypt.

        Queued bcrypt and file work never starts, and what awaits it gets
        :class:`~.limits.Overloaded` (``STOPPING``). The executor is shut
        down only if this store made it. Called on the event loop when it runs.
        """
        self._closed = True
        self.pool.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def remove_stale_temporaries(self) -> int:
        """Remove the temporary files a killed writer left in the token directories; how many."""
        return file.remove_stale_temporaries(self.tokens_dir)

    async def authorize(self, token: str, access_token: str, *, consume: bool, client: str = "") -> None:
        """:meth:`check` for the event loop, for a request from ``client`` (its address).

        Raises :class:`TokenError`, or :class:`~.limits.Overloaded` when
        the work is refused before it is done. Steps 3 to 6 are answered from
        memory when :meth:`_remembered` can, else the file is read on
        ``executor`` and bcrypt runs on the pool. Counting calls (step 7) is
        group-committed: see :meth:`_count`. A refusal in
        :data:`~.limits.FAILED_AUTHENTICATION` counts against ``client``.
        """
        await (await self.admit(token, access_token, consume=consume, client=client)).durable()

    async def admit(self, token: str, access_token: str, *, consume: bool, client: str = "") -> Counted:
        """:meth:`authorize` up to the moment the call is admitted: for a counted call,
        once its limit was checked under the file lock, before its count is durable.

        Await the result's :meth:`Counted.durable` before answering.
        """
        address = address_key(client)
        self._active += 1
        counting = False
        try:
            hashed = await self._authenticated(token, access_token, consume=consume, address=address)
            if not consume:
                return NOTHING_TO_COUNT
            loop = asyncio.get_running_loop()
            ticket = _Ticket(access_token, hashed, loop.create_future(), admitted=loop.create_future())
            await self._count(token, ticket)
            counting = True
            assert ticket.future is not None
            return Counted(self, ticket.future)
        except TokenError as exc:
            if exc.reason in FAILED_AUTHENTICATION:
                self.failures.failed(address)
            raise
        finally:
            if not counting:
                self._active -= 1

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no :meth:`authorize` is under way, at most ``timeout`` seconds.

        After :meth:`close`, this lets the requests it answered be written
        before the event loop stops.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)  # one more turn: the answers are written as their handlers resume

    async def _authenticated(self, token: str, access_token: str, *, consume: bool, address: str) -> str:
        """Steps 3 to 6 for the event loop; returns the verified hash.

        An address being slowed is refused before any file or bcrypt work,
        unless memory alone can say that its credentials are right: a token's
        owner behind the same address as a flood keeps working.
        """
        slowed = self.failures.retry_after(address)
        try:
            hashed = self._remembered(token, access_token, consume=consume)
        except TokenError:
            if slowed:
                raise Overloaded(Busy.FAILURES, slowed) from None
            raise
        if hashed is not None:
            return hashed
        if slowed:
            raise Overloaded(Busy.FAILURES, slowed)
        hashed = await self._io(functools.partial(self._usable, token, consume=consume))
        await self._verified(token, access_token, hashed, address)
        return hashed

    async def _io(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the file executor; :class:`Overloaded` once the store is closed."""
        if self._closed:
            raise Overloaded(Busy.STOPPING)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except asyncio.CancelledError:
            if self._closed:  # cancelled by close(), not by our caller
                raise Overloaded(Busy.STOPPING) from None
            raise

    async def _verified(self, token: str, access_token: str, hashed: str, address: str) -> None:
        """Step 6's second half on the loop: remembered, or bcrypt on the pool within ``address``'s share.

        The same verification asked again while one runs waits for that one:
        a client that sends its first few requests at once pays bcrypt once,
        and within its share only once.
        """
        if self._memo.knows(token, access_token, hashed):
            return
        key = verdict_key(token, access_token, hashed)
        verifying = self._verifying.get(key)
        started = verifying is None
        if verifying is None:
            # The address's verifications under way count as failures to come.
            if slowed := self.failures.retry_after(address, self._verifying_by_address[address]):
                raise Overloaded(Busy.FAILURES, slowed)
            verifying = asyncio.ensure_future(self.pool.run(address, functools.partial(self._bcrypt, access_token,
                                                                                          hashed)))
            self._verifying[key] = verifying
            verifying.add_done_callback(functools.partial(self._verify_done, key))
            self._verifying_by_address[address] += 1
        try:
            # shield: a caller that goes away does not cancel the others' verification.
            verified = await asyncio.shield(verifying)
        finally:
            if started:
                # Here, not when the verification ends: authorize() records the
                # failure in this same step, so there is no moment when another
                # request would count it as neither under way nor failed.
                self._verifying_by_address[address] -= 1
                if not self._verifying_by_address[address]:
                    del self._verifying_by_address[address]
        if not verified:
            raise TokenError(Refusal.WRONG_ACCESS_TOKEN)
        self._memo.remember(token, access_token, hashed)

    def _verify_done(self, key: VerdictKey, future: asyncio.Future[bool]) -> None:
        self._verifying.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved, even if every waiter went away

    def _bcrypt(self, access_token: str, hashed: str) -> bool:
        """bcrypt itself, on a pool thread. Blocking and slow by design."""
        with self._lock:
            self.bcrypt_calls += 1
        return password_verify(access_token, hashed)

    def check(self, token: str, access_token: str, *, consume: bool) -> None:
        """Flextype's validation steps 3 to 7; raises :class:`TokenError`.

        Blocking. With ``consume`` a success also adds one to ``calls`` in the
        token file, after re-checking the state and limit under the file lock.
        Without it, as for reading the record, the call limit is not enforced:
        it limits clears, and reading never counts as one. bcrypt runs on the
        calling thread: the pool and the per-address limits are :meth:`authorize`'s.
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
        signature = file.signature(path)
        data = self._cached_parse(token, signature)
        if data is None:
            return None
        hashed = self._usable_hash(token, data, signature, consume=consume)
        return hashed if self._memo.knows(token, access_token, hashed) else None

    def _authenticate(self, token: str, access_token: str, *, consume: bool) -> str:
        """Steps 3 to 6 without counting; returns the verified hash. Blocking."""
        hashed = self._usable(token, consume=consume)
        # Outside the file lock: a slow bcrypt must not hold up other requests.
        self._verify(token, access_token, hashed)
        return hashed

    def _usable(self, token: str, *, consume: bool) -> str:
        """Steps 3 to 6's first half: the token file loaded and checked; the hash to verify. Blocking."""
        data, signature = self._load(token, self._path(token))
        return self._usable_hash(token, data, signature, consume=consume)

    def _path(self, token: str) -> Path:
        """Step 3's first half: the token file's path, for an id that can name one."""
        return file.token_dir(self.tokens_dir, token) / file.TOKEN_FILE

    def _usable_hash(self, token: str, data: TokenData, signature: Signature, *, consume: bool) -> str:
        """Steps 4 and 5 on the token's file as loaded; returns the hash step 6 checks against."""
        self._memo.observe(token, signature)
        rules.check_usable(data)
        if consume:
            rules.check_limit(data)
        hashed = rules.stored_hash(data)
        rules.check_cost(hashed, self.max_bcrypt_cost)
        return hashed

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
        return self._load_as(token, path, lock=True)

    def _load_as(self, token: str, path: Path, *, lock: bool) -> tuple[TokenData, Signature]:
        """:meth:`_load`, read under the shared file lock if ``lock``: False when the
        caller holds the exclusive one, which a shared lock would wait for."""
        signature = file.signature(path)
        data = self._cached_parse(token, signature)
        if data is not None:
            return data, signature
        try:
            data, signature = file.read(path, lock=lock)
        except UnreadableFile as exc:
            if not exc.empty:  # an empty read may be a torn write of a file with that very signature
                with self._lock:
                    self._parsed[token] = (exc.signature, None)
            raise
        with self._lock:
            self._parsed[token] = (signature, dict(data))
        return data, signature

    def _cached_parse(self, token: str, signature: Signature) -> TokenData | None:
        """A copy of the token file's last parse if the file still has ``signature``, else None.

        Raises the invalid-file refusal if the file with that signature did not parse.
        """
        with self._lock:
            cached = self._parsed.get(token)
            if cached is None or cached[0] != signature:
                return None
            if cached[1] is None:
                raise TokenError(Refusal.INVALID_TOKEN_FILE)
            return dict(cached[1])

    def _wrote(self, token: str, data: TokenData, signature: Signature) -> None:
        """Record our own write before it lands, so it is neither parsed again nor taken
        for a change from outside that would empty the memo."""
        self._memo.wrote(token, signature)
        with self._lock:
            self._parsed[token] = (signature, dict(data))

    # --- step 7: counting calls -----------------------------------------------------

    async def _count(self, token: str, ticket: _Ticket) -> None:
        """Queue ``ticket`` for the token's next write, and wait until that write admits it.

        While a write for the token is under way, calls queue up; the next
        write counts them all at once. One write per batch keeps the number of
        ``fsync`` calls, not the number of requests, the limit on a busy token.
        ``ticket.future`` is done once the count is durable.
        """
        self._queued.setdefault(token, []).append(ticket)
        if token not in self._flushing:
            # Eagerly: the checks on the loop admit the call before this returns, so
            # neither a task step nor this coroutine's wake-up costs a trip through the loop.
            self._flushing[token] = None
            rest = run_eagerly(self._flush(token))
            if rest is not None and token in self._flushing:
                self._flushing[token] = rest
        assert ticket.admitted is not None
        await ticket.admitted

    async def _flush(self, token: str) -> None:
        """Write the token's queued calls, batch after batch, until none are left."""
        loop = asyncio.get_running_loop()
        try:
            while self._queued.get(token):
                tickets = self._queued.pop(token)
                try:
                    write = None if self._closed else self._admit_here(token, tickets)
                    if write is None:  # the lock is busy, or bcrypt must run: all of it on the executor
                        admit = functools.partial(loop.call_soon_threadsafe, _admit, tickets)
                        await self._io(functools.partial(self._commit, token, tickets, admit))
                    else:
                        _admit(tickets)
                        await self._io_holding_lock(write)
                except Exception as exc:  # an I/O failure, or closing: every caller in the batch sees it
                    for ticket in tickets:
                        ticket.error = ticket.error or exc
                for ticket in tickets:
                    assert ticket.future is not None and ticket.admitted is not None
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

    def _commit(self, token: str, tickets: list[_Ticket], admit: Callable[[], object] = lambda: None) -> None:
        """Step 7 for a batch: add one to ``calls`` per ticket still allowed, in one write. Blocking.

        Under the token's file lock, the file is read again: another thread or
        process may have counted calls, disabled the token or changed its hash
        since each ticket was authenticated. A ticket that no longer passes
        gets its :class:`TokenError` in ``ticket.error``. ``admit`` is called
        once the tickets are checked, before the write, still under the lock.
        """
        try:
            path = self._path(token)
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
        path = self._path(token)
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

    async def _io_holding_lock(self, held: _HeldWrite) -> None:
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
            await self._io(write)
        finally:
            if claim.acquire(blocking=False):
                file.unlock(lock)

    def _checked(self, token: str, path: Path, tickets: list[_Ticket], *, verify: bool) -> Callable[[], None] | None:
        """Under the held lock: the file read again and each ticket checked; the write that counts
        those that passed, or None when none did. Without ``verify`` (on the loop), only the parse
        cache is used, and :class:`_NotOnTheLoop` is raised for a file changed since it was parsed
        or a hash changed since a ticket was verified."""
        if verify:
            data, signature = self._load_as(token, path, lock=False)
        else:
            signature = file.signature(path)
            cached = self._cached_parse(token, signature)
            if cached is None:
                raise _NotOnTheLoop
            data = cached
        self._memo.observe(token, signature)
        rules.check_usable(data)
        counted = 0
        for ticket in tickets:
            try:
                rules.check_limit(data, more=counted + 1)
                if data.get("hashed_access_token") != ticket.hashed:
                    # The hash changed since: rare, and bounded by the cost ceiling.
                    hashed = rules.stored_hash(data)
                    rules.check_cost(hashed, self.max_bcrypt_cost)
                    if not verify and not self._memo.knows(token, ticket.access_token, hashed):
                        raise _NotOnTheLoop
                    self._verify(token, ticket.access_token, hashed)
                counted += 1
            except TokenError as exc:
                ticket.error = exc
        if not counted:
            return None
        data["calls"] += counted

        def write() -> None:
            file.write(path, data, functools.partial(self._wrote, token, data))
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
        if ticket.error is None and ticket.admitted is not None and not ticket.admitted.done():
            ticket.admitted.set_result(None)

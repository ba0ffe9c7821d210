"""The ceiling on abuse of the credentials: bcrypt's own pool, per-address shares, slowing.

bcrypt is slow on purpose, so anyone who can send wrong access tokens can
make the service spend CPU, and, without a ceiling, make every legitimate
clear wait behind a queue of doomed verifications. Three things stop that:

- :class:`BcryptPool`: bcrypt runs on a few threads of its own, never on the
  threads that read and write token files (so a remembered credential is
  never stuck behind bcrypt), with a bounded queue. When the queue is full,
  the request is refused at once (429) instead of waiting without bound.
- Per client address, the pool gives at most ``per_address`` verifications
  at once; that address's other verifications wait in a short queue of their
  own, and beyond it are refused. One address can never hold the whole pool.
- :class:`FailureLog`: an address whose authentications failed ``limit``
  times within ``window`` seconds is refused (429, with ``Retry-After``)
  without touching the disk or bcrypt, until the oldest failure ages out.

All three are keyed by the client's address, never by token: a flood
against a token never locks its owner out from another address. IPv6
addresses count by their /64 network, the smallest block one host is given.

Nothing here knows HTTP: a refusal is an :class:`Overloaded` with a
:class:`Busy` reason, and :mod:`cachebus.service.errors` maps it to a status.
Nothing here sees a credential either; addresses are all it keys on.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import ipaddress
import math
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Generic, TypeVar

from .rules import Refusal

T = TypeVar("T")

#: Refusals that count as a failed authentication of the address that earned
#: them: the ones answered 401, what a guess gets. A disabled token, a reached
#: limit or a broken token file is the token's state, not a guess.
FAILED_AUTHENTICATION = frozenset({Refusal.UNKNOWN_TOKEN, Refusal.NO_HASH, Refusal.WRONG_ACCESS_TOKEN,
                                   Refusal.HASH_TOO_COSTLY})
#: Addresses whose failures are remembered at most; the least recently failing go first.
MAX_ADDRESSES = 100_000


class Busy(enum.StrEnum):
    """Why work was refused before it was done; the value is what logs and metrics show."""

    #: The address failed to authenticate too often lately.
    FAILURES = "too_many_failures"
    #: The address already has its share of the bcrypt pool, and its queue is full.
    ADDRESS = "address_busy"
    #: The bcrypt pool's queue is full.
    POOL = "bcrypt_busy"
    #: The service is stopping.
    STOPPING = "stopping"


class Overloaded(Exception):
    """Work refused before it was done: its :class:`Busy` reason, and when to retry."""

    def __init__(self, why: Busy, retry_after: int = 1) -> None:
        super().__init__(why.value)
        self.why = why
        #: Whole seconds, at least 1: HTTP's ``Retry-After``.
        self.retry_after = max(1, retry_after)


def address_key(ip: str) -> str:
    """The key a client address counts under: IPv4 as is, IPv6 by its /64 network.

    One host easily holds a whole /64 of IPv6 addresses, and counting each
    one alone would give it billions of shares. An IPv4-mapped IPv6 address
    counts as its IPv4 address. Anything that does not parse (a Unix socket's
    empty address) is its own key.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


class FailureLog:
    """Failed authentications by address, in a sliding window.

    Only the last ``limit`` failures of each address are kept, and at most
    :data:`MAX_ADDRESSES` addresses; the least recently failing address is
    forgotten first. ``limit`` 0 slows no one. Used from the event loop only.
    """

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str, pending: int = 0) -> int:
        """Whole seconds until ``address`` may try again; 0 when it is not slowed.

        ``pending`` counts the address's attempts under way, as if each were
        to fail: however many it sends at once, it gets at most ``limit``
        attempts per window, not ``limit`` plus whatever was in flight when the
        last one failed. While only those keep it over, it may retry in a second.
        """
        if self.limit <= 0:
            return 0
        times = self._failures.get(address)
        if times is None:
            return 0 if pending < self.limit else 1
        now = self._clock()
        recent = sum(1 for t in times if t > now - self.window)
        if recent + pending < self.limit:
            return 0
        if recent < self.limit:
            return 1
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, address: str) -> None:
        """Record one failed authentication of ``address``."""
        if self.limit <= 0:
            return
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self.limit)
        times.append(self._clock())
        self._failures[address] = times  # now the most recent
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


@dataclass(eq=False)  # hashed by identity: the pool keeps a set of them
class _Job(Generic[T]):
    """One call for a pool thread, and the future on the loop that waits for it."""

    fn: Callable[[], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any, error: BaseException | None) -> None:
        """On the loop: hand over the outcome, unless the pool closed meanwhile."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


@dataclass
class _Share:
    """One address's use of the pool: verifications running or queued, and those waiting their turn."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


#: Every pool made in this process, so the exit can wait for their hashes.
_POOLS: weakref.WeakSet[BcryptPool] = weakref.WeakSet()
#: Seconds the exit waits, in all, for hashes under way: more than one at api.max_bcrypt_cost takes.
_EXIT_WAIT = 10.0


@atexit.register
def _let_hashes_finish() -> None:
    """Wait for the hashes under way before the interpreter finalizes.

    A daemon thread still inside bcrypt then is ended by ``pthread_exit``,
    whose forced unwinding crosses bcrypt's Rust frames, and the process
    aborts ("FATAL: exception not rethrown", exit status 134): seen at the end
    of a test run, and possible at any service's exit during a verification.
    ``atexit`` runs while daemon threads still run normally.
    """
    deadline = time.monotonic() + _EXIT_WAIT
    threads = [thread for pool in list(_POOLS) for thread in pool._end_threads()]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


class BcryptPool:
    """Threads of bcrypt's own, a bounded queue, and a share per client address.

    :meth:`run` is called on the event loop. At most ``threads + queue``
    verifications are admitted at once, counting those waiting for their
    address's turn; at most ``per_address`` of one address run or sit in the
    pool's queue, and at most ``per_address_queue`` more wait for their turn.
    Whatever does not fit is refused with :class:`Overloaded` at once.

    The threads are daemon threads, started on first use, and :meth:`close`
    answers everything admitted without waiting for bcrypt. At the
    interpreter's exit a thread in the middle of a hash is waited for (see
    :func:`_let_hashes_finish`); queued work never starts then.
    """

    def __init__(self, threads: int = 4, queue: int = 64, per_address: int = 1, per_address_queue: int = 8,
                 name: str = "cachebus-auth-bcrypt") -> None:
        self.threads = threads
        self.capacity = threads + queue
        # More than the pool has would be no limit at all.
        self.per_address = max(1, min(per_address, threads))
        self.per_address_queue = per_address_queue
        self.name = name
        #: Verifications admitted and not yet answered: running, queued, or waiting their turn.
        self.admitted = 0
        self._shares: dict[str, _Share] = {}
        self._jobs: SimpleQueue[_Job[Any] | None] = SimpleQueue()
        self._pending: set[_Job[Any]] = set()
        self._started: list[threading.Thread] = []
        self._closed = False
        #: Set at the interpreter's exit: the threads take no more work and end.
        self._exiting = False
        _POOLS.add(self)

    async def run(self, address: str, fn: Callable[[], T]) -> T:
        """``fn()`` on a pool thread, within ``address``'s share; raises :class:`Overloaded` if it cannot be."""
        if self._closed:
            raise Overloaded(Busy.STOPPING)
        if self.admitted >= self.capacity:
            raise Overloaded(Busy.POOL)
        share = self._shares.setdefault(address, _Share())
        if share.running >= self.per_address and len(share.waiting) >= self.per_address_queue:
            self._forget_if_idle(address, share)
            raise Overloaded(Busy.ADDRESS)
        self.admitted += 1
        try:
            if share.running < self.per_address:
                share.running += 1
            else:
                try:
                    await self._wait_turn(share)
                except BaseException:
                    self._forget_if_idle(address, share)
                    raise
            try:
                return await self._submit(fn)
            finally:
                self._release(address, share)
        finally:
            self.admitted -= 1

    async def _wait_turn(self, share: _Share) -> None:
        """Wait until a finishing verification of the same address hands over its place."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        share.waiting.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                # Given the place just as we were cancelled: pass it on.
                share.running -= 1
                self._hand_over(share)
            elif turn in share.waiting:
                share.waiting.remove(turn)
            raise

    def _release(self, address: str, share: _Share) -> None:
        share.running -= 1
        self._hand_over(share)
        self._forget_if_idle(address, share)

    def _hand_over(self, share: _Share) -> None:
        while share.waiting and share.running < self.per_address:
            turn = share.waiting.popleft()
            if not turn.done():
                share.running += 1
                turn.set_result(None)

    def _forget_if_idle(self, address: str, share: _Share) -> None:
        if share.running == 0 and not share.waiting:
            self._shares.pop(address, None)

    async def _submit(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, loop.create_future(), loop)
        if len(self._started) < self.threads:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._started)}", daemon=True)
            self._started.append(thread)
            thread.start()
        self._pending.add(job)
        self._jobs.put(job)
        try:
            return await job.future
        finally:
            self._pending.discard(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._exiting:
                return
            if job.future.done():  # answered by close() while queued
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.fn()
            except BaseException as exc:  # handed to the caller, who raises it
                error = exc
            try:
                job.loop.call_soon_threadsafe(job.settle, result, error)
            except RuntimeError:  # the loop is closed: no one waits any more
                return

    def _end_threads(self) -> list[threading.Thread]:
        """Tell every thread to end once its current hash (if any) is done; the threads."""
        self._exiting = True
        for _ in self._started:
            self._jobs.put(None)
        return self._started

    def close(self) -> None:
        """Refuse new work, answer everything admitted with ``STOPPING``, and let the threads go.

        Called on the event loop. Queued work never starts; a thread in the
        middle of a hash finishes it (bounded by ``api.max_bcrypt_cost``) and
        exits, and no one waits for it: the threads are daemons.
        """
        if self._closed:
            return
        self._closed = True
        for job in list(self._pending):
            if not job.future.done():
                job.future.set_exception(Overloaded(Busy.STOPPING))
        for share in self._shares.values():
            for turn in share.waiting:
                if not turn.done():
                    turn.set_exception(Overloaded(Busy.STOPPING))
        for _ in self._started:
            self._jobs.put(None)

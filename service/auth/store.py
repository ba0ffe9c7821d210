"""Authorizing API calls with Flextype tokens: two verbs, fast, and with exact call counts.

:class:`TokenStore` is what the HTTP layer asks, with one verb per use of a token:

- :meth:`~TokenStore.verify` for the read endpoints: Flextype's validation
  steps 3 to 6. No call is counted, and the call limit is not enforced: it
  limits clears, and reading never counts as one.
- :meth:`~TokenStore.admit_call` for the clear: steps 3 to 7, returning a
  :class:`~.counter.Counted` as soon as the call is admitted under the
  token's lock. The caller publishes, then awaits
  :meth:`~.counter.Counted.durable` before answering.

The two halves are apart: the :class:`~.authenticator.Authenticator` says
whether a token and access token are allowed (parse cache, verdict memo,
bcrypt pool), the :class:`~.counter.CallCounter` counts calls (group commit
under the token's lock). The store runs both on one executor for files, and
counts the failed authentications of each client address
(:mod:`.limits`). No token id or access token ever appears in an exception or
a log line; a failure carries a :class:`~.rules.Refusal` only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from . import file, rules
from .authenticator import Authenticator
from .counter import CallCounter, Counted
from .filework import FileWork
from .limits import FAILED_AUTHENTICATION, BcryptPool, FailureLog, address_key
from .rules import DEFAULT_MAX_BCRYPT_COST, TokenError


class TokenStore:
    """Authorization against the tokens under ``tokens_dir``, on the event loop.

    Files are read and written on ``executor``, bcrypt runs on ``pool``, so
    that neither blocks the loop. Without an ``executor`` the store makes one
    of ``io_threads`` of its own; without a ``pool`` or ``failures``, default
    ones. :meth:`close` shuts down what the store made, and the pool in any case.

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
        self._files = FileWork(executor)
        self.pool = pool if pool is not None else BcryptPool()
        self.failures = failures if failures is not None else FailureLog()
        self.authenticator = Authenticator(self.tokens_dir, self._files, self.pool, self.failures, max_bcrypt_cost)
        self.counter = CallCounter(self.authenticator, self._files)
        # Verbs under way (a counted call until its count is durable); on the event loop.
        self._active = 0

    async def verify(self, token: str, access_token: str, *, client: str = "") -> None:
        """Flextype's steps 3 to 6 for a request from ``client`` (its address) that counts no call.

        Raises :class:`~.rules.TokenError`, or :class:`~.limits.Overloaded`
        when the work is refused before it is done. A refusal in
        :data:`~.limits.FAILED_AUTHENTICATION` counts against ``client``.
        """
        address = address_key(client)
        self._active += 1
        try:
            with self._failures_of(address):
                await self.authenticator.authenticate(token, access_token, rules.check_usable, address)
        finally:
            self._active -= 1

    async def admit_call(self, token: str, access_token: str, *, client: str = "") -> Counted:
        """Flextype's steps 3 to 7 for a call that counts, up to the moment it is admitted: its
        limit checked under the token's lock, its count not yet durable.

        Raises as :meth:`verify` does. Await the result's
        :meth:`~.counter.Counted.durable` before answering.
        """
        address = address_key(client)
        self._active += 1
        counting = False
        try:
            with self._failures_of(address):
                hashed = await self.authenticator.authenticate(token, access_token, rules.check_call, address)
                durable = await self.counter.admit(token, access_token, hashed)
            counting = True
            return Counted(durable, self._settled)
        finally:
            if not counting:
                self._active -= 1

    def _settled(self) -> None:
        self._active -= 1

    @contextlib.contextmanager
    def _failures_of(self, address: str) -> Iterator[None]:
        """Count a failed authentication against ``address``: what a guess gets, not the token's state."""
        try:
            yield
        except TokenError as exc:
            if exc.reason in FAILED_AUTHENTICATION:
                self.failures.failed(address)
            raise

    def remove_stale_temporaries(self) -> int:
        """Remove the temporary files a killed writer left in the token directories; how many."""
        return file.remove_stale_temporaries(self.tokens_dir)

    def close(self) -> None:
        """Stop at once: refuse new work, answer what waits, never wait for bcrypt.

        Queued bcrypt and file work never starts, and what awaits it gets
        :class:`~.limits.Overloaded` (``STOPPING``). The executor is shut
        down only if this store made it. Called on the event loop when it runs.
        """
        self._files.close()
        self.pool.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no verb is under way, at most ``timeout`` seconds.

        After :meth:`close`, this lets the requests it answered be written
        before the event loop stops.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)  # one more turn: the answers are written as their handlers resume

"""Is this token, with this access token, allowed? Flextype's steps 3 to 6, fast.

:class:`Authenticator` runs the steps in Flextype's order; the steps
themselves are elsewhere: the rules in :mod:`.rules`, the file in
:mod:`.file`, bcrypt in :mod:`.hash`. What it adds is speed without losing
exactness, and a ceiling on abuse:

- The parse cache (:class:`~.parses.ParseCache`): an unchanged token file
  costs one ``stat``.
- The verdict memo (:class:`~.memo.VerdictMemo`): bcrypt runs once per token
  and access token, until the file changes behind our back. A remembered
  verdict on a known file is answered on the event loop, with no thread hop.
- bcrypt on a :class:`~.limits.BcryptPool` of its own with a bounded queue
  and a share per client address, never on the file threads, so doomed
  verifications never delay a remembered credential; a client address that
  keeps failing is refused (:class:`~.limits.Overloaded`) without bcrypt.
  Identical verifications in flight at the same time share one bcrypt.

Counting the call (step 7) is the :class:`~.counter.CallCounter`'s, which
checks each call again under the token's lock with the methods below.
No token id or access token ever appears in an exception or a log line.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from pathlib import Path

from . import file, rules
from .file import Signature
from .filework import FileWork
from .hash import password_verify
from .limits import BcryptPool, Busy, FailureLog, Overloaded
from .memo import VerdictKey, VerdictMemo, verdict_key
from .parses import ParseCache
from .rules import Refusal, Rules, TokenData, TokenError


class Authenticator:
    """Steps 3 to 6 against the tokens under ``tokens_dir``, for the event loop.

    Files are read on ``files``, bcrypt runs on ``pool`` within the client
    address's share, and ``failures`` slows an address that keeps failing
    (the store records the failures; this only reads them).
    """

    def __init__(self, tokens_dir: Path, files: FileWork, pool: BcryptPool, failures: FailureLog,
                 max_bcrypt_cost: int) -> None:
        self.tokens_dir = tokens_dir
        self.pool = pool
        self.failures = failures
        self.max_bcrypt_cost = max_bcrypt_cost
        #: Actual bcrypt verifications, memo hits excluded.
        self.bcrypt_calls: int = 0
        self._files = files
        self._parses = ParseCache()
        self._memo = VerdictMemo()
        # Guards bcrypt_calls, which pool and file threads both add to.
        self._lock = threading.Lock()
        # Verifications under way, by verdict key: the same one asked again waits for it. On the loop.
        self._verifying: dict[VerdictKey, asyncio.Future[bool]] = {}
        self._verifying_by_address: collections.Counter[str] = collections.Counter()

    async def authenticate(self, token: str, access_token: str, use: Rules, address: str) -> str:
        """Steps 3 to 6, with ``use`` as steps 4 and 5; returns the verified hash.

        Raises :class:`TokenError`, or :class:`Overloaded` when the work is
        refused before it is done. An address being slowed is refused before
        any file or bcrypt work, unless memory alone can say that its
        credentials are right: a token's owner behind the same address as a
        flood keeps working.
        """
        slowed = self.failures.retry_after(address)
        try:
            hashed = self._remembered(token, access_token, use)
        except TokenError:
            if slowed:
                raise Overloaded(Busy.FAILURES, slowed) from None
            raise
        if hashed is not None:
            return hashed
        if slowed:
            raise Overloaded(Busy.FAILURES, slowed)
        hashed = await self._files.run(functools.partial(self._usable, token, use))
        await self._verified(token, access_token, hashed, address)
        return hashed

    def path(self, token: str) -> Path:
        """Step 3's first half: the token file's path, for an id that can name one."""
        return file.token_dir(self.tokens_dir, token) / file.TOKEN_FILE

    # --- steps 3 to 5 -------------------------------------------------------------

    def _remembered(self, token: str, access_token: str, use: Rules) -> str | None:
        """Steps 3 to 6 from memory alone: the verified hash, or None when that takes more.

        One ``stat`` and no bcrypt, so the event loop may call it: a known file
        and a remembered verdict need no thread hop. None means the file must
        be parsed or the access token verified; whatever memory does hold is
        checked fully, so a refusal here is the one the file would give.
        """
        signature = file.signature(self.path(token))
        data = self._parses.cached(token, signature)
        if data is None:
            return None
        hashed = self._usable_hash(token, data, signature, use)
        return hashed if self._memo.knows(token, access_token, hashed) else None

    def _usable(self, token: str, use: Rules) -> str:
        """Steps 3 to 6's first half: the token file loaded and checked; the hash to verify. Blocking."""
        data, signature = self._parses.load(token, self.path(token))
        return self._usable_hash(token, data, signature, use)

    def _usable_hash(self, token: str, data: TokenData, signature: Signature, use: Rules) -> str:
        """Steps 4 and 5 on the token's file as loaded; returns the hash step 6 checks against."""
        self._memo.observe(token, signature)
        use(data)
        hashed = rules.stored_hash(data)
        rules.check_cost(hashed, self.max_bcrypt_cost)
        return hashed

    # --- step 6 on the loop: the memo, or bcrypt on the pool ----------------------------

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
                # Here, not when the verification ends: the store records the
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

    # --- for the counter, which checks each call again under the token's lock -----------

    def load(self, token: str, path: Path, *, lock: bool) -> tuple[TokenData, Signature]:
        """The token file as :class:`~.parses.ParseCache` has it or reads it, seen by the memo. Blocking."""
        data, signature = self._parses.load(token, path, lock=lock)
        self._memo.observe(token, signature)
        return data, signature

    def cached(self, token: str, signature: Signature) -> TokenData | None:
        """The parse of the token file with ``signature`` if it is known (seen by the memo), else None."""
        data = self._parses.cached(token, signature)
        if data is not None:
            self._memo.observe(token, signature)
        return data

    def remembers(self, token: str, access_token: str, hashed: str) -> bool:
        """Whether step 6 can be answered from memory."""
        return self._memo.knows(token, access_token, hashed)

    def verify_here(self, token: str, access_token: str, hashed: str) -> None:
        """Step 6 on the calling thread, remembered or by bcrypt; raises :class:`TokenError`. Blocking.

        For a hash that changed between a call's authentication and its count:
        rare, and bounded by the cost ceiling.
        """
        if self._memo.knows(token, access_token, hashed):
            return
        with self._lock:
            self.bcrypt_calls += 1
        if not password_verify(access_token, hashed):
            raise TokenError(Refusal.WRONG_ACCESS_TOKEN)
        self._memo.remember(token, access_token, hashed)

    def wrote(self, token: str, data: TokenData, signature: Signature) -> None:
        """Record our own write before it lands, so it is neither parsed again nor taken
        for a change from outside that would empty the memo."""
        self._memo.wrote(token, signature)
        self._parses.wrote(token, data, signature)

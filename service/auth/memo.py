"""Remembered bcrypt verdicts, so a token that keeps clearing pays bcrypt once.

bcrypt is slow by design (tens of milliseconds at Flextype's cost), and the
same few tokens authenticate over and over. :class:`VerdictMemo` remembers
each successful verification, keyed by token, the SHA-256 of the access
token and the stored hash: never the access token itself, and a wrong guess
is never remembered, so each one still pays bcrypt.

A verdict for a given hash stays true, but the memo still forgets a token's
verdicts as soon as its file is seen to change behind our back (an editor,
``cachebus tokens disable``, another service process): whoever changed it
may have meant to revoke something, and re-verifying once is cheap. Our own
writes (counting calls) are not such a change; the store reports their
signatures with :meth:`VerdictMemo.wrote`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque

from .file import Signature

#: Verdicts kept at most; the least recently used go first.
MEMO_SIZE = 10_000
#: Signatures of a token file the memo knows to be ours or already seen.
KNOWN_SIGNATURES = 16

#: (token, sha256(access_token), hashed_access_token)
VerdictKey = tuple[str, bytes, str]


def verdict_key(token: str, access_token: str, hashed: str) -> VerdictKey:
    """What a verdict is remembered by: never the access token itself, only its SHA-256."""
    # surrogatepass: any str must hash, including a lone surrogate from a JSON body.
    return token, hashlib.sha256(access_token.encode("utf-8", "surrogatepass")).digest(), hashed


class VerdictMemo:
    """Successful verifications by token, LRU-bounded; safe to use from several threads."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._verdicts: OrderedDict[VerdictKey, None] = OrderedDict()
        self._by_token: dict[str, set[VerdictKey]] = {}
        # Per token, the file signatures the verdicts are known to agree with:
        # the last one read, plus the ones we wrote since. A deque of several,
        # not one, because group commit may write again while another thread
        # still holds a signature it read of our previous write; seeing that
        # one is no change from outside. Bounded, as only the last few writes
        # can still be in a reader's hands.
        self._signatures: dict[str, deque[Signature]] = {}

    def __len__(self) -> int:
        return len(self._verdicts)

    def knows(self, token: str, access_token: str, hashed: str) -> bool:
        """Whether ``access_token`` is remembered to match ``hashed`` for ``token``."""
        key = verdict_key(token, access_token, hashed)
        with self._lock:
            if key not in self._verdicts:
                return False
            self._verdicts.move_to_end(key)
            return True

    def remember(self, token: str, access_token: str, hashed: str) -> None:
        """Record a successful verification, dropping the least recently used past :attr:`size`."""
        key = verdict_key(token, access_token, hashed)
        with self._lock:
            self._verdicts[key] = None
            self._verdicts.move_to_end(key)
            self._by_token.setdefault(token, set()).add(key)
            while len(self._verdicts) > self.size:
                old, _ = self._verdicts.popitem(last=False)
                keys = self._by_token[old[0]]
                keys.discard(old)
                if not keys:
                    del self._by_token[old[0]]

    def observe(self, token: str, signature: Signature) -> None:
        """The token's file was read with ``signature``: forget its verdicts if that is news."""
        with self._lock:
            known = self._signatures.get(token)
            if known is not None and signature in known:
                return
            self._forget_locked(token)
            self._signatures[token] = deque([signature], maxlen=KNOWN_SIGNATURES)

    def wrote(self, token: str, signature: Signature) -> None:
        """We wrote the token's file with ``signature``: seeing it later is no change."""
        with self._lock:
            self._signatures.setdefault(token, deque(maxlen=KNOWN_SIGNATURES)).append(signature)

    def _forget_locked(self, token: str) -> None:
        for key in self._by_token.pop(token, ()):
            del self._verdicts[key]

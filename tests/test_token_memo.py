"""The verdict memo alone: what it remembers, for how long, and what makes it forget."""

from __future__ import annotations

from cachebus.service.auth.file import Signature
from cachebus.service.auth.memo import KNOWN_SIGNATURES, VerdictMemo

S1, S2, S3 = Signature(1, 100, 7), Signature(2, 100, 8), Signature(3, 101, 9)


def seen(memo: VerdictMemo, *tokens: str) -> VerdictMemo:
    for token in tokens:
        memo.observe(token, S1)
    return memo


def test_remembers_exactly_what_was_verified() -> None:
    memo = seen(VerdictMemo(), "one", "two")
    memo.remember("one", "secret", "$2y$hash")
    assert memo.knows("one", "secret", "$2y$hash")
    assert not memo.knows("one", "secret2", "$2y$hash")
    assert not memo.knows("one", "secret", "$2y$other")  # a new hash is a new question
    assert not memo.knows("two", "secret", "$2y$hash")


def test_never_holds_the_access_token() -> None:
    memo = seen(VerdictMemo(), "one")
    memo.remember("one", "rasmuslerdorf", "$2y$hash")
    assert "rasmuslerdorf" not in repr(vars(memo))
    assert b"rasmuslerdorf" not in repr(vars(memo)).encode()


def test_a_lone_surrogate_is_a_key_like_any_other() -> None:
    memo = seen(VerdictMemo(), "one")
    assert not memo.knows("one", "\ud800", "$2y$hash")
    memo.remember("one", "\ud800", "$2y$hash")
    assert memo.knows("one", "\ud800", "$2y$hash")


def test_least_recently_used_go_first() -> None:
    memo = seen(VerdictMemo(size=2), "one")
    memo.remember("one", "a", "h")
    memo.remember("one", "b", "h")
    assert memo.knows("one", "a", "h")  # now b is the least recently used
    memo.remember("one", "c", "h")
    assert len(memo) == 2
    assert memo.knows("one", "a", "h") and memo.knows("one", "c", "h")
    assert not memo.knows("one", "b", "h")


def test_eviction_keeps_forgetting_by_token_consistent() -> None:
    memo = seen(VerdictMemo(size=1), "one", "two")
    memo.remember("one", "a", "h")
    memo.remember("two", "a", "h")  # evicts one's
    memo.observe("one", S2)  # forgets one's verdicts: none left, and no error
    assert memo.knows("two", "a", "h") and len(memo) == 1


def test_a_change_from_outside_forgets_that_token_only() -> None:
    memo = seen(VerdictMemo(), "one", "two")
    memo.remember("one", "a", "h")
    memo.remember("one", "b", "h")
    memo.remember("two", "a", "h")
    memo.observe("one", S1)  # the file we already knew
    assert memo.knows("one", "a", "h")
    memo.observe("one", S2)  # someone else rewrote it
    assert not memo.knows("one", "a", "h") and not memo.knows("one", "b", "h")
    assert memo.knows("two", "a", "h") and len(memo) == 1


def test_our_own_writes_are_not_a_change() -> None:
    memo = seen(VerdictMemo(), "one")
    memo.remember("one", "a", "h")
    memo.wrote("one", S2)
    memo.wrote("one", S3)
    # A reader may still see the file we read, or an earlier write of ours, after a later one.
    for signature in (S3, S1, S2):
        memo.observe("one", signature)
        assert memo.knows("one", "a", "h"), signature


def test_only_the_last_few_signatures_are_known() -> None:
    memo = seen(VerdictMemo(), "one")
    memo.remember("one", "a", "h")
    for i in range(KNOWN_SIGNATURES):
        memo.wrote("one", Signature(10 + i, 100, 10 + i))
    memo.observe("one", S1)  # pushed out by our later writes: no longer recognised
    assert not memo.knows("one", "a", "h")


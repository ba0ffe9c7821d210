"""Flextype's token rules on plain dicts, and PHP's bcrypt functions: no files, no store."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import bcrypt
import pytest

from cachebus.service.auth import rules as token_rules
from cachebus.service.auth.hash import password_hash, password_verify
from cachebus.service.auth.rules import Refusal, TokenError

PHP_ACCESS = "rasmuslerdorf"  # the password of PHP's password_hash documentation example
PHP_HASH = "$2y$10$.vGA1O9wmRjrwAVXD98HNOgsNpDczlqm3Jq7KnEd1rVAGv3Fykk1a"


def token(**fields: Any) -> dict[str, Any]:
    """A valid, enabled, unlimited token's data, with ``fields`` on top (``...`` drops a key)."""
    data = {"hashed_access_token": PHP_HASH, "state": "enabled", "calls": 0, "limit_calls": 0}
    data.update(fields)
    return {k: v for k, v in data.items() if v is not ...}


def refusal(check: Any, *args: Any, **kwargs: Any) -> Refusal:
    with pytest.raises(TokenError) as info:
        check(*args, **kwargs)
    assert str(info.value) == info.value.reason  # the reason, and nothing else
    return info.value.reason


# --- step 4 ------------------------------------------------------------------


def test_a_complete_token_passes() -> None:
    token_rules.check_usable(token())
    token_rules.check_usable(token(calls=5, limit_calls=10, uuid="u", created_by="x", title="kept"))


@pytest.mark.parametrize("fields", [
    {"state": ...}, {"calls": ...}, {"limit_calls": ...},
    {"state": None}, {"calls": None}, {"limit_calls": None},  # PHP's isset(): null is missing
    {"calls": "3"}, {"limit_calls": "10"}, {"calls": 1.5}, {"limit_calls": [1]},
    {"calls": True}, {"limit_calls": False},  # YAML booleans are ints to Python, not to Flextype
])
def test_missing_null_or_non_int_fields_are_invalid(fields: dict[str, Any]) -> None:
    assert refusal(token_rules.check_fields, token(**fields)) is Refusal.INVALID_TOKEN_FILE


def test_state_is_required_but_any_value_is_a_field() -> None:
    token_rules.check_fields(token(state=""))
    token_rules.check_fields(token(state=0))


def test_is_plain_int() -> None:
    assert token_rules.is_plain_int(0) and token_rules.is_plain_int(-3) and token_rules.is_plain_int(10**30)
    for value in (True, False, 1.0, "1", None):
        assert not token_rules.is_plain_int(value), value


# --- step 5 ------------------------------------------------------------------


def test_disabled_is_refused_and_other_states_are_not() -> None:
    assert refusal(token_rules.check_state, token(state="disabled")) is Refusal.DISABLED
    for state in ("enabled", "Disabled", "paused", 1):
        token_rules.check_state(token(state=state))


def test_an_invalid_file_is_refused_as_invalid_before_its_state() -> None:
    assert refusal(token_rules.check_usable, token(state="disabled", calls=None)) is Refusal.INVALID_TOKEN_FILE


def test_check_usable_does_not_enforce_the_limit() -> None:
    token_rules.check_usable(token(calls=5, limit_calls=5))


@pytest.mark.parametrize(("calls", "limit_calls", "more", "allowed"), [
    (0, 0, 1, True),  # 0: no limit
    (10**9, 0, 10**9, True),
    (0, 1, 1, True),
    (1, 1, 1, False),
    (7, 3, 1, False),  # already past the limit
    (2, 5, 3, True),  # a batch: the 3rd call on top of 2 is the 5th
    (2, 5, 4, False),
])
def test_may_count(calls: int, limit_calls: int, more: int, allowed: bool) -> None:
    data = token(calls=calls, limit_calls=limit_calls)
    assert token_rules.may_count(data, more) is allowed
    if allowed:
        token_rules.check_limit(data, more)
    else:
        assert refusal(token_rules.check_limit, data, more) is Refusal.LIMIT_REACHED


def test_check_limit_asks_about_one_call_by_default() -> None:
    token_rules.check_limit(token(calls=2, limit_calls=3))
    assert refusal(token_rules.check_limit, token(calls=3, limit_calls=3)) is Refusal.LIMIT_REACHED


# --- step 6 ------------------------------------------------------------------


def test_stored_hash() -> None:
    assert token_rules.stored_hash(token()) == PHP_HASH
    assert refusal(token_rules.stored_hash, token(hashed_access_token=...)) is Refusal.NO_HASH
    assert refusal(token_rules.stored_hash, token(hashed_access_token=None)) is Refusal.NO_HASH
    for hashed in (12345, ["$2y$"], {"a": 1}):
        assert refusal(token_rules.stored_hash, token(hashed_access_token=hashed)) is Refusal.WRONG_ACCESS_TOKEN


def test_password_verify_takes_phps_hash() -> None:
    assert password_verify(PHP_ACCESS, PHP_HASH)
    assert not password_verify("rasmuslerdorF", PHP_HASH)
    assert not password_verify("", PHP_HASH)


def test_password_verify_looks_at_72_bytes_like_php() -> None:
    hashed = bcrypt.hashpw(b"p" * 72, bcrypt.gensalt(rounds=4)).decode()
    assert password_verify("p" * 72 + "anything after byte 72", hashed)
    assert not password_verify("p" * 71, hashed)
    # Bytes, not characters: 36 two-byte characters fill the 72.
    hashed = bcrypt.hashpw(("é" * 36).encode(), bcrypt.gensalt(rounds=4)).decode()
    assert password_verify("é" * 100, hashed)


@pytest.mark.parametrize("hashed", ["", "not a hash", "$2y$10$short", "$2y$10$\ud800"])
def test_a_malformed_hash_verifies_nothing(hashed: str) -> None:
    assert not password_verify("secret", hashed)


def test_a_lone_surrogate_fails_to_verify_rather_than_raising() -> None:
    assert not password_verify("\ud800", PHP_HASH)


def test_password_hash_writes_what_php_writes() -> None:
    hashed = password_hash("s3cret")
    assert hashed.startswith("$2y$10$") and len(hashed) == 60
    assert password_verify("s3cret", hashed) and not password_verify("s3creT", hashed)
    assert password_hash("s3cret") != hashed  # salted


@pytest.mark.processes
def test_the_rules_need_no_bcrypt() -> None:
    # errors.py imports Refusal from here, and must not pull in the service's bcrypt.
    code = "import sys, cachebus.service.auth.rules; assert 'bcrypt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

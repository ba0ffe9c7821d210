"""The token store and the admin commands together: Flextype's checks 3 to 7,
the memo, and exact call counting.

Everything runs against real token files in ``tmp_path``; the concurrency tests
use real threads and real processes sharing one directory. The parts alone are
tested in test_token_rules.py, test_token_file.py and test_token_memo.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import bcrypt
import pytest
import yaml

from cachebus.service.auth import file as token_file
from cachebus.service.auth.admin import TokenSummary, create_token, disable_token, list_tokens
from cachebus.service.auth.file import TOKEN_ID_RE
from cachebus.service.auth.hash import password_verify
from cachebus.service.auth.limits import BcryptPool, FailureLog, Overloaded
from cachebus.service.auth.rules import TokenError
from cachebus.service.auth.store import TokenStore
from cachebus.service.errors import REFUSAL_STATUS

from .support import InPlaceWriter

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tokens" / "flextype-php"
PHP_TOKEN = "flextype-php"
PHP_ACCESS = "rasmuslerdorf"  # the password of PHP's password_hash documentation example
PHP_HASH = "$2y$10$.vGA1O9wmRjrwAVXD98HNOgsNpDczlqm3Jq7KnEd1rVAGv3Fykk1a"


# --- helpers ----------------------------------------------------------------


def fast_hash(secret: str) -> str:
    """A $2y$ hash at bcrypt's lowest cost, for tests that verify many times."""
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=4)).decode()
    return "$2y$" + hashed.removeprefix("$2b$")


def write_token(tokens_dir: Path, token: str, **fields: Any) -> Path:
    """Write a token file with ``fields`` as given (``None`` drops a key)."""
    data = {"hashed_access_token": fast_hash("secret"), "state": "enabled", "calls": 0,
            "limit_calls": 0, "uuid": "00000000-0000-4000-8000-000000000000", "created_by": "tests"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    path = tokens_dir / token / "token.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def replace_file(path: Path, text: str) -> None:
    """Rewrite ``path`` the way an editor or another tool would: a new file renamed over it."""
    tmp = path.with_name("edit.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


async def call(store: TokenStore, token: str, access_token: str, *, client: str = "") -> None:
    """A counted call as the clear makes it: admitted, then durable before the answer."""
    counted = await store.admit_call(token, access_token, client=client)
    await counted.durable()


def count(store: TokenStore, token: str, access_token: str) -> None:
    """One counted call, on a loop of its own."""
    asyncio.run(call(store, token, access_token))


def verify(store: TokenStore, token: str, access_token: str) -> None:
    """One read endpoint's check, on a loop of its own."""
    asyncio.run(store.verify(token, access_token))


def failure(attempt: Coroutine[Any, Any, None]) -> tuple[int, str]:
    """The status and reason of ``attempt``'s refusal (a verb of the store, or :func:`call`)."""
    with pytest.raises(TokenError) as info:
        asyncio.run(attempt)
    # The message is the reason code, and nothing else; the HTTP layer picks the status.
    assert str(info.value) == info.value.reason
    return REFUSAL_STATUS[info.value.reason], info.value.reason


class ThreadsThatRan:
    """The names of the threads that called each of some functions, seen by a profile hook on
    this thread and on those started while it is on: where the store's work ran, with none
    of it replaced."""

    def __init__(self, **functions: Callable[..., object]) -> None:
        self._names = {function.__code__: name for name, function in functions.items()}  # type: ignore[attr-defined]
        self.threads: dict[str, set[str]] = {name: set() for name in functions}

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and (name := self._names.get(frame.f_code)) is not None:
            self.threads[name].add(threading.current_thread().name)

    def __enter__(self) -> ThreadsThatRan:
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.mkdir()
    return path


@pytest.fixture
def store(tokens: Path) -> Any:
    s = TokenStore(tokens)
    yield s
    s.close()


@pytest.fixture
def php_token(tokens: Path) -> Path:
    """The PHP-written fixture copied into ``tokens``; returns its token.yaml."""
    shutil.copytree(FIXTURE, tokens / PHP_TOKEN)
    return tokens / PHP_TOKEN / "token.yaml"


# --- step 3: the token id and the token file --------------------------------


def test_token_id_pattern() -> None:
    assert TOKEN_ID_RE.fullmatch("a" * 128)
    assert TOKEN_ID_RE.fullmatch("Ab0_-")
    for bad in ("", "a" * 129, "../x", "a/b", "a.b", ".", "..", "a\n", "a b", "é"):
        assert not TOKEN_ID_RE.fullmatch(bad), bad


@pytest.mark.parametrize("token", ["../x", "a/b", "a" * 129, "", "..", "x/../x", "/abs"])
def test_bad_ids_are_unknown_without_touching_the_disk(tmp_path: Path, token: str) -> None:
    store = TokenStore(tmp_path / "does" / "not" / "exist")
    try:
        assert failure(call(store, token, "secret")) == (401, "unknown_token")
    finally:
        store.close()
    assert not (tmp_path / "does").exists()


def test_bad_ids_are_refused_even_where_a_valid_token_file_would_be_found(tmp_path: Path, tokens: Path,
                                                                            store: TokenStore) -> None:
    # Each id names a real, valid token file if joined to the path naively.
    write_token(tmp_path, "x")  # tokens/../x
    write_token(tokens / "a", "b")  # tokens/a/b
    write_token(tokens, "a" * 129)
    (tokens / "token.yaml").write_text((tmp_path / "x" / "token.yaml").read_text())  # tokens//token.yaml
    for token in ("../x", "a/b", "a" * 129, ""):
        assert failure(call(store, token, "secret")) == (401, "unknown_token"), token
    assert read(tmp_path / "x" / "token.yaml")["calls"] == 0
    assert store.authenticator.bcrypt_calls == 0


def test_missing_token_file_is_unknown(tokens: Path, store: TokenStore) -> None:
    assert failure(store.verify("nope", "secret")) == (401, "unknown_token")
    (tokens / "empty").mkdir()
    assert failure(store.verify("empty", "secret")) == (401, "unknown_token")
    (tokens / "dir" / "token.yaml").mkdir(parents=True)
    assert failure(store.verify("dir", "secret")) == (401, "unknown_token")
    (tokens / "file").write_text("not a directory")
    assert failure(store.verify("file", "secret")) == (401, "unknown_token")


def test_missing_tokens_dir_is_unknown(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "missing")
    try:
        assert failure(store.verify("abc", "secret")) == (401, "unknown_token")
    finally:
        store.close()


# --- step 4: the token file's fields ----------------------------------------


@pytest.mark.parametrize("text", [
    "",
    "just a string\n",
    "- a\n- list\n",
    "42\n",
    "state: [unclosed\n",
    "\xff\xfe not utf-8",
])
def test_unparseable_or_non_mapping_file_is_invalid(tokens: Path, store: TokenStore, text: str) -> None:
    path = tokens / "tok" / "token.yaml"
    path.parent.mkdir()
    path.write_bytes(text.encode("latin-1"))
    assert failure(store.verify("tok", "secret")) == (400, "invalid_token_file")


@pytest.mark.parametrize("fields", [
    {"state": None},
    {"calls": None},
    {"limit_calls": None},
    {"calls": "3"},
    {"limit_calls": "10"},
    {"calls": 1.5},
    {"calls": True},
    {"limit_calls": [1]},
])
def test_missing_or_non_int_fields_are_invalid(tokens: Path, store: TokenStore, fields: dict[str, Any]) -> None:
    write_token(tokens, "tok", **fields)
    assert failure(store.verify("tok", "secret")) == (400, "invalid_token_file")


def test_null_field_counts_as_missing(tokens: Path, store: TokenStore) -> None:
    path = tokens / "tok" / "token.yaml"
    path.parent.mkdir()
    path.write_text(f"hashed_access_token: {fast_hash('secret')}\nstate: enabled\ncalls: ~\nlimit_calls: 0\n")
    assert failure(store.verify("tok", "secret")) == (400, "invalid_token_file")


def test_invalid_file_is_checked_before_the_access_token(tokens: Path, store: TokenStore) -> None:
    write_token(tokens, "tok", state=None, hashed_access_token=None)
    assert failure(store.verify("tok", "wrong")) == (400, "invalid_token_file")


# --- step 5: state and call limit --------------------------------------------


def test_disabled(tokens: Path, store: TokenStore) -> None:
    write_token(tokens, "tok", state="disabled")
    # Step 5 comes before step 6: even a wrong access token gets 400.
    assert failure(store.verify("tok", "wrong")) == (400, "disabled")
    assert failure(call(store, "tok", "secret")) == (400, "disabled")
    assert store.authenticator.bcrypt_calls == 0


def test_limit_reached(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok", calls=3, limit_calls=3)
    assert failure(call(store, "tok", "wrong")) == (400, "limit_reached")
    write_token(tokens, "tok", calls=7, limit_calls=3)
    assert failure(call(store, "tok", "secret")) == (400, "limit_reached")
    assert read(path)["calls"] == 7


def test_zero_limit_is_unlimited(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok", calls=10**9, limit_calls=0)
    count(store, "tok", "secret")
    assert read(path)["calls"] == 10**9 + 1


def test_counted_calls_stop_at_the_limit(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok", limit_calls=2)
    count(store, "tok", "secret")
    count(store, "tok", "secret")
    assert failure(call(store, "tok", "secret")) == (400, "limit_reached")
    verify(store, "tok", "secret")  # reading the record is not a call
    assert read(path)["calls"] == 2


# --- step 6: the access token ------------------------------------------------


def test_php_hash_fixture_verifies(php_token: Path, store: TokenStore) -> None:
    assert read(php_token)["hashed_access_token"] == PHP_HASH
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert failure(store.verify(PHP_TOKEN, "rasmuslerdorF")) == (401, "wrong_access_token")
    assert bcrypt.checkpw(PHP_ACCESS.encode(), PHP_HASH.encode())  # bcrypt itself takes $2y$


def test_no_hash(tokens: Path, store: TokenStore) -> None:
    write_token(tokens, "tok", hashed_access_token=None)
    assert failure(store.verify("tok", "secret")) == (401, "no_hash")


def test_wrong_access_token(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok")
    assert failure(call(store, "tok", "wrong")) == (401, "wrong_access_token")
    assert failure(store.verify("tok", "")) == (401, "wrong_access_token")
    assert read(path)["calls"] == 0


@pytest.mark.parametrize("hashed", ["", "not a hash", "$2y$10$short", 12345, ["$2y$"]])
def test_malformed_hash_is_a_wrong_access_token(tokens: Path, store: TokenStore, hashed: Any) -> None:
    write_token(tokens, "tok", hashed_access_token=hashed)
    assert failure(store.verify("tok", "secret")) == (401, "wrong_access_token")


def test_long_access_token_is_truncated_to_72_bytes_like_php(tokens: Path, store: TokenStore) -> None:
    prefix = "p" * 72
    write_token(tokens, "tok", hashed_access_token=fast_hash(prefix))
    verify(store, "tok", prefix + "anything after byte 72")
    assert failure(store.verify("tok", "x" * 1000)) == (401, "wrong_access_token")
    # Multi-byte characters: 72 bytes, not 72 characters.
    write_token(tokens, "tok", hashed_access_token=fast_hash("é" * 36))
    verify(store, "tok", "é" * 100)


def test_unencodable_access_token_fails_cleanly(tokens: Path, store: TokenStore) -> None:
    write_token(tokens, "tok")
    assert failure(store.verify("tok", "\ud800")) == (401, "wrong_access_token")


# --- step 7: counting the call -----------------------------------------------


def test_a_counted_call_increments_once_and_preserves_the_rest(php_token: Path, store: TokenStore) -> None:
    before = read(php_token)
    count(store, PHP_TOKEN, PHP_ACCESS)
    after = read(php_token)
    assert after["calls"] == before["calls"] + 1
    assert list(after) == list(before)
    assert {k: v for k, v in after.items() if k != "calls"} == {k: v for k, v in before.items() if k != "calls"}
    count(store, PHP_TOKEN, PHP_ACCESS)
    assert read(php_token)["calls"] == before["calls"] + 2
    # Nothing left behind but the lock file.
    assert sorted(p.name for p in php_token.parent.iterdir()) == [".token.yaml.lock", "token.yaml"]


def test_a_counted_call_keeps_extra_fields_and_mode(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok", title="Test", icon="fas fa-database", created_at=1585312553,
                       calls=4, note="héllo")
    path.chmod(0o640)
    fields = list(read(path))
    count(store, "tok", "secret")
    data = read(path)
    assert list(data) == fields
    assert data["calls"] == 5 and data["created_at"] == 1585312553 and data["note"] == "héllo"
    assert path.stat().st_mode & 0o777 == 0o640


def test_verify_does_not_write(php_token: Path, store: TokenStore) -> None:
    before = php_token.read_bytes()
    signature = php_token.stat().st_mtime_ns, php_token.stat().st_ino
    for _ in range(3):
        verify(store, PHP_TOKEN, PHP_ACCESS)
    assert php_token.read_bytes() == before
    assert (php_token.stat().st_mtime_ns, php_token.stat().st_ino) == signature


def test_a_refused_call_counts_nothing(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok", calls=1)
    failure(call(store, "tok", "wrong"))
    assert read(path)["calls"] == 1


# --- the memo of successful verifications ------------------------------------


def test_memo_skips_bcrypt_on_repeat(php_token: Path, store: TokenStore) -> None:
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 1
    verify(store, PHP_TOKEN, PHP_ACCESS)
    # Our own increments do not invalidate it either.
    count(store, PHP_TOKEN, PHP_ACCESS)
    count(store, PHP_TOKEN, PHP_ACCESS)
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 1
    assert read(php_token)["calls"] == 2
    # Failures are not remembered: each wrong guess pays bcrypt.
    failure(store.verify(PHP_TOKEN, "guess"))
    failure(store.verify(PHP_TOKEN, "guess"))
    assert store.authenticator.bcrypt_calls == 3


def test_memo_never_holds_the_access_token(php_token: Path, store: TokenStore) -> None:
    count(store, PHP_TOKEN, PHP_ACCESS)
    # The store's parts too: the authenticator's memo and parse cache, the counter.
    seen: set[int] = set()
    held: list[str] = []
    parts: list[object] = [store]
    while parts:
        part = parts.pop()
        if id(part) not in seen:
            seen.add(id(part))
            held.append(repr(vars(part)))
            parts += [value for value in vars(part).values()
                      if type(value).__module__.startswith("cachebus.") and hasattr(value, "__dict__")]
    assert len(held) > 3
    assert PHP_ACCESS not in "".join(held)
    assert PHP_ACCESS.encode() not in "".join(held).encode()


def test_changed_hash_invalidates_the_memo(php_token: Path, store: TokenStore) -> None:
    verify(store, PHP_TOKEN, PHP_ACCESS)
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 1
    data = read(php_token)
    data["hashed_access_token"] = fast_hash("rotated")
    replace_file(php_token, yaml.safe_dump(data, sort_keys=False))
    assert failure(store.verify(PHP_TOKEN, PHP_ACCESS)) == (401, "wrong_access_token")
    assert failure(call(store, PHP_TOKEN, PHP_ACCESS)) == (401, "wrong_access_token")
    count(store, PHP_TOKEN, "rotated")
    assert read(php_token)["calls"] == 1


def test_any_outside_change_to_the_file_invalidates_the_memo(php_token: Path, store: TokenStore) -> None:
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 1
    # Same hash, but the file changed behind the store's back: verify again.
    replace_file(php_token, php_token.read_text() + "title: edited\n")
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 2
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 2
    # Another store (another process, say) counting a call is a change too.
    other = TokenStore(php_token.parent.parent)
    try:
        count(other, PHP_TOKEN, PHP_ACCESS)
    finally:
        other.close()
    verify(store, PHP_TOKEN, PHP_ACCESS)
    assert store.authenticator.bcrypt_calls == 3


def test_memo_is_per_token_and_access_token(tokens: Path, store: TokenStore) -> None:
    write_token(tokens, "one")
    write_token(tokens, "two")
    verify(store, "one", "secret")
    verify(store, "two", "secret")
    assert store.authenticator.bcrypt_calls == 2
    assert failure(store.verify("one", "secret2")) == (401, "wrong_access_token")


# --- create, list, disable ---------------------------------------------------


def test_create_list_disable_round_trip(tmp_path: Path) -> None:
    tokens = tmp_path / "nested" / "tokens"  # created with its parents
    store = TokenStore(tokens)
    try:
        created = create_token(tokens, limit_calls=5, created_by="ops")
        assert TOKEN_ID_RE.fullmatch(created.token) and len(created.token) == 32
        assert len(created.access_token) == 32 and created.access_token != created.token
        assert created.path == tokens / created.token / "token.yaml"

        text = created.path.read_text()
        assert created.access_token not in text
        data = yaml.safe_load(text)
        assert list(data) == ["hashed_access_token", "state", "calls", "limit_calls", "uuid", "created_by"]
        assert data["hashed_access_token"].startswith("$2y$10$")
        assert (data["state"], data["calls"], data["limit_calls"], data["created_by"]) == ("enabled", 0, 5, "ops")
        assert bcrypt.checkpw(created.access_token.encode(), data["hashed_access_token"].encode())
        assert not any(created.access_token in p.read_text() for p in tokens.rglob("*") if p.is_file())

        count(store, created.token, created.access_token)
        second = create_token(tokens)
        rows = list_tokens(tokens)
        assert [r.token for r in rows] == sorted([created.token, second.token])
        row = next(r for r in rows if r.token == created.token)
        assert row == TokenSummary(token=created.token, state="enabled", calls=1, limit_calls=5,
                                   uuid=data["uuid"], created_by="ops")
        assert next(r for r in rows if r.token == second.token).created_by == "cachebus"

        disable_token(tokens, created.token)
        assert read(created.path)["state"] == "disabled"
        assert read(created.path)["calls"] == 1
        assert failure(call(store, created.token, created.access_token)) == (400, "disabled")
        assert [r.state for r in list_tokens(tokens) if r.token == created.token] == ["disabled"]
        verify(store, second.token, second.access_token)
    finally:
        store.close()


def test_create_rejects_a_negative_limit(tokens: Path) -> None:
    with pytest.raises(ValueError):
        create_token(tokens, limit_calls=-1)
    assert list(tokens.iterdir()) == []


def test_disable_unknown_token_is_a_key_error(tokens: Path) -> None:
    for token in ("0" * 32, "../x", ""):
        with pytest.raises(KeyError):
            disable_token(tokens, token)
    assert list(tokens.iterdir()) == []


def test_disable_invalidates_the_memo(tokens: Path, store: TokenStore) -> None:
    path = write_token(tokens, "tok", title="kept")
    verify(store, "tok", "secret")
    disable_token(tokens, "tok")
    assert read(path)["title"] == "kept"
    assert failure(store.verify("tok", "secret")) == (400, "disabled")


def test_list_skips_unreadable_entries(tmp_path: Path, tokens: Path, php_token: Path) -> None:
    (tokens / "no-file").mkdir()
    (tokens / "stray.txt").write_text("x")
    (tokens / "garbage").mkdir()
    (tokens / "garbage" / "token.yaml").write_text("- not\n- a mapping\n")
    write_token(tokens, "broken", state=None)
    rows = list_tokens(tokens)
    assert [r.token for r in rows] == ["broken", PHP_TOKEN]
    assert rows[0].state == "invalid"
    assert rows[1] == TokenSummary(PHP_TOKEN, "enabled", 0, 0, read(php_token)["uuid"], "admin")
    assert list_tokens(tmp_path / "missing") == []


# --- the executor --------------------------------------------------------------


def test_the_verbs_run_file_work_and_bcrypt_off_the_loop(php_token: Path, tokens: Path) -> None:
    store = TokenStore(tokens)

    async def main() -> tuple[int, str]:
        await call(store, PHP_TOKEN, PHP_ACCESS)
        await store.verify(PHP_TOKEN, PHP_ACCESS)
        await asyncio.gather(*(call(store, PHP_TOKEN, PHP_ACCESS) for _ in range(5)))
        with pytest.raises(TokenError) as info:
            await call(store, PHP_TOKEN, "wrong")
        return REFUSAL_STATUS[info.value.reason], info.value.reason

    # Reads and parses, bcrypt, writes and fsyncs (the loop only stats and locks).
    with ThreadsThatRan(read=token_file.read, bcrypt=password_verify, write=token_file.write) as ran:
        try:
            assert asyncio.run(main()) == (401, "wrong_access_token")
        finally:
            store.close()
    assert read(php_token)["calls"] == 6
    assert all(ran.threads.values()), ran.threads
    assert all(name.startswith("cachebus-auth") for names in ran.threads.values() for name in names), ran.threads


def test_a_call_is_admitted_before_its_count_is_durable_and_durable_before_answering(php_token: Path,
                                                                                    tokens: Path) -> None:
    """The clear may go out while the count's fsync runs; the answer waits for it (issue 14).

    Once the token is known, the store's one file thread is kept busy, so the count's
    write waits for it: the call is admitted all the same, and durable only once written.
    """
    release = threading.Event()
    executor = ThreadPoolExecutor(1)
    store = TokenStore(tokens, executor=executor)

    async def main() -> tuple[int, int]:
        await store.verify(PHP_TOKEN, PHP_ACCESS)  # the file parsed, the verdict remembered
        executor.submit(release.wait, 10)
        counted = await store.admit_call(PHP_TOKEN, PHP_ACCESS)
        while_held = read(php_token)["calls"]  # admitted, under the lock, before the write
        durable = asyncio.ensure_future(counted.durable())
        await asyncio.sleep(0.01)
        assert not durable.done(), "durable before the count was written"
        release.set()
        await durable
        return while_held, read(php_token)["calls"]

    try:
        assert asyncio.run(main()) == (0, 1)
    finally:
        release.set()
        store.close()
        executor.shutdown()


def test_a_remembered_verdict_is_answered_on_the_loop(php_token: Path, tokens: Path) -> None:
    executor = ThreadPoolExecutor(1)
    store = TokenStore(tokens, executor=executor)
    verify(store, PHP_TOKEN, PHP_ACCESS)
    executor.shutdown()  # from here on, any work sent to the executor fails

    async def main() -> None:
        await store.verify(PHP_TOKEN, PHP_ACCESS)  # one stat, from memory
        with pytest.raises(RuntimeError):  # a verdict not remembered needs bcrypt: the executor
            await store.verify(PHP_TOKEN, "guess")

    asyncio.run(main())
    assert store.authenticator.bcrypt_calls == 1


def test_concurrent_calls_are_group_committed_exactly(tokens: Path) -> None:
    write_token(tokens, "tok", limit_calls=30)
    store = TokenStore(tokens)

    async def main() -> list[object]:
        return await asyncio.gather(*(call(store, "tok", "secret") for _ in range(50)),
                                    return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        store.close()
    assert results.count(None) == 30
    refused = [r for r in results if r is not None]
    assert all(isinstance(r, TokenError) and r.reason == "limit_reached" for r in refused)
    assert read(tokens / "tok" / "token.yaml")["calls"] == 30
    assert store.counter.commits < 30, "calls that arrive together share one write"
    assert store.authenticator.bcrypt_calls <= 4, "only the first, concurrent, cold checks pay bcrypt"


def test_close_leaves_a_given_executor_running(php_token: Path, tokens: Path) -> None:
    with ThreadPoolExecutor(1) as executor:
        store = TokenStore(tokens, executor=executor)
        store.close()
        assert executor.submit(lambda: 42).result() == 42


# --- exact counts under concurrency --------------------------------------------


def test_exact_count_across_threads(tokens: Path) -> None:
    """Stores on threads of their own, each on its own loop as a service process is, share the files."""
    path = write_token(tokens, "tok", title="kept")
    barrier = threading.Barrier(10)
    errors: list[BaseException] = []

    def worker() -> None:
        store = TokenStore(tokens)
        try:
            barrier.wait()
            for _ in range(5):
                count(store, "tok", "secret")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = read(path)
    assert data["calls"] == 50 and data["title"] == "kept"


def test_limit_is_exact_across_threads(tokens: Path) -> None:
    path = write_token(tokens, "tok", limit_calls=17)
    barrier = threading.Barrier(8)
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        store = TokenStore(tokens)
        barrier.wait()
        for _ in range(5):
            try:
                count(store, "tok", "secret")
                outcome = "ok"
            except TokenError as exc:
                outcome = exc.reason
            with lock:
                results.append(outcome)
        store.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 17
    assert results.count("limit_reached") == 40 - 17
    assert read(path)["calls"] == 17


CHILD = """
import asyncio, json, sys
from cachebus.service.auth.rules import TokenError
from cachebus.service.auth.store import TokenStore

tokens_dir, token, access, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


async def calls(store):
    outcomes = []
    for _ in range(n):
        try:
            counted = await store.admit_call(token, access)
            await counted.durable()
            outcomes.append("ok")
        except TokenError as exc:
            outcomes.append(exc.reason)
    return outcomes


store = TokenStore(tokens_dir)
print("ready", flush=True)
sys.stdin.readline()  # start together with the other process
outcomes = asyncio.run(calls(store))
store.close()
print(json.dumps(outcomes), flush=True)
"""


def run_processes(tokens: Path, token: str, access: str, count: int, per_process: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tokens), token, access, str(per_process)],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(count)]
    outcomes: list[str] = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", (line, p.stderr.read() if p.stderr else "")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outcomes += json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outcomes


@pytest.mark.processes
def test_exact_count_across_processes(tokens: Path) -> None:
    path = write_token(tokens, "tok", title="kept")
    outcomes = run_processes(tokens, "tok", "secret", count=2, per_process=25)
    assert outcomes == ["ok"] * 50
    data = read(path)
    assert data["calls"] == 50 and data["title"] == "kept"


@pytest.mark.processes
def test_limit_is_exact_across_processes(tokens: Path) -> None:
    path = write_token(tokens, "tok", limit_calls=30)
    outcomes = run_processes(tokens, "tok", "secret", count=2, per_process=25)
    assert outcomes.count("ok") == 30
    assert outcomes.count("limit_reached") == 20
    assert read(path)["calls"] == 30


# --- the cost ceiling ------------------------------------------------------------

#: A well-formed bcrypt hash of cost 31, which would take days to check.
COST_31 = "$2y$31$" + "a" * 53


@pytest.mark.parametrize("hashed", [COST_31, "$2b$15$" + "a" * 53, "$2a$99$" + "a" * 53])
def test_a_hash_above_the_cost_ceiling_is_refused_without_bcrypt(tokens: Path, store: TokenStore,
                                                                    hashed: str) -> None:
    path = write_token(tokens, "tok", hashed_access_token=hashed)
    assert failure(store.verify("tok", "secret")) == (401, "hash_too_costly")
    assert failure(call(store, "tok", "secret")) == (401, "hash_too_costly")
    assert store.authenticator.bcrypt_calls == 0
    assert read(path)["calls"] == 0

    async def main() -> None:
        with pytest.raises(TokenError) as info:
            await call(store, "tok", "secret", client="127.0.0.2")
        assert info.value.reason == "hash_too_costly"

    asyncio.run(main())
    assert store.authenticator.bcrypt_calls == 0


def test_the_cost_ceiling_is_a_setting(tokens: Path) -> None:
    write_token(tokens, "tok")  # cost 4
    store = TokenStore(tokens, max_bcrypt_cost=4)
    try:
        count(store, "tok", "secret")
        write_token(tokens, "tok", hashed_access_token="$2y$05$" + fast_hash("secret")[7:])
        assert failure(store.verify("tok", "secret")) == (401, "hash_too_costly")
    finally:
        store.close()


# --- the abuse limits, through the store ---------------------------------------------


def limited_store(tokens: Path, failures: int = 3, **pool: int) -> TokenStore:
    return TokenStore(tokens, pool=BcryptPool(**pool) if pool else None,
                      failures=FailureLog(limit=failures, window=60))


def test_bcrypt_runs_on_its_own_threads_and_files_on_theirs(php_token: Path, tokens: Path) -> None:
    store = TokenStore(tokens)

    async def main() -> None:
        await call(store, PHP_TOKEN, PHP_ACCESS)
        with pytest.raises(TokenError):
            await store.verify(PHP_TOKEN, "wrong")

    with ThreadsThatRan(bcrypt=password_verify, files=token_file.read) as ran:
        try:
            asyncio.run(main())
        finally:
            store.close()
    assert ran.threads["bcrypt"] and all(n.startswith("cachebus-auth-bcrypt") for n in ran.threads["bcrypt"])
    assert ran.threads["files"] and all(n.startswith("cachebus-auth-io") for n in ran.threads["files"])


def test_an_address_that_keeps_failing_is_slowed_and_its_owner_is_not(tokens: Path) -> None:
    path = write_token(tokens, "tok")
    store = limited_store(tokens)

    async def attempt(access_token: str, client: str) -> str:
        try:
            await call(store, "tok", access_token, client=client)
            return "ok"
        except TokenError as exc:
            return exc.reason
        except Overloaded as exc:
            assert exc.retry_after >= 1
            return exc.why

    async def main() -> None:
        assert await attempt("secret", "127.0.0.1") == "ok"  # remembered from here on
        attacker = [await attempt(f"guess-{i}", "127.0.0.2") for i in range(6)]
        assert attacker == ["wrong_access_token"] * 3 + ["too_many_failures"] * 3
        # At once, the attempts under way count as failures to come: still 3 in all.
        at_once = await asyncio.gather(*(attempt(f"again-{i}", "127.0.0.3") for i in range(6)))
        assert sorted(at_once) == ["too_many_failures"] * 3 + ["wrong_access_token"] * 3
        calls = store.authenticator.bcrypt_calls
        # Slowed: refused before the disk and bcrypt, whatever the token.
        assert await attempt("guess", "127.0.0.2") == "too_many_failures"
        with pytest.raises(Overloaded):
            await store.verify("no-such-token", "x", client="127.0.0.2")
        assert store.authenticator.bcrypt_calls == calls
        # The owner, from its own address, cold or warm, is not slowed.
        assert await attempt("secret", "127.0.0.1") == "ok"
        assert await attempt("wrong", "127.0.0.1") == "wrong_access_token"
        # A credential already verified gets through even from the slowed address.
        assert await attempt("secret", "127.0.0.2") == "ok"

    try:
        asyncio.run(main())
    finally:
        store.close()
    assert read(path)["calls"] == 3


def test_only_failed_authentications_count_against_an_address(tokens: Path) -> None:
    """A disabled token, a reached limit, a broken file: the token's state, not a guess."""
    write_token(tokens, "tok", state="disabled")
    store = limited_store(tokens)

    async def main() -> list[str]:
        outcomes = []
        for _ in range(6):
            try:
                await call(store, "tok", "secret", client="127.0.0.2")
            except TokenError as exc:
                outcomes.append(exc.reason)
        return outcomes

    try:
        assert asyncio.run(main()) == ["disabled"] * 6
    finally:
        store.close()


def test_concurrent_identical_verifications_share_one_bcrypt(tokens: Path) -> None:
    write_token(tokens, "tok")
    store = limited_store(tokens, threads=1, queue=0, per_address=1, per_address_queue=0)

    async def main() -> list[object]:
        return await asyncio.gather(*(store.verify("tok", "secret", client="127.0.0.1")
                                      for _ in range(20)), return_exceptions=True)

    try:
        assert asyncio.run(main()) == [None] * 20  # no queue at all, yet nothing refused
    finally:
        store.close()
    assert store.authenticator.bcrypt_calls == 1


def test_close_answers_waiting_verifications_with_stopping(tokens: Path) -> None:
    write_token(tokens, "tok", hashed_access_token=bcrypt.hashpw(b"secret", bcrypt.gensalt(12)).decode())
    store = limited_store(tokens, failures=0, threads=1, queue=10, per_address=1, per_address_queue=10)

    async def main() -> list[object]:
        calls = [asyncio.ensure_future(call(store, "tok", f"guess-{i}", client="127.0.0.2"))
                 for i in range(8)]
        while store.pool.admitted < 8:
            assert not any(call.done() for call in calls), calls
            await asyncio.sleep(0.001)
        store.close()
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, Overloaded) and o.why == "stopping" for o in outcomes), outcomes
    assert store.authenticator.bcrypt_calls <= 1  # at most the one already running


# --- reading while Flextype's PHP writes in place ------------------------------------


@pytest.mark.processes
@pytest.mark.parametrize("lock", [True, False], ids=["writer-holds-the-lock", "writer-without-lock"])
def test_in_place_writes_never_cause_a_false_refusal_and_counts_stay_exact(tokens: Path, lock: bool) -> None:
    path = write_token(tokens, "tok", title="kept")
    store = TokenStore(tokens)
    clears, reads = 150, 150

    async def main() -> list[object]:
        outcomes: list[object] = []
        for _ in range(clears // 10):
            outcomes += await asyncio.gather(*(call(store, "tok", "secret", client="127.0.0.1") for _ in range(10)),
                                             *(store.verify("tok", "secret", client="127.0.0.1") for _ in range(10)),
                                             return_exceptions=True)
        return outcomes

    try:
        with InPlaceWriter(path, lock=lock) as writer:
            outcomes = asyncio.run(main())
    finally:
        store.close()
    assert writer.rounds > 0
    assert [o for o in outcomes if o is not None] == []
    assert len(outcomes) == clears + reads
    data = read(path)
    assert data["calls"] == clears and data["title"] == "kept"

"""The token file alone: finding, reading, locking and replacing ``token.yaml``."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cachebus.service import token_file
from cachebus.service.token_file import Signature
from cachebus.service.token_rules import Refusal, TokenError

DATA = {"hashed_access_token": "$2y$10$x", "state": "enabled", "calls": 3, "limit_calls": 0,
        "title": "héllo", "created_at": 1585312553}


def refusal(call: Any, *args: Any) -> Refusal:
    with pytest.raises(TokenError) as info:
        call(*args)
    return info.value.reason


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "tok"
    path.mkdir()
    return path


def test_token_dir_builds_a_path_only_from_a_plain_id(tmp_path: Path) -> None:
    assert token_file.token_dir(tmp_path, "Ab0_-") == tmp_path / "Ab0_-"
    for bad in ("", "a" * 129, "../x", "a/b", ".", "..", "a\n", "é"):
        assert refusal(token_file.token_dir, tmp_path, bad) is Refusal.UNKNOWN_TOKEN, bad


def test_write_then_read_round_trip(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    written = token_file.write(path, DATA)
    data, read = token_file.read(path)
    assert data == DATA and list(data) == list(DATA)  # keys keep their order
    assert "héllo" in path.read_text(encoding="utf-8")  # unicode as is, not escaped
    assert read == written == Signature.of(os.stat(path)) == token_file.signature(path)
    assert path.stat().st_mode & 0o777 == token_file.NEW_FILE_MODE
    assert [p.name for p in directory.iterdir()] == [token_file.TOKEN_FILE]  # no temporary left


def test_write_keeps_the_mode(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    token_file.write(path, DATA)
    path.chmod(0o640)
    token_file.write(path, {**DATA, "calls": 4})
    assert path.stat().st_mode & 0o777 == 0o640
    assert token_file.read(path)[0]["calls"] == 4


def test_before_rename_sees_the_signature_the_file_will_have(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    token_file.write(path, DATA)
    old = token_file.signature(path)
    seen: list[tuple[Signature, Signature]] = []

    def before_rename(signature: Signature) -> None:
        seen.append((signature, token_file.signature(path)))

    new = token_file.write(path, {**DATA, "calls": 4}, before_rename)
    assert seen == [(new, old)]  # told before the new file was in place
    assert token_file.signature(path) == new != old


def test_a_failed_write_leaves_the_old_file_and_no_temporary(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    token_file.write(path, DATA)
    before = path.read_bytes()

    def fail(signature: Signature) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        token_file.write(path, {**DATA, "calls": 4}, fail)
    assert path.read_bytes() == before
    assert [p.name for p in directory.iterdir()] == [token_file.TOKEN_FILE]


def test_the_signature_changes_with_every_write(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    signatures = {token_file.write(path, DATA) for _ in range(20)}
    assert len(signatures) == 20  # same content each time: the inode tells them apart


def test_missing_files_are_unknown(tmp_path: Path, directory: Path) -> None:
    for path in (directory / token_file.TOKEN_FILE, tmp_path / "nope" / token_file.TOKEN_FILE):
        assert refusal(token_file.read, path) is Refusal.UNKNOWN_TOKEN
        assert refusal(token_file.signature, path) is Refusal.UNKNOWN_TOKEN
    (tmp_path / "file").write_text("x")
    assert refusal(token_file.read, tmp_path / "file" / token_file.TOKEN_FILE) is Refusal.UNKNOWN_TOKEN


def test_a_non_regular_file_is_refused_without_blocking(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    os.mkfifo(path)  # opening a FIFO for reading would wait for a writer without O_NONBLOCK
    started = time.monotonic()
    assert refusal(token_file.read, path) is Refusal.UNKNOWN_TOKEN
    assert time.monotonic() - started < 5
    path.unlink()
    path.mkdir()
    assert refusal(token_file.read, path) is Refusal.UNKNOWN_TOKEN


def test_a_file_over_the_size_cap_is_invalid(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    filler = "# " + "x" * 98 + "\n"
    body = "state: enabled\ncalls: 0\nlimit_calls: 0\n"
    path.write_text(body + filler * ((token_file.MAX_TOKEN_FILE - len(body)) // len(filler)))
    assert path.stat().st_size <= token_file.MAX_TOKEN_FILE
    assert token_file.read(path)[0]["state"] == "enabled"
    path.write_text(body + filler * (token_file.MAX_TOKEN_FILE // len(filler) + 1))
    assert refusal(token_file.read, path) is Refusal.INVALID_TOKEN_FILE


@pytest.mark.parametrize("raw", [b"", b"just a string\n", b"- a\n- list\n", b"42\n", b"state: [unclosed\n",
                                 b"\xff\xfe not utf-8", b"a: " + b"[" * 5000 + b"]" * 5000])
def test_what_is_not_a_yaml_mapping_is_invalid(directory: Path, raw: bytes) -> None:
    path = directory / token_file.TOKEN_FILE
    path.write_bytes(raw)
    assert refusal(token_file.read, path) is Refusal.INVALID_TOKEN_FILE


def test_locked_excludes_other_threads(directory: Path) -> None:
    inside = threading.Event()
    order: list[str] = []

    def other() -> None:
        inside.wait()
        with token_file.locked(directory):
            order.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    with token_file.locked(directory):
        inside.set()
        time.sleep(0.2)  # time enough for the other thread to reach flock
        order.append("first")
    thread.join(5)
    assert order == ["first", "other"]
    assert (directory / token_file.LOCK_FILE).exists()


def test_locked_in_a_missing_directory_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(TokenError) as info, token_file.locked(tmp_path / "nope"):
        pass  # pragma: no cover
    assert info.value.reason is Refusal.UNKNOWN_TOKEN
    assert not (tmp_path / "nope").exists()

"""The token file alone: finding, reading, locking and replacing ``token.yaml``."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cachebus.service.auth import file as token_file
from cachebus.service.auth.file import Signature
from cachebus.service.auth.rules import Refusal, TokenError
from cachebus.testing import DEADLINE, wait_for

from .support import InPlaceWriter

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
    refused: list[Refusal] = []
    reader = threading.Thread(target=lambda: refused.append(refusal(token_file.read, path)), daemon=True)
    reader.start()
    reader.join(DEADLINE)  # no writer ever comes: a read that waits for one never returns
    blocked = reader.is_alive()
    if blocked:  # let it go, so that the test ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert not blocked, "reading the FIFO waited for a writer"
    assert refused == [Refusal.UNKNOWN_TOKEN]
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


def waiting_on_flock(path: Path) -> bool:
    """Whether something waits for an ``flock`` on ``path``: /proc/locks lists each waiter after "->"."""
    st = path.stat()
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return any(fields[1:3] == ["->", "FLOCK"] and file_id in fields for fields in map(str.split, f))


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
        wait_for(lambda: waiting_on_flock(directory / token_file.LOCK_FILE), what="the other thread to wait in flock")
        order.append("first")
    thread.join(5)
    assert order == ["first", "other"]
    assert (directory / token_file.LOCK_FILE).exists()


def test_locked_in_a_missing_directory_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(TokenError) as info, token_file.locked(tmp_path / "nope"):
        pass  # pragma: no cover
    assert info.value.reason is Refusal.UNKNOWN_TOKEN
    assert not (tmp_path / "nope").exists()


# --- links, odd lock files, deep nesting ------------------------------------------


def test_a_linked_token_directory_is_unknown_and_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    token_file.write(outside / token_file.TOKEN_FILE, DATA)
    before = (outside / token_file.TOKEN_FILE).read_bytes()
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "tok").symlink_to(outside)
    path = tokens / "tok" / token_file.TOKEN_FILE
    assert refusal(token_file.signature, path) is Refusal.UNKNOWN_TOKEN
    assert refusal(token_file.read, path) is Refusal.UNKNOWN_TOKEN
    assert refusal(lambda: token_file.write(path, {**DATA, "calls": 99})) is Refusal.UNKNOWN_TOKEN
    with pytest.raises(TokenError) as info, token_file.locked(tokens / "tok"):
        pass  # pragma: no cover
    assert info.value.reason is Refusal.UNKNOWN_TOKEN
    assert sorted(p.name for p in outside.iterdir()) == [token_file.TOKEN_FILE]  # no lock, no temporary
    assert (outside / token_file.TOKEN_FILE).read_bytes() == before


def test_a_linked_token_file_is_unknown_and_never_replaced(tmp_path: Path, directory: Path) -> None:
    target = tmp_path / "elsewhere.yaml"
    token_file.write(target, DATA)
    before = target.read_bytes()
    path = directory / token_file.TOKEN_FILE
    path.symlink_to(target)
    assert refusal(token_file.signature, path) is Refusal.UNKNOWN_TOKEN
    assert refusal(token_file.read, path) is Refusal.UNKNOWN_TOKEN
    assert refusal(lambda: token_file.write(path, {**DATA, "calls": 99})) is Refusal.UNKNOWN_TOKEN
    assert path.is_symlink() and target.read_bytes() == before
    assert [p.name for p in directory.iterdir()] == [token_file.TOKEN_FILE]  # no temporary left


@pytest.mark.parametrize("make", ["directory", "link", "dangling link", "fifo"])
def test_a_lock_file_that_is_not_a_file_is_the_invalid_file_refusal(tmp_path: Path, directory: Path,
                                                                     make: str) -> None:
    path = directory / token_file.TOKEN_FILE
    token_file.write(path, DATA)
    lock = directory / token_file.LOCK_FILE
    victim = tmp_path / "victim"
    if make == "directory":
        lock.mkdir()
    elif make == "link":
        victim.write_text("x")
        lock.symlink_to(victim)
    elif make == "dangling link":
        lock.symlink_to(victim)  # O_CREAT through it would create the victim
    else:
        os.mkfifo(lock)
    with pytest.raises(TokenError) as info, token_file.locked(directory):
        pass  # pragma: no cover
    assert info.value.reason is Refusal.INVALID_TOKEN_FILE
    assert refusal(token_file.read, path) is Refusal.INVALID_TOKEN_FILE
    assert not victim.exists() or victim.read_text() == "x"


@pytest.mark.parametrize("depth", [token_file.MAX_DEPTH + 1, 500, 990])
def test_a_file_nested_too_deep_is_invalid(directory: Path, depth: int) -> None:
    path = directory / token_file.TOKEN_FILE
    path.write_text("state: enabled\ncalls: 0\nlimit_calls: 0\nx: " + "[" * depth + "]" * depth + "\n")
    assert refusal(token_file.read, path) is Refusal.INVALID_TOKEN_FILE


def test_nesting_up_to_the_limit_reads_and_writes_back(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    depth = token_file.MAX_DEPTH - 1  # the mapping itself is one level
    path.write_text("state: enabled\ncalls: 0\nlimit_calls: 0\nx: " + "[" * depth + "]" * depth + "\n")
    data, _ = token_file.read(path)
    token_file.write(path, data)
    assert token_file.read(path)[0] == data


def test_shared_aliases_are_walked_once(directory: Path) -> None:
    # Nine levels of nine aliases each: 9**9 paths, 9 containers.
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = directory / token_file.TOKEN_FILE
    path.write_text("\n".join(lines) + "\nstate: enabled\ncalls: 0\nlimit_calls: 0\n")
    assert token_file.read(path)[0]["state"] == "enabled"


# --- a killed writer's temporary files ---------------------------------------------


def test_stale_temporaries_are_removed_only_where_ours_would_be(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    (tokens / "tok").mkdir(parents=True)
    token_file.write(tokens / "tok" / token_file.TOKEN_FILE, DATA)
    ours = [".token.yaml.0123456789abcdef.tmp", ".token.yaml.k3j_x9a2.tmp"]  # this version's; mkstemp's
    for name in ours:
        (tokens / "tok" / name).write_text("half a file")
    kept = [tokens / "tok" / "notes.tmp", tokens / "tok" / ".token.yaml.tmp", tokens / ".token.yaml.abcdefgh.tmp",
            tmp_path / "outside" / ".token.yaml.abcdefgh.tmp"]
    kept[-1].parent.mkdir()
    for path in kept:
        path.write_text("not ours")
    (tokens / "linked").symlink_to(tmp_path / "outside")  # not followed
    (tokens / "tok" / ".token.yaml.directory1.tmp").mkdir()  # not a file
    assert token_file.remove_stale_temporaries(tokens) == 2
    assert all(path.exists() for path in kept)
    assert sorted(p.name for p in (tokens / "tok").iterdir()) == [
        ".token.yaml.directory1.tmp", ".token.yaml.lock", ".token.yaml.tmp", "notes.tmp", "token.yaml"]
    assert token_file.remove_stale_temporaries(tmp_path / "missing") == 0


def test_stale_temporaries_of_a_live_writer_are_kept(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    (tokens / "tok").mkdir(parents=True)
    token_file.write(tokens / "tok" / token_file.TOKEN_FILE, DATA)
    temporary = tokens / "tok" / ".token.yaml.0123456789abcdef.tmp"
    temporary.write_text("being written")
    with token_file.locked(tokens / "tok"):  # a writer at work
        assert token_file.remove_stale_temporaries(tokens) == 0
    assert temporary.exists()
    assert token_file.remove_stale_temporaries(tokens) == 1
    assert not temporary.exists()


def test_write_names_its_temporary_so_that_cleaning_would_find_it(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    names: list[str] = []

    def before_rename(signature: Signature) -> None:
        names.extend(p.name for p in directory.iterdir() if p.name != token_file.TOKEN_FILE)

    token_file.write(path, DATA, before_rename)
    assert len(names) == 1 and token_file.TEMP_FILE_RE.fullmatch(names[0])


# --- reading while someone writes in place -----------------------------------------

@pytest.mark.processes
def test_a_writer_holding_the_lock_is_never_seen_half_done(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    token_file.write(path, DATA)
    with token_file.locked(directory):
        pass  # the lock file exists from the start, as once anyone has locked it
    with InPlaceWriter(path, lock=True) as writer:
        # Read once only: no re-reading hides a torn file; the shared lock alone must.
        results = [token_file.read(path, patience=0)[0] for _ in range(2000)]
    assert writer.rounds > 0
    assert all(data == DATA for data in results)


@pytest.mark.processes
def test_a_writer_without_the_lock_is_read_again_until_whole(directory: Path) -> None:
    path = directory / token_file.TOKEN_FILE
    token_file.write(path, DATA)
    with InPlaceWriter(path, lock=False) as writer:
        results = [token_file.read(path)[0] for _ in range(500)]
    assert writer.rounds > 0
    assert all(data == DATA for data in results)

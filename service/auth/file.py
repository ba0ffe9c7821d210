"""One token's file on disk: find it, read it, lock it, replace it.

A token is a directory ``<tokens_dir>/<token>/`` holding ``token.yaml``, as in
a Flextype project. Several threads and several service processes may share
the directory, an admin or an editor may rewrite a file at any time, and
Flextype's own PHP rewrites it in place, with no lock at all. So:

- :func:`read` parses what one open file holds, and returns its
  :class:`Signature` taken from that same open file. It reads under a shared
  ``flock`` (the lock writers take), and a file that does not parse, or lacks
  Flextype's fields, is read again a few times before it counts as invalid:
  a writer that truncates and then writes leaves an empty or half-written
  file for a moment, which is not the file's real content.
- :func:`locked` is an exclusive ``flock`` on a lock file beside it. The lock
  is not on ``token.yaml`` itself because :func:`write` replaces that file,
  and a lock on a replaced inode would exclude no one.
- :func:`write` never leaves a torn file: a reader sees the old content or
  the new, and after a crash the new content is on disk or the old is.
  :func:`remove_stale_temporaries` removes what a ``kill -9`` left behind.
- Nothing follows a symbolic link out of the tokens directory: the token's
  directory, ``token.yaml`` and the lock file are opened relative to a
  directory descriptor with ``O_NOFOLLOW``, and a write never replaces a link.
  (``tokens_dir`` itself is the operator's choice, and may be a link.)

Files that are missing, links, not regular files, too big, nested too deep or
not a YAML mapping are refused with a :class:`~.rules.TokenError`, like
any other bad token.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .rules import Refusal, TokenData, TokenError, check_fields

log = logging.getLogger("cachebus.tokens")

# libyaml's parser and emitter when PyYAML has them: several times faster, and
# every clear reads and rewrites a token file.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

#: Token ids that may name a directory. Anything else is refused before a path
#: is built from it, which rules out path traversal (no ``.``, no ``/``).
TOKEN_ID_RE: re.Pattern[str] = re.compile(r"[a-zA-Z0-9_-]{1,128}")

TOKEN_FILE = "token.yaml"
LOCK_FILE = ".token.yaml.lock"
#: The temporary files :func:`write` makes beside ``token.yaml``: ``.token.yaml.<random>.tmp``.
#: Also matches the names earlier versions made with ``tempfile.mkstemp``.
TEMP_FILE_RE: re.Pattern[str] = re.compile(r"\.token\.yaml\.[a-z0-9_]{8,32}\.tmp")

#: Larger token files are refused as invalid rather than parsed (Flextype's are
#: a few hundred bytes).
MAX_TOKEN_FILE = 1 << 20
#: Deeper nesting is refused as invalid. Flextype's token files are flat; a deep
#: one would only exhaust the recursion of the YAML emitter when we write it back.
MAX_DEPTH = 32
#: Seconds a file that does not parse, or lacks Flextype's fields, is read
#: again while it is empty or changing, before it counts as invalid; and the
#: first and the longest pause between two reads. A PHP truncate-then-write
#: leaves the file empty for microseconds, but one rewriting in a loop on a
#: journalling file system keeps it empty most of the time, for up to tens of
#: milliseconds at once: many short pauses find a moment it is whole. The
#: store remembers a file found invalid, so this is spent once per change.
READ_PATIENCE = 1.0
READ_BACKOFF = 0.001
READ_BACKOFF_MAX = 0.004
#: Reads that find a non-empty invalid file unchanged (same signature) before
#: it counts as invalid without waiting out the patience.
SETTLED_READS = 2
#: How long a reader waits for a writer's exclusive lock before it reads anyway:
#: our own writes replace the file atomically, so the lock only guards against
#: in-place writers (and re-reading still does), and a stuck lock holder must
#: not stall reads for ever. The wait polls, every :data:`SHARED_LOCK_POLL` at
#: most: a writer that takes the lock again at once would starve a blocked reader.
SHARED_LOCK_WAIT = 2.0
SHARED_LOCK_POLL = 0.0005
#: The mode of a new token file: it holds a hash, so only its owner reads it.
NEW_FILE_MODE = 0o600

# O_NOFOLLOW refuses a link as the last component; O_CLOEXEC keeps the
# descriptors out of any child process.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted as a file must not hang the open.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class UnreadableFile(TokenError):
    """An invalid token file that could not be parsed, with the signature of the very file read.

    The store remembers that signature, so that the same broken file is
    refused at once next time rather than read again. Not when the read found
    no bytes (``empty``): that is what a torn write looks like, and the file's
    size as ``fstat`` saw it a moment before may be the whole file's.
    """

    def __init__(self, signature: Signature, *, empty: bool) -> None:
        super().__init__(Refusal.INVALID_TOKEN_FILE)
        self.signature = signature
        self.empty = empty


class Signature(NamedTuple):
    """What changes whenever a token file is rewritten, in place or by rename.

    Comparing signatures tells "the file I parsed" from "some other file"
    with one ``stat``. The inode is part of it because a rename can bring in
    a file of the same size within the clock's resolution.
    """

    mtime_ns: int
    size: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


def token_dir(tokens_dir: Path, token: str) -> Path:
    """``<tokens_dir>/<token>``, for an id that can name nothing else.

    Flextype's step 3: an id that does not match :data:`TOKEN_ID_RE` is an
    unknown token, refused without touching the disk.
    """
    if not TOKEN_ID_RE.fullmatch(token):
        raise TokenError(Refusal.UNKNOWN_TOKEN)
    return tokens_dir / token


def signature(path: Path) -> Signature:
    """The signature ``path`` has now; a missing file, or a link, is an unknown token.

    ``lstat`` on the token's directory and on the file: neither may be a link.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path.parent).st_mode):
            raise TokenError(Refusal.UNKNOWN_TOKEN)
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise TokenError(Refusal.UNKNOWN_TOKEN) from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenError(Refusal.UNKNOWN_TOKEN)
    return Signature.of(st)


@contextlib.contextmanager
def _directory(directory: Path) -> Iterator[int]:
    """A descriptor of the token's directory, which must not be a link."""
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise TokenError(Refusal.UNKNOWN_TOKEN) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link: not followed out of the tokens directory
            raise TokenError(Refusal.UNKNOWN_TOKEN) from None
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def read(path: Path, *, lock: bool = True, patience: float = READ_PATIENCE) -> tuple[TokenData, Signature]:
    """The parsed token file and the signature of the very file parsed.

    With ``lock`` the file is read under a shared ``flock``; pass False when
    the caller already holds the exclusive one (:func:`locked`). A file that
    does not parse or lacks Flextype's fields is read again, for up to
    ``patience`` seconds while it is empty or changing, and then the last
    outcome stands, so step 4 still decides in Flextype's order. A file that
    stays the same for :data:`SETTLED_READS` more reads is what it is: a broken
    file costs a few milliseconds, not the whole patience.
    """
    deadline = time.monotonic() + patience
    delay = READ_BACKOFF
    previous: Signature | None = None
    unchanged = 0
    with _directory(path.parent) as dir_fd:
        while True:
            last = time.monotonic() >= deadline
            error: UnreadableFile | None = None
            try:
                data, sig = _read_once(dir_fd, path.name, lock=lock)
            except UnreadableFile as exc:
                if last:
                    raise
                error, sig = exc, exc.signature
            else:
                if last or _has_fields(data):
                    return data, sig
            unchanged = unchanged + 1 if sig == previous else 0
            previous = sig
            if (error is None or not error.empty) and unchanged >= SETTLED_READS:
                if error is not None:
                    raise error
                return data, sig
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, READ_BACKOFF_MAX)


def _has_fields(data: TokenData) -> bool:
    try:
        check_fields(data)
    except TokenError:
        return False
    return True


def _read_once(dir_fd: int, name: str, *, lock: bool) -> tuple[TokenData, Signature]:
    with _shared_lock(dir_fd) if lock else contextlib.nullcontext():
        try:
            fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise TokenError(Refusal.UNKNOWN_TOKEN) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # token.yaml is a link
                raise TokenError(Refusal.UNKNOWN_TOKEN) from None
            raise
        try:
            # Stat the open file, not the path: a rename between the two would
            # pair one version's content with another's signature.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TokenError(Refusal.UNKNOWN_TOKEN)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_TOKEN_FILE + 1)
        finally:
            os.close(fd)
    unreadable = UnreadableFile(Signature.of(st), empty=not raw)
    if len(raw) > MAX_TOKEN_FILE:
        raise unreadable
    # RecursionError: PyYAML's pure-Python parser recurses on deeply nested
    # collections (libyaml stops at a depth limit with a YAMLError instead).
    try:
        data = yaml.load(raw, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        raise unreadable from None
    if not isinstance(data, dict) or _too_deep(data):
        raise unreadable
    return data, unreadable.signature


def _too_deep(data: Any) -> bool:
    """Whether ``data`` nests deeper than :data:`MAX_DEPTH`; iterative, each container once.

    Each container is visited once because YAML aliases can share one many
    times: walking every path could take exponential time.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(node, (dict, list)) and id(node) not in seen:
            seen.add(id(node))
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


def _open_lock_file(dir_fd: int, *, create: bool) -> int | None:
    """The token's lock file, opened without following a link; None if absent and not created.

    A lock file that is a directory, a link or anything but a regular file is
    the invalid-file refusal, never a 500.
    """
    flags = (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY
    try:
        fd = os.open(LOCK_FILE, flags | _FILE_FLAGS, 0o644, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError):
        raise TokenError(Refusal.INVALID_TOKEN_FILE) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a socket
            raise TokenError(Refusal.INVALID_TOKEN_FILE) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TokenError(Refusal.INVALID_TOKEN_FILE)
    return fd


@contextlib.contextmanager
def _shared_lock(dir_fd: int) -> Iterator[None]:
    """A shared ``flock`` on the lock file, waited for at most :data:`SHARED_LOCK_WAIT`.

    A reader never creates the lock file: where there is none, no one holds
    the lock, and reading stays possible in a read-only tokens directory.
    """
    fd = _open_lock_file(dir_fd, create=False)
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + SHARED_LOCK_WAIT
        delay = SHARED_LOCK_POLL / 8
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break  # read anyway: see SHARED_LOCK_WAIT
                time.sleep(delay)
                delay = min(delay * 2, SHARED_LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the token's lock file, across threads and processes.

    Every read-modify-write of a token file happens inside it, so no count
    or state change is lost to another writer.
    """
    with _directory(directory) as dir_fd:
        fd = _open_lock_file(dir_fd, create=True)
        if fd is None:  # pragma: no cover - created above, unless removed in between
            raise TokenError(Refusal.UNKNOWN_TOKEN)
    try:
        # flock locks belong to the open file description, so this also
        # excludes other threads of this process, each with its own open().
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def try_lock(directory: Path) -> int | None:
    """:func:`locked`'s lock taken without waiting: a descriptor for :func:`unlock`, or None
    when another thread or process holds it. For the event loop, which never waits for a lock."""
    with _directory(directory) as dir_fd:
        fd = _open_lock_file(dir_fd, create=True)
        if fd is None:  # pragma: no cover - created above, unless removed in between
            raise TokenError(Refusal.UNKNOWN_TOKEN)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int) -> None:
    """Release a lock from :func:`try_lock` (from any thread)."""
    os.close(fd)


def write(path: Path, data: TokenData, before_rename: Callable[[Signature], None] | None = None) -> Signature:
    """Replace ``path`` with ``data`` atomically and durably; returns the new file's signature.

    The file keeps its mode (a new one gets :data:`NEW_FILE_MODE`) and its
    keys keep their order. ``before_rename`` receives the new signature before
    the new file becomes visible, so that a concurrent reader can never see a
    file of ours that the caller does not yet know it wrote. A ``token.yaml``
    that is a link, or a token directory that is one, is refused: a write
    never replaces a link, nor writes where one points.
    """
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    with _directory(path.parent) as dir_fd:
        try:
            old = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            mode = NEW_FILE_MODE
        else:
            if not stat.S_ISREG(old.st_mode):
                raise TokenError(Refusal.UNKNOWN_TOKEN)
            mode = stat.S_IMODE(old.st_mode)
        tmp = f".token.yaml.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, NEW_FILE_MODE,
                     dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                # rename keeps the inode, size and mtime, so this is the signature
                # token.yaml will have.
                new = Signature.of(os.fstat(f.fileno()))
            if before_rename is not None:
                before_rename(new)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        _fsync(dir_fd)
    return new


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _fsync(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the rename still happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def remove_stale_temporaries(tokens_dir: Path) -> int:
    """Remove the temporary files a killed writer left in token directories; how many.

    Only names matching :data:`TEMP_FILE_RE`, only regular files, only in the
    directories of ``tokens_dir`` that can name a token and are not links. A
    directory whose lock is held is skipped: its writer is alive, and its
    temporary file is about to become ``token.yaml``.
    """
    try:
        names = os.listdir(tokens_dir)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    for name in names:
        if not TOKEN_ID_RE.fullmatch(name):
            continue
        try:
            removed += _remove_stale_in(tokens_dir / name)
        except (TokenError, OSError) as exc:
            # The directory's name is a token id, a credential: never logged.
            log.warning("could not clean a token directory: %s", getattr(exc, "strerror", None) or exc)
    return removed


def _remove_stale_in(directory: Path) -> int:
    with _directory(directory) as dir_fd:
        stale = [entry for entry in os.listdir(dir_fd) if TEMP_FILE_RE.fullmatch(entry)]
        if not stale:
            return 0
        lock = _open_lock_file(dir_fd, create=True)
        if lock is None:  # pragma: no cover - created above, unless removed in between
            return 0
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            removed = 0
            for entry in stale:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISREG(os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                        os.unlink(entry, dir_fd=dir_fd)
                        removed += 1
            if removed:
                _fsync(dir_fd)
            return removed
        finally:
            os.close(lock)

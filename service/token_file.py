"""One token's file on disk: find it, read it, lock it, replace it.

A token is a directory ``<tokens_dir>/<token>/`` holding ``token.yaml``, as in
a Flextype project. Several threads and several service processes may share
the directory, and an admin or an editor may rewrite a file at any time, so:

- :func:`read` parses what one open file holds, and returns its
  :class:`Signature` taken from that same open file.
- :func:`locked` is an exclusive ``flock`` on a lock file beside it. The lock
  is not on ``token.yaml`` itself because :func:`write` replaces that file,
  and a lock on a replaced inode would exclude no one.
- :func:`write` never leaves a torn file: a reader sees the old content or
  the new, and after a crash the new content is on disk or the old is.

Files that are missing, not regular files, too big or not a YAML mapping are
refused with a :class:`~.token_rules.TokenError`, like any other bad token.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import yaml

from .token_rules import Refusal, TokenData, TokenError

# libyaml's parser and emitter when PyYAML has them: several times faster, and
# every clear reads and rewrites a token file.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

#: Token ids that may name a directory. Anything else is refused before a path
#: is built from it, which rules out path traversal (no ``.``, no ``/``).
TOKEN_ID_RE: re.Pattern[str] = re.compile(r"[a-zA-Z0-9_-]{1,128}")

TOKEN_FILE = "token.yaml"
LOCK_FILE = ".token.yaml.lock"

#: Larger token files are refused as invalid rather than parsed (Flextype's are
#: a few hundred bytes).
MAX_TOKEN_FILE = 1 << 20
#: The mode of a new token file: it holds a hash, so only its owner reads it.
NEW_FILE_MODE = 0o600


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
    """The signature ``path`` has now; a missing file is an unknown token."""
    try:
        return Signature.of(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        raise TokenError(Refusal.UNKNOWN_TOKEN) from None


def read(path: Path) -> tuple[TokenData, Signature]:
    """The parsed token file and the signature of the very file parsed."""
    try:
        # O_NONBLOCK: a FIFO planted as token.yaml must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise TokenError(Refusal.UNKNOWN_TOKEN) from None
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
    if len(raw) > MAX_TOKEN_FILE:
        raise TokenError(Refusal.INVALID_TOKEN_FILE)
    # RecursionError: PyYAML's pure-Python parser recurses on deeply nested
    # collections (libyaml stops at a depth limit with a YAMLError instead).
    try:
        data = yaml.load(raw, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        raise TokenError(Refusal.INVALID_TOKEN_FILE) from None
    if not isinstance(data, dict):
        raise TokenError(Refusal.INVALID_TOKEN_FILE)
    return data, Signature.of(st)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the token's lock file, across threads and processes.

    Every read-modify-write of a token file happens inside it, so no count
    or state change is lost to another writer.
    """
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        raise TokenError(Refusal.UNKNOWN_TOKEN) from None
    try:
        # flock locks belong to the open file description, so this also
        # excludes other threads of this process, each with its own open().
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write(path: Path, data: TokenData, before_rename: Callable[[Signature], None] | None = None) -> Signature:
    """Replace ``path`` with ``data`` atomically and durably; returns the new file's signature.

    The file keeps its mode (a new one gets :data:`NEW_FILE_MODE`) and its
    keys keep their order. ``before_rename`` receives the new signature before
    the new file becomes visible, so that a concurrent reader can never see a
    file of ours that the caller does not yet know it wrote.
    """
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=".token.yaml.", suffix=".tmp", dir=path.parent)
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return new


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the rename still happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)

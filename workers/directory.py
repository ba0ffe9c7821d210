"""A purge target that empties a directory of cache files, as Flextype's cache clear empties ``var/tmp``.

Flextype keeps its caches in files under ``var/tmp`` (``PATH_TMP``): the
settings cache in ``config/``, the router cache in ``routes/``, the data
cache (phpfastcache's ``files`` or Flextype's ``phparray`` driver) in
``data/``, and some more. Its ``POST /api/v1/cache/clear`` deletes that whole
directory, and Flextype recreates what it needs on the next request. Run
``cachebus worker --purge-dir /srv/flextype/var/tmp`` on every web host and
each clear does the same there (docs/scoped-clears.md, "The directory target").

A clear keeps the directory itself (its owner, mode, ACLs, and a mount point
stay where they are) and removes everything in it:

1. a new empty directory is made next to it with the same owner, mode and
   extended attributes, as ``.<name>.cachebus-new-<random>``;
2. the directory is renamed aside to ``.<name>.cachebus-purge-<random>`` and
   the new one renamed into its place: two atomic renames, so the application
   finds either the old cache or an empty one, never a half-deleted tree;
3. the old tree is deleted in a background thread, after the purge returned:
   nobody reads it any more, and deleting 40,000 files took 4.8 s here, which
   on the worker's loop delayed the ack (and the proof) as long and let the
   lease lapse. A file that vanishes meanwhile is skipped; one written into it
   meanwhile is deleted with it. The purge reports the entries directly in the
   directory that it moved aside (Flextype's ``config``, ``data``, ``routes``…),
   which it counts without walking the tree.

When the directory cannot be renamed (a mount point, no write permission on
its parent, an owner this process cannot give the new one), its contents are
deleted in place instead, skipping files that vanish, and deleting files that
appear, as long as the purge runs. Trees left aside by a purge that was killed
are deleted by the next one.

Safety: the path is resolved once, when the target is made; ``/``, the home
directory (or a directory holding it), the working directory (or one holding
it), anything that is not an existing directory and, with ``allowed_root``,
anything outside it are refused with a :class:`ValueError`. Deletion never
follows a symbolic link: each directory is opened relative to its parent
with ``O_NOFOLLOW`` and entered only if it is still the directory that was
listed, so a link to elsewhere is removed, never what it points to (as
``shutil.rmtree`` does where ``rmtree.avoids_symlink_attacks``). Nor does it
cross into another file system mounted inside the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cachebus.bus.scope import Scope

log = logging.getLogger("cachebus.directory")

#: The sibling a purge moves the directory's old contents to, before deleting them.
PURGE_MARK = ".cachebus-purge-"
#: The sibling a purge prepares as the directory's empty replacement.
NEW_MARK = ".cachebus-new-"

#: Where Flextype's file drivers keep the data cache, under ``var/tmp`` (its ``cache.drivers.files.path``).
DATA_DIR = "data"
#: Driver folders of phpfastcache's file layout, and what their drivers append to ``<hash>.<extension>``:
#: phpfastcache's ``Files``, and Flextype's own ``Phparray`` (src/flextype/core/Cache/Drivers/Phparray).
KEYED_DRIVERS = {"Files": "", "Phparray": ".php"}
#: The extensions phpfastcache allows for cache files (``IOConfigurationOptionInterface::SAFE_FILE_EXTENSIONS``).
CACHE_FILE_EXTENSIONS = ("txt", "cache", "db", "pfc")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How many times a directory that refills while it is emptied is listed again before it is left.
_RELISTS = 3


class DirectoryTarget:
    """A directory of cache files, emptied on every clear; see the module's documentation.

    ``clear()`` returns how many files it removed; ``clear_scope(scope)`` removes the
    data-cache files of ``scope.keys`` where it can tell which they are, else returns
    None (the subscriber then calls ``clear()``).
    """

    def __init__(self, path: str | os.PathLike[str], *, allowed_root: str | os.PathLike[str] | None = None) -> None:
        #: The directory, resolved once: a clear never looks the path up through links again.
        self.path = _checked_directory(path, allowed_root)
        prefix = re.escape(f".{self.path.name}")
        self._leftover = re.compile(f"{prefix}(?:{re.escape(PURGE_MARK)}|{re.escape(NEW_MARK)})[0-9a-f]{{16}}")
        self._told_in_place = False
        #: Deletes the trees purges moved aside, one at a time, off the caller's thread.
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachebus-purge-dir")
        #: The last deletion handed to it: :meth:`settled` waits for it.
        self._deleting: Future[None] | None = None

    def __repr__(self) -> str:
        return f"DirectoryTarget({str(self.path)!r})"

    # --- clear: everything ------------------------------------------------------

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        """Empty the directory and keep it: how many entries were directly in it when it was
        swapped for an empty one (the old tree is then deleted in the background), or how many
        files were removed when it is emptied in place.

        Raises :class:`OSError` when files in the live directory could not be
        removed (permissions), and :class:`RuntimeError` when the path is no
        longer a directory (replaced by a link or a file since the target was made).
        """
        self._remove_leftovers()
        for _ in range(_RELISTS):
            top = self._open_self()
            if top is None:
                return 0  # gone, as Flextype's own clear leaves it: nothing to purge
            try:
                fcntl.flock(top, fcntl.LOCK_EX)  # one purge of this directory at a time, in any process
                st = os.fstat(top)
                if not _same(st, _lstat(self.path)):
                    continue  # another purge moved it aside while we waited: purge its replacement
                aside = self._move_aside(st)
                if aside is not None:
                    moved = len(os.listdir(top))
                    # The descriptor shares the lock: another process's purge leaves the tree alone.
                    self._deleting = self._deleter.submit(self._delete_aside, os.dup(top), st, aside)
                    return moved
                removed, error = _empty(top, st.st_dev)
                if error is not None:
                    raise error
                return removed
            finally:
                os.close(top)
        raise RuntimeError(f"{self.path}: replaced {_RELISTS} times while waiting to purge it")

    def settled(self, timeout: float | None = None) -> bool:
        """Wait until the trees moved aside so far are deleted; False if ``timeout`` passed first."""
        deleting = self._deleting
        if deleting is None:
            return True
        try:
            deleting.result(timeout)
        except TimeoutError:
            return False
        return True

    def _delete_aside(self, fd: int, st: os.stat_result, aside: Path) -> None:
        """Delete a tree a purge moved aside (in the deleting thread; never raises)."""
        try:
            removed, error = _empty(fd, st.st_dev)
            if error is None:
                _rmdir_if_same(aside, st)
                log.debug("%s: %d old cache files deleted", self.path, removed)
            else:
                log.warning("%s: the old cache files moved aside to %s could not all be removed (%s); "
                            "the next clear tries again", self.path, aside, error)
        except Exception:
            log.exception("%s: deleting the old cache files in %s failed; the next clear tries again",
                          self.path, aside)
        finally:
            os.close(fd)

    def _open_self(self) -> int | None:
        try:
            return os.open(self.path, _DIR_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RuntimeError(f"{self.path} is no longer a directory (now a symbolic link or a file): "
                                   "not purged") from None
            raise

    def _move_aside(self, st: os.stat_result) -> Path | None:
        """Swap in an empty copy of the directory; the old one's new path, or None to empty it in place."""
        why = self._why_in_place(st)
        if why is not None:
            self._in_place(why)
            return None
        token = secrets.token_hex(8)
        fresh = self.path.with_name(f".{self.path.name}{NEW_MARK}{token}")
        aside = self.path.with_name(f".{self.path.name}{PURGE_MARK}{token}")
        try:
            step = "cannot make its replacement next to it"
            os.mkdir(fresh, 0o700)
            _copy_owner_and_mode(st, self.path, fresh)
            step = "cannot rename it"
            os.rename(self.path, aside)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rmdir(fresh)
            self._in_place(f"{step}: {exc.strerror or exc}")
            return None
        try:
            # Replaces an empty directory the application made meanwhile; one it has already
            # written to (ENOTEMPTY) is kept: it is already the empty cache, refilling.
            os.rename(fresh, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(fresh)
        return aside

    def _why_in_place(self, st: os.stat_result) -> str | None:
        if os.path.ismount(self.path):
            return "it is a mount point"
        if _mounts_below(self.path):
            return "a file system is mounted inside it, which a rename would take away"
        euid = os.geteuid()
        if euid != 0 and (st.st_uid != euid or (st.st_gid != os.getegid() and st.st_gid not in os.getgroups())):
            return "this process cannot give a new directory its owner and group"
        return None

    def _in_place(self, why: str) -> None:
        if not self._told_in_place:
            log.info("%s: emptying it in place, not by renaming it aside (%s)", self.path, why)
            self._told_in_place = True

    def _remove_leftovers(self) -> None:
        """Delete what a purge that was killed left next to the directory (not one still running)."""
        parent = self.path.parent
        try:
            with os.scandir(parent) as entries:
                names = [e.name for e in entries if self._leftover.fullmatch(e.name)]
        except OSError:
            return
        for name in names:
            path = parent / name
            try:
                fd = os.open(path, _DIR_FLAGS)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # ours by its name, and not a directory: nothing to enter
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a purge in another process is deleting it now
                st = os.fstat(fd)
                removed, error = _empty(fd, st.st_dev)
                if error is None:
                    _rmdir_if_same(path, st)
                    log.info("%s: removed %s, left by an interrupted purge (%d files)", self.path, name, removed)
                else:
                    log.warning("%s: cannot remove %s, left by an interrupted purge: %s", self.path, name, error)
            finally:
                os.close(fd)

    # --- clear_scope: the data cache's files for some keys -----------------------

    def clear_scope(self, scope: Scope, *, clear_id: str | None = None, seq: int | None = None) -> int | None:
        """Remove the data-cache files of ``scope.keys``: how many there were; None when the
        scope cannot be mapped to files (prefixes, tags, or a layout not known for sure).

        A key is the item key the application gave phpfastcache (``cache()->set($key, …)``
        in Flextype). Its file is ``data/<security key>/<Files|Phparray>/<h[0:2]>/<h[2:4]>/
        <h>.<extension>[.php]`` with ``h`` the key's MD5, phpfastcache's default file name
        hash; every security key folder (one per HTTP host, and ``cli``) and every allowed
        extension is looked at. Flextype's other caches (settings, routes) hold no keys
        and are left as they are.
        """
        if scope.everything:
            return self.clear(clear_id=clear_id, seq=seq)
        if scope.prefixes or scope.tags:
            return None  # phpfastcache's file names are hashes, and tags live inside the files
        drivers = self._keyed_driver_dirs()
        if drivers is None:
            return None
        removed = 0
        for key in scope.keys:
            digest = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
            for parts, suffix in drivers:
                for extension in CACHE_FILE_EXTENSIONS:
                    removed += _unlink_below(self.path, [*parts, digest[:2], digest[2:4]],
                                             f"{digest}.{extension}{suffix}")
        return removed

    def _keyed_driver_dirs(self) -> list[tuple[list[str], str]] | None:
        """The driver folders under ``data/`` (path parts below the directory, and file suffix),
        or None unless ``data/`` holds nothing but security-key folders of known driver folders."""
        found: list[tuple[list[str], str]] = []
        try:
            for entry in _list_dirs(self.path / DATA_DIR):
                if entry in KEYED_DRIVERS:  # an empty security key: the driver folder right in data/
                    found.append(([DATA_DIR, entry], KEYED_DRIVERS[entry]))
                    continue
                for driver in _list_dirs(self.path / DATA_DIR / entry):
                    if driver not in KEYED_DRIVERS:
                        return None  # another driver (Sqlite, Leveldb…): its keys are not files
                    found.append(([DATA_DIR, entry, driver], KEYED_DRIVERS[driver]))
        except (OSError, _NotLayout):
            return None
        return found or None


# --- checks made once -----------------------------------------------------------


def _checked_directory(path: str | os.PathLike[str], allowed_root: str | os.PathLike[str] | None) -> Path:
    """``path`` resolved, if a purge may empty it; else :class:`ValueError`, one line saying why."""
    text = os.fspath(path)
    if not text:
        raise ValueError("purge directory: the path is empty")
    try:
        resolved = Path(text).resolve(strict=True)
    except FileNotFoundError:
        raise ValueError(f"purge directory {text}: not an existing directory") from None
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"purge directory {text}: cannot resolve it: {exc}") from None
    if not resolved.is_dir():
        raise ValueError(f"purge directory {text}: not an existing directory")
    if resolved.parent == resolved:
        raise ValueError(f"purge directory {text}: refusing to empty the root directory {resolved}")
    for home in _homes():
        if home.is_relative_to(resolved):
            what = "is" if home == resolved else "holds"
            raise ValueError(f"purge directory {text}: refusing to empty {resolved}, which {what} "
                             f"the home directory {home}")
    cwd: Path | None = None
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
    if cwd is not None and cwd.is_relative_to(resolved):
        raise ValueError(f"purge directory {text}: refusing to empty {resolved}, which "
                         f"{'is' if cwd == resolved else 'holds'} this process's working directory")
    if allowed_root is not None:
        root = Path(allowed_root).resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"purge directory {text}: {resolved} is outside the allowed root {root}")
    return resolved


def _homes() -> set[Path]:
    """The user's home directory, from ``$HOME`` and from the password database."""
    homes = set()
    with contextlib.suppress(RuntimeError, OSError):
        homes.add(Path.home().resolve())
    with contextlib.suppress(KeyError, OSError):
        homes.add(Path(pwd.getpwuid(os.geteuid()).pw_dir).resolve())
    return homes


# --- deleting without following links -------------------------------------------


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _same(a: os.stat_result, b: os.stat_result | None) -> bool:
    return b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _copy_owner_and_mode(st: os.stat_result, source: Path, target: Path) -> None:
    """Give ``target`` the owner, group, mode and extended attributes (ACLs…) of ``source``."""
    made = os.stat(target)
    if (made.st_uid, made.st_gid) != (st.st_uid, st.st_gid):
        os.chown(target, st.st_uid, st.st_gid)
    # After chown, which may clear the set-group-ID bit; copies the mode, times and extended attributes.
    shutil.copystat(source, target, follow_symlinks=False)


def _mounts_below(path: Path) -> bool:
    """Whether a file system is mounted somewhere inside ``path`` (Linux's mount table; False elsewhere)."""
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            # Octal escapes for space, tab, newline and backslash.
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            if point != path and point.is_relative_to(path):
                return True
    return False


def _rmdir_if_same(path: Path, st: os.stat_result) -> None:
    """Remove the now empty directory at ``path`` if it is still the one ``st`` describes."""
    if _same(st, _lstat(path)):
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(path)


def _entries(fd: int) -> Iterator[os.DirEntry[str]]:
    """The entries of the open directory ``fd``, listed at once (deleting while listing is allowed, but unordered)."""
    with os.scandir(fd) as listing:
        return iter(list(listing))


class _Frame:
    """A directory being emptied: its descriptor, its entries left, its name in its parent."""

    __slots__ = ("entries", "fd", "name", "relists")

    def __init__(self, fd: int, name: str | None, relists: int = 0) -> None:
        self.fd = fd
        self.name = name
        self.relists = relists
        self.entries = _entries(fd)


def _empty(top: int, device: int) -> tuple[int, OSError | None]:
    """Remove everything in the open directory ``top``: files removed, and the first error that
    left something behind (the rest is removed anyway). Never follows a symbolic link, never
    leaves ``device``; what vanishes meanwhile is skipped, what appears is removed too."""
    removed = 0
    error: OSError | None = None
    stack = [_Frame(top, None)]
    try:
        while stack:
            frame = stack[-1]
            for entry in frame.entries:
                try:
                    child, count = _remove_entry(frame.fd, entry, device)
                except OSError as exc:
                    if exc.errno == errno.EXDEV:
                        log.warning("not purging %s: another file system is mounted there", entry.name)
                    else:
                        error = error or exc
                    continue
                removed += count
                if child is not None:
                    problem = _push(stack, child, entry.name, 0)
                    if problem is None:
                        break
                    error = error or problem
            else:
                stack.pop()
                if frame.name is not None:
                    os.close(frame.fd)
                    error = _rmdir_emptied(stack, frame.name, frame.relists) or error
    finally:
        for frame in stack:
            if frame.fd != top:
                os.close(frame.fd)
    return removed, error


def _remove_entry(parent: int, entry: os.DirEntry[str], device: int) -> tuple[int | None, int]:
    """Unlink ``entry`` unless it is a directory to enter: (the directory opened, or None; files removed)."""
    child = _enter(parent, entry, device)
    if child is not None:
        return child, 0
    try:
        os.unlink(entry.name, dir_fd=parent)
    except FileNotFoundError:
        return None, 0
    except IsADirectoryError:
        # It became a directory since it was listed: take it again, as one.
        return _enter(parent, entry, device, recheck=True), 0
    return None, 1


def _rmdir_emptied(stack: list[_Frame], name: str, relists: int) -> OSError | None:
    """Remove the directory ``name`` just emptied from its parent (the top of ``stack``); if it was
    written to meanwhile, list it again (a few times at most: then it is left, holding only files
    newer than the purge). An error that is not one of those, returned."""
    parent = stack[-1].fd
    try:
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            return exc
        if relists < _RELISTS:
            try:
                again = _open_dir_at(parent, name)
            except OSError as reopen:
                return reopen
            if again is not None:
                return _push(stack, again, name, relists + 1)
    return None


def _push(stack: list[_Frame], fd: int, name: str, relists: int) -> OSError | None:
    """Put the open directory ``fd`` on ``stack`` to be emptied; if it cannot be listed, close it and say why."""
    try:
        stack.append(_Frame(fd, name, relists))
    except OSError as exc:
        os.close(fd)
        return exc
    return None


def _enter(parent: int, entry: os.DirEntry[str], device: int, recheck: bool = False) -> int | None:
    """An open descriptor of the directory ``entry``, or None if it is not one to enter (a file, a
    link, gone). Raises :class:`OSError` for a directory on another device, which is left alone."""
    try:
        if not recheck and not entry.is_dir(follow_symlinks=False):
            return None  # from the listing (d_type): no system call for a file
        st = os.stat(entry.name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if st.st_dev != device:
        raise OSError(errno.EXDEV, "another file system is mounted there; left as it is", entry.name)
    fd = _open_dir_at(parent, entry.name)
    if fd is None:
        return None
    if not _same(st, os.fstat(fd)):
        # Replaced between the look and the open: take the new one as it is now.
        os.close(fd)
        return _enter(parent, entry, device, recheck=True) if not recheck else None
    return fd


def _open_dir_at(parent: int, name: str) -> int | None:
    """``name`` in ``parent`` opened as a directory, never through a link; None if it is gone or not one."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise


class _NotLayout(Exception):
    """A folder of the data cache holds something its layout does not explain."""


def _list_dirs(path: Path) -> list[str]:
    """The names in ``path``, which must all be real directories (not links); :class:`_NotLayout` otherwise."""
    names = []
    with os.scandir(path) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                raise _NotLayout(entry.path)
            names.append(entry.name)
    return names


def _unlink_below(top: Path, folders: list[str], name: str) -> int:
    """Remove ``top/<folders…>/name`` without following a link on the way: 1 if it was there, else 0."""
    fds: list[int] = []
    try:
        fd = os.open(top, _DIR_FLAGS)
        fds.append(fd)
        for folder in folders:
            fd = os.open(folder, _DIR_FLAGS, dir_fd=fd)
            fds.append(fd)
        if not stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            return 0
        os.unlink(name, dir_fd=fd)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return 0  # a link or a file where a folder should be: not a path phpfastcache would use
        raise
    finally:
        for fd in fds:
            os.close(fd)

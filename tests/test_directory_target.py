"""The directory target: a Flextype ``var/tmp`` emptied on every clear, safely, on every web host.

Real files and directories throughout; the end-to-end test runs the real
service and two reference workers (``cachebus worker --purge-dir``), one per
"web host", each with its own Flextype cache directory: one clear empties both,
one clear of a key removes just that key's files on both.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachebus.bus.scope import Scope
from cachebus.testing import DEADLINE, Cluster, wait_for
from cachebus.workers.directory import DirectoryTarget
from cachebus.workers.targets import TargetKind, adapt

ROOT = Path(__file__).resolve().parent.parent

#: phpfastcache item keys, as Flextype passes them to cache()->set().
KEYS = ("entries.home", "entries.blog.post-1", "entries.blog.post-2", "registry.site")


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def cache_file(top: Path, key: str, security_key: str = "example.org", driver: str = "Files",
               extension: str = "txt") -> Path:
    """Where phpfastcache's Files driver (or Flextype's Phparray one) keeps ``key`` under Flextype's var/tmp:
    data/<security key>/<driver>/<md5[0:2]>/<md5[2:4]>/<md5>.<extension>[.php]."""
    h = md5(key)
    suffix = ".php" if driver == "Phparray" else ""
    return top / "data" / security_key / driver / h[:2] / h[2:4] / f"{h}.{extension}{suffix}"


def build_flextype_tmp(top: Path) -> list[Path]:
    """Fill ``top`` as a Flextype site's var/tmp looks after some traffic; every file written, in order.

    config/flextype/<md5>.php (the settings cache), routes/routes.php (the router cache),
    data/<host or cli>/Files/… (the data cache, phpfastcache's files driver), logs/, glide/, site/.
    """
    written: list[Path] = []

    def put(path: Path, text: str = "cached") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    top.mkdir(parents=True, exist_ok=True)
    put(top / "config" / "flextype" / f"{md5('settings')}.php", "<?php\n return [];\n")
    put(top / "routes" / "routes.php", "<?php return [];")
    for security_key in ("example.org", "cli"):
        for key in KEYS:
            put(cache_file(top, key, security_key), 'a:1:{s:1:"d";s:5:"value";}')
    put(top / "logs" / "2024-05-01.log", "[2024-05-01] flextype.INFO: ...")
    put(top / "glide" / "media" / "photo.jpg" / "a1b2c3", "jpeg")
    put(top / "site" / f"{md5('home')}.html", "<html></html>")
    return written


def files_below(top: Path) -> set[Path]:
    return {p for p in top.rglob("*") if not p.is_dir() or p.is_symlink()}


def siblings_left(top: Path) -> list[str]:
    return sorted(p.name for p in top.parent.iterdir() if ".cachebus-" in p.name)


@pytest.fixture
def var_tmp(tmp_path: Path) -> Path:
    top = tmp_path / "site" / "var" / "tmp"
    top.mkdir(parents=True)
    return top


@pytest.fixture
def unrenamable(tmp_path: Path) -> Iterator[Path]:
    """An empty var/tmp a purge cannot rename: a mount point (as root) or in a read-only parent (otherwise)."""
    top = tmp_path / "site" / "var" / "tmp"
    top.mkdir(parents=True)
    if os.geteuid() != 0:
        top.parent.chmod(0o555)
        yield top
        top.parent.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "cachebus-test", str(top)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)


# --- clear: everything ----------------------------------------------------------


def test_clear_empties_flextype_var_tmp_and_keeps_the_directory(var_tmp: Path):
    written = build_flextype_tmp(var_tmp)
    var_tmp.chmod(0o750)
    target = DirectoryTarget(var_tmp)
    before = os.stat(var_tmp)

    assert written
    top_level = len(list(var_tmp.iterdir()))

    # It counts what it moved aside (config, data, routes…), and deletes the files after returning.
    assert target.clear(clear_id="c1", seq=1) == top_level

    assert var_tmp.is_dir() and list(var_tmp.iterdir()) == []
    after = os.stat(var_tmp)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # swapped for an empty copy, not emptied in place
    assert target.settled(DEADLINE)
    assert siblings_left(var_tmp) == []
    # Flextype refills it; the next clear empties it again.
    build_flextype_tmp(var_tmp)
    assert target.clear() == top_level
    assert list(var_tmp.iterdir()) == []
    assert target.settled(DEADLINE) and siblings_left(var_tmp) == []


def test_clear_of_an_empty_or_vanished_directory(var_tmp: Path):
    target = DirectoryTarget(var_tmp)
    assert target.clear() == 0 and var_tmp.is_dir()
    # Flextype's own clear deletes var/tmp itself; nothing is left to purge, and nothing is made.
    var_tmp.rmdir()
    assert target.clear() == 0
    assert not var_tmp.exists()


@pytest.mark.processes
def test_a_directory_that_cannot_be_renamed_is_emptied_in_place(unrenamable: Path):
    written = build_flextype_tmp(unrenamable)
    before = os.stat(unrenamable)
    assert DirectoryTarget(unrenamable).clear() == len(written)
    assert list(unrenamable.iterdir()) == []
    assert os.stat(unrenamable).st_ino == before.st_ino
    assert siblings_left(unrenamable) == []


@pytest.mark.processes
def test_a_file_system_mounted_inside_is_left_alone(var_tmp: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    written = build_flextype_tmp(var_tmp)
    inner = var_tmp / "glide" / "shared"
    inner.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "cachebus-test", str(inner)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (inner / "keep.jpg").write_text("not ours")
        assert DirectoryTarget(var_tmp).clear() == len(written)  # emptied in place: every file counted
        assert (inner / "keep.jpg").read_text() == "not ours"  # still mounted where it was, and untouched
        assert files_below(var_tmp) == {inner / "keep.jpg"}
    finally:
        subprocess.run(["umount", "-l", str(inner)], check=False)


# --- safety -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["root", "home", "holds home", "file", "missing", "outside root",
                                  "link out of root", "working directory"])
def test_refuses_a_directory_it_must_not_empty(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    allowed = tmp_path / "srv"
    allowed.mkdir()
    kwargs: dict[str, Path] = {}
    if case == "root":
        path = Path("/")
    elif case == "home":
        path = Path.home()
    elif case == "holds home":
        (tmp_path / "home" / "web").mkdir(parents=True)
        monkeypatch.setenv("HOME", str(tmp_path / "home" / "web"))
        path = tmp_path / "home"
    elif case == "file":
        path = tmp_path / "settings.yaml"
        path.write_text("x")
    elif case == "missing":
        path = tmp_path / "var" / "tmp"
    elif case == "outside root":
        path = tmp_path / "elsewhere"
        path.mkdir()
        kwargs["allowed_root"] = allowed
    elif case == "link out of root":
        (tmp_path / "elsewhere").mkdir()
        path = allowed / "tmp"
        path.symlink_to(tmp_path / "elsewhere")
        kwargs["allowed_root"] = allowed
    else:
        path = tmp_path / "app"
        (path / "var").mkdir(parents=True)
        monkeypatch.chdir(path / "var")
    with pytest.raises(ValueError) as info:
        DirectoryTarget(path, **kwargs)
    message = str(info.value)
    assert message.startswith("purge directory ") and "\n" not in message


def test_the_path_is_resolved_once_and_may_be_inside_the_allowed_root(tmp_path: Path, var_tmp: Path):
    link = tmp_path / "current"
    link.symlink_to(var_tmp.parent.parent)
    target = DirectoryTarget(link / "var" / "tmp", allowed_root=var_tmp.parent.parent)
    assert target.path == var_tmp.resolve()
    assert DirectoryTarget(var_tmp, allowed_root=var_tmp).path == var_tmp.resolve()


def test_links_inside_are_removed_never_followed(tmp_path: Path, var_tmp: Path):
    outside = tmp_path / "uploads"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "photo.jpg").write_text("keep me")
    (outside / "notes.txt").write_text("keep me too")
    written = build_flextype_tmp(var_tmp)
    links = [var_tmp / "media", var_tmp / "glide" / "notes.txt", var_tmp / "data" / "dangling"]
    links[0].symlink_to(outside)
    links[1].symlink_to(outside / "notes.txt")
    links[2].symlink_to(tmp_path / "nowhere")

    assert written
    target = DirectoryTarget(var_tmp)
    target.clear()
    assert target.settled(DEADLINE)

    assert list(var_tmp.iterdir()) == [] and siblings_left(var_tmp) == []
    assert (outside / "deep" / "photo.jpg").read_text() == "keep me"
    assert (outside / "notes.txt").read_text() == "keep me too"


def test_a_path_replaced_by_a_link_is_not_purged(tmp_path: Path, var_tmp: Path):
    target = DirectoryTarget(var_tmp)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    var_tmp.rmdir()
    var_tmp.symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="no longer a directory"):
        target.clear()
    assert (elsewhere / "precious").read_text() == "keep me"


def test_leftovers_of_an_interrupted_purge_are_removed_on_the_next_clear(var_tmp: Path):
    parent = var_tmp.parent
    aside = parent / ".tmp.cachebus-purge-0123456789abcdef"
    build_flextype_tmp(aside)
    fresh = parent / ".tmp.cachebus-new-fedcba9876543210"
    fresh.mkdir()
    busy = parent / ".tmp.cachebus-purge-00000000000000aa"  # a purge in another process, still running
    build_flextype_tmp(busy)
    decoys = [parent / ".tmp.cachebus-purge-mine", parent / ".logs.cachebus-purge-0123456789abcdef",
              parent / "tmp-backup"]
    for decoy in decoys:
        decoy.mkdir()
        (decoy / "file").write_text("not a leftover")
    build_flextype_tmp(var_tmp)

    held = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        DirectoryTarget(var_tmp).clear()
    finally:
        os.close(held)

    assert not aside.exists() and not fresh.exists()
    assert busy.is_dir() and files_below(busy)
    for decoy in decoys:
        assert (decoy / "file").read_text() == "not a leftover"
    assert list(var_tmp.iterdir()) == []


# --- an application writing meanwhile ----------------------------------------------


_WRITER = r"""
import os, sys, time
top, stop = sys.argv[1], sys.argv[2]
written = failed = n = 0
while not os.path.exists(stop):
    key = n % 2000  # a site's pages: the same keys, cached again and again
    folder = os.path.join(top, "data", ("example.org", "cli")[key % 2], "Files", "%02x" % (key % 256),
                          "%02x" % (key % 7))
    path = os.path.join(folder, "page-%d.txt" % key)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write("fresh")
        if n % 3 == 0:
            os.unlink(path)
        written += 1
    except OSError:
        failed += 1
    n += 1
    if n == 1:
        print("writing", flush=True)
    time.sleep(0.0002)  # a busy site's pace, not a disk benchmark's
print(written, failed, flush=True)
"""


class CacheWriter:
    """Another process writing data-cache files in a loop, as PHP requests do (mkdir -p, then the
    file), deleting some again. A write that fails because its folder vanished is counted: a PHP
    writer sees the same during Flextype's own clear."""

    def __init__(self, top: Path) -> None:
        self.stop = top.parent.parent / "stop-writer"
        self.proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(top), str(self.stop)],
                                     stdout=subprocess.PIPE, text=True)
        self.written = self.failed = 0

    def __enter__(self) -> CacheWriter:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "writing":
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the cache writer did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.touch()
        out, _ = self.proc.communicate(timeout=DEADLINE)
        self.stop.unlink()
        self.written, self.failed = map(int, out.split())


@pytest.mark.processes
@pytest.mark.parametrize("fixture", ["var_tmp", "unrenamable"])
def test_files_appearing_and_vanishing_during_a_clear_do_not_fail_it(fixture: str, request: pytest.FixtureRequest):
    top = request.getfixturevalue(fixture)  # renamed aside, or emptied in place
    target = DirectoryTarget(top)
    rounds = removed = 0
    with CacheWriter(top) as writer:
        until = time.monotonic() + 0.5
        while rounds < 20 or time.monotonic() < until:
            build_flextype_tmp(top)
            removed += target.clear()
            rounds += 1
    assert removed >= rounds and writer.written > 0
    target.clear()
    assert target.settled(DEADLINE)
    assert top.is_dir() and list(top.iterdir()) == []
    assert siblings_left(top) == []


# --- clear_scope: the data cache's files for some keys ------------------------------


def test_clear_scope_deletes_exactly_the_keys_files(var_tmp: Path):
    build_flextype_tmp(var_tmp)
    php_array = cache_file(var_tmp, "entries.home", security_key="web", driver="Phparray")
    php_array.parent.mkdir(parents=True)
    php_array.write_text("<?php return [];")
    other_extension = cache_file(var_tmp, "entries.home", security_key="cli", extension="cache")
    other_extension.write_text("x")
    before = files_below(var_tmp)
    gone = {cache_file(var_tmp, "entries.home", "example.org"), cache_file(var_tmp, "entries.home", "cli"),
            php_array, other_extension}

    dropped = DirectoryTarget(var_tmp).clear_scope(Scope(keys=("entries.home", "never.cached")))

    assert dropped == len(gone)
    assert files_below(var_tmp) == before - gone
    assert (var_tmp / "routes" / "routes.php").exists()  # Flextype's keyless caches stay


@pytest.mark.parametrize("scope", [Scope(prefixes=("entries.",)), Scope(tags=("blog",)),
                                   Scope(keys=("entries.home",), tags=("blog",))])
def test_clear_scope_declines_prefixes_and_tags(scope: Scope, var_tmp: Path):
    build_flextype_tmp(var_tmp)
    before = files_below(var_tmp)
    assert DirectoryTarget(var_tmp).clear_scope(scope) is None
    assert files_below(var_tmp) == before


@pytest.mark.parametrize("layout", ["no data folder", "another driver", "a stray file", "a linked folder"])
def test_clear_scope_declines_a_layout_it_does_not_know(layout: str, tmp_path: Path, var_tmp: Path):
    build_flextype_tmp(var_tmp)
    if layout == "no data folder":
        shutil.rmtree(var_tmp / "data")
    elif layout == "another driver":
        (var_tmp / "data" / "cli" / "Sqlite").mkdir()
    elif layout == "a stray file":
        (var_tmp / "data" / "example.org" / "notes.txt").write_text("?")
    else:
        (tmp_path / "other").mkdir()
        (var_tmp / "data" / "other.org").symlink_to(tmp_path / "other")
    before = files_below(var_tmp)
    assert DirectoryTarget(var_tmp).clear_scope(Scope(keys=("entries.home",))) is None
    assert files_below(var_tmp) == before


def test_clear_scope_never_follows_a_link_to_a_keys_file(tmp_path: Path, var_tmp: Path):
    build_flextype_tmp(var_tmp)
    h = md5("entries.secret")
    outside = tmp_path / "outside"
    (outside / h[2:4]).mkdir(parents=True)
    (outside / h[2:4] / f"{h}.txt").write_text("keep me")
    (var_tmp / "data" / "example.org" / "Files" / h[:2]).symlink_to(outside)
    assert DirectoryTarget(var_tmp).clear_scope(Scope(keys=("entries.secret",))) == 0
    assert (outside / h[2:4] / f"{h}.txt").read_text() == "keep me"


def test_clear_scope_of_everything_is_a_clear(var_tmp: Path):
    build_flextype_tmp(var_tmp)
    top_level = len(list(var_tmp.iterdir()))
    assert DirectoryTarget(var_tmp).clear_scope(Scope()) == top_level
    assert list(var_tmp.iterdir()) == []


def test_the_subscriber_tells_it_which_clear_it_applies(var_tmp: Path):
    (target,) = adapt([DirectoryTarget(var_tmp)])
    assert target.kind is TargetKind.PURGEABLE


# --- the reference worker ---------------------------------------------------------


@pytest.mark.processes
def test_worker_refuses_a_purge_dir_in_one_line_naming_flag_and_key(content_dir: Path):
    result = subprocess.run([sys.executable, "-m", "cachebus.workers", "--content-dir", str(content_dir),
                             "--purge-dir", "/"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("cachebus: error: command line --purge-dir: worker.purge_dirs: "
                                     "purge directory /: refusing to empty the root directory /")


def web_hosts(cluster: Cluster, tmp_path: Path) -> dict[str, Path]:
    """The service, and two "web hosts", each a reference worker purging its own Flextype var/tmp,
    which Flextype has filled (after the workers joined: joining purges everything, this too)."""
    cluster.start_service()
    tops = {name: tmp_path / name / "flextype" / "var" / "tmp" for name in ("web1", "web2")}
    for name, top in tops.items():
        top.mkdir(parents=True)
        cluster.start_worker(name, args=["--purge-dir", str(top)])
    for top in tops.values():
        build_flextype_tmp(top)
    return tops


@pytest.mark.processes
def test_one_clear_empties_the_flextype_cache_on_every_web_host(cluster: Cluster, tmp_path: Path):
    tops = web_hosts(cluster, tmp_path)
    hosts = {name: (top, len(list(top.iterdir()))) for name, top in tops.items()}

    status, _, body = cluster.clear(wait="all", timeout="20")

    proof = json.loads(body)
    assert status == 200, proof
    assert proof["complete"] and proof["missing"] == [] and proof["failed"] == []
    # Each ack counts what its host moved aside (the reference worker's own cache held nothing yet).
    assert {a["name"]: (a["outcome"], a["entries_dropped"]) for a in proof["acks"]} == {
        name: ("ok", count) for name, (_, count) in hosts.items()}
    for top, _ in hosts.values():
        assert top.is_dir() and list(top.iterdir()) == []
        wait_for(lambda top=top: siblings_left(top) == [], what="the old files deleted in the background")


@pytest.mark.processes
def test_a_clear_of_some_keys_removes_just_their_files_and_a_prefix_empties_all(cluster: Cluster, tmp_path: Path):
    tops = web_hosts(cluster, tmp_path)
    before = {name: files_below(top) for name, top in tops.items()}

    status, _, body = cluster.clear(wait="all", timeout="20", keys="entries.home")

    proof = json.loads(body)
    assert status == 200, proof
    # The key's data-cache file in each security-key folder (the host's, and cli), nothing else.
    assert {a["name"]: (a["outcome"], a["scope"], a["entries_dropped"]) for a in proof["acks"]} == {
        name: ("ok", "scoped", 2) for name in tops}
    for name, top in tops.items():
        gone = {cache_file(top, "entries.home", security_key) for security_key in ("example.org", "cli")}
        assert files_below(top) == before[name] - gone

    # A prefix cannot be found among hashed file names: each host empties the whole directory, and says so.
    status, _, body = cluster.clear(wait="all", timeout="20", prefixes="entries.")
    proof = json.loads(body)
    assert status == 200, proof
    assert {a["name"]: (a["outcome"], a["scope"]) for a in proof["acks"]} == {name: ("ok", "all") for name in tops}
    for top in tops.values():
        assert top.is_dir() and list(top.iterdir()) == []

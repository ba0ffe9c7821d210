"""This project's own test helpers, beside the embedders' kit (:mod:`cachebus.testing`).

They serve this suite only (thread stress, clear loops, network namespaces, a
token file rewritten in place, the demo content, bus peers of a test's own, the
event stream read by hand, a fake clock, a cache that fails), so they are not
shipped in the wheel, and :mod:`cachebus.testing` keeps only what an embedding
application's tests need. Fixtures built from both live in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Any

import yaml

from cachebus.bus.security import SERVICE_KEY, BusMode, ClientSecurity, ensure_keypair, load_public
from cachebus.client import read_events
from cachebus.testing import DEADLINE, Cluster, http
from cachebus.workers.cache import Cache
from cachebus.workers.content import copy_tree, demo_content

# --- threads and loops ---------------------------------------------------------------


def run_threads(work: Callable[[int], None], count: int) -> None:
    """Run ``work(0)`` … ``work(count - 1)`` in threads released together (a barrier), and once all
    have ended, raise the first exception any of them raised (an assertion, say) in the caller."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class ClearLoop:
    """Clears sent one after another from a thread, round robin over ``targets`` (instance
    numbers, as a load balancer sees them; change the list to take one out), with each
    answer's status in :attr:`seen` (0 for a connection dropped without an answer)."""

    def __init__(self, clear: Callable[[int], int], targets: list[int]) -> None:
        self.clear = clear
        self.targets = list(targets)
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClearLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set():
            try:
                self.seen.append(self.clear(self.targets[sent % len(self.targets)]))
            except OSError:
                self.seen.append(0)
            sent += 1


# --- hosts -------------------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why this machine cannot make network namespaces for a test, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"cbprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# --- tokens and content ------------------------------------------------------------


_IN_PLACE_WRITER = r"""
import fcntl, os, sys
path, lock_path, use_lock, stop = sys.argv[1], sys.argv[2], sys.argv[3] == "lock", sys.argv[4]
rounds = 0
while not os.path.exists(stop):
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644) if use_lock else None
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    fd = os.open(path, os.O_RDWR)
    data = os.read(fd, 1 << 20)
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.close(fd)
    if lock is not None:
        os.close(lock)
    rounds += 1
    if rounds == 1:
        print("writing", flush=True)
print(rounds, flush=True)
"""


class InPlaceWriter:
    """A process that rewrites a token file in place, in a tight loop, as Flextype's PHP does.

    Each round truncates the file, then writes it back: between the two, a
    reader finds it empty. With ``lock`` each round holds the token's
    exclusive lock, as a careful in-place writer would; without, it takes no
    lock at all, as PHP's ``file_put_contents`` does. It reads and writes
    through one descriptor, so a rename over the path meanwhile (a count we
    wrote) is never undone: torn reads, never lost updates. Use as a context
    manager; ``rounds`` is set on exit.
    """

    def __init__(self, path: Path, *, lock: bool) -> None:
        self.stop_file = path.parent / f"stop-writer-{os.getpid()}"
        self.rounds = 0
        self.proc = subprocess.Popen([sys.executable, "-c", _IN_PLACE_WRITER, str(path),
                                      str(path.parent / ".token.yaml.lock"), "lock" if lock else "nolock",
                                      str(self.stop_file)], stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> InPlaceWriter:
        """Returns once the writer has done its first round, so that it runs all along."""
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "writing":
            self.__exit__()
            raise AssertionError("the in-place writer did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        try:
            out, _ = self.proc.communicate(timeout=DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stop_file.unlink()
        self.rounds = int(out.strip() or 0)
        if self.proc.returncode and not any(exc):
            raise AssertionError(f"the in-place writer exited with {self.proc.returncode}")


def copy_demo_content(target: Path) -> Path:
    """The demo entries (Flextype's layout) copied to ``target``, which must not exist."""
    copy_tree(demo_content(), target)
    return target


def edit_entry(content_dir: Path, entry_id: str, title: str) -> None:
    """Change an entry's title on disk, as an editor would."""
    path = content_dir / entry_id / "entry.yaml"
    data = yaml.safe_load(path.read_text())
    data["title"] = title
    path.write_text(yaml.safe_dump(data))


def read_entry(url: str, entry_id: str = "hello") -> tuple[str, dict[str, Any]]:
    """A reference worker's entry: its ``X-Cache`` (HIT or MISS) and its fields."""
    status, headers, body = http("GET", f"{url}/entries/{entry_id}")
    if status != 200:
        raise AssertionError(f"GET {url}/entries/{entry_id} answered {status}: {body[:200]!r}")
    return headers["X-Cache"], json.loads(body)


# --- bus peers and the event stream of a test's own -----------------------------------


def bus_client(keys_dir: Path, name: str, allowed: bool = True) -> ClientSecurity:
    """CURVE keys for a socket of a test's own, talking to the service that uses ``keys_dir``.

    ``allowed``: a keypair in the service's allow-list (as a local worker called
    ``name`` would make); otherwise one the service has never seen. Apply it to
    a socket with ``.apply(sock)`` before connecting.
    """
    if allowed:
        return ClientSecurity.resolve(BusMode.CURVE, name=name, keys_dir=keys_dir)
    keypair, _ = ensure_keypair(keys_dir.parent / f"{keys_dir.name}-unknown", name)
    return ClientSecurity(BusMode.CURVE, keypair, load_public(keys_dir / f"{SERVICE_KEY}.key"))


class EventStream:
    """A blocking Server-Sent Events client of ``/api/v1/cache/events``: each event as (id, kind, data)."""

    def __init__(self, cluster: Cluster, last_event_id: str | None = None, rcvbuf: int = 0) -> None:
        self.conn = HTTPConnection("127.0.0.1", cluster.port, timeout=DEADLINE)
        if rcvbuf:
            self.conn.sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=DEADLINE)
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.conn.request("GET", f"/api/v1/cache/events?{cluster.creds()}", headers=headers)
        self.response: HTTPResponse | None = None
        self.last_id: str | None = None
        self._events: Iterator[tuple[str | None, str, Any]] | None = None

    def open(self) -> HTTPResponse:
        if self.response is None:
            self.response = self.conn.getresponse()
        return self.response

    def next(self) -> tuple[str | None, str, Any] | None:
        """The next event, or None when the server ended the stream."""
        if self._events is None:
            self._events = read_events(self.open())
        event = next(self._events, None)
        if event is not None and event[0] is not None:
            self.last_id = event[0]
        return event

    def until(self, predicate: Callable[[str, Any], bool], what: str) -> list[tuple[str | None, str, Any]]:
        """Events up to and including the first that matches ``predicate``."""
        seen: list[tuple[str | None, str, Any]] = []
        while True:
            event = self.next()
            if event is None:
                raise AssertionError(f"stream ended before {what}; saw {[e[1] for e in seen]}")
            seen.append(event)
            if predicate(event[1], event[2]):
                return seen

    def close(self) -> None:
        self.conn.close()


def expected_names(clear: dict[str, Any]) -> list[str]:
    """The names of the worker processes a clear expected, sorted, one per process
    (a clear lists processes by id; tests start workers by name)."""
    return sorted(name for name, group in clear["groups"].items() for _ in range(group["expected"]))


# --- a clock and a cache of a test's own ---------------------------------------------


class FakeClock:
    """A clock that moves only when told to, for the caches' and leases' ``clock``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyCache(Cache):
    """An application's cache whose purges raise while ``failing`` is set (its backing store is down)."""

    failing = False

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        if self.failing:
            raise RuntimeError("the backing store is down")
        return super().clear(clear_id=clear_id, seq=seq)

"""Which of several service instances publishes: the one holding the lead.

Several ``cachebus serve`` processes share one tokens directory
(docs/scale-out.md). Exactly one of them, the one holding an exclusive
``flock`` on ``<tokens_dir>/.cachebus-lead``, publishes clears and heartbeats
and keeps the record; the others pass their workers' messages and their HTTP
requests to it, and each of them tries to take the lock every
``service.lead_poll`` seconds. A dead leader's lock is released with its
process, so a follower takes over within one poll.

The lock file also holds the leader's :class:`LeadRecord`: where its peers
reach it, and the position of its bus stream (epoch and last seq), rewritten
*before* each clear is sent. A follower that takes over on the same host and
boot continues that stream, so workers that heard every clear see no gap and
keep their caches; anywhere else (the record came from another host, or
from before a reboot) it starts a new epoch and every worker purges once,
because a write another host made without fsync may not have reached the file
(a seq reused for another clear could otherwise go unnoticed).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("cachebus.lead")

#: The lock file's name in the tokens directory (not a token's name: those are hex).
LEAD_FILE = ".cachebus-lead"
#: Bytes the record fills; rewritten in place with one ``pwrite``, padded with spaces.
RECORD_SIZE = 1024
#: Longest name, URL or endpoint a record may hold.
_MAX_TEXT = 200


@functools.cache
def boot_id() -> str:
    """This host's boot: two records with the same one were written on this host since it started.
    Read once: it does not change while a process runs."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:64]
    except OSError:
        return ""


@dataclass(frozen=True)
class LeadRecord:
    """What the leader says about itself in the lock file."""

    #: The instance's name (``service.name``), for logs and metrics.
    name: str
    #: Where its peers send the HTTP requests they pass on (``service.peer_url``).
    url: str
    #: Where its peers send their workers' messages (``bus.acks`` as peers reach it).
    acks: str
    #: Its bus stream: epoch and the last seq it published (or is about to).
    epoch: str
    seq: int
    pid: int
    boot: str

    def to_bytes(self, key: bytes = b"") -> bytes:
        """The record as written: JSON, signed with ``key`` (a MAC over the fields), padded."""
        fields = asdict(self)
        data = json.dumps({**fields, "mac": _mac(key, fields)}, separators=(",", ":")).encode()
        if len(data) > RECORD_SIZE:
            raise ValueError(f"a lead record of {len(data)} bytes does not fit in {RECORD_SIZE}")
        return data.ljust(RECORD_SIZE)

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes = b"") -> LeadRecord | None:
        """The record in ``data``, or None for anything that is not one (empty, torn, edited, or
        signed with another key: whoever can write the tokens directory must not be able to send
        a follower's requests, credentials and all, to an address of their choosing)."""
        try:
            fields: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(fields, dict) or set(fields) != {*cls.__dataclass_fields__, "mac"}:
            return None
        mac = fields.pop("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, fields)):
            return None
        texts = ("name", "url", "acks", "epoch", "boot")
        if not all(isinstance(fields[k], str) and len(fields[k]) <= _MAX_TEXT for k in texts):
            return None
        if not all(type(fields[k]) is int and 0 <= fields[k] < 2 ** 63 for k in ("seq", "pid")):
            return None
        return cls(**fields)


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


class Lead:
    """The lock and record file of one instance: taken or not, read, and rewritten in place.

    ``key`` signs the record: a secret every instance holds (the service's CURVE
    secret key, or ``bus.key``); without one (an insecure bus) records are unsigned.
    """

    def __init__(self, path: Path, key: bytes = b"") -> None:
        self.path = path
        self.key = key
        self.held = False
        self.unverified = False
        self._fd: int | None = None

    def open(self) -> None:
        """Open (or create) the file; raises ``OSError`` when the directory is unusable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link planted in the tokens directory never redirects the writes.
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    @property
    def opened(self) -> bool:
        return self._fd is not None

    def try_take(self) -> bool:
        """Take the lead if nobody holds it; True once held (and from then on)."""
        if self.held:
            return True
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if self.replaced():
            # The file was removed or replaced since it was opened: another process may lock the
            # one the path names now, so this lock guards nothing.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            return False
        self.held = True
        return True

    def read(self) -> LeadRecord | None:
        """The record as last written, or None if there is none that parses."""
        assert self._fd is not None
        data = os.pread(self._fd, RECORD_SIZE, 0)
        record = LeadRecord.from_bytes(data, self.key)
        #: Whether the last read found bytes that are no record of ours (torn, forged, or signed
        #: by an instance with another keypair).
        self.unverified = record is None and bool(data.strip())
        return record

    def replaced(self) -> bool:
        """Whether the path no longer names the file this instance locks (removed or replaced:
        another process could then lock the new file, so whoever holds this one must let go)."""
        assert self._fd is not None
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return True
        held = os.fstat(self._fd)
        return (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino)

    def write(self, record: LeadRecord) -> None:
        """Rewrite the record in place: one ``pwrite``, which readers on this host see at once.

        Raises ``OSError`` if it fails (on NFS, after the server revoked a lost lock):
        the caller must stop publishing.
        """
        assert self._fd is not None and self.held
        os.pwrite(self._fd, record.to_bytes(self.key), 0)

    def close(self) -> None:
        """Release the lead (if held) and close the file."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None
        self.held = False

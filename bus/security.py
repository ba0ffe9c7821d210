"""Who may use the bus: CURVE keys and an allow-list, a shared HMAC key, or nobody checks.

Three modes, chosen by two settings (``bus.key`` and ``bus.insecure``):

* **CURVE** (the default): ZeroMQ's CurveZMQ encrypts every connection and
  authenticates both ends. The service holds a keypair (``<keys_dir>/service.key``
  and ``service.key_secret``); both its sockets are CURVE servers, and pyzmq's
  ZAP authenticator (:mod:`zmq.auth`) lets in only clients whose public key is
  in the allow-list directory ``<keys_dir>/workers/`` (any ``*.key`` file),
  read again whenever it changes. Workers are CURVE clients with their own
  keypair and the service's public key. The transport then vouches for every
  message's sender: the ROUTER reads the client's key from each frame's
  ``User-Id``, and the record binds each worker to it.
* **HMAC** (``bus.key`` set): every message is signed with the shared key, and
  a receiver refuses an old or repeated signature (see :class:`~cachebus.bus.protocol.Codec`).
  Anyone can still connect and read, and every key holder can speak for any worker.
* **Insecure** (``bus.insecure: true``): no check at all, with a warning at every start.

Keys are pyzmq certificate files (:func:`zmq.auth.create_certificates`). Files
are created with mode 0600 and directories with 0700, so a local setup needs
no manual step: the service creates its keypair on first start, and a local
worker creates its own in the allow-list directory, which allows it.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio  # loaded by zmq.auth.asyncio anyway
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from .peers import PeerLog, Trouble

log = logging.getLogger("cachebus.security")

#: Where a local setup keeps its keys, relative to the directory a process starts in.
DEFAULT_KEYS_DIR = "var/keys"
#: The service's keypair: ``<keys_dir>/service.key`` (public) and ``service.key_secret``.
SERVICE_KEY = "service"
#: The allow-list, under the keys directory: one ``<name>.key`` public key file per worker.
WORKERS_DIR = "workers"
#: Under keys_dir: the public keys of relays, which may speak for the workers below them.
RELAYS_DIR = "relays"
#: The ZAP domain of both service sockets; the authenticator answers for it alone.
ZAP_DOMAIN = "cachebus"

INSECURE_WARNING = ("bus.insecure is true: the bus is not authenticated. Any process that can reach its "
                    "ports can read every clear, and forge hellos and acks (docs/security.md)")


class BusMode(enum.StrEnum):
    """How the bus authenticates its peers (see the module docstring)."""

    CURVE = "curve"
    HMAC = "hmac"
    INSECURE = "insecure"


def bus_mode(key: str | bytes, insecure: bool) -> BusMode:
    """The mode the settings ask for; raises ``ValueError`` when they contradict each other."""
    if insecure and key:
        raise ValueError("insecure and a key exclude each other: a key signs every message, "
                         "insecure checks nothing")
    if insecure:
        return BusMode.INSECURE
    return BusMode.HMAC if key else BusMode.CURVE


class KeyFileError(Exception):
    """A key file that is missing or unusable. ``str()`` is one line, and never holds a secret."""


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair, z85-encoded as ZeroMQ's socket options take it."""

    public: bytes
    secret: bytes
    #: The secret key file it was read from.
    path: Path

    @property
    def public_file(self) -> Path:
        return self.path.with_suffix(".key")


def key_name(name: str) -> str:
    """``name`` as a key file name: letters, digits, ``.``, ``_`` and ``-`` only, nothing hidden."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:128].lstrip(".")
    return cleaned or "worker"


def _valid(key: bytes | None) -> bool:
    try:
        return key is not None and len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, TypeError):
        return False


def _read_certificate(path: Path) -> tuple[bytes | None, bytes | None]:
    """zmq.auth's reading of a certificate file, its failures as one :class:`KeyFileError`."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a readable key file ({type(exc).__name__})") from None


def load_public(path: Path) -> bytes:
    """The z85 public key in the certificate file ``path``."""
    public, _ = _read_certificate(path)
    if not _valid(public):
        raise KeyFileError(f"{path}: not a CURVE public key")
    assert public is not None
    return public


def load_keypair(path: Path) -> Keypair:
    """The keypair in the secret certificate file ``path``."""
    public, secret = _read_certificate(path)
    if not (_valid(public) and _valid(secret)):
        raise KeyFileError(f"{path}: not a CURVE secret key file")
    assert public is not None and secret is not None
    return Keypair(public=public, secret=secret, path=path)


def private_dir(path: Path) -> Path:
    """Create ``path`` readable by this user alone (mode 0700) if missing; its parents, if
    missing, get the default mode. An existing directory is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def ensure_keypair(directory: Path, name: str) -> tuple[Keypair, bool]:
    """The keypair ``<directory>/<name>.key_secret``, created first if missing; and whether it was created.

    Creation is atomic and never replaces a key: the files are written (mode
    0600) in a private temporary directory and linked into place, so two
    processes starting at once end up with the same keypair.
    """
    secret_file = directory / f"{name}.key_secret"
    try:
        created = False if secret_file.exists() else _create_keypair(directory, name, secret_file)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot create a keypair there ({exc.strerror or exc})") from None
    keypair = load_keypair(secret_file)
    if not keypair.public_file.exists():
        _write_public(keypair)
    return keypair, created


def _create_keypair(directory: Path, name: str, secret_file: Path) -> bool:
    """Create ``secret_file`` and its public file; False if another process made it first."""
    private_dir(directory)
    scratch = Path(tempfile.mkdtemp(prefix=".new-key-", dir=directory))
    try:
        public_tmp, secret_tmp = (Path(p) for p in zmq.auth.create_certificates(scratch, name))
        for path in (public_tmp, secret_tmp):
            path.chmod(0o600)
        try:
            os.link(secret_tmp, secret_file)
        except FileExistsError:
            return False  # another process made it first: use theirs
        os.replace(public_tmp, secret_file.with_suffix(".key"))
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_public(keypair: Keypair) -> None:
    """(Re)write the public key file beside a secret one, as ``create_certificates`` would."""
    fd, tmp = tempfile.mkstemp(prefix=".new-key-", dir=keypair.path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write('#   ZeroMQ CURVE Public Certificate\nmetadata\ncurve\n'
                f'    public-key = "{keypair.public.decode()}"\n')
    os.replace(tmp, keypair.public_file)


# --- the service's side ---------------------------------------------------------


class AllowList:
    """Worker public keys allowed on the bus: every ``*.key`` file in one directory.

    A credentials provider for :meth:`zmq.auth.Authenticator.configure_curve_callback`:
    the authenticator asks on each new connection. The directory is read again
    when its modification time changes (a key file added or removed), and on an
    unknown key at most once a second (a file replaced in place), so adding a
    key needs no restart and a flood of unknown keys costs no disk reads.
    """

    def __init__(self, directory: Path, peers: PeerLog, rescan_interval: float = 1.0) -> None:
        self.directory = directory
        self.peers = peers
        self.rescan_interval = rescan_interval
        #: z85 public key -> the file names (without .key) that allow it.
        self._keys: dict[bytes, set[str]] = {}
        #: key file name (without .key) -> the z85 public key in it.
        self._names: dict[str, bytes] = {}
        self._mtime: int | None = None
        self._scanned_at = float("-inf")
        self._looked_at = float("-inf")

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether the client with z85 public ``key`` may connect. Never raises: a
        raise would stop pyzmq's ZAP task, and with it every new connection."""
        try:
            if self.knows(key):
                return True
            self.peers.report(f"key {key.decode(errors='replace')[:40]}", Trouble.REFUSED,
                              f"public key not in the allow-list {self.directory}")
        except Exception as exc:
            self.peers.report("the allow-list", Trouble.FAILED, f"{type(exc).__name__}: {exc}", exc_info=exc)
        return False

    def knows(self, key: bytes, fresh_within: float = 0.0) -> bool:
        """Whether ``key`` is in the list, reading the directory again as :meth:`callback` does;
        says nothing of a key it does not know. ``fresh_within``: seconds a known key may rely on
        the last look at the directory (a check per relayed message, not per connection: a stat
        for each of ten thousand acks was a tenth of the service's CPU, py-spy)."""
        if fresh_within and key in self._keys and time.monotonic() - self._looked_at < fresh_within:
            return True  # an unknown key is always looked for again: one added a moment ago joins at once
        self._refresh(force=False)
        if key not in self._keys and time.monotonic() - self._scanned_at >= self.rescan_interval:
            self._refresh(force=True)
        return key in self._keys

    def name_of(self, key: bytes) -> str | None:
        """The name of a key file holding ``key`` (the first, if several do)."""
        names = self._keys.get(key)
        return min(names) if names else None

    def owner(self, name: str) -> str | None:
        """The z85 key of ``<name>.key`` in the allow-list, if there is such a file: the
        worker name is then reserved for that key."""
        key = self._names.get(name)
        return key.decode() if key is not None else None

    def _refresh(self, force: bool) -> None:
        self._looked_at = time.monotonic()
        try:
            mtime = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if not force and mtime == self._mtime:
            return
        keys: dict[bytes, set[str]] = {}
        names: dict[str, bytes] = {}
        for path in sorted(self.directory.glob("*.key")) if mtime is not None else ():
            try:
                public = load_public(path)
            except KeyFileError as exc:
                self.peers.report(str(path), Trouble.UNDECODABLE, str(exc))
                continue
            keys.setdefault(public, set()).add(path.stem)
            names[path.stem] = public
        self._keys, self._names, self._mtime = keys, names, mtime
        self._scanned_at = time.monotonic()


#: Seconds a relayed message's key check may rely on the last look at ``workers/``.
RELAYED_KEY_FRESHNESS = 0.5


class ServiceSecurity:
    """The service's half: its keypair, the allow-list and the ZAP authenticator (CURVE mode)."""

    def __init__(self, mode: BusMode, keys_dir: Path, peers: PeerLog) -> None:
        self.mode = mode
        self.keys_dir = keys_dir
        self.keypair: Keypair | None = None
        self.allow_list: AllowList | None = None
        #: Relays' public keys (docs/scale-out.md): they may connect, and speak for the workers below them.
        self.relays: AllowList | None = None
        self._authenticator: AsyncioAuthenticator | None = None
        if mode is BusMode.CURVE:
            try:
                private_dir(private_dir(keys_dir) / WORKERS_DIR)
            except OSError as exc:
                raise KeyFileError(f"{keys_dir}: cannot create the keys directory ({exc.strerror or exc})") from None
            self.keypair, created = ensure_keypair(keys_dir, SERVICE_KEY)
            if created:
                log.info("created the service's bus keypair in %s", keys_dir)
            self.allow_list = AllowList(keys_dir / WORKERS_DIR, peers)
            self.relays = AllowList(keys_dir / RELAYS_DIR, peers)

    @property
    def authenticates(self) -> bool:
        """Whether every received frame carries its sender's authenticated key (``User-Id``)."""
        return self.allow_list is not None

    def owner(self, name: str) -> str | None:
        """The key a worker name is reserved for (``workers/<name>.key``), if any."""
        return self.allow_list.owner(name) if self.allow_list is not None else None

    def relay_name(self, key: str | None) -> str | None:
        """The name of the relay whose key is ``key`` (``relays/<name>.key``), or None for any other key."""
        if self.relays is None or key is None or not self.relays.knows(key.encode()):
            return None
        return self.relays.name_of(key.encode())

    def is_peer(self, key: str | None) -> bool:
        """Whether ``key`` is this service's own: another instance sharing its keypair (docs/scale-out.md)."""
        return self.keypair is not None and key is not None and key.encode() == self.keypair.public

    def peer_client(self) -> ClientSecurity:
        """How this instance connects to another as a client: with the service's own keypair."""
        if self.keypair is None:
            return ClientSecurity(self.mode)
        return ClientSecurity(self.mode, self.keypair, self.keypair.public)

    def allows_worker(self, key: str | None) -> bool:
        """Whether a worker with ``key`` would be allowed to connect here itself (``workers/``).

        Asked for every relayed message, so the directory is looked at again at most every
        :data:`RELAYED_KEY_FRESHNESS` seconds: a removed key stops a relayed worker within that,
        where a direct worker's open connection is never asked again.
        """
        return (self.allow_list is not None and key is not None
                and self.allow_list.knows(key.encode(), RELAYED_KEY_FRESHNESS))

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server that asks the authenticator about every client."""
        if self.keypair is None:
            return
        sock.curve_server = True
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.zap_domain = ZAP_DOMAIN.encode()
        # Without this, a CURVE socket whose ZAP handler is gone lets every client in.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def start(self, ctx: zmq.asyncio.Context) -> None:
        """Start answering ZAP requests; call on the running event loop, before binding."""
        if self.mode is BusMode.INSECURE:
            log.warning(INSECURE_WARNING)
        if self.allow_list is None:
            log.info("bus security: %s", self.mode)
            return
        self._authenticator = AsyncioAuthenticator(ctx, log=logging.getLogger("cachebus.zap"))
        self._authenticator.start()
        self._authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_WorkersOrRelays(
            self.allow_list, self.relays, self.keypair.public if self.keypair else None))
        log.info("bus security: curve; service public key %s, workers allowed by the key files in %s",
                 self.keypair.public_file if self.keypair else "?", self.allow_list.directory)

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


class _WorkersOrRelays:
    """The ZAP check: a worker's key, a relay's, or the service's own (another instance's).
    Only an unknown key is reported (by the workers' list)."""

    def __init__(self, workers: AllowList, relays: AllowList | None, own: bytes | None = None) -> None:
        self.workers = workers
        self.relays = relays
        self.own = own

    def callback(self, domain: str, key: bytes) -> bool:
        if self.own is not None and key == self.own:
            return True
        try:
            if self.relays is not None and self.relays.knows(key):
                return True
        except Exception:  # never raise into pyzmq's ZAP task; the workers' list reports
            pass
        return self.workers.callback(domain, key)


# --- a worker's side -------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    """A subscriber's half: in CURVE mode, its keypair and the service's public key."""

    mode: BusMode
    keypair: Keypair | None = None
    server_key: bytes | None = None

    @classmethod
    def resolve(cls, mode: BusMode, *, name: str, keys_dir: str | os.PathLike[str],
                server_key: str | bytes | None = None,
                secret_key_file: str | os.PathLike[str] | None = None) -> ClientSecurity:
        """Find (or create) what ``mode`` needs. Raises :class:`KeyFileError` with one line saying what is missing.

        The service's public key is ``server_key``, or read from
        ``<keys_dir>/service.key``. The worker's keypair is ``secret_key_file``
        (which must exist), or ``<keys_dir>/workers/<name>.key_secret``, created
        when missing: in the allow-list directory, which also allows it for a
        service on this host reading the same ``keys_dir``.
        """
        if mode is not BusMode.CURVE:
            return cls(mode)
        keys = Path(keys_dir)
        if server_key:
            server = server_key.encode() if isinstance(server_key, str) else server_key
            if not _valid(server):
                raise KeyFileError("server_key: not a z85-encoded CURVE public key")
        else:
            server_file = keys / f"{SERVICE_KEY}.key"
            if not server_file.exists():
                raise KeyFileError(f"no service public key at {server_file}: the service writes it on its first "
                                "start; on another host, copy the service's file there")
            server = load_public(server_file)
        if secret_key_file:
            # Named on purpose, so made on purpose (`cachebus keys create`): a typo must not
            # quietly make a new key that the service does not know.
            keypair, created = load_keypair(Path(secret_key_file)), False
        else:
            keypair, created = ensure_keypair(private_dir(keys) / WORKERS_DIR, key_name(name))
        if created:
            log.info("created this worker's bus keypair %s: a service reading %s allows it already; a service "
                     "on another host, once %s is copied to its keys_dir/%s/", keypair.path, keys,
                     keypair.public_file.name, WORKERS_DIR)
        return cls(mode, keypair, server)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the service (before it connects)."""
        if self.keypair is None or self.server_key is None:
            return
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.keypair.public
        sock.curve_secretkey = self.keypair.secret

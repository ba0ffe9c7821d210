"""The bus subscriber any Python process can embed to have its caches cleared.

Asyncio applications use :class:`Subscriber`; threaded ones (a WSGI app, a
Celery worker) use :class:`ThreadedSubscriber`, which runs the same code on
its own event loop in a background thread::

    cache = Cache()
    subscriber = ThreadedSubscriber([cache], name="web-1")
    subscriber.start()

The subscriber connects a SUB socket to the service's commands and a DEALER to
its ack channel. By default both are CURVE clients (:mod:`cachebus.bus.security`):
the subscriber reads the service's public key from ``<keys_dir>/service.key``
and uses its own keypair, ``<keys_dir>/workers/<name>.key_secret``, created
when missing, which a service on the same host with the same ``keys_dir``
allows. A shared ``key`` selects the HMAC mode instead, and ``insecure=True``
no authentication at all.

It says hello once its subscription has delivered a first
message (so the service never expects it before it can hear), purges its
targets on every clear, and acks each purge. Clears that arrive together are
coalesced into one purge. It watches the sequence numbers in commands and
heartbeats: a gap or a new epoch means it may have missed a clear, and it
purges everything, because a clear-all is idempotent and always safe.

Targets that hold a lease (``hold_lease``/``revoke_lease``, as
:class:`~cachebus.workers.cache.Cache` does) are trusted only for
``heartbeat_interval * liveness`` seconds after the service was last heard.
When the lease lapses they bypass themselves; when the service is heard again
the subscriber purges once (cause ``reconnect``) before renewing it. A target
starts without a lease, so nothing cached before the subscriber synced is
served.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import zmq
import zmq.asyncio

from cachebus.bus.endpoints import DEFAULT_ACKS, DEFAULT_PUBLISH
from cachebus.bus.peers import PeerLog, Trouble, peer_address
from cachebus.bus.protocol import (
    Ack,
    Bye,
    Clear,
    Codec,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    PurgeCause,
    Welcome,
    WorkerHeartbeat,
    worst,
)
from cachebus.bus.security import DEFAULT_KEYS_DIR, INSECURE_WARNING, BusMode, ClientSecurity, bus_mode, key_name
from cachebus.bus.sockets import configure, drain, plain

from .cache import Purgeable

log = logging.getLogger("cachebus.subscriber")

#: Most commands handled in one batch; the batch is purged once.
_MAX_BATCH = 1000


@runtime_checkable
class Leased(Protocol):
    """A purge target that stops trusting its entries when its lease lapses."""

    def hold_lease(self, until: float) -> None: ...

    def revoke_lease(self) -> None: ...


def default_name() -> str:
    """``<hostname>-<pid>``: unique enough when no name is configured."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Subscriber:
    """Purges ``targets`` when the service says so, and acks each purge.

    ``targets`` are objects with ``clear(*, clear_id, seq) -> int`` (see
    :class:`~cachebus.workers.cache.Purgeable`); ``clear`` may also be a coroutine
    function, for targets that do I/O.

    Security, as ``bus.*`` in the settings: by default CURVE with the keys in
    ``keys_dir`` (``server_key`` gives the service's z85 public key instead of
    ``<keys_dir>/service.key``, ``secret_key_file`` this process's keypair
    instead of ``<keys_dir>/workers/<name or hostname>.key_secret``); a shared
    ``key`` for HMAC; or ``insecure=True``. :meth:`start` raises
    :class:`~cachebus.bus.security.KeyFileError` when a key it needs is missing.
    """

    def __init__(
        self,
        targets: Iterable[Purgeable],
        *,
        name: str | None = None,
        publish: str = DEFAULT_PUBLISH,
        acks: str = DEFAULT_ACKS,
        endpoint: str = "",
        key: str | bytes = b"",
        insecure: bool = False,
        keys_dir: str | os.PathLike[str] = DEFAULT_KEYS_DIR,
        server_key: str | bytes | None = None,
        secret_key_file: str | os.PathLike[str] | None = None,
        heartbeat_interval: float = 0.5,
        liveness: int = 3,
        recv_hwm: int = 10_000,
        socket_buffer: int = 0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.targets = list(targets)
        # isinstance against a runtime-checkable Protocol is slow: decide once.
        self._leased_targets: list[Leased] = [t for t in self.targets if isinstance(t, Leased)]
        self.name = name or default_name()
        self.instance = uuid.uuid4().hex
        self.publish = publish
        self.acks = acks
        self.endpoint = endpoint
        raw_key = key.encode() if isinstance(key, str) else key
        self.mode = bus_mode(raw_key, insecure)
        self.heartbeat_interval = heartbeat_interval
        #: How long the service may stay silent before targets stop being trusted.
        self.lease_seconds = heartbeat_interval * liveness
        self.codec = Codec(raw_key, max_age=self.lease_seconds)
        # One keypair per configured name, or per host: not per process, as the
        # default name (with its pid) would make.
        self._security_options: dict[str, Any] = {
            "name": key_name(name or socket.gethostname()), "keys_dir": keys_dir, "server_key": server_key,
            "secret_key_file": secret_key_file}
        self.security = ClientSecurity(self.mode)
        self.recv_hwm = recv_hwm
        self.socket_buffer = socket_buffer
        #: time.monotonic() until which leased targets are trusted; None before the first sync.
        self.lease_until: float | None = None
        self.last_cause: PurgeCause | None = None
        #: The service epoch and last command seq this subscriber has seen.
        self.epoch: str | None = None
        self.seq = 0
        self.purges = 0
        #: How many purges each cause brought about.
        self.purges_by_cause: dict[PurgeCause, int] = {}
        self.peers = PeerLog(log)
        self._synced = asyncio.Event()
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: time.monotonic() of the last hello not yet welcomed.
        self._hello_at: float | None = None
        #: time.monotonic() of the SUB socket's last connect.
        self._connected_at = 0.0

    @property
    def synced(self) -> bool:
        """True once the subscription is proven and the service welcomed us."""
        return self._synced.is_set()

    @property
    def trusted(self) -> bool:
        """True while the service was heard recently enough to trust the targets."""
        return self.lease_until is not None and time.monotonic() < self.lease_until

    def _leased(self) -> list[Leased]:
        return self._leased_targets

    async def start(self) -> None:
        """Connect both sockets and start listening."""
        for target in self._leased():
            target.revoke_lease()
        self.security = ClientSecurity.resolve(self.mode, **self._security_options)
        if self.mode is BusMode.INSECURE:
            log.warning(INSECURE_WARNING)
        self._sub = self._ctx.socket(zmq.SUB)
        # No ZMTP heartbeat on SUB: libzmq aborts a subscriber whose full queue meets a
        # heartbeat timeout (zeromq/libzmq#4767); the service's heartbeats and the lease do the job.
        configure(self._sub, recv_hwm=self.recv_hwm, buffer=self.socket_buffer)
        self.security.apply(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(self.publish)
        self._connected_at = time.monotonic()
        self._waiting = plain(self._sub)
        # A plain socket, watched by the loop directly: every ack and heartbeat
        # goes out here, and zmq.asyncio's per-send future and extra loop pass
        # were a third of a subscriber's CPU with a thousand in one process.
        self._dealer = zmq.Socket(self._ctx, zmq.DEALER)
        configure(self._dealer, heartbeat=self.heartbeat_interval)
        self.security.apply(self._dealer)
        self._dealer.connect(self.acks)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._dealer.FD, self._replies)
        self._tasks = [
            asyncio.create_task(self._commands(), name=f"{self.name}-commands"),
            asyncio.create_task(self._heartbeats(), name=f"{self.name}-heartbeats"),
        ]
        log.info("subscriber %s listening to %s, acking to %s", self.name, self.publish, self.acks)

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until :attr:`synced`; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Say bye, stop listening and close the sockets."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._dealer is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._dealer.FD)
            self._send(Bye(name=self.name, instance=self.instance))
            self._dealer.close(linger=500)
            self._dealer = None
        if self._sub is not None:
            self._sub.close(linger=0)
        if self._own_context:
            self._ctx.term()

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # --- commands from the PUB socket ---------------------------------------

    async def _commands(self) -> None:
        assert self._sub is not None
        while True:
            batch = [await self._sub.recv_multipart(copy=False)]
            lapsed = not self.trusted
            batch += drain(self._waiting, _MAX_BATCH - 1)
            try:
                messages = []
                for frames in batch:
                    try:
                        messages.append(self.codec.decode([f.bytes for f in frames]))
                    except ProtocolError as exc:
                        self.peers.report(peer_address(frames[0]), Trouble.UNDECODABLE, str(exc))
                await self._handle(messages, lapsed)
            except Exception as exc:
                # Half a batch may have been applied (a target's clear raised, say):
                # distrust the targets, so the next batch purges before they serve again.
                self._distrust()
                self.peers.failed(peer_address(batch[0][0]), exc)

    def _distrust(self) -> None:
        """Stop trusting the targets now; the next command purges them before renewing the lease."""
        self.lease_until = time.monotonic()
        for target in self._leased():
            target.revoke_lease()

    async def _handle(self, messages: list[Message], lapsed: bool = False) -> None:
        """Apply a batch of commands: at most one purge and one ack for all of them.

        ``lapsed`` says the lease had run out before the batch arrived: the
        targets may have missed anything, so they are purged before the lease
        is renewed.
        """
        commands = [m for m in messages if isinstance(m, (Clear, Heartbeat))]
        if not commands:
            return
        # When several causes apply, the most telling is reported (see PurgeCause).
        cause: PurgeCause | None = None
        newest_clear: Clear | None = None
        announce = False
        if lapsed:
            cause = PurgeCause.RECONNECT
            announce = True
            if self.lease_until is not None:
                log.warning("heard the service again after %.1f s of silence: purging",
                            time.monotonic() - self.lease_until + self.lease_seconds)
        for msg in commands:
            if msg.epoch != self.epoch:
                if self.epoch is not None:
                    log.warning("service epoch changed from %s to %s: purging", self.epoch, msg.epoch)
                    cause = worst(cause, PurgeCause.EPOCH)
                announce = True
                self.epoch = msg.epoch
                self.seq = msg.seq - 1 if isinstance(msg, Clear) else msg.seq
            if isinstance(msg, Clear):
                if msg.seq <= self.seq:
                    continue
                cause = worst(cause, PurgeCause.CLEAR)
                newest_clear = msg
            if msg.seq > self.seq + (1 if isinstance(msg, Clear) else 0):
                log.warning("missed commands %d..%d: purging", self.seq + 1, msg.seq)
                cause = worst(cause, PurgeCause.GAP)
            self.seq = max(self.seq, msg.seq)
        if cause is not None:
            await self._purge(cause, newest_clear)
        self._renew_lease(commands[-1])
        if announce:
            self._say_hello()

    def _say_hello(self) -> None:
        self._synced.clear()
        self._hello_at = time.monotonic()
        self._send(Hello(**self._identity()))

    def _renew_lease(self, newest: Clear | Heartbeat) -> None:
        """Trust the targets for one lease from when ``newest`` was sent.

        The message's age (by the wall clocks of service and worker) is taken
        off, so a backlog of old messages cannot extend trust; clock skew that
        makes the age look negative counts as zero.
        """
        age = max(0.0, time.time() - newest.ts)
        until = time.monotonic() + self.lease_seconds - age
        if until <= time.monotonic():
            log.debug("newest command is %.1f s old: lease not renewed", age)
            return
        self.lease_until = until
        for target in self._leased():
            target.hold_lease(until)

    async def _heartbeats(self) -> None:
        """Tell the service we are alive, while we can vouch for our targets."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if self.lease_until is None:
                self._never_heard()
            if self.epoch is not None and self.trusted and self._unwelcomed():
                continue
            if self.epoch is not None and self.trusted:
                try:
                    self._send(WorkerHeartbeat(**self._identity(), stats=self._stats()))
                except Exception as exc:  # a target's stats() raised: report it, keep beating next time
                    self.peers.failed("this process", exc, "heartbeat")

    # libzmq ends a session whose handshake the service refused (a CURVE key not in
    # its allow-list) and never tries again. So that a key added to the allow-list
    # later works without restarting the worker, the subscriber connects again
    # itself while the service stays silent.

    def _never_heard(self) -> None:
        """Connect the SUB again if nothing came since it connected, a lease ago."""
        if time.monotonic() - self._connected_at < self.lease_seconds:
            return
        assert self._sub is not None
        self.peers.report(self.publish, Trouble.UNANSWERED, f"nothing heard yet: connecting again{self._key_hint()}")
        _reconnect(self._sub, self.publish)
        self._connected_at = time.monotonic()

    def _unwelcomed(self) -> bool:
        """Connect the back channel again and repeat the hello, if the last hello went
        unanswered for a lease. Also covers a hello lost while the back channel was down."""
        if self._synced.is_set() or self._hello_at is None:
            return False
        waited = time.monotonic() - self._hello_at
        if waited < self.lease_seconds:
            return False
        assert self._dealer is not None
        self.peers.report(self.acks, Trouble.UNANSWERED,
                          f"no welcome {waited:.1f} s after hello: connecting again{self._key_hint()}")
        _reconnect(self._dealer, self.acks)
        self._say_hello()
        return True

    def _key_hint(self) -> str:
        if self.security.keypair is None:
            return ""
        return (f" (is the service running, and does it allow this worker's public key "
                f"{self.security.keypair.public_file}?)")

    def _identity(self) -> dict[str, Any]:
        """The fields of :class:`~cachebus.bus.protocol.WorkerIdentity` for this subscriber."""
        return {"name": self.name, "instance": self.instance, "host": socket.gethostname(),
                "pid": os.getpid(), "endpoint": self.endpoint, "epoch": self.epoch or "", "seq": self.seq}

    def _stats(self) -> dict[str, Any]:
        totals: dict[str, Any] = {"purges": self.purges, "last_purge_cause": self.last_cause,
                                  "bypass": not self.trusted}
        for target in self.targets:
            stats = getattr(target, "stats", None)
            if callable(stats):
                for key, value in stats().items():
                    if key in ("entries", "hits", "misses", "evictions", "bypass_seconds"):
                        totals[key] = totals.get(key, 0) + value
        lookups = totals.get("hits", 0) + totals.get("misses", 0)
        if lookups:
            totals["hit_ratio"] = totals["hits"] / lookups
        return totals

    async def _purge(self, cause: PurgeCause, clear: Clear | None) -> None:
        started = time.perf_counter()
        dropped = 0
        for target in self.targets:
            result = target.clear(clear_id=clear.id if clear else None, seq=self.seq)
            if inspect.isawaitable(result):
                result = await result
            dropped += int(result or 0)
        purge_ms = (time.perf_counter() - started) * 1000
        self.purges += 1
        self.purges_by_cause[cause] = self.purges_by_cause.get(cause, 0) + 1
        self.last_cause = cause
        log.info("purged %d entries in %.2f ms (cause: %s, seq %d)", dropped, purge_ms, cause, self.seq)
        self._send(Ack(name=self.name, instance=self.instance, epoch=self.epoch or "", seq=self.seq,
                       clear_id=clear.id if clear else "", dropped=dropped, purge_ms=purge_ms,
                       cause=cause))

    # --- replies on the DEALER socket ---------------------------------------

    def _replies(self) -> None:
        """Handle every reply waiting on the DEALER (the loop calls this when its FD signals).

        ZeroMQ's FD is edge-triggered: it signals a change, not a level, so
        everything readable is read now, and :meth:`_send` calls this again
        when a send may have taken the signal for a reply that arrived meanwhile.
        """
        dealer = self._dealer
        while dealer is not None and _readable(dealer):
            frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                msg = self.codec.decode([f.bytes for f in frames])
                if isinstance(msg, Welcome):
                    log.info("welcomed by service epoch %s at seq %d", msg.epoch, msg.seq)
                    self._hello_at = None
                    self._synced.set()
            except ProtocolError as exc:
                self.peers.report(peer_address(frames[0]), Trouble.UNDECODABLE, str(exc))
            except Exception as exc:
                self.peers.failed(peer_address(frames[0]), exc)

    def _send(self, msg: Message) -> None:
        """Send on the back channel without ever blocking the worker.

        With no service connected the message is dropped: acks for an epoch
        the service no longer has would be ignored anyway.
        """
        assert self._dealer is not None and self._loop is not None
        try:
            self._dealer.send_multipart(self.codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("back channel unavailable; %s dropped", msg.KIND.decode())
        if _readable(self._dealer):
            self._loop.call_soon(self._replies)

    @classmethod
    def from_settings(cls, targets: Iterable[Purgeable], path: str | os.PathLike[str] | None = None, *,
                      environ: Mapping[str, str] = os.environ, **overrides: Any) -> Subscriber:
        """A subscriber configured as the service is: keywords > environment > settings file.

        The file is ``path``, else ``$CACHEBUS_CONFIG``, else none (the built-in
        defaults); the variables are ``CACHEBUS_PUBLISH``, ``CACHEBUS_ACKS``,
        ``CACHEBUS_KEY`` and the others in :mod:`cachebus.workers.options`,
        which says what is read from where. A bad value raises
        :class:`~cachebus.settings.SettingsError`, one line naming the file and
        key or the variable.
        """
        # Imported here only to keep this addition in one place; options imports nothing of this module.
        from .options import embedder_settings, subscriber_options
        settings = embedder_settings(path, environ=environ)
        return cls(targets, **subscriber_options(settings, environ=environ, **overrides))


def _reconnect(sock: zmq.Socket, endpoint: str) -> None:
    """A fresh connection (and handshake) to ``endpoint``."""
    try:
        sock.disconnect(endpoint)
    except zmq.ZMQError:
        pass  # the session already ended: a refused handshake
    sock.connect(endpoint)


def _readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock`` (ZMQ_EVENTS is an int option; pyzmq types every option int | bytes)."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


class ThreadedSubscriber:
    """A :class:`Subscriber` on its own event loop in a daemon thread.

    For applications without asyncio. Targets must be thread-safe, as
    :class:`~cachebus.workers.cache.Cache` is.
    """

    def __init__(self, targets: Iterable[Purgeable], **options: Any) -> None:
        self._targets = list(targets)
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: Exception | None = None
        self.subscriber: Subscriber | None = None

    def start(self) -> None:
        """Start the background thread; returns once the sockets are connected.

        Raises what :meth:`Subscriber.start` raised (a missing key file, say).
        """
        self._thread = threading.Thread(target=self._run, name="cachebus-subscriber", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            self._loop = self.subscriber = None
            raise self._error

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            try:
                self.subscriber = Subscriber(self._targets, **self._options)
                await self.subscriber.start()
            except Exception as exc:
                self._error = exc
                if self.subscriber is not None:
                    await self.subscriber.stop()
            finally:
                self._started.set()

        self._loop.run_until_complete(main())
        if self._error is None:
            self._loop.run_forever()
        self._loop.close()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the service has welcomed this subscriber."""
        assert self._loop is not None and self.subscriber is not None
        future = asyncio.run_coroutine_threadsafe(self.subscriber.wait_synced(timeout), self._loop)
        return future.result()

    def stop(self) -> None:
        """Say bye, close the sockets and end the thread."""
        if self._loop is None or self.subscriber is None:
            return
        asyncio.run_coroutine_threadsafe(self.subscriber.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join()

    @classmethod
    def from_settings(cls, targets: Iterable[Purgeable], path: str | os.PathLike[str] | None = None, *,
                      environ: Mapping[str, str] = os.environ, **overrides: Any) -> ThreadedSubscriber:
        """:meth:`Subscriber.from_settings` for the threaded flavour; settings are read (and
        checked) now, in the calling thread."""
        from .options import embedder_settings, subscriber_options
        settings = embedder_settings(path, environ=environ)
        return cls(targets, **subscriber_options(settings, environ=environ, **overrides))

"""The bus subscriber any Python process can embed to have its caches cleared.

Asyncio applications use :class:`Subscriber`; threaded ones (a WSGI app, a
Celery worker) use :class:`ThreadedSubscriber`, which runs the same code on
its own event loop in a background thread::

    cache = Cache()
    subscriber = ThreadedSubscriber([cache, TTLCache(1000, 60), load_page], name="web")
    subscriber.start()          # in each process: after the fork, never before

**Targets.** Any cache object is a target, checked once when the subscriber is
built (:mod:`cachebus.workers.targets`): a ``clear(*, clear_id, seq)``
(:class:`~cachebus.workers.cache.Cache`), a ``clear()`` with no arguments
(``dict``, ``cachetools``, any ``MutableMapping``, Django cache backends), a
``functools.lru_cache``/``cache`` function (``cache_clear()``), or an async
``clear()``. Anything else is a :class:`TypeError` at construction.

**Identity.** ``name`` is a label many processes share, a role such as
``web`` (default: the host name); it also names the CURVE keypair. Each
process that starts a subscriber gets its own :attr:`Subscriber.instance`,
``<host>:<pid>:<random>``, made by :meth:`Subscriber.start`, and the service
counts processes by it. A subscriber started in one process and used in a
child forked from it would share the parent's sockets and identity: at fork
the child marks every started subscriber as forked, withdraws its targets'
leases and drops (never closes) the inherited sockets, and any later use
raises :class:`ForkedSubscriberError`. Start subscribers after the fork:
gunicorn's ``post_fork`` hook, uvicorn's startup/lifespan.

**Security.** The subscriber connects a SUB socket to the service's commands
and a DEALER to its ack channel. By default both are CURVE clients
(:mod:`cachebus.bus.security`): it reads the service's public key from
``<keys_dir>/service.key`` and uses the keypair
``<keys_dir>/workers/<name>.key_secret``, created when missing, which a
service on the same host with the same ``keys_dir`` allows. A shared ``key``
selects the HMAC mode instead, and ``insecure=True`` no authentication at all.

**Purges.** It says hello once its subscription has delivered a first message
(so the service never expects it before it can hear), purges its targets on
every clear meant for it, and acks each purge. Clears that arrive together are
coalesced into one purge of what they name together. A clear for a ``group``
(docs/scoped-clears.md) that names neither its ``name`` nor one of its
``labels`` is counted and otherwise ignored. It watches the sequence numbers in
commands and heartbeats: a gap or a new epoch means it may have missed a
clear, meant for it or not, and it purges everything, because a clear-all is
idempotent and always safe.

**Failing targets.** A target whose clear raises never stops the subscriber.
The error is logged with its traceback (one line per target per minute),
counted (:attr:`Subscriber.purge_failures`), and acked at once as a failed
purge, its type and message scrubbed of credentials. While a target fails
the subscriber still hears the service and heartbeats (its stats say
``failing``), but withdraws the lease of every leased target. It retries the
failed targets, and only those, on the next command or service heartbeat;
once all have succeeded it acks the purge as ok and renews the leases. A new
clear meanwhile purges every target, as always.

**The lease.** Targets that hold a lease (``hold_lease``/``revoke_lease``, as
:class:`~cachebus.workers.cache.Cache` does) are trusted only for
``heartbeat_interval * liveness`` seconds after the service was last heard.
Both values come from the service, in every welcome and heartbeat; a
subscriber configured with others logs one warning and follows the service.
When the lease lapses the targets bypass themselves; when the service is
heard again the subscriber purges once (cause ``reconnect``) before renewing
it. A target starts without a lease, so nothing cached before the subscriber
synced is served. Targets without a lease are purged, but nothing stops them
serving while the service is unreachable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import zmq
import zmq.asyncio

from cachebus.bus.endpoints import connect_all
from cachebus.bus.peers import PeerLog, Trouble, peer_address
from cachebus.bus.protocol import (
    Ack,
    Bye,
    Clear,
    Codec,
    Heartbeat,
    Hello,
    LeaseTerms,
    Message,
    OnSilence,
    ProtocolError,
    PurgeCause,
    PurgeOutcome,
    Welcome,
    WorkerHeartbeat,
    worst,
)
from cachebus.bus.reader import Batch, Reader, send_now
from cachebus.bus.scope import EVERYTHING, PurgeExtent, Scope, in_group
from cachebus.bus.security import INSECURE_WARNING, BusMode, ClientSecurity, key_name
from cachebus.bus.sockets import configure

from .options import SubscriberOptions, default_name, embedder_settings, subscriber_options
from .targets import MAX_ERROR, Leased, Target, adapt, describe_error, describe_traceback

__all__ = ["ForkedSubscriberError", "Leased", "Subscriber", "SubscriberOptions", "ThreadedSubscriber",
           "default_name"]

log = logging.getLogger("cachebus.subscriber")

#: Most commands handled in one batch; the batch is purged once.
_MAX_BATCH = 1000

#: Lease terms until the service is heard, when none were configured: they only time the reconnects
#: before the first message, since every welcome and heartbeat carries the service's own.
_INITIAL_HEARTBEAT_INTERVAL = 0.5
_INITIAL_LIVENESS = 3


#: Heartbeat stats summed over the targets that have ``stats()``.
_SUMMED_STATS = ("entries", "hits", "misses", "evictions", "bypass_seconds")


class ForkedSubscriberError(RuntimeError):
    """A subscriber started in one process was used in a child forked from it.

    The child shares the parent's sockets and identity, so it can neither
    purge nor prove anything: each process must start its own subscriber,
    after the fork.
    """

    def __init__(self, started_pid: int, pid: int) -> None:
        self.started_pid = started_pid
        self.pid = pid
        super().__init__(
            f"this subscriber was started in process {started_pid}, and this is process {pid}, forked from it: "
            "a forked child must not use its parent's sockets or identity. Build and start the subscriber after "
            "the fork, in each process: in gunicorn's post_fork or post_worker_init hook, with uvicorn in the "
            "application's startup or lifespan handler")


#: Subscribers started (and not stopped) in this process, for the at-fork hook.
_started: weakref.WeakSet[Subscriber] = weakref.WeakSet()
#: Instances made in this process: unique within it, whatever the random part draws.
_instances: set[str] = set()


def _after_fork_in_child() -> None:
    """In a forked child: no subscriber of the parent may serve, purge or ack here."""
    for subscriber in list(_started):
        subscriber._forked()
    _started.clear()
    _instances.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def new_instance() -> str:
    """``<host>:<pid>:<random>``: this process's identity on the bus, new at every start."""
    while True:
        instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        if instance not in _instances:
            _instances.add(instance)
            return instance


@dataclass
class _FailedPurge:
    """A purge some target failed: what the ok ack says once every target has been purged since."""

    cause: PurgeCause
    clear_id: str
    dropped: int
    purge_ms: float


class Subscriber:
    """Purges ``targets`` when the service says so, and acks each purge.

    ``targets`` are any cache objects :mod:`cachebus.workers.targets` accepts;
    one it cannot purge is a :class:`TypeError` here. ``name`` is a label many
    processes may share (default: the host name); each started process has
    its own :attr:`instance`.

    ``options`` and the keywords are
    :class:`~cachebus.workers.options.SubscriberOptions` (the keywords change
    the fields they name; an unknown one is a :class:`TypeError`):
    ``Subscriber([cache], name="web", insecure=True)``. :meth:`start` raises
    :class:`~cachebus.bus.security.KeyFileError` when a key it needs is missing.
    """

    def __init__(self, targets: Iterable[Any], options: SubscriberOptions | None = None, /,
                 **fields: Any) -> None:
        #: What it was told, checked (:class:`~cachebus.workers.options.SubscriberOptions`).
        self.options = opts = SubscriberOptions.of(options, **fields)
        self._targets: list[Target] = adapt(targets)
        #: The target objects, as given.
        self.targets = [target.obj for target in self._targets]
        self._leased_targets: list[Leased] = [t.leased for t in self._targets if t.leased is not None]
        self.name = opts.name
        #: More names this process answers to in a clear's ``group`` (``web``, ``eu``, ``host-3``).
        self.labels: tuple[str, ...] = opts.labels
        #: ``<host>:<pid>:<random>``, made by :meth:`start` (so a subscriber built before a fork and
        #: started after it gets the child's); empty before.
        self.instance = ""
        self._publish = opts.publish_endpoints
        self._acks = opts.acks_endpoints
        self.mode = opts.mode
        self._configured_terms = (opts.heartbeat_interval, opts.liveness)
        #: The lease terms in force: the service's once heard (:attr:`terms_from_service`), until then the
        #: configured or initial ones.
        self.heartbeat_interval: float = opts.heartbeat_interval or _INITIAL_HEARTBEAT_INTERVAL
        self.liveness: int = opts.liveness or _INITIAL_LIVENESS
        self.terms_from_service = False
        self._warned_terms = False
        self.codec = Codec(opts.raw_key, max_age=self.lease_seconds)
        self.security = ClientSecurity(self.mode)
        #: What the targets do once the service is silent for a lease (``bus.on_silence``).
        self.on_silence = opts.on_silence
        #: Seconds spent degraded (serving with no service heard) up to the last time it was heard again.
        self._degraded_total = 0.0
        self._warned_degraded = False
        #: time.monotonic() until which the service counts as heard; None before the first message.
        self.lease_until: float | None = None
        self.last_cause: PurgeCause | None = None
        #: The service epoch and last command seq this subscriber has seen.
        self.epoch: str | None = None
        self.seq = 0
        self.purges = 0
        #: How many purges each cause brought about.
        self.purges_by_cause: dict[PurgeCause, int] = {}
        #: Target clears that raised, in purges and in retries.
        self.purge_failures = 0
        #: The targets whose last clear raised, with the error their failed ack carried.
        self.failing: dict[Target, str] = {}
        self._failed_purge: _FailedPurge | None = None
        self.peers = PeerLog(log)
        self._synced = asyncio.Event()
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: Reader | None = None
        self._replies: Reader | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: The pid :meth:`start` ran in, while started.
        self._started_pid: int | None = None
        #: Set in a forked child: the pid the subscriber was started in.
        self._forked_from: int | None = None
        #: time.monotonic() of the last hello not yet welcomed.
        self._hello_at: float | None = None
        #: time.monotonic() of the SUB socket's last connect.
        self._connected_at = 0.0
        #: time.monotonic() of the last ack sent: the service counts it as a sign of life.
        self._acked_at = float("-inf")

    @property
    def lease_seconds(self) -> float:
        """How long the service may stay silent before targets stop being trusted."""
        return self.heartbeat_interval * self.liveness

    @property
    def synced(self) -> bool:
        """True once the subscription is proven and the service welcomed us."""
        return self._synced.is_set()

    @property
    def heard(self) -> bool:
        """True while the service was heard within a lease."""
        return self.lease_until is not None and time.monotonic() < self.lease_until

    @property
    def trusted(self) -> bool:
        """True while the targets may serve within the bound: the service was heard within a lease and
        no target is failing."""
        return self.heard and not self.failing

    @property
    def degraded(self) -> bool:
        """True while the targets serve without the bound: ``on_silence`` is ``serve``, the service was
        heard once, and not within the last lease."""
        return self.on_silence is OnSilence.SERVE and self.lease_until is not None and not self.heard

    @property
    def serving(self) -> bool:
        """True while the targets serve from their entries, within the bound or (degraded) without it."""
        return (self.heard or self.degraded) and not self.failing

    @property
    def degraded_seconds(self) -> float:
        """Seconds this subscriber has served degraded, including now."""
        ongoing = time.monotonic() - self.lease_until if self.degraded and self.lease_until is not None else 0.0
        return self._degraded_total + ongoing

    async def start(self) -> None:
        """Connect both sockets and start listening. In a forked child, raises :class:`ForkedSubscriberError`."""
        self._check_process()
        if self._started_pid is not None:
            raise RuntimeError(f"subscriber {self.name} is started already")
        for target in self._leased_targets:
            target.revoke_lease()
        opts = self.options
        self.security = ClientSecurity.resolve(self.mode, name=key_name(self.name), keys_dir=opts.keys_dir,
                                               server_key=opts.server_key, secret_key_file=opts.secret_key_file)
        if self.mode is BusMode.INSECURE:
            log.warning(INSECURE_WARNING)
        self.instance = new_instance()
        self._loop = asyncio.get_running_loop()
        # Made here, not when built: a context made before a fork is unusable in the child.
        self._ctx = opts.context or zmq.asyncio.Context()
        try:
            # Plain sockets, read from the loop's reader callbacks (bus.reader): zmq.asyncio's
            # future per receive was a large share of a worker's CPU per clear.
            self._sub = zmq.Socket(self._ctx, zmq.SUB)
            # No ZMTP heartbeat on SUB: libzmq aborts a subscriber whose full queue meets a
            # heartbeat timeout (zeromq/libzmq#4767); the service's heartbeats and the lease do the job.
            configure(self._sub, recv_hwm=opts.recv_hwm, buffer=opts.socket_buffer)
            self.security.apply(self._sub)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            for endpoint in self._publish:
                self._sub.connect(endpoint)
            self._connected_at = time.monotonic()
            # A plain socket, watched by the loop directly: every ack and heartbeat
            # goes out here, and zmq.asyncio's per-send future and extra loop pass
            # were a third of a subscriber's CPU with a thousand in one process.
            self._dealer = zmq.Socket(self._ctx, zmq.DEALER)
            # The ZMTP heartbeat keeps the interval known at start, even once the service's differs.
            configure(self._dealer, heartbeat=self.heartbeat_interval)
            self.security.apply(self._dealer)
            connect_all(self._dealer, self._acks)
        except BaseException:
            self._close()
            raise
        self._commands = Reader(self._sub, self._on_commands, _MAX_BATCH)
        self._replies = Reader(self._dealer, self._on_replies, _MAX_BATCH)
        self._commands.start()
        self._replies.start()
        self._tasks = [asyncio.create_task(self._heartbeats(), name=f"{self.name}-heartbeats")]
        self._started_pid = os.getpid()
        _started.add(self)
        log.info("subscriber %s (instance %s) listening to %s, acking to %s",
                 self.name, self.instance, opts.publish, opts.acks)

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until :attr:`synced`; False if ``timeout`` passed first."""
        self._check_process()
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Say bye, stop listening and close the sockets."""
        self._check_process()
        _started.discard(self)
        for task in self._tasks:
            task.cancel()
        for reader in (self._commands, self._replies):
            pending = reader.close() if reader is not None else None
            if pending is not None:
                self._tasks.append(cast("asyncio.Task[None]", pending))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._commands = self._replies = None
        if self._dealer is not None:
            self._send(Bye(name=self.name, instance=self.instance))
            self._dealer.close(linger=500)
        self._close()
        self._started_pid = None

    def _close(self) -> None:
        """Close whatever sockets :meth:`start` made, and the context if it made that too."""
        for sock in (self._dealer, self._sub):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        self._dealer = self._sub = None
        if self._ctx is not None and self.options.context is None:
            self._ctx.term()
        self._ctx = None

    def _check_process(self) -> None:
        if self._forked_from is not None:
            raise ForkedSubscriberError(self._forked_from, os.getpid())

    def _forked(self) -> None:
        """Called in a forked child (see :func:`_after_fork_in_child`); must never raise or block on the bus."""
        self._forked_from = self._started_pid or 0
        # The child's caches must not serve on the parent's lease, not even for a moment.
        for target in self._leased_targets:
            try:
                target.revoke_lease()
            except Exception:  # nothing may escape an at-fork hook
                pass
        self.lease_until = None
        # Dropped, never closed: the sockets and context are the parent's, and using them here,
        # even to close them, is unsafe (pyzmq makes close and term no-ops in a child anyway).
        self._sub = self._dealer = None
        self._ctx = None
        self._tasks = []

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # --- commands from the PUB socket ---------------------------------------

    def _on_commands(self, batch: Batch) -> Coroutine[Any, Any, None] | None:
        """Decode a batch from the SUB socket; the coroutine that applies it (run eagerly by the reader)."""
        if self._forked_from is not None:
            return None
        messages = []
        for frames in batch:
            try:
                messages.append(self.codec.decode([f.bytes for f in frames]))
            except ProtocolError as exc:
                self.peers.report(peer_address(frames[0]), Trouble.UNDECODABLE, str(exc))
        return self._handle_safely(messages, not self.heard, batch[0][0])

    async def _handle_safely(self, messages: list[Message], lapsed: bool, first: zmq.Frame) -> None:
        try:
            await self._handle(messages, lapsed)
        except Exception as exc:
            # A bug of ours (a target's failure never gets here): distrust the targets,
            # so the next batch purges before they serve again.
            self._distrust()
            self.peers.failed(peer_address(first), exc)

    def _distrust(self) -> None:
        """Stop trusting the targets now; the next command purges them before renewing the lease."""
        self.lease_until = time.monotonic()
        self._withdraw_leases()

    def _withdraw_leases(self) -> None:
        for target in self._leased_targets:
            target.revoke_lease()

    async def _handle(self, messages: list[Message], lapsed: bool = False) -> None:
        """Apply a batch of commands: at most one purge and one ack for all of them.

        ``lapsed`` says the lease had run out before the batch arrived: the
        targets may have missed anything, so they are purged before the lease
        is renewed. Without a purge to do, targets that failed are retried.
        """
        commands = [m for m in messages if isinstance(m, (Clear, Heartbeat))]
        if not commands:
            return
        # When several causes apply, the most telling is reported (see PurgeCause).
        cause: PurgeCause | None = None
        newest_clear: Clear | None = None
        #: What the clears meant for this process name together (only a bare clear purges it all).
        scope: Scope | None = None
        announce = False
        if lapsed:
            cause = PurgeCause.RECONNECT
            announce = True
            if self.lease_until is not None:
                log.warning("heard the service again after %.1f s of silence: purging",
                            time.monotonic() - self.lease_until + self.lease_seconds)
                if self.on_silence is OnSilence.SERVE:
                    self._degraded_total += max(0.0, time.monotonic() - self.lease_until)
                    self._warned_degraded = False
        for msg in commands:
            if isinstance(msg, Heartbeat):
                self._follow_terms(msg)
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
                if in_group(msg.group, self.name, self.labels):
                    cause = worst(cause, PurgeCause.CLEAR)
                    newest_clear = msg
                    scope = msg.scope if scope is None else scope.union(msg.scope)
            if msg.seq > self.seq + (1 if isinstance(msg, Clear) else 0):
                log.warning("missed commands %d..%d: purging", self.seq + 1, msg.seq)
                cause = worst(cause, PurgeCause.GAP)
            self.seq = max(self.seq, msg.seq)
        if cause is not None:
            # A gap, a new epoch or a lapse may hide any clear: only clears alone purge less than everything.
            await self._purge(cause, newest_clear, scope if cause is PurgeCause.CLEAR and scope else EVERYTHING)
        elif self.failing:
            await self._retry()
        self._renew_lease(commands[-1])
        if announce:
            self._say_hello()

    def _follow_terms(self, terms: LeaseTerms) -> None:
        """Use the service's heartbeat interval and liveness: for the lease, the signatures' window and
        the heartbeats. Nobody has to copy them, and a different configuration cannot break the bound."""
        interval, liveness = terms.heartbeat_interval, terms.liveness
        if self.terms_from_service and (interval, liveness) == (self.heartbeat_interval, self.liveness):
            return
        configured_interval, configured_liveness = self._configured_terms
        differs = ((configured_interval is not None and configured_interval != interval)
                   or (configured_liveness is not None and configured_liveness != liveness))
        if differs and not self._warned_terms:
            self._warned_terms = True
            log.warning("subscriber %s was given heartbeat_interval %s s and liveness %s, the service uses %g s "
                        "and %d: following the service (a lease of %g s); leave both unset to follow it silently",
                        self.name, configured_interval, configured_liveness, interval, liveness, terms.lease)
        else:
            log.info("following the service's lease terms: heartbeat_interval %g s x liveness %d = %g s",
                     interval, liveness, terms.lease)
        self.heartbeat_interval, self.liveness = interval, liveness
        self.terms_from_service = True
        self.codec.follow_lease(self.lease_seconds)

    def _say_hello(self) -> None:
        self._synced.clear()
        self._hello_at = time.monotonic()
        self._send(Hello(**self._identity()))

    def _renew_lease(self, newest: Clear | Heartbeat) -> None:
        """Count the service as heard for one lease from when ``newest`` was sent, and trust the
        targets as long, unless one is failing.

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
        if self.failing:
            return
        # With on_silence: serve, silence never stops the targets; a lapse still purges them
        # when the service is heard again (_handle), and a failing target still withdraws them.
        held = until if self.on_silence is OnSilence.BYPASS else math.inf
        for target in self._leased_targets:
            target.hold_lease(held)

    async def _heartbeats(self) -> None:
        """Tell the service we are alive, while we hear it (also while a target fails: the acks say so).

        An ack tells the service as much as a heartbeat (it marks the worker
        live), so a heartbeat is skipped when an ack went out within the last
        interval: with a thousand subscribers and clears every few
        milliseconds, that halves what the service receives. At most
        ``liveness - 1`` are skipped in a row, so the cache counters a
        heartbeat carries still reach the service at least once a lease.
        """
        skipped = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if self._forked_from is not None:
                return
            if self.lease_until is None:
                self._never_heard()
            elif self.degraded and not self._warned_degraded:
                self._warned_degraded = True
                log.warning("no service heard for %.1f s: serving from the caches without the bound "
                            "(bus.on_silence: serve) until it is heard again", self.degraded_seconds
                            + self.lease_seconds)
            if self.epoch is not None and self.heard and self._unwelcomed():
                continue
            if self.epoch is not None and self.heard:
                if (time.monotonic() - self._acked_at < self.heartbeat_interval
                        and skipped < self.liveness - 1):
                    skipped += 1
                    continue
                skipped = 0
                try:
                    self._send(WorkerHeartbeat(**self._identity(), stats=self.stats()))
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
        self.peers.report(self.options.publish, Trouble.UNANSWERED,
                          f"nothing heard yet: connecting again{self._key_hint()}")
        _reconnect(self._sub, self._publish)
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
        self.peers.report(self.options.acks, Trouble.UNANSWERED,
                          f"no welcome {waited:.1f} s after hello: connecting again{self._key_hint()}")
        _reconnect(self._dealer, self._acks)
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
                "pid": os.getpid(), "endpoint": self.options.endpoint, "epoch": self.epoch or "", "seq": self.seq,
                "labels": self.labels}

    def stats(self) -> dict[str, Any]:
        """What each heartbeat tells the service: purges, failures, and the targets' summed counters."""
        totals: dict[str, Any] = {"purges": self.purges, "last_purge_cause": self.last_cause,
                                  "bypass": not self.serving, "on_silence": self.on_silence,
                                  "degraded": self.degraded, "degraded_seconds": round(self.degraded_seconds, 3),
                                  "failing": bool(self.failing),
                                  "failing_targets": len(self.failing), "purge_failures": self.purge_failures}
        for target in self._targets:
            if target.stats is not None:
                for key, value in target.stats().items():
                    if key in _SUMMED_STATS:
                        totals[key] = totals.get(key, 0) + value
        lookups = totals.get("hits", 0) + totals.get("misses", 0)
        if lookups:
            totals["hit_ratio"] = totals["hits"] / lookups
        return totals

    # --- purges ---------------------------------------------------------------

    async def _purge(self, cause: PurgeCause, clear: Clear | None, scope: Scope = EVERYTHING) -> None:
        """Purge ``scope`` from every target and ack: ok, or failed if any target raised.

        A target still failing from an earlier purge is purged entirely: what
        that purge should have dropped is not known any more.
        """
        clear_id = clear.id if clear else ""
        dropped, purge_ms, errors, extent = await self._clear(self._targets, clear_id or None, cause, scope)
        self.purges += 1
        self.purges_by_cause[cause] = self.purges_by_cause.get(cause, 0) + 1
        self.last_cause = cause
        if errors:
            self._failed_purge = _FailedPurge(cause, clear_id, dropped, purge_ms)
            self._withdraw_leases()
            # Each target's failure had its (rate-limited) line; this one follows every purge.
            log.debug("purge failed: %d of %d targets raised; acked as failed, leases withdrawn, retrying on "
                      "the next command or heartbeat (cause: %s, seq %d)",
                      len(errors), len(self._targets), cause, self.seq)
            self._ack(cause, clear_id, dropped, purge_ms, extent, _one_error(errors))
            return
        self._failed_purge = None
        # DEBUG: the ack and the metrics carry every purge; an INFO line each was work on the hot path (issue 14).
        log.debug("purged %d entries in %.2f ms (cause: %s, seq %d, %s)", dropped, purge_ms, cause, self.seq, scope)
        self._ack(cause, clear_id, dropped, purge_ms, extent)

    async def _retry(self) -> None:
        """Clear the failed targets again; once none fails, ack the failed purge as ok."""
        failed = self._failed_purge
        assert failed is not None
        dropped, purge_ms, _, _ = await self._clear(list(self.failing), failed.clear_id or None, failed.cause)
        failed.dropped += dropped
        failed.purge_ms += purge_ms
        if self.failing:
            return
        self._failed_purge = None
        log.info("purge retried: every target purged; acking seq %d as ok (cause: %s)", self.seq, failed.cause)
        # The retried targets dropped everything.
        self._ack(failed.cause, failed.clear_id, failed.dropped, failed.purge_ms, PurgeExtent.ALL)

    async def _clear(self, targets: list[Target], clear_id: str | None, cause: PurgeCause,
                     scope: Scope = EVERYTHING) -> tuple[int, float, list[str], PurgeExtent]:
        """Purge ``scope`` from ``targets`` (everything from a failing one): entries dropped,
        milliseconds taken, the errors of those that raised, and ``all`` if any target
        dropped everything.

        A target's exception never escapes: it is counted, logged with its
        traceback (one line per target per interval) and kept in :attr:`failing`.
        """
        started = time.perf_counter()
        dropped = 0
        errors = []
        extent = PurgeExtent.ALL if scope.everything else PurgeExtent.SCOPED
        for target in targets:
            try:
                count, done = await target.purge_scope(EVERYTHING if target in self.failing else scope, clear_id,
                                                       self.seq)
                dropped += count
                if done is PurgeExtent.ALL:
                    extent = PurgeExtent.ALL
            except Exception as exc:
                # First of all: half a purge may have been applied, so no leased target serves from now on.
                self._withdraw_leases()
                error = describe_error(exc)
                errors.append(error)
                self.failing[target] = error
                self.purge_failures += 1
                self.peers.report(target.label, Trouble.FAILED,
                                  f"purge ({cause}, seq {self.seq}) acked as failed, retried on every command and "
                                  f"heartbeat: {error}\n{describe_traceback(exc)}\n")
            else:
                if self.failing.pop(target, None) is not None:
                    log.info("%s purged again after failing", target.label)
        return dropped, (time.perf_counter() - started) * 1000, errors, extent

    def _ack(self, cause: PurgeCause, clear_id: str, dropped: int, purge_ms: float,
             extent: PurgeExtent = PurgeExtent.ALL, error: str = "") -> None:
        self._acked_at = time.monotonic()
        self._send(Ack(name=self.name, instance=self.instance, epoch=self.epoch or "", seq=self.seq,
                       clear_id=clear_id, dropped=dropped, purge_ms=purge_ms, cause=cause,
                       outcome=PurgeOutcome.FAILED if error else PurgeOutcome.OK, error=error, scope=extent))

    # --- replies on the DEALER socket ---------------------------------------

    def _on_replies(self, batch: Batch) -> None:
        """Handle the replies waiting on the DEALER: the service's welcomes."""
        for frames in batch:
            try:
                msg = self.codec.decode([f.bytes for f in frames])
                if isinstance(msg, Welcome):
                    if self._hello_at is not None:  # heartbeats are answered too: only a hello's answer is news
                        log.info("welcomed by service epoch %s at seq %d", msg.epoch, msg.seq)
                    self._follow_terms(msg)
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
        assert self._dealer is not None
        try:
            send_now(self._dealer, self.codec.encode(msg))
        except zmq.Again:
            log.debug("back channel unavailable; %s dropped", msg.KIND.decode())
        if self._replies is not None:
            self._replies.kick()  # the send may have taken the edge of a welcome

    @classmethod
    def from_settings(cls, targets: Iterable[Any], path: str | os.PathLike[str] | None = None, *,
                      environ: Mapping[str, str] = os.environ, **overrides: Any) -> Subscriber:
        """A subscriber configured as the service is: keywords > environment > settings file.

        The file is ``path``, else ``$CACHEBUS_CONFIG``, else none (the built-in
        defaults); the variables are ``CACHEBUS_PUBLISH``, ``CACHEBUS_ACKS``,
        ``CACHEBUS_KEY`` and the others in :mod:`cachebus.workers.options`,
        which says what is read from where. A bad value raises
        :class:`~cachebus.settings.SettingsError`, one line naming the file and
        key or the variable.
        """
        return cls(targets, subscriber_options(embedder_settings(path, environ=environ), environ=environ,
                                               **overrides))


def _one_error(errors: list[str]) -> str:
    """The error a failed ack carries: the first target's, and how many others failed."""
    if len(errors) == 1:
        return errors[0]
    more = f" (and {len(errors) - 1} more failing targets)"
    first = errors[0]
    if len(first) + len(more) > MAX_ERROR:
        first = first[:MAX_ERROR - len(more) - 1] + "…"
    return first + more


def _reconnect(sock: zmq.Socket, endpoints: list[str]) -> None:
    """A fresh connection (and handshake) to each of ``endpoints``."""
    for endpoint in endpoints:
        try:
            sock.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # the session already ended: a refused handshake
        sock.connect(endpoint)


class ThreadedSubscriber:
    """A :class:`Subscriber` on its own event loop in a daemon thread.

    For applications without asyncio. Takes the same arguments as
    :class:`Subscriber`, and checks them (and the targets) at once. Targets
    must be thread-safe, as :class:`~cachebus.workers.cache.Cache` is.
    """

    def __init__(self, targets: Iterable[Any], options: SubscriberOptions | None = None, /,
                 **fields: Any) -> None:
        self.subscriber = Subscriber(targets, options, **fields)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        #: Guards the hand-over between start() and the thread: reported, or abandoned.
        self._lock = threading.Lock()
        self._reported = threading.Event()
        self._abandoned = False
        self._error: BaseException | None = None

    def start(self, timeout: float | None = 10.0) -> None:
        """Start the background thread; returns once the sockets are connected.

        Raises what :meth:`Subscriber.start` raised (a missing key file, a bad
        endpoint), and :class:`TimeoutError` if the thread has not reported
        within ``timeout`` seconds (a key file that blocks on reading, say);
        that thread then stops the subscriber itself if it ever starts.
        """
        self.subscriber._check_process()
        if self._thread is not None:
            raise RuntimeError("this ThreadedSubscriber was started already")
        self._reported.clear()
        self._abandoned, self._error = False, None
        thread = threading.Thread(target=self._run, name=f"cachebus-subscriber-{self.subscriber.name}", daemon=True)
        thread.start()
        if not self._reported.wait(timeout):
            with self._lock:
                self._abandoned = not self._reported.is_set()
            if self._abandoned:
                raise TimeoutError(f"the subscriber's thread did not report within {timeout:g} s: its start "
                                   "is blocked (on reading a key file, say)")
        if self._error is not None:
            thread.join()
            raise self._error
        self._thread = thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> bool:
            """Start the subscriber; whether the loop should keep running it."""
            try:
                await self.subscriber.start()
            except BaseException as exc:
                with self._lock:
                    self._error = exc
                    self._reported.set()
                return False
            with self._lock:
                if not self._abandoned:
                    self._loop = loop
                    self._reported.set()
                    return True
            # start() stopped waiting and raised: nobody will stop this subscriber but us.
            await self.subscriber.stop()
            return False

        try:
            if loop.run_until_complete(main()):
                loop.run_forever()
        except BaseException:
            # Nothing should end the loop but stop(); if something does, say what, once.
            log.exception("the subscriber thread of %s ended unexpectedly", self.subscriber.name)
            raise
        finally:
            loop.close()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the service has welcomed this subscriber."""
        self.subscriber._check_process()
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("this ThreadedSubscriber is not running")
        future = asyncio.run_coroutine_threadsafe(self.subscriber.wait_synced(timeout), self._loop)
        return future.result()

    def stop(self, timeout: float = 10.0) -> None:
        """Say bye, close the sockets and end the thread, waiting at most ``timeout`` seconds.

        Never blocks for good: if the thread has already ended (or does not
        answer in time), there is nothing left to stop and this returns.
        """
        self.subscriber._check_process()
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.subscriber.stop(), loop).result(timeout)
            except (RuntimeError, TimeoutError, concurrent.futures.TimeoutError) as exc:
                # The loop closed or hangs: its thread will not say bye any more.
                log.warning("the subscriber thread of %s did not stop within %g s: %s", self.subscriber.name,
                            timeout, exc or type(exc).__name__)
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    @classmethod
    def from_settings(cls, targets: Iterable[Any], path: str | os.PathLike[str] | None = None, *,
                      environ: Mapping[str, str] = os.environ, **overrides: Any) -> ThreadedSubscriber:
        """:meth:`Subscriber.from_settings` for the threaded flavour; settings are read (and
        checked) now, in the calling thread."""
        return cls(targets, subscriber_options(embedder_settings(path, environ=environ), environ=environ,
                                               **overrides))

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
(to every instance's, when several share the lead: only the leader speaks) and
a DEALER to its ack channel. By default both are CURVE clients
(:mod:`cachebus.bus.security`): it reads the service's public key from
``<keys_dir>/service.key`` and uses the keypair
``<keys_dir>/workers/<name>.key_secret``, created when missing, which a
service on the same host with the same ``keys_dir`` allows. A shared ``key``
selects the HMAC mode instead, and ``insecure=True`` no authentication at all.

**One path.** The DEALER talks to one instance at a time, the first in
``acks`` to begin with (:mod:`cachebus.bus.upstream`), so this process's
hello, acks, heartbeats and bye reach the leader in the order they were sent.
The service answers every hello and heartbeat with a welcome; when one has
gone unanswered for a lease, the subscriber moves to the next endpoint in the
list (wrapping around; with one, it connects to it again, which also picks up
a key added to the service's allow-list since) and says hello there. Moving
purges nothing: the commands come on the SUB socket, which never moves.

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
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, cast

import zmq
import zmq.asyncio

from cachebus.bus.peers import PeerLog, Trouble, peer_address
from cachebus.bus.protocol import Bye, Codec, Hello, Message, ProtocolError, PurgeCause, Welcome, WorkerHeartbeat
from cachebus.bus.reader import Batch, Reader, send_now
from cachebus.bus.security import INSECURE_WARNING, BusMode, ClientSecurity, key_name
from cachebus.bus.sockets import configure
from cachebus.bus.upstream import attach, move

from .options import SubscriberOptions, default_name, embedder_settings, subscriber_options
from .purger import Purged, Purger
from .session import Beat, Decision, Move, Resubscribe, SayHello, Session
from .targets import Leased, Target

__all__ = ["ForkedSubscriberError", "Leased", "Subscriber", "SubscriberOptions", "ThreadedSubscriber",
           "default_name"]

log = logging.getLogger("cachebus.subscriber")

#: Most commands handled in one batch; the batch is purged once.
_MAX_BATCH = 1000


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


class Subscriber:
    """Purges ``targets`` when the service says so, and acks each purge.

    ``targets`` are any cache objects :mod:`cachebus.workers.targets` accepts;
    one it cannot purge is a :class:`TypeError` here. ``options`` and the
    keywords are :class:`~cachebus.workers.options.SubscriberOptions` (the
    keywords change the fields they name; an unknown one is a
    :class:`TypeError`): ``Subscriber([cache], name="web", insecure=True)``.
    ``name`` is a label many processes may share (default: the host name);
    each started process has its own :attr:`instance`. :meth:`start` raises
    :class:`~cachebus.bus.security.KeyFileError` when a key it needs is missing.

    The subscriber holds the sockets, its heartbeat task and the fork guard,
    and applies what its :attr:`session` (epoch, seq, lease, path:
    :mod:`cachebus.workers.session`) decides, through its :attr:`purger`
    (the targets: :mod:`cachebus.workers.purger`).
    """

    def __init__(self, targets: Iterable[Any], options: SubscriberOptions | None = None, /,
                 **fields: Any) -> None:
        #: What it was told, checked.
        self.options = SubscriberOptions.of(options, **fields)
        opts = self.options
        self.peers = PeerLog(log)
        #: The targets: every purge, the failing ones and their retry.
        self.purger = Purger(targets, self.peers)
        #: The target objects, as given.
        self.targets = [target.obj for target in self.purger.targets]
        self.name = opts.name
        self.labels = opts.labels
        #: ``<host>:<pid>:<random>``, made by :meth:`start` (so a subscriber built before a fork and
        #: started after it gets the child's); empty before.
        self.instance = ""
        self._publish = opts.publish_endpoints
        #: Where it stands with the service: epoch, seq, lease terms, lapse, and the back channel's path.
        self.session = Session(opts.name, opts.labels, opts.acks_endpoints,
                               heartbeat_interval=opts.heartbeat_interval, liveness=opts.liveness,
                               on_silence=opts.on_silence)
        self.mode = opts.mode
        self.codec = Codec(opts.raw_key, max_age=self.session.lease_seconds)
        self.security = ClientSecurity(self.mode)
        self._synced = asyncio.Event()
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.SyncSocket | None = None
        self._dealer: zmq.SyncSocket | None = None
        self._commands: Reader | None = None
        self._replies: Reader | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: The pid :meth:`start` ran in, while started.
        self._started_pid: int | None = None
        #: Set in a forked child: the pid the subscriber was started in.
        self._forked_from: int | None = None

    # --- where it stands (the session's and the purger's, for the application) -------------

    @property
    def epoch(self) -> str | None:
        """The service epoch last seen."""
        return self.session.epoch

    @property
    def seq(self) -> int:
        """The last command seq seen in :attr:`epoch`."""
        return self.session.seq

    @property
    def synced(self) -> bool:
        """True once the subscription is proven and the service welcomed the last hello."""
        return self._synced.is_set()

    @property
    def heard(self) -> bool:
        """True while the service was heard within a lease."""
        return self.session.heard

    @property
    def trusted(self) -> bool:
        """True while the targets may serve within the bound: the service was heard within a lease and
        no target is failing."""
        return self.session.heard and not self.purger.failing

    @property
    def degraded(self) -> bool:
        """True while the targets serve without the bound: ``on_silence`` is ``serve``, the service was
        heard once, and not within the last lease."""
        return self.session.degraded

    @property
    def serving(self) -> bool:
        """True while the targets serve from their entries, within the bound or (degraded) without it."""
        return (self.session.heard or self.session.degraded) and not self.purger.failing

    @property
    def degraded_seconds(self) -> float:
        """Seconds this subscriber has served degraded, including now."""
        return self.session.degraded_seconds

    @property
    def purges(self) -> int:
        return self.purger.purges

    @property
    def purges_by_cause(self) -> dict[PurgeCause, int]:
        """How many purges each cause brought about."""
        return self.purger.purges_by_cause

    @property
    def last_cause(self) -> PurgeCause | None:
        return self.purger.last_cause

    @property
    def purge_failures(self) -> int:
        """Target clears that raised, in purges and in retries."""
        return self.purger.purge_failures

    @property
    def failing(self) -> dict[Target, str]:
        """The targets whose last clear raised, with the error their failed ack carried."""
        return self.purger.failing

    # --- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect both sockets and start listening. In a forked child, raises :class:`ForkedSubscriberError`."""
        self._check_process()
        if self._started_pid is not None:
            raise RuntimeError(f"subscriber {self.name} is started already")
        self.purger.withdraw_leases()
        self.session.started()
        self._synced.clear()
        opts = self.options
        self.security = ClientSecurity.resolve(self.mode, name=key_name(self.name), keys_dir=opts.keys_dir,
                                               server_key=opts.server_key, secret_key_file=opts.secret_key_file)
        if self.mode is BusMode.INSECURE:
            log.warning(INSECURE_WARNING)
        self.instance = new_instance()
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
            # Every instance's PUB: only the one holding the lead speaks (docs/scale-out.md).
            for endpoint in self._publish:
                self._sub.connect(endpoint)
            # A plain socket, watched by the loop directly: every ack and heartbeat
            # goes out here, and zmq.asyncio's per-send future and extra loop pass
            # were a third of a subscriber's CPU with a thousand in one process.
            self._dealer = zmq.Socket(self._ctx, zmq.DEALER)
            # The ZMTP heartbeat keeps the interval known at start, even once the service's differs.
            configure(self._dealer, heartbeat=self.session.heartbeat_interval)
            self.security.apply(self._dealer)
            # One instance at a time (bus.upstream): a DEALER connected to several round-robins,
            # and this process's messages would overtake each other on their way to the leader.
            attach(self._dealer, self.session.upstream)
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
                 self.name, self.instance, opts.publish, self.session.upstream.current)

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
        for target in self.purger.leased:
            try:
                target.revoke_lease()
            except Exception:  # nothing may escape an at-fork hook
                pass
        self.session.forget()
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
        return self._handle_safely(messages, batch[0][0])

    async def _handle_safely(self, messages: list[Message], first: zmq.Frame) -> None:
        try:
            await self._handle(messages)
        except Exception as exc:
            # A bug of ours (a target's failure never gets here): distrust the targets,
            # so the next batch purges before they serve again.
            self.session.distrust()
            self.purger.withdraw_leases()
            self.peers.failed(peer_address(first), exc)

    async def _handle(self, messages: list[Message]) -> None:
        """Apply a batch of commands as the session decides: at most one purge and one ack for all of
        them (without a purge, a retry of the targets that failed), then the lease, then a hello."""
        heard = self.session.receive(messages)
        if heard is None:
            return
        self._follow_lease()
        seq = self.session.seq
        if heard.purge is not None:
            purge = heard.purge
            self._ack(await self.purger.purge(purge.cause, purge.scope, purge.clear_id, seq))
        elif self.purger.failing:
            retried = await self.purger.retry(seq)
            if retried is not None:
                self._ack(retried)
        renew = self.session.renew(heard)
        if renew is not None:
            self.purger.hold_leases(renew.until)
        if heard.hello:
            self._say_hello()

    def _follow_lease(self) -> None:
        """The signatures' window follows the lease terms the session follows."""
        if self.codec.max_age != self.session.lease_seconds:
            self.codec.follow_lease(self.session.lease_seconds)

    def _ack(self, purged: Purged) -> None:
        self.session.acked()
        self._send(purged.ack(self.name, self.instance, self.session.epoch or "", self.session.seq))

    def _say_hello(self) -> None:
        self._synced.clear()
        self._send(Hello(**self._identity()))
        self.session.hello_sent()

    # --- every heartbeat interval --------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Apply what the session decides once per heartbeat interval: heartbeat (while the service is
        heard; also while a target fails: the acks say so), move off a silent back channel, or connect
        a SUB that never heard anything again."""
        while True:
            await asyncio.sleep(self.session.heartbeat_interval)
            if self._forked_from is not None:
                return
            for decision in self.session.tick():
                self._apply(decision)

    def _apply(self, decision: Decision) -> None:
        match decision:
            case Beat():
                try:
                    beat = WorkerHeartbeat(**self._identity(), stats=self.stats(), on_silence=self.options.on_silence,
                                           degraded=self.degraded)
                except Exception as exc:  # a target's stats() raised: report it, keep beating next time
                    self.peers.failed("this process", exc, "heartbeat")
                    return
                self._send(beat)
                self.session.heartbeat_sent()
            case Move():
                assert self._dealer is not None
                # One line per endpoint per minute; a worker whose key the service refuses moves every lease.
                self.peers.report(decision.left, Trouble.UNANSWERED,
                                  f"no welcome {decision.waited:.1f} s after a hello or heartbeat: moving to "
                                  f"{decision.to}{self._key_hint()}")
                move(self._dealer, self.session.upstream)
            case SayHello():
                self._say_hello()
            case Resubscribe():
                assert self._sub is not None
                self.peers.report(self.options.publish, Trouble.UNANSWERED,
                                  f"nothing heard yet: connecting again{self._key_hint()}")
                _reconnect(self._sub, self._publish)
                self.session.subscribed()

    def _key_hint(self) -> str:
        if self.security.keypair is None:
            return ""
        return (f" (is the service running, and does it allow this worker's public key "
                f"{self.security.keypair.public_file}?)")

    def _identity(self) -> dict[str, Any]:
        """The fields of :class:`~cachebus.bus.protocol.WorkerIdentity` for this subscriber."""
        return {"name": self.name, "instance": self.instance, "host": socket.gethostname(),
                "pid": os.getpid(), "endpoint": self.options.endpoint, "epoch": self.session.epoch or "",
                "seq": self.session.seq, "labels": self.labels}

    def stats(self) -> dict[str, Any]:
        """What each heartbeat tells the service: purges, failures, and the targets' summed counters."""
        session = self.session
        return {"bypass": not self.serving, "on_silence": session.on_silence, "degraded": session.degraded,
                "degraded_seconds": round(session.degraded_seconds, 3), **self.purger.counters()}

    # --- replies on the DEALER socket ---------------------------------------

    def _on_replies(self, batch: Batch) -> None:
        """Handle the replies waiting on the DEALER: the welcomes answering hellos and heartbeats."""
        for frames in batch:
            try:
                msg = self.codec.decode([f.bytes for f in frames])
                if isinstance(msg, Welcome):
                    if self.session.welcomed(msg):  # heartbeats are answered too: only a hello's answer is news
                        log.info("welcomed by service epoch %s at seq %d", msg.epoch, msg.seq)
                    self._follow_lease()
                    self._synced.set()
            except ProtocolError as exc:
                self.peers.report(peer_address(frames[0]), Trouble.UNDECODABLE, str(exc))
            except Exception as exc:
                self.peers.failed(peer_address(frames[0]), exc)

    def _send(self, msg: Message) -> None:
        """Send on the back channel without ever blocking the worker.

        With the back channel's queue full the message is dropped: a path that
        stays that way goes unanswered, and the session moves off it.
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
        return cls(targets, _from_settings(path, environ, overrides))


def _from_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str],
                   overrides: dict[str, Any]) -> SubscriberOptions:
    return subscriber_options(embedder_settings(path, environ=environ), environ=environ, **overrides)


def _reconnect(sock: zmq.Socket[Any], endpoints: list[str]) -> None:
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
        return cls(targets, _from_settings(path, environ, overrides))

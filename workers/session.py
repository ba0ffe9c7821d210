"""A subscriber's session with the service, without sockets: what it has heard, how long it trusts it,
and which back-channel endpoint it answers on.

:class:`Session` is the sans-IO core of :class:`~cachebus.workers.subscriber.Subscriber`,
as :class:`~cachebus.service.record.Record` is the service's: a plain object,
fed the messages the subscriber decoded and the time (injected clocks), that
returns **decisions** for the subscriber to apply to its targets and sockets.
It keeps:

* the service's **epoch and seq** as last seen, so a new epoch or a gap in the
  sequence purges everything (docs/delivery.md has the table);
* the **lease**: until when the service counts as heard, renewed from each
  batch's newest command minus its age, and the lease terms, the service's own
  once heard (one warning when configured ones differ);
* the **lapse**: a batch that arrives after the lease ran out purges once
  (cause ``reconnect``), and with ``on_silence: serve`` the time served
  degraded is counted;
* the **hello and welcome**: a hello is owed after a new epoch or a lapse, and
  a welcome answers it;
* the **path**: the one ack endpoint in use (:class:`~cachebus.bus.upstream.Upstream`).
  Every hello and heartbeat expects a welcome; when the oldest unanswered one
  has waited a lease, the path is silent and the subscriber moves to the next
  endpoint and says hello there (a hello only: moving loses no clear, so it
  purges nothing).

Each batch of commands is one :meth:`Session.receive`, whose answer
(:class:`Heard`) holds at most one :class:`Purge`; after the purge the
subscriber asks :meth:`Session.renew` for the lease (:class:`Renew`), so the
targets are never trusted before they were purged. Each heartbeat interval is
one :meth:`Session.tick`, whose decisions are :class:`Resubscribe`,
:class:`Move`, :class:`SayHello` and :class:`Beat`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cachebus.bus.endpoints import DEFAULT_ACKS
from cachebus.bus.protocol import Clear, Heartbeat, LeaseTerms, Message, OnSilence, PurgeCause, Welcome, worst
from cachebus.bus.scope import EVERYTHING, Scope, in_group
from cachebus.bus.upstream import Upstream

__all__ = ["Beat", "Decision", "Heard", "Move", "Purge", "Renew", "Resubscribe", "SayHello", "Session"]

log = logging.getLogger("cachebus.subscriber")

#: Lease terms until the service is heard, when none were configured: they only time the reconnects
#: before the first message, since every welcome and heartbeat carries the service's own.
INITIAL_HEARTBEAT_INTERVAL = 0.5
INITIAL_LIVENESS = 3


# --- decisions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purge:
    """Purge ``scope`` from every target, and ack it with ``cause``.

    ``clear`` is the newest clear meant for this process in the batch (None
    when only a heartbeat, a gap or a lapse asked for the purge). Only clears
    alone purge less than everything: a gap, a new epoch or a lapse may hide
    any clear.
    """

    cause: PurgeCause
    scope: Scope
    clear: Clear | None = None

    @property
    def clear_id(self) -> str:
        """The id the ack carries: the newest clear's, or empty."""
        return self.clear.id if self.clear is not None else ""


@dataclass(frozen=True, slots=True)
class SayHello:
    """Announce this process to the service: it may not know it (a new epoch, back after a lapse,
    a new endpoint). The hello carries the epoch and seq it stands at."""


@dataclass(frozen=True, slots=True)
class Renew:
    """Let the leased targets serve until ``until`` (the session's clock; ``math.inf`` with
    ``on_silence: serve``, where silence never stops them). Not while a target is failing."""

    until: float


@dataclass(frozen=True, slots=True)
class Move:
    """The back-channel endpoint ``left`` went unanswered for ``waited`` seconds (a lease or more):
    disconnect from it, connect to ``to`` (the same one, when it is the only one: a fresh handshake)."""

    left: str
    to: str
    waited: float


@dataclass(frozen=True, slots=True)
class Resubscribe:
    """Nothing heard a lease after the SUB connected: connect it again. libzmq ends a session whose
    handshake the service refused (a CURVE key not in its allow-list) and never tries again, so a key
    added to the allow-list later would otherwise need a restart."""


@dataclass(frozen=True, slots=True)
class Beat:
    """Send a worker heartbeat: the service counts this process as live, and answers it."""


#: What one heartbeat interval may ask for, in the order to apply them.
Decision = Resubscribe | Move | SayHello | Beat


@dataclass(frozen=True, slots=True)
class Heard:
    """What one batch of commands asks for, applied in this order: ``purge`` (or, without one, a
    retry of the targets that failed), then :meth:`Session.renew` with this batch, then a hello if
    ``hello``."""

    purge: Purge | None
    hello: bool
    #: The batch's last command: the lease counts from when it was sent.
    newest: Clear | Heartbeat


# --- the session ------------------------------------------------------------------------


class Session:
    """One subscriber's standing with the service (see the module's docstring).

    ``name`` and ``labels`` say which clears' groups are this process's;
    ``acks`` are the back-channel endpoints, one per service instance, used one
    at a time in order. ``heartbeat_interval`` and ``liveness`` are the
    configured terms (None: follow the service silently). ``clock`` is
    monotonic and times the lease and the path; ``wall`` is the clock a
    message's ``ts`` is compared with, to take its age off the lease.
    """

    def __init__(self, name: str, labels: Iterable[str] = (), acks: Sequence[str] = (DEFAULT_ACKS,), *,
                 heartbeat_interval: float | None = None, liveness: int | None = None,
                 on_silence: OnSilence = OnSilence.BYPASS, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.name = name
        self.labels = tuple(labels)
        self.on_silence = on_silence
        self._clock = clock
        self._wall = wall
        self._configured_terms = (heartbeat_interval, liveness)
        #: The lease terms in force: the service's once heard (:attr:`terms_from_service`), until then
        #: the configured or initial ones.
        self.heartbeat_interval: float = heartbeat_interval or INITIAL_HEARTBEAT_INTERVAL
        self.liveness: int = liveness or INITIAL_LIVENESS
        self.terms_from_service = False
        self._warned_terms = False
        #: The service epoch and last command seq seen.
        self.epoch: str | None = None
        self.seq = 0
        #: clock() until which the service counts as heard; None before the first command.
        self.lease_until: float | None = None
        #: Seconds spent degraded (serving with no service heard) up to the last time it was heard again.
        self._degraded_total = 0.0
        self._warned_degraded = False
        #: Whether the last hello is still waiting for its welcome.
        self.hello_waiting = False
        #: The back channel's one endpoint in use; silent after a lease without a welcome.
        self.upstream = Upstream(acks, lambda: self.lease_seconds, clock)
        #: clock() of the SUB socket's last connect.
        self._subscribed_at = clock()
        #: clock() of the last ack sent: the service counts it as a sign of life, as a heartbeat.
        self._acked_at = -math.inf
        #: Heartbeats skipped in a row because an ack had just gone out.
        self._skipped = 0

    # --- the lease ----------------------------------------------------------------------

    @property
    def lease_seconds(self) -> float:
        """How long the service may stay silent before targets stop being trusted."""
        return self.heartbeat_interval * self.liveness

    @property
    def heard(self) -> bool:
        """True while the service was heard within a lease."""
        return self.lease_until is not None and self._clock() < self.lease_until

    @property
    def degraded(self) -> bool:
        """True while the targets serve without the bound: ``on_silence`` is ``serve``, the service
        was heard once, and not within the last lease."""
        return self.on_silence is OnSilence.SERVE and self.lease_until is not None and not self.heard

    @property
    def degraded_seconds(self) -> float:
        """Seconds served degraded, including now."""
        ongoing = self._clock() - self.lease_until if self.degraded and self.lease_until is not None else 0.0
        return self._degraded_total + ongoing

    def distrust(self) -> None:
        """Count the service as unheard from now: the next batch purges before anything is trusted."""
        self.lease_until = self._clock()

    def forget(self) -> None:
        """Never heard (a forked child: the parent's lease is not the child's)."""
        self.lease_until = None

    # --- commands ---------------------------------------------------------------------------

    def receive(self, messages: Iterable[Message]) -> Heard | None:
        """A batch of decoded messages from the SUB socket: at most one purge for all of them.

        Only clears and heartbeats count; None when the batch held neither.
        """
        commands = [m for m in messages if isinstance(m, (Clear, Heartbeat))]
        if not commands:
            return None
        # When several causes apply, the most telling is reported (see PurgeCause).
        cause: PurgeCause | None = None
        newest_clear: Clear | None = None
        #: What the clears meant for this process name together (only a bare clear purges it all).
        scope: Scope | None = None
        hello = False
        if not self.heard:
            cause = PurgeCause.RECONNECT
            hello = True
            self._lapse_ended()
        for msg in commands:
            if isinstance(msg, Heartbeat):
                self.follow_terms(msg)
            if msg.epoch != self.epoch:
                if self.epoch is not None:
                    log.warning("service epoch changed from %s to %s: purging", self.epoch, msg.epoch)
                    cause = worst(cause, PurgeCause.EPOCH)
                hello = True
                self.epoch = msg.epoch
                self.seq = msg.seq - 1 if isinstance(msg, Clear) else msg.seq
            if isinstance(msg, Clear):
                if msg.seq <= self.seq:
                    continue  # seen already, or older: the stream went back within its epoch
                if in_group(msg.group, self.name, self.labels):
                    cause = worst(cause, PurgeCause.CLEAR)
                    newest_clear = msg
                    scope = msg.scope if scope is None else scope.union(msg.scope)
            if msg.seq > self.seq + (1 if isinstance(msg, Clear) else 0):
                log.warning("missed commands %d..%d: purging", self.seq + 1, msg.seq)
                cause = worst(cause, PurgeCause.GAP)
            self.seq = max(self.seq, msg.seq)
        purge = None
        if cause is not None:
            # A gap, a new epoch or a lapse may hide any clear: only clears alone purge less than everything.
            purge = Purge(cause, scope if cause is PurgeCause.CLEAR and scope is not None else EVERYTHING,
                          newest_clear)
        return Heard(purge, hello, commands[-1])

    def _lapse_ended(self) -> None:
        """Heard again after the lease ran out (or for the first time)."""
        if self.lease_until is None:
            return
        now = self._clock()
        log.warning("heard the service again after %.1f s of silence: purging",
                    now - self.lease_until + self.lease_seconds)
        if self.on_silence is OnSilence.SERVE:
            self._degraded_total += max(0.0, now - self.lease_until)
            self._warned_degraded = False

    def renew(self, heard: Heard) -> Renew | None:
        """Count the service as heard for one lease from when the batch's newest command was sent;
        the lease for the targets, or None when that command is already a lease old.

        Asked after the batch's purge, so nothing is trusted before it is done.
        The message's age (by the wall clocks of service and worker) is taken
        off, so a backlog of old messages cannot extend trust; clock skew that
        makes the age look negative counts as zero.
        """
        age = max(0.0, self._wall() - heard.newest.ts)
        now = self._clock()
        until = now + self.lease_seconds - age
        if until <= now:
            log.debug("newest command is %.1f s old: lease not renewed", age)
            return None
        self.lease_until = until
        # With on_silence: serve, silence never stops the targets; a lapse still purges them
        # when the service is heard again, and a failing target still withdraws them.
        return Renew(until if self.on_silence is OnSilence.BYPASS else math.inf)

    def follow_terms(self, terms: LeaseTerms) -> None:
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

    # --- the back channel -----------------------------------------------------------------

    def hello_sent(self) -> None:
        """A hello went out: a welcome is due within a lease."""
        self.hello_waiting = True
        self.upstream.expect_answer()

    def heartbeat_sent(self) -> None:
        """A worker heartbeat went out: the service answers it as it answers a hello."""
        self.upstream.expect_answer()

    def acked(self) -> None:
        """An ack went out: a sign of life the service counts, so the next heartbeat may be skipped."""
        self._acked_at = self._clock()

    def welcomed(self, welcome: Welcome) -> bool:
        """A welcome came back on the path in use; whether it answered a hello (rather than a heartbeat)."""
        self.follow_terms(welcome)
        self.upstream.answered()
        answered_hello, self.hello_waiting = self.hello_waiting, False
        return answered_hello

    def subscribed(self) -> None:
        """The SUB socket connected (again)."""
        self._subscribed_at = self._clock()

    def started(self) -> None:
        """The subscriber (re)started: both sockets are new. Nothing sent before waits for an answer, and
        the service counts as unheard, so the first batch purges and says hello, as at the first start."""
        self.subscribed()
        self.upstream.answered()
        self.hello_waiting = False
        self.lease_until = None

    # --- every heartbeat interval ------------------------------------------------------------

    def tick(self) -> list[Decision]:
        """What to do once per heartbeat interval: reconnect a SUB that never heard anything, move off
        a silent path (and say hello at the next one), or heartbeat.

        An ack tells the service as much as a heartbeat (it marks the worker
        live), so a heartbeat is skipped when an ack went out within the last
        interval; at most ``liveness - 1`` in a row, so the cache counters a
        heartbeat carries still reach the service once a lease. Skipping sends
        nothing that expects an answer, so it can delay a move, never cause one:
        a path that stops answering is left within two leases and one interval
        (a lease until the next heartbeat, a lease unanswered, one interval of
        this timer), within a lease and an interval without acks.
        """
        now = self._clock()
        decisions: list[Decision] = []
        if self.lease_until is None:
            if now - self._subscribed_at >= self.lease_seconds:
                decisions.append(Resubscribe())
                self._subscribed_at = now
        elif self.degraded and not self._warned_degraded:
            self._warned_degraded = True
            log.warning("no service heard for %.1f s: serving from the caches without the bound "
                        "(bus.on_silence: serve) until it is heard again", self.degraded_seconds + self.lease_seconds)
        in_sync = self.epoch is not None and self.heard
        if self.upstream.silent:
            decisions.append(self._move())
            if in_sync:
                # Not while the service is unheard: the hello waits for the next command (a lapse's).
                decisions.append(SayHello())
            return decisions
        if in_sync:
            if now - self._acked_at < self.heartbeat_interval and self._skipped < self.liveness - 1:
                self._skipped += 1
            else:
                self._skipped = 0
                decisions.append(Beat())
        return decisions

    def _move(self) -> Move:
        """The move off the silent endpoint; :func:`cachebus.bus.upstream.move` makes it
        (and :meth:`Upstream.next` with it)."""
        upstream = self.upstream
        endpoints = upstream.endpoints
        following = endpoints[(endpoints.index(upstream.current) + 1) % len(endpoints)]
        return Move(upstream.current, following, upstream.silent_for())

"""The subscriber's logic as plain objects: its :class:`Session` (epoch, seq, lease, lapse, path) and its
:class:`Purger` (targets, failures, retry), driven with decoded messages and injected clocks.

No sockets and no sleeps: each test is microseconds, as tests/test_record.py
is for the service's record. tests/test_subscriber.py and the others check
the same behaviour end to end, through the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable

import pytest

from cachebus.bus.peers import PeerLog
from cachebus.bus.protocol import Clear, Heartbeat, OnSilence, PurgeCause, PurgeOutcome, Welcome
from cachebus.bus.scope import EVERYTHING, PurgeExtent, Scope
from cachebus.workers.cache import Cache
from cachebus.workers.purger import Purged, Purger
from cachebus.workers.session import Beat, Decision, Heard, Move, Purge, Renew, Resubscribe, SayHello, Session

from .played import Flaky

#: The service's lease terms in these tests: a lease of 1.5 s.
INTERVAL, LIVENESS = 0.5, 3
LEASE = INTERVAL * LIVENESS
A, B, C = "tcp://10.0.0.1:5557", "tcp://10.0.0.2:5557", "tcp://10.0.0.3:5557"


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Worker:
    """A session on two fake clocks (monotonic and wall, moved together), applying its decisions as
    the subscriber does, minus the sockets."""

    def __init__(self, acks: Iterable[str] = (A,), name: str = "web", labels: Iterable[str] = (),
                 **terms: object) -> None:
        self.clock, self.wall = Clock(100.0), Clock(1_700_000_000.0)
        self.session = Session(name, labels, tuple(acks), clock=self.clock, wall=self.wall,
                               **terms)  # type: ignore[arg-type]
        self.epoch = "e1"

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.wall.now += seconds

    def clear(self, seq: int, epoch: str | None = None, age: float = 0.0, **scope: tuple[str, ...]) -> Clear:
        return Clear(epoch=epoch or self.epoch, seq=seq, id=f"c{seq}", ts=self.wall.now - age, **scope)

    def beat(self, seq: int, epoch: str | None = None, age: float = 0.0, interval: float = INTERVAL,
             liveness: int = LIVENESS) -> Heartbeat:
        return Heartbeat(epoch=epoch or self.epoch, seq=seq, ts=self.wall.now - age, heartbeat_interval=interval,
                         liveness=liveness)

    def hear(self, *messages: Clear | Heartbeat) -> Heard:
        """One batch, applied: the purge (not run here), the lease renewed, the hello said."""
        heard = self.session.receive(messages)
        assert heard is not None
        self.session.renew(heard)
        if heard.hello:
            self.session.hello_sent()
        return heard

    def welcome(self) -> None:
        self.session.welcomed(Welcome(epoch=self.epoch, seq=self.session.seq, heartbeat_interval=INTERVAL,
                                      liveness=LIVENESS))

    def tick(self, wait: float | None = None) -> list[Decision]:
        """``wait`` seconds later (a heartbeat interval), the decisions of the tick applied."""
        self.advance(self.session.heartbeat_interval if wait is None else wait)
        decisions = self.session.tick()
        for decision in decisions:
            if isinstance(decision, Move):
                self.session.upstream.next()  # what bus.upstream.move does, with the socket
            elif isinstance(decision, SayHello):
                self.session.hello_sent()
            elif isinstance(decision, Beat):
                self.session.heartbeat_sent()
        return decisions

    def synced(self) -> Worker:
        """Heard the service (the first purge and hello) and welcomed: where a running worker stands."""
        self.hear(self.beat(0))
        self.welcome()
        return self


# --- sequencing -----------------------------------------------------------------------------


def test_the_first_batch_purges_everything_and_says_hello_then_each_clear_purges_what_it_names():
    worker = Worker()
    first = worker.hear(worker.beat(4))
    assert first.purge == Purge(PurgeCause.RECONNECT, EVERYTHING) and first.hello
    assert (worker.session.epoch, worker.session.seq) == ("e1", 4)
    heard = worker.hear(worker.clear(5))
    assert heard.purge == Purge(PurgeCause.CLEAR, EVERYTHING, heard.newest) and not heard.hello
    assert heard.purge.clear_id == "c5" and worker.session.seq == 5
    assert worker.session.receive([]) is None  # nothing but undecodable messages: nothing to do


def test_a_new_epoch_purges_everything_and_says_hello(caplog: pytest.LogCaptureFixture):
    worker = Worker().synced()
    worker.hear(worker.clear(1), worker.clear(2))
    heard = worker.hear(worker.clear(7, epoch="e2"))
    # The first clear of the new stream is applied, but it may not be the first one sent.
    assert heard.purge is not None and heard.purge.cause is PurgeCause.EPOCH
    assert heard.purge.scope == EVERYTHING and heard.purge.clear_id == "c7" and heard.hello
    assert (worker.session.epoch, worker.session.seq) == ("e2", 7)
    assert "service epoch changed from e1 to e2: purging" in caplog.text
    # A heartbeat of a new epoch too, and it sets the position without a gap.
    heard = worker.hear(worker.beat(3, epoch="e3"))
    assert heard.purge == Purge(PurgeCause.EPOCH, EVERYTHING) and heard.hello and worker.session.seq == 3


def test_a_gap_purges_everything_with_cause_gap():
    worker = Worker().synced()
    heard = worker.hear(worker.clear(1, keys=("k",)), worker.clear(3, keys=("j",)))
    assert heard.purge is not None and heard.purge.cause is PurgeCause.GAP
    assert heard.purge.scope == EVERYTHING and heard.purge.clear_id == "c3" and not heard.hello
    # A heartbeat past the last clear seen: the clear in between was lost, whoever it was for.
    heard = worker.hear(worker.beat(5))
    assert heard.purge == Purge(PurgeCause.GAP, EVERYTHING) and worker.session.seq == 5
    assert worker.hear(worker.beat(5)).purge is None  # a heartbeat at the position: nothing missed


def test_clears_for_other_groups_are_counted_and_purge_nothing():
    worker = Worker(name="api", labels=["eu"]).synced()
    heard = worker.hear(worker.clear(1, group=("web",)), worker.clear(2, group=("us", "web")))
    assert heard.purge is None and worker.session.seq == 2
    heard = worker.hear(worker.clear(3, group=("eu",), keys=("k",)))  # by label
    assert heard.purge == Purge(PurgeCause.CLEAR, Scope(keys=("k",)), heard.newest)
    # A lost clear of another group is still a gap: it might have been for anyone.
    heard = worker.hear(worker.clear(5, group=("web",)))
    assert heard.purge == Purge(PurgeCause.GAP, EVERYTHING)


def test_scoped_clears_arriving_together_purge_their_union_and_a_bare_one_everything():
    worker = Worker().synced()
    heard = worker.hear(worker.clear(1, keys=("a",)), worker.clear(2, prefixes=("p:",), keys=("b", "a")),
                        worker.clear(3, tags=("t",), group=("api",)))
    assert heard.purge is not None and heard.purge.cause is PurgeCause.CLEAR
    assert heard.purge.scope == Scope(keys=("a", "b"), prefixes=("p:",))
    assert heard.purge.clear_id == "c2"  # the newest clear meant for this process
    heard = worker.hear(worker.clear(4, keys=("a",)), worker.clear(5))
    assert heard.purge is not None and heard.purge.scope == EVERYTHING


def test_a_seq_going_back_within_the_epoch_is_ignored():
    worker = Worker().synced()
    worker.hear(worker.clear(1), worker.clear(2), worker.clear(3))
    heard = worker.hear(worker.clear(2), worker.clear(3))  # replayed, or a stale path
    assert heard.purge is None and worker.session.seq == 3
    heard = worker.hear(worker.beat(2))  # a heartbeat behind the position says nothing was lost
    assert heard.purge is None and worker.session.seq == 3
    assert worker.hear(worker.clear(4)).purge == Purge(PurgeCause.CLEAR, EVERYTHING, worker.clear(4))


# --- the lease ----------------------------------------------------------------------------------


def test_the_lease_runs_from_when_the_newest_command_was_sent():
    worker = Worker().synced()
    session = worker.session
    heard = session.receive([worker.beat(0, age=5.0), worker.clear(1, age=0.5)])
    assert heard is not None
    assert session.renew(heard) == Renew(worker.clock.now + LEASE - 0.5)
    assert session.lease_until == worker.clock.now + LEASE - 0.5
    # Older than a lease: not renewed, and the lease already held is kept.
    stale = session.receive([worker.beat(1, age=LEASE + 0.1)])
    assert stale is not None and session.renew(stale) is None
    assert session.lease_until == worker.clock.now + LEASE - 0.5
    # A worker clock behind the service's (a message from the future) counts as no age.
    ahead = session.receive([worker.clear(2, age=-3.0)])
    assert ahead is not None and session.renew(ahead) == Renew(worker.clock.now + LEASE)


def test_a_lapse_purges_once_and_says_hello_when_the_service_is_heard_again(caplog: pytest.LogCaptureFixture):
    worker = Worker().synced()
    assert worker.session.heard
    worker.advance(LEASE)
    assert not worker.session.heard
    worker.advance(2.0)
    heard = worker.hear(worker.beat(0))
    assert heard.purge == Purge(PurgeCause.RECONNECT, EVERYTHING) and heard.hello
    assert "heard the service again after 3.5 s of silence: purging" in caplog.text
    assert worker.session.heard
    # A clear that ends the lapse is applied, and the purge still drops everything.
    worker.advance(LEASE)
    heard = worker.hear(worker.clear(1, keys=("k",)))
    assert heard.purge == Purge(PurgeCause.RECONNECT, EVERYTHING, heard.newest)
    # A gap or a new epoch outranks the lapse as the cause.
    worker.advance(LEASE)
    assert worker.hear(worker.clear(3)).purge == Purge(PurgeCause.GAP, EVERYTHING, worker.clear(3))


def test_distrust_makes_the_next_batch_purge_before_anything_is_trusted():
    worker = Worker().synced()
    worker.session.distrust()
    assert not worker.session.heard
    assert worker.hear(worker.beat(0)).purge == Purge(PurgeCause.RECONNECT, EVERYTHING)


def test_the_service_terms_are_followed_with_one_warning_when_configured_ones_differ(
        caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cachebus.subscriber")
    worker = Worker(heartbeat_interval=2.0, liveness=9)
    session = worker.session
    assert (session.lease_seconds, session.terms_from_service) == (18.0, False)  # until the service is heard
    worker.hear(worker.beat(0, interval=0.2, liveness=2))
    assert (session.heartbeat_interval, session.liveness, session.lease_seconds) == (0.2, 2, 0.4)
    assert session.terms_from_service
    for _ in range(4):
        worker.hear(worker.beat(0, interval=0.2, liveness=2))
    session.welcomed(Welcome(epoch="e1", seq=0, heartbeat_interval=0.2, liveness=2))
    worker.hear(worker.beat(0, interval=0.3, liveness=2))  # the service changed its terms: followed
    assert session.lease_seconds == pytest.approx(0.6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert ("given heartbeat_interval 2.0 s and liveness 9, the service uses 0.2 s and 2: following the service "
            "(a lease of 0.4 s)") in warnings[0]
    # Unconfigured: followed silently.
    caplog.clear()
    Worker().hear(worker.beat(0, interval=0.2, liveness=2))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_with_on_silence_serve_silence_never_stops_the_targets_and_the_degraded_time_is_counted(
        caplog: pytest.LogCaptureFixture):
    worker = Worker(on_silence=OnSilence.SERVE)
    session = worker.session
    heard = session.receive([worker.beat(0)])
    assert heard is not None and session.renew(heard) == Renew(math.inf)
    assert not session.degraded and session.degraded_seconds == 0.0
    worker.advance(LEASE)
    assert session.degraded and session.degraded_seconds == 0.0
    worker.advance(2.0)
    assert session.degraded_seconds == 2.0
    session.tick()
    session.tick()
    assert caplog.text.count("serving from the caches without the bound") == 1
    # Heard again: purged (before the targets serve on), no longer degraded, the time kept.
    heard = worker.hear(worker.beat(0))
    assert heard.purge == Purge(PurgeCause.RECONNECT, EVERYTHING)
    assert not session.degraded and session.degraded_seconds == 2.0
    worker.advance(LEASE + 1.0)
    assert session.degraded_seconds == 3.0
    worker.hear(worker.beat(0))
    assert session.degraded_seconds == 3.0
    # The default bypasses: never degraded, the lease ends.
    bypassing = Worker()
    heard = bypassing.session.receive([bypassing.beat(0)])
    assert heard is not None and bypassing.session.renew(heard) == Renew(bypassing.clock.now + LEASE)
    bypassing.advance(LEASE + 1.0)
    assert not bypassing.session.degraded and bypassing.session.degraded_seconds == 0.0


# --- heartbeats and the path --------------------------------------------------------------------


def test_heartbeats_go_out_while_the_service_is_heard_and_some_are_skipped_after_acks():
    worker = Worker().synced()
    assert worker.tick() == [Beat()]
    worker.welcome()
    # Acks every interval: at most liveness - 1 heartbeats skipped in a row.
    sent = []
    for _ in range(6):
        worker.advance(0.1)
        worker.hear(worker.beat(0))
        worker.session.acked()
        sent.append(worker.tick(wait=0.4))
        worker.welcome()
    assert sent == [[], [], [Beat()], [], [], [Beat()]]
    # Not heard: nothing to say (the hello comes with the next command).
    worker.advance(LEASE)
    assert worker.tick() == []


def test_an_unanswered_hello_or_heartbeat_moves_to_the_next_endpoint_and_says_hello_there():
    worker = Worker(acks=(A, B, C)).synced()
    upstream = worker.session.upstream
    assert upstream.current == A
    assert worker.tick() == [Beat()]  # sent, and answered
    worker.welcome()
    assert worker.tick() == [Beat()]  # sent, and never answered
    worker.hear(worker.beat(0))  # the service is still heard on the SUB socket
    assert worker.tick() == [Beat()]
    worker.hear(worker.beat(0))
    assert worker.tick() == [Beat()]
    worker.hear(worker.beat(0))
    # A lease since the oldest unanswered one: move, and a hello only (moving loses no clear: no purge).
    assert worker.tick() == [Move(A, B, LEASE), SayHello()]
    assert upstream.current == B and worker.session.hello_waiting and upstream.moves == 1
    worker.hear(worker.beat(0))
    worker.welcome()
    assert not worker.session.hello_waiting and upstream.waiting_since is None
    assert worker.tick() == [Beat()]
    # In order, wrapping around.
    for _ in range(3):
        worker.hear(worker.beat(0))
        worker.tick()
    assert upstream.current == C
    for _ in range(4):
        worker.hear(worker.beat(0))
        worker.tick()
    assert upstream.current == A and upstream.moves == 3


def test_heartbeats_skipped_after_acks_never_cause_a_move():
    """Silence counts from the oldest hello or heartbeat still unanswered; an ack expects no answer."""
    worker = Worker(acks=(A, B)).synced()
    for _ in range(40):  # 20 s of acks every interval, each skipped heartbeat's place left empty
        worker.advance(0.1)
        worker.hear(worker.clear(worker.session.seq + 1))
        worker.session.acked()
        decisions = worker.tick(wait=0.4)
        assert not [d for d in decisions if isinstance(d, Move)]
        if decisions:
            worker.welcome()  # the heartbeats that did go out are answered
    assert worker.session.upstream.current == A and worker.session.upstream.moves == 0


def test_a_move_while_the_service_is_unheard_waits_for_it_to_say_hello():
    worker = Worker(acks=(A, B)).synced()
    worker.tick()  # a heartbeat the dead instance never answers
    worker.advance(LEASE)  # nothing heard meanwhile either: no heartbeats
    assert worker.tick() == [Move(A, B, LEASE + INTERVAL)]
    assert worker.tick() == []  # nothing waits for an answer any more: no further move
    heard = worker.hear(worker.beat(0, epoch="e2"))  # the other instance took over
    assert heard.hello and worker.session.upstream.current == B


def test_with_one_endpoint_moving_connects_to_it_again():
    worker = Worker(acks=(A,))
    decisions = []
    for _ in range(3):
        worker.hear(worker.beat(0))  # heard, and the hello is never answered (the service refuses this key, say)
        decisions.append(worker.tick())
    assert decisions == [[Beat()], [Beat()], [Move(A, A, LEASE), SayHello()]]
    assert worker.session.upstream.current == A and worker.session.upstream.moves == 1


def test_a_subscription_that_never_hears_anything_is_made_again_every_lease():
    worker = Worker()
    assert [worker.tick() for _ in range(6)] == [[], [], [Resubscribe()], [], [], [Resubscribe()]]
    worker.session.subscribed()
    worker.hear(worker.beat(0))
    assert not [d for d in worker.tick() if isinstance(d, Resubscribe)]


# --- the purger ---------------------------------------------------------------------------------


def test_a_failing_target_is_a_failed_purge_withdraws_the_leases_and_only_it_is_retried():
    cache, flaky, plain = Cache(), Flaky(), {"k": 1}
    purger = Purger([cache, flaky, plain], PeerLog(logging.getLogger("test")))
    cache.set("k", "v")
    flaky.data["k"] = 1
    purger.hold_leases(math.inf)
    flaky.down = True

    async def main() -> None:
        failed = await purger.purge(PurgeCause.CLEAR, EVERYTHING, "c1", 1)
        assert failed == Purged(PurgeCause.CLEAR, "c1", 2, failed.purge_ms, PurgeExtent.ALL,
                                "ConnectionError: cannot reach redis://***@cache:6379/0 (password=***)")
        ack = failed.ack("web", "h:1:ab", "e1", 1)
        assert (ack.outcome, ack.error, ack.dropped, ack.seq) == (PurgeOutcome.FAILED, failed.error, 2, 1)
        assert cache.bypass and list(purger.failing) == [purger.targets[1]] and purger.purge_failures == 1
        purger.hold_leases(math.inf)
        assert cache.bypass  # no lease while a target fails
        plain["x"] = 1
        assert await purger.retry(2) is None  # still failing; the others are not cleared again
        assert plain == {"x": 1} and purger.purge_failures == 2
        flaky.down = False
        ok = await purger.retry(2)
        assert ok == Purged(PurgeCause.CLEAR, "c1", 3, ok.purge_ms if ok else 0.0, PurgeExtent.ALL)
        assert ok is not None and ok.ack("web", "h:1:ab", "e1", 2).outcome is PurgeOutcome.OK
        assert not purger.failing and await purger.retry(3) is None
        purger.hold_leases(math.inf)
        assert not cache.bypass
        assert (purger.purges, purger.last_cause, purger.purges_by_cause) == (1, "clear", {PurgeCause.CLEAR: 1})

    asyncio.run(main())


def test_a_target_still_failing_is_purged_entirely_by_a_scoped_purge():
    flaky, plain = Flaky(), {"a": 1, "b": 2}
    purger = Purger([flaky, plain], PeerLog(logging.getLogger("test")))
    flaky.down = True

    async def main() -> None:
        await purger.purge(PurgeCause.CLEAR, EVERYTHING, "c1", 1)
        flaky.down = False
        flaky.data["other"] = 1
        plain.update(a=1, b=2)
        purged = await purger.purge(PurgeCause.CLEAR, Scope(keys=("a",)), "c2", 2)
        assert purged.ok and purged.extent is PurgeExtent.ALL and flaky.data == {} and plain == {"b": 2}
        scoped = await purger.purge(PurgeCause.CLEAR, Scope(keys=("b",)), "c3", 3)
        assert scoped.extent is PurgeExtent.ALL  # a Flaky has no scoped purge: it drops all
        assert purger.counters()["failing"] is False and plain == {}

    asyncio.run(main())


def test_a_restart_is_a_fresh_session_that_purges_and_says_hello_at_its_first_batch():
    worker = Worker(acks=(A, B)).synced()
    worker.tick()  # a heartbeat still unanswered when the subscriber stops
    worker.session.started()
    assert not worker.session.heard and worker.session.upstream.waiting_since is None
    assert worker.tick() == []  # nothing that was sent before the restart can move it
    heard = worker.hear(worker.beat(0))
    assert heard.purge == Purge(PurgeCause.RECONNECT, EVERYTHING) and heard.hello

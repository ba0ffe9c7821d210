"""The record: one entry per process, failed purges that prove nothing, and memory
bounded by settings and shared between clears with the same workers.

These drive a real :class:`Record` directly, as the ack listener does, so a
thousand workers and hundreds of clears cost a second, not a fleet.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from cachebus.bus.protocol import Ack, Bye, Clear, Hello, PurgeCause, PurgeOutcome
from cachebus.service.record import Peer, Record, Refused, WorkerState


def hello(record: Record, name: str, instance: str = "", peer: Peer | None = None) -> None:
    record.hello(Hello(name=name, instance=instance or f"{name}-1", host="h", pid=1, endpoint="", epoch="e",
                       seq=0), peer or Peer())


def publish(record: Record, seq: int, token: str = "") -> None:
    record.published(Clear(epoch="e", seq=seq, id=f"c{seq}", ts=time.time()), token)


def ack(record: Record, name: str, seq: int, instance: str = "", error: str = "") -> None:
    record.acked(Ack(name=name, instance=instance or f"{name}-1", epoch="e", seq=seq, clear_id=f"c{seq}",
                     dropped=3, purge_ms=0.1, cause=PurgeCause.CLEAR,
                     outcome=PurgeOutcome.FAILED if error else PurgeOutcome.OK, error=error))


def test_processes_sharing_a_name_are_each_expected_and_listed():
    """gunicorn -w 3 with one name: three workers, all expected, grouped under the name."""
    record = Record()
    for pid in range(3):
        hello(record, "web", f"host:{pid}:ab")
    publish(record, 1, token="0123456789abcdef")
    entry = record.clear("c1")
    assert entry is not None and entry.expected == ("host:0:ab", "host:1:ab", "host:2:ab")
    ack(record, "web", 1, "host:0:ab")
    ack(record, "web", 1, "host:2:ab")
    body = record.clear_json(entry)
    assert body["token"] == "01234567"
    assert body["groups"] == {"web": {"expected": 3, "acked": 2, "failed": 0, "missing": 1}}
    assert [m["worker"] for m in body["missing"]] == ["host:1:ab"]
    assert body["missing"][0] == {"worker": "host:1:ab", "name": "web", "host": "h", "pid": 1, "state": "live",
                                  "last_seen": record.worker("host:1:ab").last_seen}
    assert not body["complete"]
    ack(record, "web", 1, "host:1:ab")
    assert record.clear_json(entry)["complete"]
    assert [w.instance for w in record.workers()] == ["host:0:ab", "host:1:ab", "host:2:ab"]


def test_a_failed_purge_is_listed_but_proves_nothing_until_a_retry_succeeds():
    record = Record()
    hello(record, "web", "a")
    hello(record, "web", "b")
    publish(record, 1)
    entry = record.clear("c1")
    assert entry is not None
    ack(record, "web", 1, "a")
    ack(record, "web", 1, "b", error="ConnectionError: redis down")
    body = record.clear_json(entry)
    assert not body["complete"] and body["missing"] == []
    assert [(f["worker"], f["error"]) for f in body["failed"]] == [("b", "ConnectionError: redis down")]
    assert body["groups"]["web"] == {"expected": 2, "acked": 1, "failed": 1, "missing": 0}
    assert record.worker("b").last_outcome == PurgeOutcome.FAILED
    ack(record, "web", 1, "b", error="ConnectionError: still down")  # a second failure changes nothing
    assert entry.failed_count == 1 and record.acks_kept == 2
    ack(record, "web", 1, "b")  # the retry purged every target
    body = record.clear_json(entry)
    assert body["complete"] and body["failed"] == [] and entry.acked_count == 2
    ack(record, "web", 1, "b", error="late failure")  # cannot undo a proof
    assert record.clear_json(entry)["complete"]


def test_nobody_live_at_publish_time_completes_at_once_without_proof():
    record = Record()
    publish(record, 1)
    entry = record.clear("c1")
    assert entry is not None and entry.completed_at is not None
    body = record.clear_json(entry)
    assert body["workers"] == [] and body["missing"] == [] and not body["complete"]


def test_workers_not_live_at_publish_time_are_listed_as_excluded():
    record = Record(suspect_after=0.0)
    hello(record, "web", "gone")
    record.sweep()
    assert record.worker("gone").state == WorkerState.SUSPECT
    record.suspect_after = 60.0
    hello(record, "web", "here")
    publish(record, 1)
    entry = record.clear("c1")
    assert entry is not None and entry.expected == ("here",)
    excluded = record.clear_json(entry)["excluded"]
    assert [(e["worker"], e["state"]) for e in excluded] == [("gone", "suspect")]


def test_an_instance_cannot_change_its_name_or_key():
    record = Record()
    hello(record, "web", "a", Peer(b"r", "key-1"))
    with pytest.raises(Refused):
        hello(record, "api", "a", Peer(b"r", "key-1"))
    with pytest.raises(Refused):
        hello(record, "web", "a", Peer(b"r", "key-2"))
    with pytest.raises(Refused):
        record.acked(Ack(name="api", instance="a", epoch="e", seq=0, clear_id="", dropped=0, purge_ms=0.0,
                         cause=PurgeCause.CLEAR), Peer(b"r", "key-1"))
    record.bye(Bye(name="web", instance="a"), Peer(b"r", "key-1"))
    assert record.worker("a").state == WorkerState.LEFT


def test_a_bye_is_the_last_word_the_ack_before_it_proves_and_no_later_clear_expects_the_worker():
    """Each worker's messages arrive in the order it sent them (one path to the leader:
    bus.upstream, and relays keep each worker's order), so the record takes them as they come."""
    record = Record()
    hello(record, "w")
    publish(record, 1)
    ack(record, "w", 1)
    record.bye(Bye(name="w", instance="w-1"))
    worker = record.worker("w-1")
    assert worker is not None and worker.state == WorkerState.LEFT
    entry = record.clear("c1")
    assert entry is not None and record.clear_json(entry)["complete"]
    publish(record, 2)
    second = record.clear("c2")
    assert second is not None and second.expected == ()


def test_a_bye_for_a_worker_the_record_does_not_know_marks_nobody():
    """A bye can only follow its own hello; one for an instance never heard of is a stranger's
    (or its hello was lost), and it keeps nobody from joining."""
    record = Record()
    record.bye(Bye(name="w", instance="w-1"), Peer(b"r", "key-other"))
    hello(record, "w", peer=Peer(b"r", "key-w"))
    assert {w.instance: w.state for w in record.workers()} == {"w-1": WorkerState.LIVE}
    publish(record, 1)
    entry = record.clear("c1")
    assert entry is not None and entry.expected == ("w-1",)


def test_clears_with_the_same_live_workers_share_one_membership():
    record = Record()
    for name in ("w1", "w2"):
        hello(record, name)
    publish(record, 1)
    publish(record, 2)
    first, second = record.clear("c1"), record.clear("c2")
    assert first is not None and second is not None
    assert first.membership is second.membership
    assert first.expected == ("w1-1", "w2-1")

    hello(record, "w3")
    publish(record, 3)
    third = record.clear("c3")
    assert third is not None and third.expected == ("w1-1", "w2-1", "w3-1")
    assert third.membership is not second.membership

    ack(record, "w1", 3)
    ack(record, "w3", 3)
    assert third.missing == ["w2-1"] and not third.complete and third.acked_count == 2
    ack(record, "w2", 3)
    assert third.complete and third.missing == []


def test_a_thousand_workers_and_hundreds_of_clears_stay_within_max_acks():
    workers, clears, max_acks = 1000, 200, 20_000
    record = Record(max_clears=1000, max_acks=max_acks)
    tracemalloc.start()
    try:
        for i in range(workers):
            hello(record, f"w{i}")
        registered, _ = tracemalloc.get_traced_memory()
        for seq in range(1, clears + 1):
            publish(record, seq)
            if seq % 10 == 0:  # every worker acks every clear, ten at a time
                for i in range(workers):
                    ack(record, f"w{i}", seq)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = record.recent(clears)
    assert record.acks_kept == sum(len(entry.acks) for entry in kept) <= max_acks
    assert kept[0].id == f"c{clears}" and kept[0].complete
    # 200,000 acks arrived; 20,000 are kept (2.7 MB measured). Unbounded, this run grows by 27.6 MB.
    assert grown - registered < 8e6, f"grew by {(grown - registered) / 1e6:.1f} MB"


def test_a_thousand_clears_to_two_thousand_silent_workers_share_one_snapshot():
    # Issue 12's defect 4: workers that join (anyone who reaches the ack socket
    # could add them) and never ack. Each clear used to copy their names into a
    # list, a frozenset and a set: 213.7 MB for this run; now 0.6 MB.
    record = Record(max_clears=1000)
    tracemalloc.start()
    try:
        for i in range(2002):
            hello(record, f"w{i}")
        registered, _ = tracemalloc.get_traced_memory()
        for seq in range(1, 1001):
            publish(record, seq)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len({id(entry.membership) for entry in record.recent(1000)}) == 1
    assert grown - registered < 5e6, f"grew by {(grown - registered) / 1e6:.1f} MB"

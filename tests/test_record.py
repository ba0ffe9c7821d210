"""The record's memory: bounded by settings, and shared between clears with the same workers.

These drive a real :class:`Record` directly, as the ack listener does, so a
thousand workers and hundreds of clears cost a second, not a fleet.
"""

from __future__ import annotations

import time
import tracemalloc

from cachebus.bus.protocol import Ack, Clear, Hello, PurgeCause
from cachebus.service.record import Record


def hello(record: Record, name: str) -> None:
    record.hello(Hello(name=name, instance=f"{name}-1", host="h", pid=1, endpoint="", epoch="e", seq=0))


def publish(record: Record, seq: int) -> None:
    record.published(Clear(epoch="e", seq=seq, id=f"c{seq}", ts=time.time()))


def ack(record: Record, name: str, seq: int) -> None:
    record.acked(Ack(name=name, instance=f"{name}-1", epoch="e", seq=seq, clear_id=f"c{seq}", dropped=0,
                     purge_ms=0.1, cause=PurgeCause.CLEAR))


def test_clears_with_the_same_live_workers_share_one_membership():
    record = Record()
    for name in ("w1", "w2"):
        hello(record, name)
    publish(record, 1)
    publish(record, 2)
    first, second = record.clear("c1"), record.clear("c2")
    assert first is not None and second is not None
    assert first.membership is second.membership
    assert first.expected == ("w1", "w2")

    hello(record, "w3")
    publish(record, 3)
    third = record.clear("c3")
    assert third is not None and third.expected == ("w1", "w2", "w3")
    assert third.membership is not second.membership

    ack(record, "w1", 3)
    ack(record, "w3", 3)
    assert third.missing == ["w2"] and not third.complete and third.acked_count == 2
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

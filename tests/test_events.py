"""The event stream, end to end: a real service, real workers, a raw SSE client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from cachebus.bus.protocol import Ack, Bye, Clear, Hello, PurgeCause, WorkerHeartbeat
from cachebus.service import events
from cachebus.service.events import (
    ClearCompleted,
    ClearPublished,
    EventKind,
    EventLog,
    RecordEvent,
    WorkerJoined,
    WorkerStats,
    unnumbered,
)
from cachebus.service.metrics import ServiceMetrics
from cachebus.service.record import Record
from cachebus.testing import DEADLINE, Cluster, http, wait_for

from .support import EventStream


@pytest.fixture
def streams() -> Any:
    opened: list[EventStream] = []
    yield opened
    for stream in opened:
        stream.close()


@pytest.mark.processes
def test_stream_starts_with_a_snapshot_and_follows_a_clear_to_completion(cluster: Cluster, streams: list):
    cluster.start_service()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    stream = EventStream(cluster)
    streams.append(stream)
    response = stream.open()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    _, kind, snapshot = stream.next()
    assert kind == "snapshot"
    assert {w["name"] for w in snapshot["workers"]} == {"w1", "w2"}

    status, headers, _ = cluster.clear()
    assert status == 204
    clear_id = headers["Cache-Clear-Id"]
    seen = stream.until(lambda kind, data: kind == "clear.completed" and data["clear_id"] == clear_id,
                        "the clear to complete")
    kinds = [kind for _, kind, data in seen if data.get("clear_id") == clear_id]
    assert kinds[0] == "clear.published"
    acked = [data for _, kind, data in seen if kind == "clear.acked" and data["clear_id"] == clear_id]
    assert {a["name"] for a in acked} == {"w1", "w2"}
    assert sorted(a["acked"] for a in acked) == [1, 2] and all(a["expected"] == 2 for a in acked)
    purged = [data for _, kind, data in seen if kind == "worker.purged"]
    assert {p["name"] for p in purged if p["cause"] == "clear"} >= {"w1", "w2"}
    completed = seen[-1][2]
    assert completed["complete"] is True and completed["missing"] == [] and completed["duration_ms"] >= 0
    numbers = [int(event_id.rsplit(":", 1)[1]) for event_id, _, _ in seen]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


@pytest.mark.processes
def test_a_client_that_reconnects_gets_what_it_missed(cluster: Cluster, streams: list):
    cluster.start_service()
    cluster.start_worker("w1")
    first = EventStream(cluster)
    streams.append(first)
    first.next()  # snapshot
    cluster.clear()
    first.until(lambda kind, data: kind == "clear.completed", "the first clear to complete")
    resume_from = first.last_id
    first.close()

    _, headers, _ = cluster.clear()
    missed_id = headers["Cache-Clear-Id"]
    wait_for(lambda: cluster.clear_record(missed_id)["complete"], what="the missed clear to complete")

    again = EventStream(cluster, last_event_id=resume_from)
    streams.append(again)
    replayed = again.until(lambda kind, data: kind != "worker.stats", "the first missed clear event")
    _, kind, data = replayed[-1]
    assert (kind, data["clear_id"]) == ("clear.published", missed_id)
    again.until(lambda kind, data: kind == "clear.completed" and data["clear_id"] == missed_id,
                "the missed clear's completion")

    stale = EventStream(cluster, last_event_id="another-run:3")
    streams.append(stale)
    _, kind, snapshot = stale.next()
    assert kind == "snapshot" and snapshot["clears"][0]["id"] == missed_id


@pytest.mark.processes
def test_worker_joins_and_state_changes_are_streamed(cluster: Cluster, streams: list):
    cluster.start_service(settings={"bus": {"liveness": 2}, "record": {"lost_after": 2.0}})
    stream = EventStream(cluster)
    streams.append(stream)
    stream.next()
    cluster.start_worker("w1")
    _, _, joined = stream.until(lambda kind, data: kind == "worker.joined", "w1 to join")[-1]
    assert joined["name"] == "w1" and joined["state"] == "live"
    cluster.workers["w1"][0].kill()
    changes = stream.until(lambda kind, data: kind == "worker.state" and data["state"] == "lost", "w1 lost")
    states = [data["state"] for _, kind, data in changes if kind == "worker.state"]
    assert states[-2:] == ["suspect", "lost"]


@pytest.mark.processes
def test_a_slow_client_is_dropped_without_slowing_the_bus(cluster: Cluster, streams: list):
    cluster.start_service(settings={"events": {"client_queue": 20}})
    cluster.start_worker("w1")
    slow = EventStream(cluster, rcvbuf=2048)
    streams.append(slow)
    slow.open()  # headers read; from here on this client reads nothing
    deadline = time.monotonic() + DEADLINE

    def dropped() -> bool:
        status, _, body = http("GET", cluster.url + "/metrics")
        return status == 200 and "cachebus_event_stream_dropped_total 1.0" in body.decode()

    while not dropped():
        assert time.monotonic() < deadline, "the slow client was never dropped"
        cluster.flood(50)
    # Every clear was still published and acked while the client was stuck.
    status, _, body = cluster.clear(wait="all", timeout="20")
    assert status == 200 and json.loads(body)["acks"][0]["name"] == "w1"
    kinds = []
    while (event := slow.next()) is not None:
        kinds.append(event[1])
    assert kinds[-1] == "overflow"


@pytest.mark.processes
def test_a_client_that_never_reads_is_disconnected(cluster: Cluster, streams: list):
    cluster.start_service(settings={"events": {"client_queue": 20}})
    cluster.start_worker("w1")
    stuck = EventStream(cluster, rcvbuf=2048)
    streams.append(stuck)
    stuck.open()  # headers read; from here on this client reads nothing at all

    def metric(name: str) -> str:
        status, _, body = http("GET", cluster.url + "/metrics")
        assert status == 200
        return next((line for line in body.decode().splitlines() if line.startswith(name + " ")), "")

    def dropped() -> bool:
        if metric("cachebus_event_stream_dropped_total") == "cachebus_event_stream_dropped_total 1.0":
            return True
        cluster.flood(50)
        return False

    wait_for(dropped, what="the stuck client to be dropped")
    # Without one byte read by the client, the service ends the connection and frees its stream.
    wait_for(lambda: metric("cachebus_event_stream_clients") == "cachebus_event_stream_clients 0.0",
             what="the stuck client's stream to be closed")
    while stuck.next() is not None:
        pass  # what was in flight, then the end of the stream


@pytest.mark.processes
def test_a_workers_cache_counters_are_streamed_and_replayed_newest_only(cluster: Cluster, streams: list):
    cluster.start_service(settings={"events": {"stats_interval": 0}})
    worker_url = cluster.start_worker("w1")
    stream = EventStream(cluster)
    streams.append(stream)
    stream.next()  # snapshot
    resume_from = stream.last_id

    def stats_event(**expected: Any) -> Callable[[str, Any], bool]:
        return lambda kind, data: (kind == "worker.stats" and data["name"] == "w1"
                                   and all(data["stats"].get(k) == v for k, v in expected.items()))

    assert http("GET", worker_url + "/entries/hello")[1]["X-Cache"] == "MISS"
    seen = stream.until(stats_event(entries=1, hits=0, misses=1), "a worker.stats event with the new entry")
    assert http("GET", worker_url + "/entries/hello")[1]["X-Cache"] == "HIT"
    seen += stream.until(stats_event(entries=1, hits=1, hit_ratio=0.5), "a worker.stats event with the hit")
    cluster.clear()
    seen += stream.until(stats_event(entries=0), "a worker.stats event after the purge")
    cluster.workers["w1"][0].stop()
    seen += stream.until(lambda kind, data: kind == "worker.state" and data["state"] == "left", "w1 to leave")
    assert len([kind for _, kind, _ in seen if kind == "worker.stats"]) >= 3

    again = EventStream(cluster, last_event_id=resume_from)
    streams.append(again)
    replayed = again.until(lambda kind, data: kind == "worker.state" and data["state"] == "left", "the replay")
    newest_stats = [event for event in seen if event[1] == "worker.stats"][-1]
    assert [event for event in replayed if event[1] == "worker.stats"] == [newest_stats]
    assert [event for event in replayed if event[1] != "worker.stats"] == \
        [event for event in seen if event[1] != "worker.stats"]


@pytest.mark.processes
def test_the_stream_needs_the_same_credentials_as_the_record(cluster: Cluster):
    cluster.start_service()
    status, _, body = http("GET", f"{cluster.url}/api/v1/cache/events?token={cluster.token}&access_token=wrong")
    assert status == 401
    assert json.loads(body)["message"] == "Token is wrong"


def published(clear_id: str) -> ClearPublished:
    return ClearPublished(clear_id=clear_id, seq=1, epoch="e", published_at=0.0, expected=())


def stats(worker: str, **counters: int) -> WorkerStats:
    return WorkerStats(worker=worker, name=worker, last_seen=0.0, stats=counters)


def test_replay_keeps_the_newest_stats_per_worker_within_the_history_bound():
    log = EventLog("e", history=3)
    log.emit(published("a"))  # 1
    for n in range(3):  # 2, 3, 4: one worker's counters, superseded twice
        log.emit(stats("w1", entries=n))
    log.emit(ClearCompleted(clear_id="a", seq=1, expected=0, acked=0, complete=True, missing=(), failed=(),
                            duration_ms=0.0))  # 5
    assert [(e.id, e.kind) for e in log.since("e:0")] == [(1, "clear.published"), (4, "worker.stats"),
                                                          (5, "clear.completed")]
    assert [e.id for e in log.since("e:3")] == [4, 5]

    for name in ("w2", "w3", "w4"):  # 6, 7, 8: more workers than the history holds
        log.emit(stats(name))
    assert log.since("e:3") is None, "w1's event 4 was dropped, so a client that saw only 3 needs a snapshot"
    assert [e.id for e in log.since("e:4")] == [5, 6, 7, 8]
    for n in (9, 10, 11):  # the history of three now drops events 1 and 5
        log.emit(published(str(n)))
    assert log.since("e:4") is None
    assert [e.id for e in log.since("e:5")] == [6, 7, 8, 9, 10, 11]


# --- the events the record emits, as the stream has always sent them ----------


def json_of(event: RecordEvent) -> list[tuple[str, Any]]:
    """``event``'s data as the stream sends it: field names, values and their order."""
    return list(json.loads(json.dumps(event.to_json())).items())


def hello(name: str, seq: int = 0) -> Hello:
    return Hello(name=name, instance=f"{name}-1", host="h", pid=7, endpoint="http://127.0.0.1:1", epoch="e", seq=seq)


def test_the_record_emits_each_change_with_the_fields_the_stream_documents():
    emitted: list[RecordEvent] = []
    record = Record(complete_within=0.0, stats_interval=0.0, emit=emitted.append)

    record.hello(hello("w1"))
    record.hello(hello("w2"))
    w1 = record.worker("w1-1")
    assert w1 is not None
    joined = emitted[0]
    assert isinstance(joined, WorkerJoined)
    assert json_of(joined) == list({
        "id": "w1-1", "name": "w1", "instance": "w1-1", "host": "h", "pid": 7, "endpoint": "http://127.0.0.1:1",
        "state": "live", "joined_at": w1.joined_at, "last_seen": w1.last_seen, "last_acked_seq": None,
        "last_acked_clear": None, "last_purge_cause": None, "last_outcome": None, "last_error": "", "acks": 0,
        "epoch": "e", "seq": 0, "stats": {}, "key": None, "on_silence": "bypass", "degraded": False,
            "via": "", "labels": [],
    }.items())
    assert json_of(joined) == list(w1.to_json().items()), "worker.joined carries the worker as /workers shows it"

    published_at = time.time()
    record.published(Clear(epoch="e", seq=1, id="c1", ts=published_at), "0123456789abcdef")
    assert json_of(emitted[2]) == list({"clear_id": "c1", "seq": 1, "epoch": "e", "published_at": published_at,
                                        "expected": ["w1-1", "w2-1"], "token": "01234567",
                                        "scope": {"keys": [], "prefixes": [], "tags": [], "group": []}}.items())

    del emitted[:]
    record.acked(Ack(name="w1", instance="w1-1", epoch="e", seq=1, clear_id="c1", dropped=5, purge_ms=0.1234567,
                     cause=PurgeCause.CLEAR))
    entry = record.clear("c1")
    assert entry is not None
    ack = entry.acks["w1-1"]
    assert [event.KIND for event in emitted] == ["worker.purged", "clear.acked"]
    assert json_of(emitted[0]) == list({"worker": "w1-1", "name": "w1", "cause": "clear", "seq": 1,
                                        "clear_id": "c1", "entries_dropped": 5, "purge_ms": 0.123,
                                        "outcome": "ok", "error": "", "scope": "all"}.items())
    assert json_of(emitted[1]) == list({"clear_id": "c1", "seq": 1, "worker": "w1-1", "name": "w1",
                                        "acked_at": ack.acked_at, "latency_ms": round(ack.latency_ms, 3),
                                        "entries_dropped": 5, "purge_ms": 0.123, "cause": "clear", "outcome": "ok",
                                        "error": "", "acked": 1, "expected": 2, "failed": 0,
                                        "scope": "all"}.items())

    del emitted[:]
    record.sweep()  # complete_within 0: w2's ack is given up on
    assert json_of(emitted[0]) == list({"clear_id": "c1", "seq": 1, "expected": 2, "acked": 1, "complete": False,
                                        "missing": ["w2-1"], "failed": [],
                                        "duration_ms": entry.duration_ms}.items())

    del emitted[:]
    record.heartbeat(WorkerHeartbeat(**vars(hello("w1", seq=1)), stats={"entries": 3, "hits": 1}))
    assert json_of(emitted[0]) == list({"worker": "w1-1", "name": "w1", "last_seen": w1.last_seen,
                                        "stats": {"entries": 3, "hits": 1}}.items())

    del emitted[:]
    record.bye(Bye(name="w1", instance="w1-1"))
    record.forget_after = -1.0
    record.sweep()
    assert [json_of(event) for event in emitted] == [
        list({"worker": "w1-1", "name": "w1", "state": "left", "previous": "live",
              "last_seen": w1.last_seen}.items()),
        list({"worker": "w1-1", "name": "w1", "state": "forgotten", "previous": "left",
              "last_seen": w1.last_seen}.items()),
    ]


def test_an_event_is_encoded_once_and_only_when_a_stream_reads_it(monkeypatch: pytest.MonkeyPatch):
    log = EventLog("e")
    record = Record(emit=log.emit)
    ServiceMetrics(record, log)  # the metrics listen to every event, and never need its JSON
    real_json = events.json
    monkeypatch.setattr(events, "json", SimpleNamespace(dumps=lambda *a, **k: pytest.fail("encoded with no reader")))
    record.hello(hello("w1"))
    record.published(Clear(epoch="e", seq=1, id="c1", ts=time.time()))
    record.acked(Ack(name="w1", instance="w1-1", epoch="e", seq=1, clear_id="c1", dropped=0, purge_ms=0.5,
                     cause=PurgeCause.GAP))
    monkeypatch.setattr(events, "json", real_json)

    replay = log.since("e:0")
    assert replay is not None and [event.kind for event in replay] == [
        "worker.joined", "clear.published", "worker.purged", "clear.acked", "clear.completed"]
    purged = replay[2]
    assert purged.sse == (b'id: e:3\nevent: worker.purged\ndata: {"worker":"w1-1","name":"w1","cause":"gap",'
                          b'"seq":1,"clear_id":"c1","entries_dropped":0,"purge_ms":0.5,"outcome":"ok",'
                          b'"error":"","scope":"all"}\n\n')
    assert purged.sse is purged.sse, "encoded once, then shared by every reader"


def test_unnumbered_events_and_snapshots_are_encoded_as_before():
    assert unnumbered(EventKind.OVERFLOW, {"dropped": True}) == b'event: overflow\ndata: {"dropped":true}\n\n'
    log = EventLog("e")
    log.emit(published("a"))
    assert log.snapshot({"epoch": "e", "workers": [], "clears": []}) == \
        b'id: e:1\nevent: snapshot\ndata: {"epoch":"e","workers":[],"clears":[]}\n\n'

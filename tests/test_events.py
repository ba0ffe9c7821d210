"""The event stream, end to end: a real service, real workers, a raw SSE client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from cachebus.service.events import EventLog
from cachebus.testing import DEADLINE, Cluster, EventStream, http, wait_for


@pytest.fixture
def streams() -> Any:
    opened: list[EventStream] = []
    yield opened
    for stream in opened:
        stream.close()


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
    assert {a["worker"] for a in acked} == {"w1", "w2"}
    assert sorted(a["acked"] for a in acked) == [1, 2] and all(a["expected"] == 2 for a in acked)
    purged = [data for _, kind, data in seen if kind == "worker.purged"]
    assert {p["worker"] for p in purged if p["cause"] == "clear"} >= {"w1", "w2"}
    completed = seen[-1][2]
    assert completed["complete"] is True and completed["missing"] == [] and completed["duration_ms"] >= 0
    numbers = [int(event_id.rsplit(":", 1)[1]) for event_id, _, _ in seen]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


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
    assert status == 200 and json.loads(body)["acks"][0]["worker"] == "w1"
    kinds = []
    while (event := slow.next()) is not None:
        kinds.append(event[1])
    assert kinds[-1] == "overflow"


def test_a_workers_cache_counters_are_streamed_and_replayed_newest_only(cluster: Cluster, streams: list):
    cluster.start_service(settings={"events": {"stats_interval": 0}})
    worker_url = cluster.start_worker("w1")
    stream = EventStream(cluster)
    streams.append(stream)
    stream.next()  # snapshot
    resume_from = stream.last_id

    def stats_event(**expected: Any) -> Callable[[str, Any], bool]:
        return lambda kind, data: (kind == "worker.stats" and data["worker"] == "w1"
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


def test_the_stream_needs_the_same_credentials_as_the_record(cluster: Cluster):
    cluster.start_service()
    status, _, body = http("GET", f"{cluster.url}/api/v1/cache/events?token={cluster.token}&access_token=wrong")
    assert status == 401
    assert json.loads(body)["message"] == "Token is wrong"


def test_replay_keeps_the_newest_stats_per_worker_within_the_history_bound():
    log = EventLog("e", history=3)
    log.emit("clear.published", {"clear_id": "a"})  # 1
    for n in range(3):  # 2, 3, 4: one worker's counters, superseded twice
        log.emit("worker.stats", {"worker": "w1", "stats": {"entries": n}})
    log.emit("clear.completed", {"clear_id": "a"})  # 5
    assert [(e.id, e.kind) for e in log.since("e:0")] == [(1, "clear.published"), (4, "worker.stats"),
                                                          (5, "clear.completed")]
    assert [e.id for e in log.since("e:3")] == [4, 5]

    for name in ("w2", "w3", "w4"):  # 6, 7, 8: more workers than the history holds
        log.emit("worker.stats", {"worker": name, "stats": {}})
    assert log.since("e:3") is None, "w1's event 4 was dropped, so a client that saw only 3 needs a snapshot"
    assert [e.id for e in log.since("e:4")] == [5, 6, 7, 8]
    for n in (9, 10, 11):  # the history of three now drops events 1 and 5
        log.emit("clear.published", {"clear_id": str(n)})
    assert log.since("e:4") is None
    assert [e.id for e in log.since("e:5")] == [6, 7, 8, 9, 10, 11]

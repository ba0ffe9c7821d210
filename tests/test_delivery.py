"""Delivery guarantees under faults, with real processes on loopback.

The guarantee: once ``heartbeat_interval x liveness`` (1.5 s by default) has
passed after a clear, no worker serves an entry cached before it. After each
fault the tests check that workers serve the new value and that the record
tells the truth about who acked.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from cachebus.service.lead import LEAD_FILE
from cachebus.testing import DEADLINE, Cluster, http_json, wait_for
from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import ThreadedSubscriber

from .support import edit_entry, expected_names, netns_unavailable, read_entry

pytestmark = pytest.mark.processes


def states(cluster: Cluster) -> dict[str, str]:
    return {w["name"]: w["state"] for w in cluster.worker_list()}


def clear_and_wait(cluster: Cluster, timeout: float = 10) -> tuple[int, dict]:
    status, _, body = cluster.clear(wait="all", timeout=str(timeout))
    assert status in (200, 202), body
    return status, json.loads(body)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_wait_all_gets_every_ack(cluster: Cluster):
    cluster.start_service()
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name)
    status, body = clear_and_wait(cluster)
    assert status == 200
    assert expected_names(body) == ["w1", "w2", "w3"]
    assert sorted(a["name"] for a in body["acks"]) == ["w1", "w2", "w3"]
    for ack in body["acks"]:
        assert set(ack) >= {"worker", "entries_dropped", "purge_ms", "latency_ms", "cause"}
    assert body["elapsed_ms"] >= max(a["latency_ms"] for a in body["acks"]) - 1
    plain = cluster.clear()
    assert plain[0] == 204 and plain[2] == b""


def test_kill_9_during_a_burst(cluster: Cluster, content_dir: Path):
    # A long suspect window, so the killed worker is still expected when the
    # waiting clear is published however slow this machine is.
    cluster.start_service(settings={"bus": {"liveness": 8}, "record": {"lost_after": 5.0}})
    urls = {name: cluster.start_worker(name) for name in ("w1", "w2", "w3")}
    for url in urls.values():
        read_entry(url)
    edit_entry(content_dir, "hello", "after the burst")

    burst = threading.Thread(target=cluster.flood, args=(40, 1))
    burst.start()
    wait_for(lambda: any(w["acks"] >= 5 for w in cluster.worker_list()), what="the burst to be under way")
    cluster.workers["w2"][0].kill()
    burst.join()

    status, body = clear_and_wait(cluster, timeout=2)
    assert status == 202
    [killed] = [m for m in body["missing"] if m["name"] == "w2"]
    assert killed["state"] in ("live", "suspect")
    # The live ones ack (however long this machine takes); the killed one never does.
    acked = cluster.wait_all_acked(body["id"], {"w1", "w3"})
    assert [m["name"] for m in acked["missing"]] == ["w2"]
    assert sorted(a["name"] for a in acked["acks"]) == ["w1", "w3"]
    for name in ("w1", "w3"):
        assert read_entry(urls[name])[1]["title"] == "after the burst"
    wait_for(lambda: states(cluster)["w2"] == "lost", what="the killed worker to be lost")
    record = cluster.clear_record(body["id"])
    assert [m["name"] for m in record["missing"]] == ["w2"]
    status, body = clear_and_wait(cluster)
    assert status == 200 and expected_names(body) == ["w1", "w3"]


def test_sigstop_past_the_liveness_window_then_sigcont(cluster: Cluster, content_dir: Path):
    cluster.start_service()
    url = cluster.start_worker("w1")
    proc = cluster.workers["w1"][0]
    assert read_entry(url)[1]["title"] == "Hello, cachebus"
    assert read_entry(url)[0] == "HIT"

    proc.signal(signal.SIGSTOP)
    try:
        edit_entry(content_dir, "hello", "while stopped")
        wait_for(lambda: states(cluster)["w1"] != "live", what="the stopped worker to fall silent")
        for _ in range(3):
            assert cluster.clear()[0] == 204
    finally:
        proc.signal(signal.SIGCONT)
    # Whatever the worker processes first, it must not serve the cached title.
    assert read_entry(url)[1]["title"] == "while stopped"

    wait_for(lambda: states(cluster)["w1"] == "live", what="the worker to be live again")
    stats = wait_for(lambda: (s := http_json(f"{url}/stats"))["bus"]["last_purge_cause"] == "reconnect" and s,
                     what="the reconnect purge")
    assert stats["cache"]["bypass_seconds"] > 0
    status, body = clear_and_wait(cluster)
    assert status == 200 and [a["name"] for a in body["acks"]] == ["w1"]


def test_service_restart_while_workers_keep_running(cluster: Cluster, content_dir: Path):
    first = cluster.start_service()
    urls = {name: cluster.start_worker(name) for name in ("w1", "w2")}
    status, body = clear_and_wait(cluster)
    assert status == 200
    epoch = body["epoch"]
    for url in urls.values():
        read_entry(url)
    assert first.stop() == 0
    edit_entry(content_dir, "hello", "after the restart")

    # The restarted service goes on with its stream (the lead record in the tokens directory):
    # workers keep their caches, and the next clear reaches them in sequence.
    cluster.start_service()
    for name in urls:
        cluster.wait_worker_live(name)
    status, body = clear_and_wait(cluster)
    assert status == 200 and body["epoch"] == epoch
    assert sorted(a["name"] for a in body["acks"]) == ["w1", "w2"]
    for url in urls.values():
        assert read_entry(url)[1]["title"] == "after the restart"
    for proc, _ in cluster.workers.values():
        assert "epoch changed" not in proc.output()


def test_service_restart_without_its_lead_record_makes_every_worker_purge(cluster: Cluster, content_dir: Path):
    first = cluster.start_service()
    urls = {name: cluster.start_worker(name) for name in ("w1", "w2")}
    for url in urls.values():
        read_entry(url)
    assert first.stop() == 0
    (cluster.tokens_dir / LEAD_FILE).unlink()  # as after a reboot, or with another tokens directory
    edit_entry(content_dir, "hello", "after the restart")

    cluster.start_service()
    for name in urls:
        cluster.wait_worker_live(name)
    for url in urls.values():
        assert read_entry(url)[1]["title"] == "after the restart"
        assert http_json(f"{url}/stats")["bus"]["last_purge_cause"] == "epoch"
    status, body = clear_and_wait(cluster)
    assert status == 200
    assert sorted(a["name"] for a in body["acks"]) == ["w1", "w2"]


def test_overflowing_a_stopped_worker_makes_it_purge_on_the_gap(tmp_path: Path, content_dir: Path):
    # Token files on tmpfs: counting 10,000 calls durably on a real disk means
    # 20,000 fsyncs, which is the benchmark's business, not this test's.
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
        cluster = Cluster(tmp_path, Path(shm) / "tokens", content_dir)
        try:
            overflow(cluster, content_dir)
        finally:
            cluster.stop()


def overflow(cluster: Cluster, content_dir: Path) -> None:
    small = {"bus": {"send_hwm": 100, "recv_hwm": 100, "socket_buffer": 16384}}
    service = cluster.start_service(settings=small)
    url = cluster.start_worker("w1", settings=small)
    worker = cluster.workers["w1"][0]
    read_entry(url)
    edit_entry(content_dir, "hello", "after the flood")
    before = {"service": rss_kib(service.pid), "worker": rss_kib(worker.pid)}

    worker.signal(signal.SIGSTOP)
    try:
        cluster.flood(10_000)
        during = rss_kib(service.pid)
    finally:
        worker.signal(signal.SIGCONT)

    assert read_entry(url)[1]["title"] == "after the flood"
    wait_for(lambda: http_json(f"{url}/stats")["bus"]["seq"] == 10_000, what="the worker to catch up")
    assert "missed commands" in worker.output()
    acked = wait_for(lambda: next((w for w in cluster.worker_list()
                                   if w["name"] == "w1" and w["last_acked_seq"] == 10_000), None),
                     what="the record to show the catch-up ack")
    assert acked["last_purge_cause"] == "gap"
    stats = http_json(f"{url}/stats")
    assert stats["bus"]["purges"] < 200, "clears that arrive together are coalesced"
    after = {"service": rss_kib(service.pid), "worker": rss_kib(worker.pid)}
    print(f"RSS KiB before {before}, service during flood {during}, after {after}")
    for side in ("service", "worker"):
        assert after[side] - before[side] < 64 * 1024, (side, before, after)


def test_a_late_joiner_serves_nothing_older_than_its_start(cluster: Cluster, content_dir: Path):
    cluster.start_service()
    assert cluster.clear()[0] == 204
    cache = Cache()
    cache.set("page", "cached before the subscriber started")
    subscriber = ThreadedSubscriber([cache], name="late", **cluster.subscriber_options())
    subscriber.start()
    try:
        assert cache.get("page") is None  # untrusted until synced
        assert subscriber.wait_synced(DEADLINE)
        assert cache.get("page") is None and len(cache) == 0
        cache.set("page", "fresh")
        assert cache.get("page") == "fresh"
    finally:
        subscriber.stop()

    edit_entry(content_dir, "hello", "edited before the worker started")
    url = cluster.start_worker("late-worker")
    assert read_entry(url) [1]["title"] == "edited before the worker started"


#: Prints what a GET of argv[1] answers (run inside the worker host's namespace).
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


@pytest.fixture
def netns_host():
    """A worker host of our own: a network namespace joined to this one by a veth pair."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    n = random.randrange(1, 250)
    ns, host_if, ns_if = f"cbtest{os.getpid()}", f"cbh{os.getpid() % 100000}", f"cbw{os.getpid() % 100000}"
    host_ip, ns_ip = f"10.213.{n}.1", f"10.213.{n}.2"

    def ip(*args: str, inside: bool = False) -> None:
        cmd = ["ip", "netns", "exec", ns, "ip", *args] if inside else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, inside=True)
        ip("link", "set", ns_if, "up", inside=True)
        ip("link", "set", "lo", "up", inside=True)
        yield {"ns": ns, "link": host_if, "host_ip": host_ip, "ns_ip": ns_ip, "ip": ip}
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.netns
def test_cut_and_restore_the_link_to_a_worker_host(tmp_path: Path, content_dir: Path, netns_host):
    cluster = Cluster(tmp_path, tmp_path / "tokens", content_dir, bus_host=netns_host["host_ip"])
    try:
        cluster.start_service()
        url = cluster.start_worker("remote", settings={"worker": {"host": netns_host["ns_ip"]}},
                                   prefix=["ip", "netns", "exec", netns_host["ns"]])
        read_entry(url)
        assert read_entry(url)[0] == "HIT"

        netns_host["ip"]("link", "set", netns_host["link"], "down")
        try:
            edit_entry(content_dir, "hello", "after the partition")
            status, body = clear_and_wait(cluster, timeout=1)
            assert status == 202 and [m["name"] for m in body["missing"]] == ["remote"]
            wait_for(lambda: states(cluster)["remote"] in ("suspect", "lost"), what="the cut-off worker to be suspect")
            # Its lease runs as long as the service's suspicion takes: wait for the worker itself to stop
            # trusting its cache, read from inside its host (which the cut leaves reachable).
            wait_for(lambda: not json.loads(subprocess.run(
                ["ip", "netns", "exec", netns_host["ns"], sys.executable, "-c", _GET, f"{url}/stats"],
                check=True, capture_output=True, text=True, timeout=DEADLINE).stdout)["bus"]["trusted"],
                what="the cut-off worker's lease to lapse")
        finally:
            netns_host["ip"]("link", "set", netns_host["link"], "up")

        wait_for(lambda: states(cluster)["remote"] == "live", what="the worker to come back")
        assert read_entry(url)[1]["title"] == "after the partition"
        stats = http_json(f"{url}/stats")
        assert stats["bus"]["last_purge_cause"] in ("reconnect", "gap")
        assert stats["cache"]["bypass_seconds"] > 0
        status, body = clear_and_wait(cluster)
        assert status == 200 and [a["name"] for a in body["acks"]] == ["remote"]
    finally:
        cluster.stop()


def test_a_lost_worker_is_forgotten_after_forget_after(cluster: Cluster):
    cluster.start_service(settings={"record": {"lost_after": 1.0, "forget_after": 2.0}})
    cluster.start_worker("stays")
    cluster.start_worker("dies")
    cluster.workers["dies"][0].kill()
    wait_for(lambda: states(cluster).get("dies") == "lost", what="the killed worker to be lost")
    wait_for(lambda: "dies" not in states(cluster), what="the lost worker to be forgotten")
    assert states(cluster) == {"stays": "live"}

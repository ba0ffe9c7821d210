"""The bus's modes and keys: CURVE by default with no manual step, HMAC, insecure (issue 12).

Real service and worker processes on loopback; keys live in each test's tmp dir.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from cachebus.bus.protocol import Ack, Bye, Codec, Hello, PurgeCause, WorkerHeartbeat
from cachebus.bus.security import INSECURE_WARNING, KeyFileError, ensure_keypair
from cachebus.service.record import Peer, Record, RecordFull, Refused
from cachebus.testing import DEADLINE, Cluster, wait_for
from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import Subscriber, ThreadedSubscriber

from .support import bus_client, expected_names


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def clear_all(cluster: Cluster) -> tuple[int, dict]:
    status, _, body = cluster.clear(wait="all", timeout="5")
    return status, json.loads(body)


@pytest.mark.processes
def test_curve_is_the_default_and_needs_no_manual_step(cluster: Cluster):
    service = cluster.start_service()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    keys = cluster.keys_dir
    # The service made its keypair, each local worker its own in the allow-list, all private.
    for directory in (keys, keys / "workers"):
        assert mode(directory) == 0o700
    for name in ("service.key", "service.key_secret", "workers/w1.key", "workers/w1.key_secret",
                 "workers/w2.key", "workers/w2.key_secret"):
        assert mode(keys / name) == 0o600, name
    workers = {w["name"]: w for w in cluster.worker_list()}
    assert workers["w1"]["key"] in (keys / "workers" / "w1.key").read_text()
    assert workers["w2"]["key"] in (keys / "workers" / "w2.key").read_text()
    status, body = clear_all(cluster)
    assert status == 200 and expected_names(body) == ["w1", "w2"]
    assert "bus security: curve" in service.output()
    assert "insecure" not in service.output()


@pytest.mark.processes
def test_insecure_mode_warns_at_every_start(tmp_path: Path, content_dir: Path):
    cluster = Cluster(tmp_path, tmp_path / "tokens", content_dir, bus={"insecure": True})
    try:
        first = cluster.start_service()
        cluster.start_worker("w1")
        assert INSECURE_WARNING in first.output()
        assert INSECURE_WARNING in cluster.workers["w1"][0].output()
        assert first.stop() == 0
        second = cluster.start_service()
        cluster.wait_worker_live("w1")
        assert INSECURE_WARNING in second.output()
        status, body = clear_all(cluster)
        assert status == 200 and expected_names(body) == ["w1"]
        assert cluster.worker_list()[0]["key"] is None
        assert not cluster.keys_dir.exists()
    finally:
        cluster.stop()


@pytest.mark.processes
def test_hmac_mode_works_end_to_end(tmp_path: Path, content_dir: Path):
    cluster = Cluster(tmp_path, tmp_path / "tokens", content_dir, bus={"key": "the-shared-secret"})
    try:
        cluster.start_service()
        cluster.start_worker("w1")
        cache = Cache()
        embedded = ThreadedSubscriber([cache], name="embedded", **cluster.subscriber_options())
        embedded.start()
        try:
            assert embedded.wait_synced(DEADLINE)
            cluster.wait_worker_live_named("embedded")
            status, body = clear_all(cluster)
            assert status == 200 and expected_names(body) == ["embedded", "w1"]
        finally:
            embedded.stop()
    finally:
        cluster.stop()


@pytest.mark.processes
def test_processes_without_an_allowed_key_cannot_read_the_clears(cluster: Cluster, zmq_context: zmq.Context):
    cluster.start_service()
    cluster.start_worker("w1")
    readers = {kind: zmq_context.socket(zmq.SUB) for kind in ("no key", "unknown key", "allowed key")}
    bus_client(cluster.keys_dir, "eve", allowed=False).apply(readers["unknown key"])
    bus_client(cluster.keys_dir, "reader").apply(readers["allowed key"])
    for sock in readers.values():
        sock.setsockopt(zmq.SUBSCRIBE, b"clear")
        sock.connect(cluster.publish)

    def allowed_reader_got_a_clear() -> bool:
        assert cluster.clear()[0] == 204
        return bool(readers["allowed key"].poll(100))

    wait_for(allowed_reader_got_a_clear, what="the allowed reader to receive a clear")
    assert not readers["no key"].poll(0)
    assert not readers["unknown key"].poll(0)


@pytest.mark.processes
def test_a_key_added_to_the_allow_list_works_without_a_restart(cluster: Cluster, tmp_path: Path):
    service = cluster.start_service()
    keypair, _ = ensure_keypair(tmp_path / "elsewhere", "late")
    subscriber = ThreadedSubscriber([Cache()], name="late", secret_key_file=keypair.path,
                                    **cluster.subscriber_options())
    subscriber.start()
    try:
        wait_for(lambda: "public key not in the allow-list" in service.output(), what="the service to refuse the key")
        assert not subscriber.wait_synced(0)
        shutil.copy(keypair.public_file, cluster.keys_dir / "workers" / "late.key")
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("late")
        assert {w["name"]: w["key"] for w in cluster.worker_list()}["late"] == keypair.public.decode()
    finally:
        subscriber.stop()


@pytest.mark.processes
def test_hellos_beyond_max_workers_are_refused_with_one_log_line(cluster: Cluster, zmq_context: zmq.Context):
    service = cluster.start_service(settings={"bus": {"max_workers": 2}})
    _, headers, _ = cluster.clear()
    epoch = cluster.clear_record(headers["Cache-Clear-Id"])["epoch"]
    dealer = zmq_context.socket(zmq.DEALER)
    bus_client(cluster.keys_dir, "many").apply(dealer)
    dealer.connect(cluster.acks)
    dealer.rcvtimeo = int(DEADLINE * 1000)
    codec = Codec()
    for i in range(5):
        dealer.send_multipart(codec.encode(Hello(name=f"n{i}", instance=f"i{i}", host="h", pid=i, endpoint="",
                                                 epoch=epoch, seq=1)))
    assert [codec.decode(dealer.recv_multipart()).KIND for _ in range(2)] == [b"welcome", b"welcome"]
    wait_for(lambda: "bus.max_workers" in service.output(), what="the refusal in the log")
    assert sorted(w["name"] for w in cluster.worker_list()) == ["n0", "n1"]
    assert service.output().count("bus.max_workers") == 1


def test_an_embedded_subscriber_says_which_key_is_missing(tmp_path: Path):
    subscriber = ThreadedSubscriber([Cache()], name="app", keys_dir=tmp_path / "keys")
    with pytest.raises(KeyFileError, match=r"no service public key at .*keys/service\.key"):
        subscriber.start()
    with pytest.raises(ValueError, match="exclude each other"):
        Subscriber([Cache()], key="secret", insecure=True)


def cachebus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cachebus.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


@pytest.mark.processes
def test_keys_create_makes_a_private_keypair_and_says_where_each_file_goes(tmp_path: Path):
    result = cachebus("keys", "create", "web-1", "--keys-dir", "keys", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    workers = tmp_path / "keys" / "workers"
    assert mode(workers) == 0o700
    assert mode(workers / "web-1.key_secret") == 0o600 and mode(workers / "web-1.key") == 0o600
    assert "keys/workers/web-1.key" in result.stdout and "keys/service.key" in result.stdout
    before = (workers / "web-1.key_secret").read_bytes()
    again = cachebus("keys", "create", "web-1", "--keys-dir", "keys", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert again.stderr.count("\n") == 1
    assert (workers / "web-1.key_secret").read_bytes() == before


def test_a_full_record_makes_room_only_by_forgetting_a_worker_that_is_gone():
    record = Record(max_workers=2)

    def hello(name: str) -> Hello:
        return Hello(name=name, instance=f"{name}-1", host="h", pid=1, endpoint="", epoch="e", seq=0)

    record.hello(hello("a"))
    record.hello(hello("b"))
    with pytest.raises(RecordFull, match=r"bus\.max_workers \(2\)"):
        record.hello(hello("c"))
    record.bye(Bye(name="a", instance="a-1"))
    record.hello(hello("c"))
    assert [w.name for w in record.workers()] == ["b", "c"]
    # A known worker saying hello again takes no room.
    record.hello(hello("b"))


def test_the_record_binds_a_worker_to_the_key_and_connection_of_its_hello():
    record = Record()
    alice, mallory = Peer(routing_id=b"\x00\x01", key="A" * 40), Peer(routing_id=b"\x00\x02", key="M" * 40)
    record.hello(Hello(name="w1", instance="i1", host="h", pid=1, endpoint="", epoch="e", seq=0), alice)
    ack = Ack(name="w1", instance="i1", epoch="e", seq=1, clear_id="", dropped=0, purge_ms=0.0,
              cause=PurgeCause.CLEAR)
    with pytest.raises(Refused, match="another key"):
        record.acked(ack, mallory)
    with pytest.raises(Refused, match="another key"):
        record.bye(Bye(name="w1", instance="i1"), mallory)
    with pytest.raises(Refused, match="belongs to another key"):
        record.hello(Hello(name="w1", instance="i2", host="h", pid=2, endpoint="", epoch="e", seq=0), mallory)
    # An instance that never said hello has nothing to credit, whoever sends its ack.
    assert record.acked(Ack(name="w1", instance="i2", epoch="e", seq=1, clear_id="", dropped=0, purge_ms=0.0,
                            cause=PurgeCause.CLEAR), alice) == []
    record.acked(ack, alice)
    # A heartbeat from the same key on a new connection (the DEALER reconnected) moves the binding.
    moved = Peer(routing_id=b"\x00\x04", key="A" * 40)
    record.heartbeat(WorkerHeartbeat(name="w1", instance="i1", host="h", pid=1, endpoint="", epoch="e", seq=1,
                                     stats={}), moved)
    record.bye(Bye(name="w1", instance="i1"), moved)
    assert record.workers()[0].state == "left" and record.workers()[0].key == "A" * 40

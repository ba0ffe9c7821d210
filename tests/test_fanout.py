"""End to end: a real service process, real worker processes, real files.

An operator edits an entry, clears, and every worker serves the new value and
shows up in the record of acks.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
import zmq

from cachebus.bus.protocol import VERSION, Codec, Heartbeat
from cachebus.bus.security import ensure_keypair
from cachebus.testing import Cluster, Proc, free_port, http_json, wait_for

from .support import bus_client, edit_entry, expected_names, read_entry

pytestmark = pytest.mark.processes


def test_edit_clear_and_every_worker_serves_the_new_value(cluster: Cluster, content_dir: Path):
    cluster.start_service()
    names = {"w1", "w2", "w3"}
    urls = {name: cluster.start_worker(name) for name in sorted(names)}

    for url in urls.values():
        assert read_entry(url) == ("MISS", {"title": "Hello, cachebus", "body": read_entry(url)[1]["body"]})
        assert read_entry(url)[0] == "HIT"

    edit_entry(content_dir, "hello", "Edited")
    for url in urls.values():
        cache, entry = read_entry(url)
        assert (cache, entry["title"]) == ("HIT", "Hello, cachebus")

    status, headers, body = cluster.clear()
    assert status == 204 and body == b""
    clear_id = headers["Cache-Clear-Id"]
    record = cluster.wait_all_acked(clear_id, names)

    assert set(expected_names(record)) == names
    assert record["complete"] and record["missing"] == []
    for ack in record["acks"]:
        assert ack["entries_dropped"] >= 1
        assert ack["purge_ms"] >= 0
        assert ack["cause"] == "clear"
    for url in urls.values():
        cache, entry = read_entry(url)
        assert (cache, entry["title"]) == ("MISS", "Edited")
        stats = http_json(f"{url}/stats")
        assert stats["cache"]["last_clear_id"] == clear_id

    workers = {w["name"]: w for w in cluster.worker_list()}
    assert set(workers) == names
    for name, worker in workers.items():
        assert worker["last_acked_seq"] == record["seq"]
        assert worker["endpoint"] == urls[name]
        assert worker["pid"] == cluster.workers[name][0].pid
        assert worker["host"] == socket.gethostname()


def test_worker_that_leaves_is_no_longer_expected(cluster: Cluster):
    cluster.start_service()
    cluster.start_worker("stays")
    cluster.start_worker("leaves")
    assert cluster.workers["leaves"][0].stop() == 0
    wait_for(lambda: {w["name"]: w["state"] for w in cluster.worker_list()}.get("leaves") == "left",
             what="the stopped worker to be marked left")
    _, headers, _ = cluster.clear()
    record = cluster.wait_all_acked(headers["Cache-Clear-Id"], {"stays"})
    assert expected_names(record) == ["stays"]


def test_garbage_on_both_bus_sockets_is_dropped_and_the_system_keeps_working(cluster: Cluster):
    service = cluster.start_service()
    url = cluster.start_worker("w1")
    read_entry(url)

    # Raw bytes that are not ZMTP at all.
    for endpoint in (cluster.publish, cluster.acks):
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 8)

    ctx = zmq.Context()
    try:
        # Well-framed ZeroMQ messages that are not cachebus messages, from peers the
        # service lets in (their key is in its allow-list).
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"junk-dealer")
        bus_client(cluster.keys_dir, "junk").apply(dealer)
        dealer.connect(cluster.acks)
        junk = [
            [b"hello"],
            [b"ack", b"99", b"", b"{}"],
            [b"ack", VERSION, b"", b"not json"],
            [b"ack", VERSION, b"", b"[1, 2]"],
            [b"ack", VERSION, b"", b'{"name": 5}'],
            [b"nope", VERSION, b"", b"{}"],
            Codec().encode(Heartbeat(epoch="x", seq=1, ts=0.0, heartbeat_interval=0.5, liveness=3)),
            [b"x" * 100] * 10,
        ]
        for frames in junk:
            dealer.send_multipart(frames)
        # A subscriber side peer that sends rubbish upstream to the PUB socket.
        xsub = ctx.socket(zmq.XSUB)
        bus_client(cluster.keys_dir, "junk").apply(xsub)
        xsub.connect(cluster.publish)
        xsub.send(b"\x07garbage")
        xsub.send(b"")

        wait_for(lambda: "dropped undecodable message" in service.output(), what="the service to log bad frames")
        status, headers, _ = cluster.clear()
        assert status == 204
        record = cluster.wait_all_acked(headers["Cache-Clear-Id"], {"w1"})
        assert record["complete"]
    finally:
        ctx.destroy(linger=0)

    assert service.popen.poll() is None
    # Logged once for that peer, however many bad messages it sent.
    assert service.output().count(f"routing id {b'junk-dealer'.hex()}") == 1
    assert "Traceback" not in service.output()


def test_worker_drops_garbage_from_the_bus_and_still_acks(tmp_path: Path, content_dir: Path):
    """The test plays the service with its own sockets, so it can send garbage to a worker."""

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    router = ctx.socket(zmq.ROUTER)
    # CURVE servers with a service keypair of the test's own (no ZAP handler: any client may connect).
    keys, _ = ensure_keypair(tmp_path / "keys", "service")
    for sock in (pub, router):
        sock.curve_server = True
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    ack_port = router.bind_to_random_port("tcp://127.0.0.1")
    router.rcvtimeo = 200
    codec = Codec()
    worker = Proc.python("cachebus.workers", ["--name", "w", "--http-port", str(free_port()),
                                       "--content-dir", str(content_dir),
                              "--bus-publish", f"tcp://127.0.0.1:{pub_port}",
                              "--bus-acks", f"tcp://127.0.0.1:{ack_port}",
                              "--keys-dir", str(tmp_path / "keys")], tmp_path / "w.log")
    try:
        def received(kind: bytes, before=None):
            def check():
                if before:
                    before()
                try:
                    msg = codec.decode(router.recv_multipart()[1:])
                except zmq.Again:
                    return None
                return msg if msg.KIND == kind else None
            return wait_for(check, what=f"the worker's {kind.decode()}")

        def heartbeat() -> None:
            pub.send_multipart(codec.encode(Heartbeat(epoch="e1", seq=0, ts=time.time(), heartbeat_interval=0.5,
                                                      liveness=3)))
        hello = received(b"hello", before=heartbeat)
        assert hello.name == "w"

        for frames in ([b"clear"], [b"clear", VERSION, b"", b"{"], [b"clear", b"1", b"", b"{}"],
                       [b"clear", VERSION, b"", b'{"epoch": "e1", "seq": "1", "id": "x", "ts": 0}']):
            pub.send_multipart(frames)
        from cachebus.bus.protocol import Clear
        pub.send_multipart(codec.encode(Clear(epoch="e1", seq=1, id="c1", ts=time.time())))
        ack = received(b"ack")
        while ack.clear_id != "c1":
            ack = received(b"ack")
        assert (ack.clear_id, ack.seq, ack.cause) == ("c1", 1, "clear")
        assert worker.popen.poll() is None
        assert worker.output().count("dropped undecodable message") == 1
    finally:
        worker.stop()
        pub.close(0)
        router.close(0)
        ctx.term()


def test_calls_are_exact_under_concurrency_across_two_service_processes(tmp_path: Path, content_dir: Path):
    first = Cluster(tmp_path / "a", tmp_path / "tokens", content_dir)
    (tmp_path / "a").mkdir()
    first.start_service()
    second = Cluster(tmp_path / "b", tmp_path / "tokens", content_dir)
    (tmp_path / "b").mkdir()
    second.token, second.access_token = first.token, first.access_token
    # Instances share a keypair (docs/scale-out.md): the second passes its clears to the first.
    second.keys_dir = first.keys_dir
    second.start_service()
    try:
        results: list[int] = []
        lock = threading.Lock()

        def call(c: Cluster):
            status, _, _ = c.clear()
            with lock:
                results.append(status)

        threads = [threading.Thread(target=call, args=(first if i % 2 else second,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [204] * 50
        data = yaml.safe_load((tmp_path / "tokens" / first.token / "token.yaml").read_text())
        assert data["calls"] == 50
    finally:
        first.stop()
        second.stop()

"""Attacks on the bus, with real processes and sockets on loopback (issue 12).

Whatever a peer sends, no receive loop stops, and no proof lists a worker that did
not purge: with worker w1 frozen by SIGSTOP, hellos, heartbeats and acks forged in
its name (without a key, with a key the service does not know, with another
worker's key, without the HMAC key, or replayed after capture) never make a 200
proof list w1.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from cachebus.bus.peers import PeerLog, Trouble
from cachebus.bus.protocol import VERSION, Ack, Codec, Hello, Message, PurgeCause, WorkerHeartbeat
from cachebus.service.instance import Service
from cachebus.testing import DEADLINE, Cluster, wait_for
from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import ThreadedSubscriber

from .support import bus_client, expected_names

#: Defect 1: one 4 KB message that raised RecursionError out of the decoder and killed the ack loop.
NESTED = [b"ack", VERSION, b"", b"[" * 2000 + b"]" * 2000]


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def clear_all(cluster: Cluster, timeout: float = 5) -> tuple[int, dict[str, Any]]:
    status, _, body = cluster.clear(wait="all", timeout=str(timeout))
    assert status in (200, 202), body
    return status, json.loads(body)


@pytest.mark.processes
def test_a_deeply_nested_message_does_not_silence_the_proof(cluster: Cluster, zmq_context: zmq.Context):
    service = cluster.start_service()
    for name in ("w1", "w2"):
        cluster.start_worker(name)
    # A peer the service lets in (its key is in the allow-list) that sends garbage.
    attacker = zmq_context.socket(zmq.DEALER)
    bus_client(cluster.keys_dir, "attacker").apply(attacker)
    attacker.connect(cluster.acks)
    attacker.send_multipart(NESTED)
    wait_for(lambda: "nests too deep" in service.output(), what="the service to drop the nested message")

    # The ack loop still reads: every worker's heartbeats keep arriving after the attack.
    attacked_at = time.time()
    wait_for(lambda: all(w["last_seen"] > attacked_at for w in cluster.worker_list()),
             what="heartbeats read after the nested message")
    assert {w["name"]: w["state"] for w in cluster.worker_list()} == {"w1": "live", "w2": "live"}
    status, body = clear_all(cluster)
    assert status == 200
    assert expected_names(body) == ["w1", "w2"]
    assert sorted(a["name"] for a in body["acks"]) == ["w1", "w2"]
    assert "Traceback" not in service.output()


@pytest.mark.gen_test
async def test_a_record_method_that_raises_does_not_stop_the_ack_loop(service: Service, monkeypatch):
    """Fault injection: the record's ``acked`` raises once; the next ack is still credited."""
    epoch = service.role.term.epoch
    codec = Codec()
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    bus_client(Path(service.settings.bus.keys_dir), "w").apply(dealer)
    dealer.connect(service.settings.bus.acks)
    try:
        await dealer.send_multipart(codec.encode(Hello(name="w", instance="i", host="h", pid=1, endpoint="",
                                                       epoch=epoch, seq=0)))
        await dealer.recv_multipart()  # welcome
        clear = service.role.publish_clear()
        real_acked = service.record.acked
        calls = []

        def broken(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("injected fault")
            return real_acked(*args, **kwargs)

        monkeypatch.setattr(service.record, "acked", broken)
        ack = Ack(name="w", instance="i", epoch=epoch, seq=clear.seq, clear_id=clear.id, dropped=1, purge_ms=0.1,
                  cause=PurgeCause.CLEAR)
        await dealer.send_multipart(codec.encode(ack))
        await dealer.send_multipart(codec.encode(ack))
        entry = service.record.clear(clear.id)
        assert entry is not None
        assert await service.record.wait(entry, 4)
        assert len(calls) == 2 and [a.worker for a in entry.acks.values()] == ["i"]
        assert service.role.recorder.peers.counts["failed to handle message"] == 1
    finally:
        dealer.close(0)
        ctx.term()



def test_a_flood_from_one_peer_writes_one_line_then_counts(caplog):
    peers = PeerLog(logging.getLogger("cachebus.test"), interval=60.0, budget=3)
    with caplog.at_level(logging.WARNING, "cachebus.test"):
        for _ in range(1000):
            peers.report("10.0.0.1", Trouble.UNDECODABLE, "not JSON")
        peers.report("10.0.0.1", Trouble.REFUSED, "not this worker's key")
        for i in range(100):
            peers.report(f"10.0.1.{i}", Trouble.UNDECODABLE, "not JSON")
    lines = [r.getMessage() for r in caplog.records]
    # One line per peer and kind, and no more than the budget for all peers together.
    assert len(lines) == 3
    assert lines[0].startswith("dropped undecodable message from 10.0.0.1: not JSON")
    assert lines[1].startswith("refused message from 10.0.0.1: not this worker's key")
    assert peers.count == 1101


# --- a frozen worker can never appear in a proof (defect 2) ---------------------------


def worker(cluster: Cluster, name: str) -> dict[str, Any]:
    return next(w for w in cluster.worker_list() if w["name"] == name)


def state(cluster: Cluster, name: str) -> str:
    return str(worker(cluster, name)["state"])


def impersonations(victim: dict[str, Any], seq: int) -> list[Message]:
    """Everything a forger says in the victim's name: hello, heartbeat, and acks for the next clears."""
    identity = {k: victim[k] for k in ("name", "instance", "host", "pid", "endpoint", "epoch")}
    acks: list[Message] = [Ack(name=victim["name"], instance=victim["instance"], epoch=victim["epoch"], seq=n,
                               clear_id="", dropped=1, purge_ms=0.1, cause=PurgeCause.CLEAR)
                           for n in range(seq, seq + 3)]
    return [Hello(**identity, seq=seq - 1), WorkerHeartbeat(**identity, seq=seq - 1, stats={}), *acks]


class Attack(threading.Thread):
    """Runs ``send(next_seq)`` over and over from its own thread (its sockets are its own) until stopped."""

    def __init__(self, setup: Callable[[zmq.Context], Callable[[int], None]]) -> None:
        super().__init__(daemon=True)
        self.setup = setup
        #: The seq of the next clear, which forged acks try to cover.
        self.next_seq = 1
        self.rounds = 0
        self._halt = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        ctx = zmq.Context()
        try:
            send = self.setup(ctx)
            self._ready.set()
            while not self._halt.is_set():
                send(self.next_seq)
                self.rounds += 1
                self._halt.wait(0.02)  # pacing, so the attack does not starve the service of CPU
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()
            ctx.destroy(linger=0)

    def __enter__(self) -> Attack:
        self.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._halt.set()
        self.join()
        assert self.error is None, self.error


def send_all(sockets: list[zmq.Socket], frames: list[list[bytes]]) -> None:
    for sock in sockets:
        for message in frames:
            try:
                sock.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:
                pass  # not connected: the service refused the handshake


def frozen_worker_is_never_in_a_proof(cluster: Cluster, attack: Attack) -> None:
    """Freeze w1, run ``attack``, clear with wait=all until w1 is no longer expected; check every proof."""
    baseline = clear_all(cluster)
    assert baseline[0] == 200 and expected_names(baseline[1]) == ["w1", "w2"], baseline
    seq = baseline[1]["seq"]
    frozen = cluster.workers["w1"][0]
    frozen.signal(signal.SIGSTOP)
    proofs = []
    try:
        attack.next_seq = seq + 1
        with attack:
            wait_for(lambda: attack.rounds >= 5, what="the attack to be under way")
            while True:
                status, body = clear_all(cluster, timeout=1)
                proofs.append((status, body))
                attack.next_seq = body["seq"] + 1
                if status == 200:
                    break
                assert len(proofs) < 20, "w1 stayed expected: the forgery kept it live"
            # The service may have answered the last clear just as w1 fell silent: one more, past that,
            # which expects w2 alone, so it waits for w2's ack as long as any proof does.
            wait_for(lambda: state(cluster, "w1") != "live", what="w1 to fall silent")
            proofs.append(clear_all(cluster))
            assert state(cluster, "w1") != "live", "forged heartbeats kept the frozen worker live"
            assert worker(cluster, "w1")["last_acked_seq"] == seq, "a forged ack was credited to w1"
    finally:
        frozen.signal(signal.SIGCONT)
    for status, body in proofs:
        assert "w1" not in {a["name"] for a in body["acks"]}, body
        if status == 200:
            assert expected_names(body) == ["w2"], body
    assert proofs[-1][0] == 200


@pytest.mark.processes
def test_curve_a_frozen_worker_cannot_be_impersonated(cluster: Cluster, tmp_path: Path):
    """Without a key, with an unknown key, and with an allowed key that is not w1's."""
    service = cluster.start_service()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    victim = worker(cluster, "w1")
    assert victim["key"] and victim["key"] != worker(cluster, "w2")["key"]
    codec = Codec()

    def setup(ctx: zmq.Context) -> Callable[[int], None]:
        no_key, unknown, mallory = (ctx.socket(zmq.DEALER) for _ in range(3))
        bus_client(cluster.keys_dir, "w1", allowed=False).apply(unknown)
        bus_client(cluster.keys_dir, "mallory").apply(mallory)
        sockets = [no_key, unknown, mallory]
        for sock in sockets:
            sock.connect(cluster.acks)
        return lambda seq: send_all(sockets, [codec.encode(m) for m in impersonations(victim, seq)])

    frozen_worker_is_never_in_a_proof(cluster, Attack(setup))
    output = service.output()
    assert "public key not in the allow-list" in output  # the unknown key never got in
    assert "a name reserved for the key in w1.key" in output  # mallory got in, and was refused
    assert "Traceback" not in output


class CapturingProxy(threading.Thread):
    """Relays one worker's back channel to the service, and keeps a copy of every message it sent."""

    def __init__(self, ctx: zmq.Context, service_acks: str) -> None:
        super().__init__(daemon=True)
        self.frontend = ctx.socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{self.frontend.bind_to_random_port('tcp://127.0.0.1')}"
        self.backend = ctx.socket(zmq.DEALER)
        self.backend.connect(service_acks)
        self.captured: list[list[bytes]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        peer = b""
        while not self._halt.is_set():
            for sock, _ in poller.poll(50):
                if sock is self.frontend:
                    peer, *message = self.frontend.recv_multipart()
                    self.captured.append(message)
                    self.backend.send_multipart(message)
                elif peer:
                    self.frontend.send_multipart([peer, *self.backend.recv_multipart()])
        self.frontend.close(0)
        self.backend.close(0)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@pytest.mark.processes
def test_hmac_a_frozen_worker_cannot_be_impersonated_without_the_key_or_by_replay(
        tmp_path: Path, content_dir: Path, zmq_context: zmq.Context):
    cluster = Cluster(tmp_path, tmp_path / "tokens", content_dir, bus={"key": "the-shared-secret"})
    proxy = CapturingProxy(zmq_context, cluster.acks)
    try:
        service = cluster.start_service()
        proxy.start()
        # w1's acks and heartbeats pass through the proxy, as through a network an attacker can read.
        cluster.start_worker("w1", args=("--bus-acks", proxy.endpoint))
        cluster.start_worker("w2")
        victim = worker(cluster, "w1")
        assert victim["key"] is None
        unsigned, wrong_key = Codec(), Codec(b"a-guessed-secret")

        def setup(ctx: zmq.Context) -> Callable[[int], None]:
            # What w1 sent up to its freeze, the baseline proof's ack included.
            captured = list(proxy.captured)
            assert any(message[0] == b"ack" for message in captured)
            replayer, forger = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
            for sock in (replayer, forger):
                sock.connect(cluster.acks)

            def send(seq: int) -> None:
                send_all([replayer], captured)
                send_all([forger], [c.encode(m) for c in (unsigned, wrong_key) for m in impersonations(victim, seq)])
            return send

        frozen_worker_is_never_in_a_proof(cluster, Attack(setup))
        output = service.output()
        assert "bad signature" in output
        assert "replayed message" in output or "outside the 1.5 s window" in output
        assert "Traceback" not in output
    finally:
        cluster.stop()
        proxy.stop()


class FailsOnce(Cache):
    """An application's cache whose next purge fails once armed (its backing store hiccups, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        if self.armed:
            self.armed = False
            raise RuntimeError("the application's purge failed")
        return super().clear(clear_id=clear_id, seq=seq)


@pytest.mark.processes
def test_a_purge_that_raises_does_not_stop_the_subscriber_and_nothing_stale_is_served(cluster: Cluster):
    cluster.start_service()
    cache = FailsOnce()
    subscriber = ThreadedSubscriber([cache], name="app", **cluster.subscriber_options())
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("app")
        cache.set("page", "before the clear")
        cache.armed = True
        assert cluster.clear()[0] == 204
        assert subscriber.subscriber is not None
        peers = subscriber.subscriber.peers
        wait_for(lambda: peers.counts[Trouble.FAILED] == 1, what="the failed purge to be reported")
        # Half a batch may have been applied: the cache is not trusted until a purge succeeds.
        assert cache.get("page") is None
        _, headers, _ = cluster.clear()
        cluster.wait_all_acked(headers["Cache-Clear-Id"], {"app"})
        assert len(cache) == 0 and subscriber.subscriber.trusted
    finally:
        subscriber.stop()

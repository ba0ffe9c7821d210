"""The service's half of a relay (docs/scale-out.md): relayed envelopes over a real CURVE bus.

A test plays the relay with its own sockets, as a relay process would use them:
a SUB for the commands, a DEALER that forwards its workers' own messages in a
``relayed`` envelope and reads the welcomes that come back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from cachebus import Cache, ThreadedSubscriber
from cachebus.bus.peers import PeerLog
from cachebus.bus.protocol import (
    RELAYED_ITEM_FRAMES,
    RELAYED_REPLY,
    Ack,
    Bye,
    Clear,
    Codec,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    PurgeCause,
    Welcome,
)
from cachebus.bus.reader import Reader
from cachebus.bus.security import (
    RELAYS_DIR,
    WORKERS_DIR,
    BusMode,
    ClientSecurity,
    ServiceSecurity,
    ensure_keypair,
    private_dir,
)
from cachebus.bus.uplink import Uplink
from cachebus.testing import DEADLINE, Cluster, Proc, free_ports, http, wait_for

from .support import bus_client, expected_names

CODEC = Codec()


class PlayedRelay:
    """A relay's two upstream sockets, with the relay's keypair (or any other, to attack)."""

    def __init__(self, cluster: Cluster, ctx: zmq.Context, security: ClientSecurity) -> None:
        self.sub = ctx.socket(zmq.SUB)
        self.dealer = ctx.socket(zmq.DEALER)
        for sock in (self.sub, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            security.apply(sock)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(cluster.publish)
        self.dealer.connect(cluster.acks)

    def command(self, kind: type[Message], timeout: float = DEADLINE) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sub.poll(100):
                msg = CODEC.decode(self.sub.recv_multipart())
                if isinstance(msg, kind):
                    return msg
        raise AssertionError(f"no {kind.__name__} from the service")

    def forward(self, *items: tuple[bytes, str, Message]) -> None:
        """Send workers' messages up in one envelope: (routing tag, worker key, message) each."""
        self.dealer.send_multipart(CODEC.encode_relayed(
            "played", [(tag, key.encode(), CODEC.encode(msg)) for tag, key, msg in items]))

    def reply(self, timeout: float = DEADLINE) -> tuple[bytes, Message]:
        assert self.dealer.poll(int(timeout * 1000)), "no reply from the service"
        frames = self.dealer.recv_multipart()
        assert frames[0] == RELAYED_REPLY
        return frames[1], CODEC.decode(frames[2:])


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def relay_security(keys_dir: Path, name: str) -> ClientSecurity:
    """A relay's keypair, in the service's keys_dir/relays/ (as an operator copies its public file there)."""
    keypair, _ = ensure_keypair(private_dir(keys_dir / RELAYS_DIR), name)
    return ClientSecurity.resolve(BusMode.CURVE, name=name, keys_dir=keys_dir, secret_key_file=keypair.path)


def worker_key(keys_dir: Path, name: str, allowed: bool = True) -> str:
    """The z85 public key of a worker behind the relay: in the service's keys_dir/workers/ when ``allowed``."""
    directory = keys_dir / WORKERS_DIR if allowed else keys_dir.parent / "keys-elsewhere"
    keypair, _ = ensure_keypair(private_dir(directory), name)
    return keypair.public.decode()


def hello(name: str, epoch: str, seq: int) -> Hello:
    return Hello(name=name, instance=f"far-host:{os.getpid()}:{name}", host="far-host", pid=os.getpid(),
                 endpoint="", epoch=epoch, seq=seq)


def ack(name: str, epoch: str, seq: int) -> Ack:
    return Ack(name=name, instance=hello(name, epoch, 0).instance, epoch=epoch, seq=seq, clear_id="c",
               cause=PurgeCause.CLEAR, dropped=0, purge_ms=0.1)


def listed(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return next((w for w in cluster.worker_list() if w["name"] == name), None)


@pytest.mark.processes
def test_workers_behind_a_relay_join_and_prove_their_purges_through_it(cluster: Cluster, zmq_context: zmq.Context):
    cluster.start_service()
    relay = PlayedRelay(cluster, zmq_context, relay_security(cluster.keys_dir, "relay-a"))
    beat = relay.command(Heartbeat)
    keys = {name: worker_key(cluster.keys_dir, name) for name in ("far-1", "far-2")}

    # Two hellos in one envelope; each welcome comes back addressed to its worker's tag.
    relay.forward((b"t1", keys["far-1"], hello("far-1", beat.epoch, beat.seq)),
                  (b"t2", keys["far-2"], hello("far-2", beat.epoch, beat.seq)))
    replies = dict(relay.reply() for _ in range(2))
    assert sorted(replies) == [b"t1", b"t2"] and all(isinstance(m, Welcome) for m in replies.values())
    wait_for(lambda: all(listed(cluster, name) for name in keys), what="both relayed workers in the record")
    for name, key in keys.items():
        worker = listed(cluster, name)
        assert worker is not None
        assert (worker["via"], worker["key"], worker["state"]) == ("relay-a", key, "live")

    # A wait=all clear, proven by the acks the relay forwards in one envelope.
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(zip(("status", "body"), _clear(cluster), strict=True)))
    thread.start()
    clear = relay.command(Clear)
    relay.forward(*((tag, keys[name], Ack(name=name, instance=hello(name, "", 0).instance, epoch=clear.epoch,
                                          seq=clear.seq, clear_id=clear.id, dropped=3, purge_ms=0.1,
                                          cause=PurgeCause.CLEAR))
                    for tag, name in ((b"t1", "far-1"), (b"t2", "far-2"))))
    thread.join(DEADLINE)
    assert answer["status"] == 200, answer
    assert sorted(a["name"] for a in answer["body"]["acks"]) == ["far-1", "far-2"]


@pytest.mark.processes
def test_only_a_relay_may_send_an_envelope_and_only_for_workers_the_service_allows(
        cluster: Cluster, zmq_context: zmq.Context):
    service = cluster.start_service()
    # A worker's key, not a relay's: it may connect, but not speak for others.
    impostor = PlayedRelay(cluster, zmq_context, bus_client(cluster.keys_dir, "mallory"))
    beat = impostor.command(Heartbeat)
    victim = worker_key(cluster.keys_dir, "victim")
    impostor.forward((b"t1", victim, hello("victim", beat.epoch, beat.seq)))
    wait_for(lambda: "not a relay's" in service.output(), what="the service to refuse the envelope")
    assert listed(cluster, "victim") is None

    # A real relay: an item whose key the service does not allow is refused alone;
    # its batch mate joins.
    relay = PlayedRelay(cluster, zmq_context, relay_security(cluster.keys_dir, "relay-b"))
    stranger = worker_key(cluster.keys_dir, "stranger", allowed=False)
    relay.forward((b"s", stranger, hello("stranger", beat.epoch, beat.seq)),
                  (b"v", victim, hello("victim", beat.epoch, beat.seq)))
    tag, welcome = relay.reply()
    assert tag == b"v" and isinstance(welcome, Welcome)
    wait_for(lambda: "not in keys_dir/workers/" in service.output(), what="the stranger refused")
    assert listed(cluster, "stranger") is None
    victim_entry = listed(cluster, "victim")
    assert victim_entry is not None and victim_entry["via"] == "relay-b"

    # A torn envelope is dropped whole, and the ack loop goes on.
    relay.dealer.send_multipart(CODEC.encode_relayed("played", [(b"x", victim.encode(), [b"ack"])]))
    wait_for(lambda: "relayed:" in service.output(), what="the torn envelope reported")
    status, body = _clear(cluster)
    # The victim is live but nobody acks for it here: the proof says so, and nothing broke.
    assert status == 202 and expected_names(body) == ["victim"] and "Traceback" not in service.output()


def test_an_envelope_is_checked_before_any_item_is_read():
    good = CODEC.encode(hello("w", "e", 1))
    frames = CODEC.encode_relayed("r", [(b"t", b"", good)])
    header, items = CODEC.decode_relayed(frames)
    assert (header.relay, header.items, items) == ("r", 1, [(b"t", None, good)])
    bad = [
        frames[:-1],  # an item cut short
        CODEC.encode_relayed("r", [(b"", b"", good)]),  # no tag
        CODEC.encode_relayed("r", [(b"t" * 65, b"", good)]),  # a tag too long
        CODEC.encode_relayed("r", [(b"t", b"short", good)]),  # not a z85 key
        CODEC.encode_relayed("r", [(b"t", b"", CODEC.encode(Heartbeat(epoch="e", seq=1, ts=0.0,
                                                                       heartbeat_interval=0.5, liveness=3)))]),
        CODEC.encode_relayed("r", [(b"t", b"", CODEC.encode_relayed("inner", [(b"t", b"", good)])[:4])]),
        [*good, b"t", b"", *good],  # not an envelope
    ]
    for frames in bad:
        with pytest.raises(ProtocolError):
            CODEC.decode_relayed(frames)


def _clear(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    status, _, body = cluster.clear(wait="all", timeout="5")
    return status, json.loads(body)


# --- cachebus relay, the process ------------------------------------------------------


@pytest.mark.processes
def test_workers_connected_to_a_relay_process_are_proven_through_it_and_lapse_when_it_stops(
        cluster: Cluster, tmp_path: Path):
    """The relay end to end: a real service, `cachebus relay`, and embedded subscribers that know
    only the relay (its endpoints and its public key), as the workers of a remote host would."""
    cluster.start_service()
    relay_keys = tmp_path / "relay-keys"
    publish_port, acks_port, http_port = free_ports(3)
    publish, acks = f"tcp://127.0.0.1:{publish_port}", f"tcp://127.0.0.1:{acks_port}"
    relay = Proc.python("cachebus.relay", ["--name", "host-b", "--publish", publish, "--acks", acks,
                                           "--relay-keys-dir", str(relay_keys), "--http-port", str(http_port),
                                           *cluster.bus_args()],
                        tmp_path / "relay.log")
    try:
        wait_for(lambda: (relay_keys / "service.key").exists(), what="the relay's keys", check=lambda: _running(relay))
        # The operator's step for a remote host: each worker's public key is copied to the service.
        for name in ("far-1", "far-2"):
            keypair, _ = ensure_keypair(private_dir(private_dir(relay_keys) / WORKERS_DIR), name)
            shutil.copy(keypair.public_file, cluster.keys_dir / WORKERS_DIR / keypair.public_file.name)
        caches = {name: Cache() for name in ("far-1", "far-2")}
        subscribers = [ThreadedSubscriber([cache], name=name, publish=publish, acks=acks, keys_dir=relay_keys)
                       for name, cache in caches.items()]
        for subscriber in subscribers:
            subscriber.start()
        try:
            for subscriber in subscribers:
                assert subscriber.wait_synced(DEADLINE)
            wait_for(lambda: sorted((w["name"], w["via"], w["state"]) for w in cluster.worker_list())
                     == [("far-1", "host-b", "live"), ("far-2", "host-b", "live")], what="both workers via host-b")
            for cache in caches.values():
                cache.set("page", "old")
            status, body = _clear(cluster)
            assert status == 200, body
            assert sorted(a["name"] for a in body["acks"]) == ["far-1", "far-2"]
            assert all(cache.get("page") is None for cache in caches.values())
            # What went through it, on its /metrics (loopback: no token asked for).
            metrics = _samples(f"http://127.0.0.1:{http_port}/metrics")
            assert metrics["cachebus_relay_workers"] == 2
            assert metrics["cachebus_relay_forwarded_total"] >= 4  # two hellos, two acks, heartbeats
            assert 1 <= metrics["cachebus_relay_envelopes_total"] <= metrics["cachebus_relay_forwarded_total"]
            assert metrics["cachebus_relay_replies_total"] >= 2 and metrics["cachebus_relay_refused_total"] == 0

            # The relay never speaks for its workers: once it stops, they stop trusting their
            # caches within the bound, and the service stops counting them live.
            for cache in caches.values():
                cache.set("page", "cached before the relay stopped")
            assert relay.stop() == 0, relay.output()
            assert "Traceback" not in relay.output()
            wait_for(lambda: all(cache.get("page") is None for cache in caches.values()),
                     what="the workers' leases to lapse")
            wait_for(lambda: all(w["state"] != "live" for w in cluster.worker_list()),
                     what="the service to stop counting them live")
        finally:
            for subscriber in subscribers:
                subscriber.stop()
    finally:
        if relay.alive():
            relay.stop()


def _running(proc: Proc) -> None:
    if not proc.alive():
        raise AssertionError(f"the relay exited: {proc.output()[-2000:]}")


def _samples(url: str) -> dict[str, float]:
    status, _, body = http("GET", url)
    assert status == 200, body
    return {name: float(value) for line in body.decode().splitlines() if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]}


@pytest.mark.processes
def test_a_relay_below_a_relay_carries_its_workers_proof_two_levels_up(cluster: Cluster, tmp_path: Path):
    """Two levels (a relay per rack, one per host below it): the worker's hello is welcomed through
    both, and its ack proves a wait=all clear; the service names the relay it sees."""
    cluster.start_service()
    relays: list[Proc] = []
    ends: dict[str, tuple[str, str, Path]] = {}
    try:
        upstream = cluster.bus_args()
        for name in ("rack", "host"):
            publish_port, acks_port, http_port = free_ports(3)
            keys = tmp_path / f"{name}-keys"
            ends[name] = (f"tcp://127.0.0.1:{publish_port}", f"tcp://127.0.0.1:{acks_port}", keys)
            relay = Proc.python("cachebus.relay", ["--name", name, "--publish", ends[name][0], "--acks", ends[name][1],
                                                   "--relay-keys-dir", str(keys), "--http-port", str(http_port),
                                                   *upstream], tmp_path / f"{name}.log")
            relays.append(relay)
            key_file = keys / "service.key"
            wait_for(key_file.exists, what=f"relay {name}'s keys", check=functools.partial(_running, relay))
            # The next level connects here as to a service, with these keys.
            upstream = ["--bus-publish", ends[name][0], "--bus-acks", ends[name][1], "--keys-dir", str(keys)]
        publish, acks, host_keys = ends["host"]
        keypair, _ = ensure_keypair(private_dir(private_dir(host_keys) / WORKERS_DIR), "deep")
        for keys in (cluster.keys_dir, ends["rack"][2]):  # every level above checks the worker's key
            shutil.copy(keypair.public_file, private_dir(keys / WORKERS_DIR) / keypair.public_file.name)
        cache = Cache()
        subscriber = ThreadedSubscriber([cache], name="deep", publish=publish, acks=acks, keys_dir=host_keys)
        subscriber.start()
        try:
            assert subscriber.wait_synced(DEADLINE)
            wait_for(lambda: [(w["name"], w["via"], w["state"]) for w in cluster.worker_list()]
                     == [("deep", "rack", "live")], what="the worker two levels down")
            cache.set("page", "old")
            status, body = _clear(cluster)
            assert status == 200, body
            assert [a["name"] for a in body["acks"]] == ["deep"] and cache.get("page") is None
        finally:
            subscriber.stop()
        for relay in relays:
            assert "Traceback" not in relay.output()
    finally:
        for relay in reversed(relays):
            if relay.alive():
                relay.stop()


# --- one envelope per clear ----------------------------------------------------------


def test_a_relay_sends_each_clears_acks_from_all_its_workers_in_one_envelope():
    """Acks are held until every worker of the relay acked (relay.hold_ms at most); a worker that
    let a round run out is not waited for again until it acks, so a dead one costs one round."""

    async def run() -> list[list[bytes]]:
        ctx = zmq.Context()
        sockets = []

        def sock(kind: int, endpoint: str, bind: bool = False) -> zmq.Socket:
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            (s.bind if bind else s.connect)(endpoint)
            sockets.append(s)
            return s

        router, next_hop = sock(zmq.ROUTER, "inproc://workers", True), sock(zmq.ROUTER, "inproc://up", True)
        dealer = sock(zmq.DEALER, "inproc://up")
        workers = {name: sock(zmq.DEALER, "inproc://workers") for name in ("w1", "w2", "w3")}
        security = ServiceSecurity(BusMode.INSECURE, Path("unused"), PeerLog(logging.getLogger("test")))
        uplink = Uplink("host-b", CODEC, router, security, 1.0, logging.getLogger("test"), hold_ms=300)
        reader = Reader(router, uplink.on_workers, 100)
        reader.start()
        uplink.start(dealer, kick_router=reader.kick)
        received: list[list[bytes]] = []

        async def envelopes(count: int) -> None:
            deadline = time.monotonic() + DEADLINE
            while len(received) < count and time.monotonic() < deadline:
                while next_hop.poll(0):
                    received.append(next_hop.recv_multipart()[1:])
                await asyncio.sleep(0.01)

        def send(name: str, msg: Message) -> None:
            workers[name].send_multipart(CODEC.encode(msg))

        try:
            for name in workers:
                send(name, hello(name, "e", 0))
            await envelopes(1)  # hellos go up at once (in one envelope or more)
            hellos = len(received)
            for round_, quiet in ((1, False), (2, True)):
                senders = ("w1", "w2") if quiet else ("w1", "w2", "w3")
                for name in senders:
                    send(name, ack(name, "e", round_))
                await envelopes(hellos + round_)
            # w3 missed round 2: it went when hold_ms ran out.
            assert uplink.full_rounds == 1
            # Round 3 waits only for w1 and w2: it goes up full, when their acks are in, not on the timer.
            for name in ("w1", "w2"):
                send(name, ack(name, "e", 3))
            await envelopes(hellos + 3)
            assert uplink.full_rounds == 2, "round 3 waited for the quiet worker"  # rounds 1 and 3
            return received[hellos:]
        finally:
            reader.close()
            uplink.close()
            for s in sockets:
                s.close()
            ctx.term()

    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave later tests without a current loop
    try:
        rounds = loop.run_until_complete(run())
    finally:
        loop.close()
    kinds = [[frame for i, frame in enumerate(envelope[4:]) if i % RELAYED_ITEM_FRAMES == 2] for envelope in rounds]
    assert kinds == [[b"ack"] * 3, [b"ack"] * 2, [b"ack"] * 2]


@pytest.mark.gen_test
async def test_a_relay_keeps_each_workers_order_a_held_ack_goes_up_before_the_bye_after_it(tmp_path: Path):
    """A relay holds a worker's ack until its other workers acked (relay.hold_ms); the worker's
    next message must not overtake it, or the service would hear the bye before the ack.
    The service's record relies on this order (each worker has one path, bus.upstream)."""
    ctx = zmq.Context()
    try:
        down_router, up_router = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        down = f"tcp://127.0.0.1:{down_router.bind_to_random_port('tcp://127.0.0.1')}"
        up = f"tcp://127.0.0.1:{up_router.bind_to_random_port('tcp://127.0.0.1')}"
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(up)
        security = ServiceSecurity(BusMode.INSECURE, tmp_path, PeerLog(logging.getLogger("test")))
        uplink = Uplink("r", CODEC, down_router, security, 0.0, logging.getLogger("test"), hold_ms=600_000)
        reader = Reader(down_router, uplink.on_workers, 100)
        uplink.start(dealer, kick_router=reader.kick)
        reader.start()
        workers = {name: ctx.socket(zmq.DEALER) for name in ("x", "y")}
        for sock in workers.values():
            sock.connect(down)
        for name, sock in workers.items():
            sock.send_multipart(CODEC.encode(hello(name, "e", 0)))
        kinds: dict[str, list[bytes]] = {"x": [], "y": []}

        async def received(condition: Any) -> None:
            deadline = time.monotonic() + DEADLINE
            while not condition():
                assert time.monotonic() < deadline, f"the relay sent up only {kinds}"
                while up_router.poll(0):
                    _, items = CODEC.decode_relayed(up_router.recv_multipart()[1:])
                    for _, _, message in items:
                        msg = CODEC.decode(message)
                        assert isinstance(msg, (Hello, Ack, Bye))
                        kinds[msg.name].append(message[0])
                await asyncio.sleep(0.01)

        await received(lambda: kinds == {"x": [b"hello"], "y": [b"hello"]})
        workers["x"].send_multipart(CODEC.encode(ack("x", "e", 1)))  # held: y has not acked
        workers["x"].send_multipart(CODEC.encode(Bye(name="x", instance=hello("x", "e", 0).instance)))
        await received(lambda: kinds["x"] == [b"hello", b"ack", b"bye"])
        uplink.close()
        reader.close()
    finally:
        ctx.destroy(linger=0)

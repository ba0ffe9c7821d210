"""Attacks on the bus, with real processes and sockets on loopback (issue 12).

Whatever a peer sends, no receive loop stops, and no proof lists a worker that did
not purge.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from cachebus.bus.peers import PeerLog, Trouble
from cachebus.bus.protocol import VERSION, Ack, Codec, Hello, PurgeCause
from cachebus.service.app import Service
from cachebus.testing import Cluster, wait_for

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


def test_a_deeply_nested_message_does_not_silence_the_proof(cluster: Cluster, zmq_context: zmq.Context):
    service = cluster.start_service()
    for name in ("w1", "w2"):
        cluster.start_worker(name)
    attacker = zmq_context.socket(zmq.DEALER)
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
    assert sorted(body["workers"]) == ["w1", "w2"]
    assert sorted(a["worker"] for a in body["acks"]) == ["w1", "w2"]
    assert "Traceback" not in service.output()


@pytest.mark.gen_test
async def test_a_record_method_that_raises_does_not_stop_the_ack_loop(service: Service, monkeypatch):
    """Fault injection: the record's ``acked`` raises once; the next ack is still credited."""
    epoch = service.publisher.epoch
    codec = Codec()
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(service.settings.bus.acks)
    try:
        await dealer.send_multipart(codec.encode(Hello(name="w", instance="i", host="h", pid=1, endpoint="",
                                                       epoch=epoch, seq=0)))
        await dealer.recv_multipart()  # welcome
        clear = await service.publisher.publish_clear()
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
        assert len(calls) == 2 and [a.worker for a in entry.acks.values()] == ["w"]
        assert service.acks.peers.counts["failed to handle message"] == 1
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

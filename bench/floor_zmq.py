"""The ZeroMQ floor: PUB -> N SUB processes -> DEALER ack round trip, nothing else.

``python -m bench.floor_zmq sub PUB ACKS`` is one subscriber process; the
benchmark runner drives the publisher side with :func:`round_trips`.
"""

from __future__ import annotations

import sys
import time

import zmq


def subscriber(publish: str, acks: str) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publish)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(acks)
    while True:
        msg = sub.recv()
        dealer.send(msg)


def round_trips(publish: str, acks: str, workers: int, count: int, deadline: float = 120) -> list[float]:
    """Publish ``count`` messages one at a time; time each until all ``workers`` acked."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(publish)
    router = ctx.socket(zmq.ROUTER)
    router.bind(acks)
    try:
        # Wait until every subscriber hears us (the slow-joiner window).
        peers: set[bytes] = set()
        end = time.monotonic() + deadline
        router.rcvtimeo = 100
        while len(peers) < workers:
            if time.monotonic() > end:
                raise RuntimeError(f"only {len(peers)} of {workers} ZeroMQ floor subscribers joined")
            pub.send(b"join")
            try:
                while True:
                    peer, _ = router.recv_multipart()
                    peers.add(peer)
            except zmq.Again:
                pass
        router.rcvtimeo = -1
        while router.poll(200):
            router.recv_multipart()
        samples = []
        for i in range(count):
            tag = b"%d" % i
            started = time.perf_counter()
            pub.send(tag)
            seen = 0
            while seen < workers:
                _, body = router.recv_multipart()
                seen += body == tag
            samples.append((time.perf_counter() - started) * 1000)
        return samples
    finally:
        pub.close(0)
        router.close(0)


if __name__ == "__main__":
    subscriber(sys.argv[2], sys.argv[3])

"""A service the test plays with its own sockets, and a store whose backend can be down.

Shared by the tests that must see every message a subscriber sends
(tests/test_subscriber.py, tests/test_scoped_clears.py); the ``played``
fixture is in tests/conftest.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import zmq

from cachebus.bus.protocol import Clear, Codec, Heartbeat, Hello, Message, Welcome, WorkerHeartbeat
from cachebus.testing import wait_for

M = TypeVar("M", bound=Message)


class PlayedService:
    """The test plays the service: a PUB and a ROUTER of its own (no security), which welcome
    hellos and keep every message a worker sends in :attr:`received`."""

    def __init__(self, heartbeat_interval: float = 0.5, liveness: int = 3) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.publish = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.acks = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.router.rcvtimeo = 50
        self.codec = Codec()
        self.terms = {"heartbeat_interval": heartbeat_interval, "liveness": liveness}
        self.epoch, self.seq = "e1", 0
        self.received: list[Message] = []

    def options(self) -> dict[str, Any]:
        return {"publish": self.publish, "acks": self.acks, "insecure": True}

    def heartbeat(self) -> None:
        self.pub.send_multipart(self.codec.encode(Heartbeat(epoch=self.epoch, seq=self.seq, ts=time.time(),
                                                            **self.terms)))

    def clear(self, clear_id: str) -> None:
        self.seq += 1
        self.pub.send_multipart(self.codec.encode(Clear(epoch=self.epoch, seq=self.seq, id=clear_id, ts=time.time())))

    def poll(self) -> Message | None:
        """A heartbeat out (the worker keeps hearing us), then one message in, if any came."""
        self.heartbeat()
        try:
            frames = self.router.recv_multipart()
        except zmq.Again:
            return None
        msg = self.codec.decode(frames[1:])
        if isinstance(msg, (Hello, WorkerHeartbeat)):  # answered alike, as the service does
            self.router.send_multipart([frames[0], *self.codec.encode(
                Welcome(epoch=self.epoch, seq=self.seq, **self.terms))])
        self.received.append(msg)
        return msg

    def next(self, kind: type[M], match: Callable[[M], bool] = lambda m: True) -> M:
        """The next message of ``kind`` that ``match`` accepts."""
        def found() -> M | None:
            msg = self.poll()
            return msg if isinstance(msg, kind) and match(msg) else None
        return wait_for(found, what=f"a {kind.__name__}")

    def pump_until(self, condition: Callable[[], bool], what: str) -> None:
        """Keep the worker hearing us (and collect what it sends) until ``condition`` holds."""
        wait_for(lambda: self.poll() is None and condition(), what=what)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


class Flaky:
    """A store whose backend can be down: then clear() raises, with credentials in its message."""

    def __init__(self, error: type[Exception] = ConnectionError) -> None:
        self.data: dict[str, int] = {}
        self.error = error
        self.down = False

    def __len__(self) -> int:
        return len(self.data)

    def clear(self) -> None:
        if self.down:
            raise self.error("cannot reach redis://app:s3cret@cache:6379/0 (password=hunter2)")
        self.data.clear()

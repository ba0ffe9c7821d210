"""One back-channel path at a time: which service instance (or relay) a DEALER talks to.

A worker or relay lists every service instance's ``bus.acks`` endpoint
(docs/scale-out.md), but its DEALER connects to **one** of them at a time. A
DEALER connected to several round-robins its messages over them, so one
worker's hello, heartbeats, acks and bye would reach the leader by different
paths (directly, or through a follower) and overtake each other. Talking to
one instance, the worker's messages arrive in the order it sent them: the
ordering is a property of the transport, and the record needs no code for
messages overtaking each other.

The instance answers every hello and every worker heartbeat with a welcome
(through a follower, the leader's welcome comes back the same way). When a
hello or heartbeat has gone unanswered for a lease, the instance is *silent*
(dead, cut off, or a follower that cannot reach the leader), and the DEALER
moves to the next endpoint in the list, in order, wrapping around, and says
hello there. With one endpoint, moving reconnects to it: a fresh handshake,
which also picks up a key added to the service's allow-list since.

:class:`Upstream` is the plain core (no sockets, an injected clock), tested
as an object; :func:`attach` and :func:`move` are the thin socket side.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .reader import Batch, Reader
from .sockets import Sockets


class Upstream:
    """Which of ``endpoints`` is in use, and whether it has fallen silent.

    ``lease`` is how long a message that expects an answer may go unanswered
    (a callable, since a worker follows the service's lease terms once it
    hears them).
    """

    def __init__(self, endpoints: Sequence[str], lease: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not endpoints:
            raise ValueError("no endpoint to talk to")
        self.endpoints = tuple(endpoints)
        self._lease = lease
        self._clock = clock
        self._index = 0
        #: clock() of the oldest message still waiting for an answer; None when all were answered.
        self.waiting_since: float | None = None
        #: How many times the path moved (or reconnected, with one endpoint) because it fell silent.
        self.moves = 0

    @property
    def current(self) -> str:
        """The endpoint the DEALER is connected to."""
        return self.endpoints[self._index]

    def expect_answer(self) -> None:
        """A hello or heartbeat went out: the path is silent if nothing answers within a lease."""
        if self.waiting_since is None:
            self.waiting_since = self._clock()

    def answered(self) -> None:
        """A welcome came back: the path works, end to end."""
        self.waiting_since = None

    def silent_for(self) -> float:
        """Seconds the oldest unanswered message has waited (0 when none waits)."""
        return 0.0 if self.waiting_since is None else self._clock() - self.waiting_since

    @property
    def silent(self) -> bool:
        """Whether a message has waited a lease for its answer."""
        return self.waiting_since is not None and self.silent_for() >= self._lease()

    def next(self) -> tuple[str, str]:
        """Move to the next endpoint (the same one, if it is the only one): ``(left, now)``.

        The wait starts again: the hello said at the new endpoint is the next
        message expecting an answer.
        """
        left = self.current
        self._index = (self._index + 1) % len(self.endpoints)
        self.waiting_since = None
        self.moves += 1
        return left, self.current


def attach(sock: zmq.Socket[Any], upstream: Upstream) -> None:
    """Connect ``sock`` to the upstream's current endpoint (and to it alone)."""
    sock.connect(upstream.current)


def move(sock: zmq.Socket[Any], upstream: Upstream) -> tuple[str, str]:
    """Move ``sock`` to the next endpoint: disconnect the silent one, connect the next.

    Messages still queued for the silent endpoint are dropped with its pipe,
    so nothing sent before the move can arrive after what is sent after it.
    Returns ``(left, now)``.
    """
    left, now = upstream.next()
    try:
        sock.disconnect(left)
    except zmq.ZMQError:
        pass  # the session already ended (a refused handshake)
    sock.connect(now)
    return left, now


_monitors = itertools.count()


def watch_disconnects(sockets: Sockets, sock: zmq.Socket[Any], disconnected: Callable[[str], None]) -> Reader:
    """Call ``disconnected(endpoint)`` when ``sock`` loses a connection (libzmq's monitor).

    A peer that died resets the connection at once, and one that froze or was
    cut off is dropped by the ZMTP heartbeat within three intervals: either
    way the path is known lost without waiting for a message to go
    unanswered. The monitor's socket is one of ``sockets``; returns its (not
    yet started) reader, which the caller closes.
    """
    address = f"inproc://cachebus-monitor-{next(_monitors)}"
    sock.monitor(address, zmq.EVENT_DISCONNECTED)
    events = sockets.open(zmq.PAIR, None, connect=[address])

    def handle(batch: Batch) -> None:
        for frames in batch:
            if len(frames) == 2 and len(frames[0].bytes) == 6:
                event, _ = struct.unpack("=hi", frames[0].bytes)
                if event == zmq.EVENT_DISCONNECTED:
                    disconnected(frames[1].bytes.decode(errors="replace"))

    return Reader(events, handle, 100)

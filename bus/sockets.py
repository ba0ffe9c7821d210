"""Every bus socket is made one way: created, limited, secured, bound or connected, and closed with its owner.

:class:`Sockets` is that one way, used by the service's publisher and ack
socket, a follower's uplink, the relay and the subscriber; :func:`configure`
holds the limits both ends of the bus apply, so they are set in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import zmq

from .protocol import MAX_MESSAGE_SIZE


def configure(sock: zmq.Socket[Any], *, send_hwm: int | None = None, recv_hwm: int | None = None,
              buffer: int = 0, heartbeat: float | None = None) -> None:
    """Bound what ``sock`` may queue and let it notice a dead peer.

    ``send_hwm``/``recv_hwm`` cap queued messages per peer; ``buffer`` sets the
    kernel send and receive buffers in bytes (0 keeps the OS default), which
    also hold queued messages. ``heartbeat`` (seconds) turns on ZMTP
    heartbeats: a connection silent for three intervals is dropped and
    re-established, instead of waiting for TCP to give up.
    """
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_SIZE)
    if send_hwm is not None:
        sock.setsockopt(zmq.SNDHWM, send_hwm)
    if recv_hwm is not None:
        sock.setsockopt(zmq.RCVHWM, recv_hwm)
    if buffer:
        sock.setsockopt(zmq.SNDBUF, buffer)
        sock.setsockopt(zmq.RCVBUF, buffer)
    if heartbeat:
        ms = max(1, int(heartbeat * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 10 * ms)


class Secures(Protocol):
    """Either side's security (:mod:`cachebus.bus.security`): what a socket needs before it is used."""

    def apply(self, sock: zmq.Socket[Any]) -> None: ...


class Sockets:
    """The sockets one part of the program opens, on one context, closed together by :meth:`close`.

    Plain sockets, whatever the context: they are read from the loop's reader
    callbacks (:mod:`cachebus.bus.reader`), and zmq.asyncio's future per
    message was a large share of the CPU per clear.
    """

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self._open: list[zmq.SyncSocket] = []

    def open(self, kind: int, security: Secures | None, *, bind: str | None = None, connect: Sequence[str] = (),
             send_hwm: int | None = None, recv_hwm: int | None = None, buffer: int = 0,
             heartbeat: float | None = None) -> zmq.SyncSocket:
        """A socket of ``kind``, limited by :func:`configure`, secured by ``security`` (None: as it is),
        then bound to ``bind`` or connected to each of ``connect``."""
        sock: zmq.SyncSocket = zmq.Socket(self.ctx, kind)
        self._open.append(sock)
        configure(sock, send_hwm=send_hwm, recv_hwm=recv_hwm, buffer=buffer, heartbeat=heartbeat)
        if security is not None:
            security.apply(sock)
        if bind is not None:
            sock.bind(bind)
        for endpoint in connect:
            sock.connect(endpoint)
        return sock

    def close(self) -> None:
        """Close every socket opened here (newest first), dropping what they still queue."""
        while self._open:
            sock = self._open.pop()
            if not sock.closed:
                sock.close(linger=0)

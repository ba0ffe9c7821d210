"""Socket options both ends of the bus apply, so limits are set in one place."""

from __future__ import annotations

import zmq

from .protocol import MAX_MESSAGE_SIZE


def configure(sock: zmq.Socket, *, send_hwm: int | None = None, recv_hwm: int | None = None,
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


def plain(sock: zmq.Socket) -> zmq.Socket:
    """A plain (blocking-API) shadow of an asyncio socket, for non-blocking calls.

    The asyncio machinery costs more than a small message itself. Use the
    shadow only where no readiness edge can be lost: for receiving (asyncio
    receives try the socket before waiting) and for sending on a socket that
    is never awaited for reading (PUB).
    """
    return zmq.Socket.shadow(sock.underlying)


def drain(sock: zmq.Socket, limit: int) -> list[list[zmq.Frame]]:
    """Up to ``limit`` messages already waiting on the plain socket ``sock``, without blocking."""
    batch = []
    for _ in range(limit):
        try:
            batch.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return batch

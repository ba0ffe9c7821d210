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

"""Socket options both ends of the bus apply, so limits are set in one place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

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


def drain(sock: zmq.Socket, limit: int) -> list[list[zmq.Frame]]:
    """Up to ``limit`` messages already waiting on the plain socket ``sock``, without blocking.

    Asks ZMQ_EVENTS before each receive rather than ending on ``zmq.Again``: an
    exception per batch costs more than the question, and most batches are one
    message long.
    """
    batch: list[list[zmq.Frame]] = []
    while len(batch) < limit and readable(sock):
        try:
            batch.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:  # pragma: no cover - EVENTS said a message was there
            break
    return batch


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock`` (reading ZMQ_EVENTS also re-arms its FD's edge).

    ZMQ_EVENTS is an int option; pyzmq types every option ``int | bytes``.
    """
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


async def batches(sock: zmq.Socket, limit: int) -> AsyncIterator[list[list[zmq.Frame]]]:
    """The messages arriving on the plain socket ``sock``, in batches of at most ``limit``.

    The event loop watches the socket's FD itself: zmq.asyncio's future per
    receive, and its extra pass through the loop, were a quarter of the
    service's CPU with 16 workers acking (py-spy, issue 14). ZeroMQ's FD is
    edge-triggered, and a send on the same socket can take the edge, so
    readiness is checked with ZMQ_EVENTS before every wait. After a full batch
    the loop gets a turn before the next one.
    """
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    fd = sock.FD
    loop.add_reader(fd, wake.set)
    try:
        while True:
            batch = drain(sock, limit)
            if batch:
                yield batch
                if len(batch) == limit:
                    await asyncio.sleep(0)
                continue
            wake.clear()
            if not readable(sock):
                await wake.wait()
    finally:
        loop.remove_reader(fd)

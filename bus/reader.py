"""Reading plain ZeroMQ sockets from the event loop: one pattern for every receiving socket.

Both ends of the bus use plain (not ``zmq.asyncio``) sockets whose FD the
event loop watches: zmq.asyncio's future per receive and its extra pass
through the loop were a quarter of the service's CPU with 16 workers acking
and most of a worker's per-clear overhead (py-spy, issue 14). A
:class:`Reader` calls its handler straight from the loop's reader callback
with every message already waiting, so one clear costs a worker one trip
through the loop.

ZeroMQ's FD is edge-triggered and a send on the same socket can take the
edge, so readiness is asked with ZMQ_EVENTS until a batch ends and after every
send (:meth:`Reader.kick`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

import zmq

from cachebus.eager import run_eagerly

log = logging.getLogger("cachebus.bus")

#: Plain ints: pyzmq's constants are enums, and every ``&`` or ``|`` on them
#: went through enum.__call__ (about 20 calls and 25 µs per clear, cProfile).
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | NOBLOCK

Batch = list[list[zmq.Frame]]
#: A handler returns None when it is done, or a coroutine to finish (run eagerly: :func:`cachebus.eager.run_eagerly`).
Handler = Callable[[Batch], Coroutine[Any, Any, None] | None]


def readable(sock: zmq.SyncSocket) -> bool:
    """Whether a message waits on ``sock`` (reading ZMQ_EVENTS also re-arms its FD's edge).

    ZMQ_EVENTS is an int option; pyzmq types every option ``int | bytes``.
    """
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)


def drain(sock: zmq.SyncSocket, limit: int) -> Batch:
    """Up to ``limit`` messages already waiting on the plain socket ``sock``, without blocking.

    Asks ZMQ_EVENTS before each receive rather than ending on ``zmq.Again``: an
    exception per batch costs more than the question, and most batches are one
    message long.
    """
    batch: Batch = []
    while len(batch) < limit and readable(sock):
        try:
            batch.append(recv_now(sock))
        except zmq.Again:  # pragma: no cover - EVENTS said a message was there
            break
    return batch


def recv_now(sock: zmq.SyncSocket) -> list[zmq.Frame]:
    """The frames of one waiting message; :class:`zmq.Again` when none waits.

    Each frame says whether more follow (``Frame.more``): ``recv_multipart``
    asked ZMQ_RCVMORE with a getsockopt and an enum per frame, five per ack.
    The rest of a message is there once its first frame is (ZeroMQ delivers
    messages whole), so only the first receive can fail.
    """
    frame = sock.recv(NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def send_now(sock: zmq.SyncSocket, frames: list[bytes]) -> None:
    """Send one message of ``frames`` without blocking; :class:`zmq.Again` when it cannot be queued.

    Frame by frame with int flags: ``send_multipart`` combined pyzmq's enum
    flags for every frame, which took half of its 14 µs per ack (issue 14).
    A multipart message is atomic in ZeroMQ: if the first frame is queued, the
    rest are too.
    """
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        sock.send(frame, NOBLOCK if index == last else _MORE)


class Reader:
    """Hands every batch of messages waiting on a plain socket to ``handle``, from the loop's reader callback.

    While a handler's coroutine is unfinished (an async target's purge), no
    further batch is read: messages are handled one batch after another, in
    the order they came.
    """

    def __init__(self, sock: zmq.SyncSocket, handle: Handler, limit: int) -> None:
        self.sock = sock
        self.handle = handle
        self.limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = 0
        #: The unfinished rest of a handler's coroutine, while there is one.
        self.pending: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Watch the socket from the running loop (also handling anything that arrived before)."""
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.FD
        self._loop.add_reader(self._fd, self.on_readable)
        self._loop.call_soon(self.on_readable)

    def close(self) -> asyncio.Future[None] | None:
        """Stop watching; cancel an unfinished handler and return it to be awaited, if any."""
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        return pending

    def kick(self) -> None:
        """Call after every send on this socket: the send may have taken the edge of a message that arrived.

        Draining until ZMQ_EVENTS says nothing waits re-arms the edge, so
        without a send nothing more is asked: each question is a poll(2) in
        libzmq.
        """
        if self._loop is not None and readable(self.sock):
            self._loop.call_soon(self.on_readable)

    def send(self, frames: list[bytes]) -> None:
        """Send on the socket without blocking (raises ``zmq.Again``), then :meth:`kick`: so no
        caller has to remember that a send may take the edge of a message that arrived."""
        send_now(self.sock, frames)
        self.kick()

    def on_readable(self) -> None:
        """Handle one batch; the loop gets a turn before the next, if more is waiting."""
        if self.pending is not None or self._loop is None:
            return
        batch = drain(self.sock, self.limit)
        if not batch:
            return
        coro = self.handle(batch)
        if coro is not None:
            self.pending = run_eagerly(coro)
            if self.pending is not None:
                self.pending.add_done_callback(self._finished)
                return
        if len(batch) == self.limit:
            self._loop.call_soon(self.on_readable)

    def _finished(self, pending: asyncio.Future[None]) -> None:
        if pending is not self.pending:
            return  # closed meanwhile
        self.pending = None
        if not pending.cancelled() and pending.exception() is not None:
            log.error("a bus message handler failed", exc_info=pending.exception())
        if self._loop is not None:
            self._loop.call_soon(self.on_readable)

"""The service's PUB socket: clear commands and heartbeats to every worker.

Each service start picks a fresh random ``epoch``; ``seq`` counts commands
within it. Among several instances only the one holding the lead speaks
(:mod:`cachebus.service.lead`); one that takes over on the same host continues
its predecessor's epoch and seq (:meth:`Publisher.continue_from`). Heartbeats
repeat the last ``seq`` so a worker that lost a command can tell, and a new
epoch tells it the service restarted. PUB never blocks:
a subscriber that falls more than ``send_hwm`` messages behind loses messages
and detects the gap instead of slowing everyone else down.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Callable

import zmq
import zmq.asyncio

from cachebus.bus.protocol import Clear, Codec, Heartbeat, Message, Welcome, now
from cachebus.bus.reader import send_now
from cachebus.bus.scope import EVERYTHING, Scope
from cachebus.bus.security import ServiceSecurity
from cachebus.bus.sockets import configure

log = logging.getLogger("cachebus.publisher")


class NotLeading(Exception):
    """This instance does not hold the lead (any more): it may not publish."""


class Publisher:
    """Owns the PUB socket, the epoch and the sequence counter."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, codec: Codec,
                 heartbeat_interval: float, send_hwm: int, buffer: int = 0,
                 security: ServiceSecurity | None = None, liveness: int = 3) -> None:
        self.endpoint = endpoint
        self.codec = codec
        #: The lease terms every heartbeat and welcome carries; workers follow them.
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.epoch = secrets.token_hex(8)
        self.seq = 0
        #: Called with each clear and the token that asked for it just before the
        #: clear is sent, so the record exists before any ack for it can arrive.
        self.on_publish: list[Callable[[Clear, str], None]] = []
        #: Whether this instance holds the lead and may send (docs/scale-out.md); a follower is silent.
        self.speaking = True
        #: Called with (epoch, seq) before anything is sent, to keep the lead's record ahead of the
        #: stream; an ``OSError`` from it (the lead is lost) silences the publisher.
        self.position: Callable[[str, int], None] | None = None
        # A plain socket: it only sends, never waits, so zmq.asyncio would add nothing but cost.
        self._socket = zmq.Socket(ctx, zmq.PUB)
        # No ZMTP heartbeat here: libzmq aborts a subscriber whose full queue meets
        # a heartbeat timeout (zeromq/libzmq#4767); our own heartbeats do the job.
        configure(self._socket, send_hwm=send_hwm, buffer=buffer)
        if security is not None:
            # CURVE: only workers in the allow-list can subscribe and read the clears.
            security.apply(self._socket)

    def bind(self) -> None:
        self._socket.bind(self.endpoint)
        log.info("publishing on %s (epoch %s)", self.endpoint, self.epoch)

    async def publish_clear(self, token: str = "", scope: Scope = EVERYTHING, group: tuple[str, ...] = ()) -> Clear:
        """Publish one clear, asked for by ``token``, and return it: of ``scope`` (by default
        everything), in the processes of ``group`` (by default all). Every worker gets the
        next ``seq`` all the same (docs/scoped-clears.md).

        Raises :class:`NotLeading` if this instance may not publish.
        """
        if not self.speaking:
            raise NotLeading("this instance does not hold the lead")
        self.seq += 1
        self._record_position()
        clear = Clear(epoch=self.epoch, seq=self.seq, id=uuid.uuid4().hex, ts=now(), keys=scope.keys,
                      prefixes=scope.prefixes, tags=scope.tags, group=group)
        for listener in self.on_publish:
            listener(clear, token)
        self._send(clear)
        return clear

    def continue_from(self, epoch: str, seq: int) -> None:
        """Go on with another instance's stream: workers that heard all of it see no gap."""
        self.epoch, self.seq = epoch, seq

    async def run_heartbeats(self) -> None:
        """Publish a heartbeat every interval, while speaking, until cancelled."""
        while True:
            if self.speaking:
                try:
                    self._record_position()
                except NotLeading:
                    pass
                else:
                    self._send(Heartbeat(epoch=self.epoch, seq=self.seq, ts=now(),
                                         heartbeat_interval=self.heartbeat_interval, liveness=self.liveness))
            await asyncio.sleep(self.heartbeat_interval)

    def _record_position(self) -> None:
        if self.position is None:
            return
        try:
            self.position(self.epoch, self.seq)
        except OSError as exc:
            self.speaking = False
            log.error("cannot write the lead's record (%s): not publishing any more", exc.strerror or exc)
            raise NotLeading("this instance lost the lead") from None

    def welcome(self) -> Welcome:
        """The answer to a worker's hello: where the bus stands, and the lease terms."""
        return Welcome(epoch=self.epoch, seq=self.seq, heartbeat_interval=self.heartbeat_interval,
                       liveness=self.liveness)

    def _send(self, msg: Message) -> None:
        # PUB never blocks: at the high-water mark libzmq drops the message for
        # that subscriber, which then sees a gap. So a plain send is enough.
        send_now(self._socket, self.codec.encode(msg))

    def close(self) -> None:
        self._socket.close(linger=0)

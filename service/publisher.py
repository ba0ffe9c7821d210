"""The service's PUB socket: clear commands and heartbeats to every worker.

The socket only sends. What is sent, and whether this instance may send at
all, is the leading role's business (:mod:`cachebus.service.role`): it owns
the term (epoch and seq) and keeps the lead's record ahead of the stream.
Heartbeats repeat the last ``seq`` so a worker that lost a command can tell,
and a new epoch tells it the stream started anew. PUB never blocks: a
subscriber that falls more than ``send_hwm`` messages behind loses messages
and detects the gap instead of slowing everyone else down.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from cachebus.bus.protocol import Codec, Message
from cachebus.bus.reader import send_now
from cachebus.bus.security import ServiceSecurity
from cachebus.bus.sockets import Sockets

log = logging.getLogger("cachebus.publisher")


class Publisher:
    """Owns the PUB socket; sends what the leading role gives it."""

    def __init__(self, sockets: Sockets, endpoint: str, codec: Codec, send_hwm: int,
                 buffer: int = 0, security: ServiceSecurity | None = None) -> None:
        self.endpoint = endpoint
        self.codec = codec
        self._sockets = sockets
        self.send_hwm, self.buffer = send_hwm, buffer
        #: CURVE: only workers in the allow-list can subscribe and read the clears.
        self._security = security
        self._socket: zmq.Socket[Any] | None = None

    def bind(self) -> None:
        # No ZMTP heartbeat here: libzmq aborts a subscriber whose full queue meets
        # a heartbeat timeout (zeromq/libzmq#4767); our own heartbeats do the job.
        self._socket = self._sockets.open(zmq.PUB, self._security, bind=self.endpoint, send_hwm=self.send_hwm,
                                          buffer=self.buffer)
        log.info("publishing on %s", self.endpoint)

    def send(self, msg: Message) -> None:
        # PUB never blocks: at the high-water mark libzmq drops the message for
        # that subscriber, which then sees a gap. So a plain send is enough.
        assert self._socket is not None, "bind() first"
        send_now(self._socket, self.codec.encode(msg))

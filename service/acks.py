"""The back channel: a ROUTER socket where workers say hello, heartbeat, ack and leave.

Workers connect a DEALER; the ROUTER's routing id lets the service answer a
hello or heartbeat with a :class:`~cachebus.bus.protocol.Welcome` addressed to
that worker alone. With CURVE, each frame also carries the sender's
authenticated public key (``User-Id``, set by the ZAP authenticator); the
record binds every worker to the key and connection of its hello, so a peer
can speak only for itself. Frames that do not decode are dropped, and a
message whose handling raises is reported and skipped, each logged at most
once per peer and interval, so a misbehaving peer can neither stop the loop
nor flood the log.

:class:`AckSocket` is the socket, bound once for the life of the process;
what happens to what it receives is the role's (:mod:`cachebus.service.role`):
the leader records it with an :class:`AckRecorder`, a follower passes it on
to the leader in ``relayed`` envelopes (:class:`~cachebus.bus.uplink.Uplink`),
as a relay does, and hands the welcomes back.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import zmq

from cachebus.bus.peers import PeerLog, Trouble, peer_address
from cachebus.bus.protocol import (
    RELAYED_REPLY,
    Ack,
    Bye,
    Codec,
    Message,
    ProtocolError,
    Relayed,
    Welcome,
    WorkerHeartbeat,
    WorkerIdentity,
)
from cachebus.bus.reader import Batch, Reader
from cachebus.bus.security import ServiceSecurity
from cachebus.bus.sockets import Sockets

from .record import Peer, Record, RecordFull, Refused

log = logging.getLogger("cachebus.acks")

#: Most waiting messages handled before yielding to other work on the loop.
_MAX_BATCH = 1000


class AckSocket:
    """The ROUTER workers connect to; every batch it reads goes to ``handle`` (the role's).

    The loop hands every waiting message over when the socket's FD signals:
    no task to wake, no future per message. Messages already waiting are
    handled in one go, so a thousand acks for one clear cost one trip through
    the event loop, not a thousand.
    """

    def __init__(self, sockets: Sockets, endpoint: str, send_hwm: int, heartbeat: float,
                 security: ServiceSecurity, handle: Callable[[Batch], None]) -> None:
        self.endpoint = endpoint
        # No ROUTER_HANDOVER: a peer that sets a routing id already in use is
        # ignored, so no one can take over a worker's connection by its id.
        self.socket = sockets.open(zmq.ROUTER, security, send_hwm=send_hwm, heartbeat=heartbeat)
        self.reader = Reader(self.socket, handle, _MAX_BATCH)

    def bind(self) -> None:
        self.socket.bind(self.endpoint)
        log.info("receiving acks on %s", self.endpoint)

    def start(self) -> None:
        """Read from the running loop."""
        self.reader.start()

    def close(self) -> None:
        """Stop reading (the socket closes with the service's others)."""
        self.reader.close()


class AckRecorder:
    """Writes the workers' messages that an :class:`AckSocket` receives into the record (the leader's)."""

    def __init__(self, door: AckSocket, codec: Codec, record: Record, welcome: Callable[[], Welcome],
                 security: ServiceSecurity) -> None:
        self.door = door
        self.codec = codec
        self.record = record
        #: The leader's answer to a hello or heartbeat: its term and lease terms.
        self.welcome = welcome
        self.security = security
        self.peers = PeerLog(log)

    def on_batch(self, batch: Batch) -> None:
        for frames in batch:
            self._handle_safely(frames)

    def _handle_safely(self, frames: list[zmq.Frame]) -> None:
        """Handle one message; whatever it raises is reported, and the loop goes on."""
        self._safely(lambda: self._handle(frames), lambda: self._sender(frames))

    def _safely(self, handle: Callable[[], None], sender: Callable[[], str]) -> None:
        """Run ``handle``, reporting what it raises against ``sender()``: asked only then, since
        naming a peer reads its address from a frame (not work for every ack)."""
        try:
            handle()
        except RecordFull as exc:
            # One line for all peers: a full record is one condition, however many knock.
            self.peers.report("any new worker", Trouble.REFUSED, str(exc))
        except Refused as exc:
            self.peers.report(sender(), Trouble.REFUSED, str(exc))
        except ProtocolError as exc:
            self.peers.report(sender(), Trouble.UNDECODABLE, str(exc))
        except Exception as exc:
            self.peers.failed(sender(), exc)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) > 1 and frames[1].bytes == Relayed.KIND:
            self._handle_relayed(frames)
            return
        try:
            msg = self.codec.decode([f.bytes for f in frames[1:]])
        except ProtocolError as exc:
            self._report(frames, Trouble.UNDECODABLE, str(exc))
            return
        peer = self._peer(frames)
        routing_id = peer.routing_id
        self._apply(msg, peer, lambda reply: self.door.reader.send([routing_id, *reply]))

    def _handle_relayed(self, frames: list[zmq.Frame]) -> None:
        """A relay's envelope: each worker's own message, applied as if the worker had sent it here.

        Only a relay's key (``keys_dir/relays/``) may send one. Each item counts
        for the key the relay authenticated, which must be a worker's key here
        too; one bad item is refused alone (docs/scale-out.md).
        """
        relay = self._peer(frames)
        # Another instance (the service's own key) passes on its workers, and says which relay
        # each envelope's items came through; a relay is named by its key file.
        peer = not self.security.authenticates or self.security.is_peer(relay.key)
        via = None if peer else self.security.relay_name(relay.key)
        if not peer and via is None:
            raise Refused("a relayed envelope from a key that is not a relay's (keys_dir/relays/)")
        try:
            header, items = self.codec.decode_relayed([f.bytes for f in frames[1:]])
        except ProtocolError as exc:
            self._report(frames, Trouble.UNDECODABLE, str(exc))
            return
        via = header.relay if via is None else via
        for tag, key, message in items:
            self._safely(functools.partial(self._relayed_item, relay, via, tag, key, message),
                         functools.partial(self._relayed_sender, frames, tag, via))

    def _relayed_item(self, relay: Peer, via: str, tag: bytes, key: str | None, message: list[bytes]) -> None:
        msg = self.codec.decode(message)  # a ProtocolError is reported by _safely, for this item alone
        if self.security.authenticates and not self.security.allows_worker(key):
            raise Refused("a relayed worker whose key is not in keys_dir/workers/")
        peer = Peer(routing_id=relay.routing_id + b"/" + tag, key=key if self.security.authenticates else None,
                    via=via)
        routing_id = relay.routing_id
        self._apply(msg, peer, lambda reply: self.door.reader.send([routing_id, RELAYED_REPLY, tag, *reply]))

    def _apply(self, msg: Message, peer: Peer, reply: Callable[[list[bytes]], None]) -> None:
        """One worker message into the record; ``reply`` sends the welcome a hello gets."""
        if isinstance(msg, WorkerIdentity):
            welcome = self.welcome()
            if msg.epoch != welcome.epoch:
                # Sent before the worker heard this service (queued across a
                # restart): it is not in sync yet and will say hello when it is.
                log.debug("%s from %s for old epoch %s ignored", msg.KIND.decode(), msg.name, msg.epoch)
                return
            owner = self.security.owner(msg.name)
            if owner is not None and owner != peer.key:
                raise Refused(f"{msg.KIND.decode()} for worker {msg.name}, a name reserved for the key in "
                              f"{msg.name}.key")
            if isinstance(msg, WorkerHeartbeat):
                self.record.heartbeat(msg, peer)
            else:
                self.record.hello(msg, peer)
            # Hellos and heartbeats are answered alike: the answer tells the worker that its one
            # path to the leader works end to end (bus.upstream), or it moves to the next instance.
            try:
                reply(self.codec.encode(welcome))
            except zmq.Again:
                log.debug("could not answer worker %s: its queue is full", msg.name)
        elif isinstance(msg, Ack):
            self.record.acked(msg, peer)
        elif isinstance(msg, Bye):
            self.record.bye(msg, peer)
        else:
            raise ProtocolError(f"unexpected {msg.KIND.decode()} message on the ack channel")

    def _peer(self, frames: list[zmq.Frame]) -> Peer:
        """The sender as the transport vouches for it: its connection, and with CURVE its key."""
        key = str(frames[-1].get("User-Id")) if self.security.authenticates else None
        return Peer(routing_id=frames[0].bytes, key=key)

    def _relayed_sender(self, frames: list[zmq.Frame], tag: bytes, via: str) -> str:
        return f"{self._sender(frames)} for {tag[:16].hex()} via relay {via}"

    def _report(self, frames: list[zmq.Frame], trouble: Trouble, reason: str) -> None:
        self.peers.report(self._sender(frames), trouble, reason)

    @staticmethod
    def _sender(frames: list[zmq.Frame]) -> str:
        """Who sent ``frames``, for a log line: its address and the start of its routing id."""
        return f"{peer_address(frames[-1])} (routing id {frames[0].bytes[:16].hex()})"

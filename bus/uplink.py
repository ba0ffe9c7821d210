"""Workers' messages up in ``relayed`` envelopes, and the answers back down by tag.

Two parts forward a worker's messages instead of recording them: a relay
(``cachebus relay``), and a service instance that does not hold the lead
(docs/scale-out.md). Both read their workers' ROUTER, put each worker's own
message, unchanged, with the key their ZAP check authenticated, into an
envelope for the next hop, and hand each welcome back to the worker its tag
names. They never make a message up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

from .peers import PeerLog, Trouble, peer_address
from .protocol import (
    MAX_RELAYED_ITEMS,
    RELAYABLE,
    RELAYED_ITEM_FRAMES,
    RELAYED_REPLY,
    Codec,
    ProtocolError,
    Relayed,
)
from .reader import Batch, Reader, send_now
from .security import ServiceSecurity
from .upstream import Upstream, move

#: Most messages read from the upstream socket before the loop gets a turn.
_MAX_BATCH = 1000
#: The kinds that go up at once: a hello waits for its welcome, a bye should not linger.
_URGENT = frozenset({b"hello", b"bye"})
#: The kinds the service answers (with a welcome): what tells this hop its path up works.
_ANSWERED = frozenset({b"hello", b"heartbeat"})

#: One item of an envelope: the worker's tag here, its authenticated key (or b""), its frames.
Item = tuple[bytes, bytes, list[bytes]]


class Uplink:
    """Forwards what a ROUTER receives from workers (and from relays below) up a DEALER.

    ``name`` is the name envelopes carry. ``keep_via`` (a service instance
    passing its workers to the leader) sends a relay-below's items in an
    envelope of their own, named after that relay, so the record's ``via``
    stays the relay the worker uses; a relay sends every item under its own
    name, as the topmost relay is the one the service hears.
    """

    def __init__(self, name: str, codec: Codec, router: zmq.SyncSocket, down: ServiceSecurity, batch_ms: float,
                 log: logging.Logger, *, keep_via: bool = False, hold_ms: float = 0.0) -> None:
        self.name = name
        self.codec = codec
        self.router = router
        self.down = down
        self.batch_ms = batch_ms
        #: Milliseconds a direct worker's ack may wait for the other workers' acks, so that one
        #: clear's acks from this hop go up in one envelope (0: they share the batch window).
        self.hold_ms = hold_ms
        self.keep_via = keep_via
        self.log = log
        self.peers = PeerLog(log)
        #: Counters for /metrics: workers' messages forwarded up, envelopes sent, replies handed
        #: down, and messages refused (not a worker's, or a reply of the wrong shape).
        self.forwarded = 0
        self.envelopes = 0
        self.replies = 0
        self.refused = 0
        #: Routing tags of the workers heard through here that have not said bye.
        self.workers: set[bytes] = set()
        self._routes = _Routes()
        #: Items waiting for their envelope, by the name it will carry.
        self._pending: dict[str, list[Item]] = {}
        self._waiting = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        #: Direct workers' acks held for the rest of the round (see :meth:`_hold`), and who sent them.
        self._held: list[Item] = []
        self._held_from: set[bytes] = set()
        #: Workers that let the last round run out without acking: not waited for until they ack again.
        self._quiet: set[bytes] = set()
        self._hold_timer: asyncio.TimerHandle | None = None
        #: Envelopes of held acks sent because every expected worker had acked (not on the timer).
        self.full_rounds = 0
        self._dealer: zmq.SyncSocket | None = None
        self._from_up: Reader | None = None
        self._kick_router: Callable[[], None] = lambda: None
        self._upstream: Upstream | None = None

    def start(self, dealer: zmq.SyncSocket, kick_router: Callable[[], None], upstream: Upstream | None = None) -> None:
        """Send up ``dealer`` (connected by the caller) and hand its replies down; ``kick_router``
        re-arms the ROUTER's reader after a send on it (bus.reader).

        With ``upstream`` (a relay's list of service instances), the dealer talks
        to one of them at a time and moves on when it falls silent
        (:mod:`cachebus.bus.upstream`): its workers' messages then keep one path.
        """
        self._dealer = dealer
        self._kick_router = kick_router
        self._upstream = upstream
        self._from_up = Reader(dealer, self.on_replies, _MAX_BATCH)
        self._from_up.start()

    def close(self) -> None:
        """Stop reading the upstream socket (the caller closes it); what waits is dropped."""
        for timer in (self._flush_timer, self._hold_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._hold_timer = None
        self._held, self._held_from = [], set()
        if self._from_up is not None:
            self._from_up.close()
            self._from_up = None
        self._pending.clear()
        self._waiting = 0

    # --- up: workers to the next hop --------------------------------------------------

    def on_workers(self, batch: Batch) -> None:
        """Messages the ROUTER received: each worker's own goes up, the rest is refused."""
        self._move_if_silent()
        authenticates = self.down.authenticates
        urgent = False
        for frames in batch:
            message = [frame.bytes for frame in frames[1:]]
            routing_id = frames[0].bytes
            key = str(frames[-1].get("User-Id")) if authenticates else ""
            if message and message[0] == Relayed.KIND:
                urgent = self._from_relay_below(routing_id, key, message) or urgent
                continue
            if len(message) != RELAYED_ITEM_FRAMES - 2 or message[0] not in RELAYABLE:
                self._refuse(peer_address(frames[-1]), "not a worker's hello, ack, heartbeat or bye: not forwarded")
                continue
            if message[0] == b"bye":
                self.workers.discard(routing_id)
                self._quiet.discard(routing_id)
            else:  # a hello, or a worker that said it elsewhere (before this relay restarted)
                self.workers.add(routing_id)
            if message[0] == b"ack" and self.hold_ms:
                self._hold((routing_id, key.encode(), message))
                continue
            if routing_id in self._held_from:
                # Whatever came before goes first, this worker's held acks among it: each worker's
                # messages reach the service in the order it sent them.
                self.flush()
                self._send_held()
            self._add(self.name, (routing_id, key.encode(), message))
            urgent = urgent or message[0] in _URGENT
        if not self._waiting:
            return
        if urgent or self._waiting >= MAX_RELAYED_ITEMS or not self.batch_ms:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.batch_ms / 1000, self.flush)

    def lost(self, endpoint: str) -> None:
        """The connection to ``endpoint`` dropped: if it is the instance in use, move to the next
        now rather than a lease later (bus.upstream.watch_disconnects)."""
        upstream = self._upstream
        if upstream is None or self._dealer is None or endpoint != upstream.current:
            return
        left, now = move(self._dealer, upstream)
        self.peers.report(left, Trouble.UNANSWERED, f"connection lost: talking to {now} instead")

    def _move_if_silent(self) -> None:
        """Move up to the next instance when the one in use left hellos or heartbeats unanswered
        for a lease. The workers' next heartbeats make them known there."""
        upstream = self._upstream
        if upstream is None or self._dealer is None or not upstream.silent:
            return
        waited = upstream.silent_for()
        left, now = move(self._dealer, upstream)
        self.peers.report(left, Trouble.UNANSWERED, f"nothing answered for {waited:.1f} s: talking to {now} instead")

    def _hold(self, item: Item) -> None:
        """Hold a direct worker's ack until every worker here has acked, then send them together.

        A worker acks each clear once (or several clears at once), so a round
        ends when the held acks come from every worker that said hello and has
        not gone quiet. ``hold_ms`` after a round's first ack it goes up
        anyway, and whoever had not acked is not waited for again until it acks:
        a dead worker without a bye costs one round ``hold_ms``, not every round.
        """
        routing_id = item[0]
        self._held.append(item)
        self._held_from.add(routing_id)
        self._quiet.discard(routing_id)
        if self._held_from >= self.workers - self._quiet:
            self.full_rounds += 1
            self._send_held()
        elif self._hold_timer is None:
            self._hold_timer = asyncio.get_running_loop().call_later(self.hold_ms / 1000, self._round_ran_out)

    def _round_ran_out(self) -> None:
        self._hold_timer = None
        self._quiet |= self.workers - self._held_from
        self._send_held()

    def _send_held(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        held, self._held, self._held_from = self._held, [], set()
        self._send(self.name, held)
        if self._from_up is not None:
            self._from_up.kick()

    def _add(self, via: str, item: Item) -> None:
        self._pending.setdefault(via, []).append(item)
        self._waiting += 1

    def _from_relay_below(self, routing_id: bytes, key: str, message: list[bytes]) -> bool:
        """A relay below this hop: its items join the envelopes going up, each under a tag
        of this hop's own that remembers where the reply goes. True if one is urgent.

        The service's rules: only a relay's key (``relays/`` here) may send an envelope,
        and each item's worker key must be in ``workers/``.
        """
        down = self.down
        relay = down.relay_name(key) if down.authenticates else None
        if down.authenticates and relay is None:
            self._refuse(f"relay key {key[:12]}…", "a relayed envelope from a key that is not a relay's: dropped")
            return False
        try:
            header, items = self.codec.decode_relayed(message)
        except ProtocolError as exc:
            self._refuse(f"relay key {key[:12]}…", str(exc))
            return False
        via = (relay or header.relay) if self.keep_via else self.name
        urgent = False
        for tag, worker_key, worker_message in items:
            if down.authenticates and not down.allows_worker(worker_key):
                self._refuse(f"relay key {key[:12]}…", "a relayed worker whose key is not in workers/: dropped")
                continue
            self._add(via, (self._routes.tag_for(routing_id, tag), (worker_key or "").encode(), worker_message))
            urgent = urgent or worker_message[0] in _URGENT
        return urgent

    def _refuse(self, who: str, why: str) -> None:
        self.refused += 1
        self.peers.report(who, Trouble.UNDECODABLE, why)

    def flush(self) -> None:
        """Send every waiting item up now, in as few envelopes as their names allow."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending, self._waiting = self._pending, {}, 0
        for via, items in pending.items():
            self._send(via, items)
        if self._from_up is not None:
            self._from_up.kick()

    def _send(self, via: str, items: list[Item]) -> None:
        """``items`` up in as few envelopes as :data:`MAX_RELAYED_ITEMS` allows; dropped if nobody is there."""
        if self._dealer is None:
            return
        for start in range(0, len(items), MAX_RELAYED_ITEMS):
            chunk = items[start:start + MAX_RELAYED_ITEMS]
            try:
                send_now(self._dealer, self.codec.encode_relayed(via, chunk))
                self.envelopes += 1
                self.forwarded += len(chunk)
                if self._upstream is not None and any(message[0] in _ANSWERED for _, _, message in chunk):
                    self._upstream.expect_answer()
            except zmq.Again:
                self.log.debug("next hop unreachable: %d workers' messages dropped", len(chunk))

    # --- down: the answers to one worker --------------------------------------------

    def on_replies(self, batch: Batch) -> None:
        if self._upstream is not None:
            self._upstream.answered()
        for frames in batch:
            message = [frame.bytes for frame in frames]
            if len(message) != RELAYED_ITEM_FRAMES or message[0] != RELAYED_REPLY:
                self._refuse("the next hop", "not a relayed reply")
                continue
            below = self._routes.get(message[1])
            try:
                if below is None:
                    send_now(self.router, message[1:])  # the tag is the worker's routing id here
                else:  # a worker of a relay below: the reply goes down one more level
                    relay_id, tag = below
                    send_now(self.router, [relay_id, RELAYED_REPLY, tag, *message[2:]])
                self.replies += 1
            except zmq.Again:
                self.log.debug("a worker's welcome dropped: its queue is full")
        self._kick_router()


class _Routes:
    """Tags of this hop's own for the workers of the relays below it, and back.

    A tag is ``b"\\xff"`` and a number: ZeroMQ's own routing ids (this hop's
    direct workers) start with a zero byte, so the two never meet. At most
    ``limit`` are kept, oldest forgotten first: a forgotten worker's next
    message gets a new tag, and only a welcome in flight could be lost.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._down: dict[bytes, tuple[bytes, bytes]] = {}
        self._up: dict[tuple[bytes, bytes], bytes] = {}
        self._next = 0

    def tag_for(self, relay_id: bytes, tag: bytes) -> bytes:
        own = self._up.get((relay_id, tag))
        if own is None:
            self._next += 1
            own = b"\xff" + self._next.to_bytes(8, "big")
            self._up[(relay_id, tag)] = own
            self._down[own] = (relay_id, tag)
            if len(self._down) > self.limit:
                oldest = next(iter(self._down))
                self._up.pop(self._down.pop(oldest), None)
        return own

    def get(self, own: bytes) -> tuple[bytes, bytes] | None:
        return self._down.get(own)

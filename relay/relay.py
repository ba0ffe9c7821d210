"""A relay: commands down through ZeroMQ's proxy, its workers' own messages up in envelopes.

To its workers a relay is a service (an XPUB and a ROUTER, a CURVE server with
its own keypair and allow-list); to the service it is one peer whose key is in
``keys_dir/relays/``. It never makes a message up: a worker is heard by the
service only through what that worker sent, so if the relay stops, its
workers' leases lapse within the bound and the service marks them suspect,
then lost, exactly as if they had been cut off themselves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tornado.web
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tornado.httpserver import HTTPServer

from cachebus.bus.peers import PeerLog, Trouble, peer_address
from cachebus.bus.protocol import (
    MAX_RELAYED_ITEMS,
    RELAYABLE,
    RELAYED_ITEM_FRAMES,
    RELAYED_REPLY,
    Codec,
    ProtocolError,
    Relayed,
)
from cachebus.bus.reader import Batch, Reader, send_now
from cachebus.bus.security import (
    RELAYS_DIR,
    BusMode,
    ClientSecurity,
    ServiceSecurity,
    ensure_keypair,
    key_name,
    private_dir,
)
from cachebus.bus.sockets import configure
from cachebus.metrics import MetricsHandler
from cachebus.settings import Settings

log = logging.getLogger("cachebus.relay")

#: Most messages read from one socket before the loop gets a turn.
_MAX_BATCH = 1000
#: The kinds that go up at once: a hello waits for its welcome, a bye should not linger.
_URGENT = frozenset({b"hello", b"bye"})


class Relay:
    """One relay process's sockets and loop work; :meth:`run` until ``stop`` is set."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.relay.name or socket.gethostname()
        bus = settings.bus
        self.codec = Codec(bus.key.encode(), max_age=bus.lease)
        self.peers = PeerLog(log)
        self._pending: list[tuple[bytes, bytes, list[bytes]]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counters for /metrics: workers' messages forwarded up, envelopes sent, replies handed down,
        #: and messages refused (not a worker's, or a reply of the wrong shape).
        self.forwarded = 0
        self.envelopes = 0
        self.replies = 0
        self.refused = 0
        #: Routing tags of the workers that said hello through this relay and have not said bye.
        self.workers: set[bytes] = set()
        #: This relay's tags for the workers of relays below it.
        self._routes = _Routes()
        self._down: ServiceSecurity | None = None

    async def run(self, stop: asyncio.Event) -> None:
        bus, relay = self.settings.bus, self.settings.relay
        self._loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        down = self._down = ServiceSecurity(bus.mode, Path(relay.keys_dir), self.peers)
        up = self._upstream_security()
        down.start(ctx)
        sockets: list[zmq.Socket] = []

        def make(kind: int, security: ServiceSecurity | ClientSecurity, **limits: Any) -> zmq.Socket:
            sock = zmq.Socket(ctx, kind)
            sockets.append(sock)
            configure(sock, **limits)
            security.apply(sock)
            return sock

        proxy: threading.Thread | None = None
        server: HTTPServer | None = None
        control = zmq.Socket(ctx, zmq.PAIR)
        try:
            # Commands: XSUB up, XPUB down, moved unchanged by ZeroMQ's own proxy in a thread.
            # No ZMTP heartbeat on the subscriber side (zeromq/libzmq#4767).
            xsub = make(zmq.XSUB, up, recv_hwm=bus.recv_hwm)
            xpub = make(zmq.XPUB, down, send_hwm=bus.send_hwm)
            xsub.connect(bus.publish)
            xpub.bind(relay.publish)
            steer = make_pair(ctx, control, sockets)
            proxy = threading.Thread(target=_proxy, args=(xsub, xpub, steer), name="cachebus-relay-proxy",
                                     daemon=True)
            proxy.start()
            # The back channel: its workers' messages up in envelopes, welcomes down by tag.
            self._router = make(zmq.ROUTER, down, send_hwm=bus.send_hwm)
            self._dealer = make(zmq.DEALER, up, heartbeat=bus.heartbeat_interval)
            self._router.bind(relay.acks)
            self._dealer.connect(bus.acks)
            self._from_workers = Reader(self._router, self._on_workers, _MAX_BATCH)
            self._from_service = Reader(self._dealer, self._on_service, _MAX_BATCH)
            self._from_workers.start()
            self._from_service.start()
            log.info("relay %s: commands from %s to %s, acks from %s to %s", self.name, bus.publish,
                     relay.publish, relay.acks, bus.acks)
            if relay.http_port:
                server = self._metrics_app().listen(relay.http_port, address=relay.http_host)
                log.info("relay %s: metrics on http://%s:%d/metrics", self.name, relay.http_host, relay.http_port)
            await stop.wait()
        finally:
            if server is not None:
                server.stop()
            for reader in (getattr(self, "_from_workers", None), getattr(self, "_from_service", None)):
                if reader is not None:
                    reader.close()
            if proxy is not None:
                control.send(b"TERMINATE")
                proxy.join(5)
            control.close(0)
            for sock in sockets:
                sock.close(0)
            down.stop()
            ctx.term()

    def _metrics_app(self) -> tornado.web.Application:
        registry = CollectorRegistry()
        registry.register(_RelayCollector(self))
        return tornado.web.Application([(r"/metrics", MetricsHandler, {
            "registry": registry, "settings": self.settings.metrics, "listen_host": self.settings.relay.http_host})])

    def _upstream_security(self) -> ClientSecurity:
        """The relay's keypair towards the service: ``<bus.keys_dir>/relays/<name>.key_secret``."""
        bus = self.settings.bus
        if bus.mode is not BusMode.CURVE:
            return ClientSecurity.resolve(bus.mode, name=self.name, keys_dir=bus.keys_dir)
        keypair, created = ensure_keypair(private_dir(private_dir(Path(bus.keys_dir)) / RELAYS_DIR),
                                          key_name(self.name))
        if created:
            log.info("created this relay's bus keypair %s: copy %s to the service's keys_dir/%s/",
                     keypair.path, keypair.public_file.name, RELAYS_DIR)
        return ClientSecurity.resolve(bus.mode, name=self.name, keys_dir=bus.keys_dir,
                                      secret_key_file=keypair.path)

    # --- up: workers to the service -------------------------------------------------

    def _on_workers(self, batch: Batch) -> None:
        authenticates = self.settings.bus.mode is BusMode.CURVE
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
            if message[0] == b"hello":
                self.workers.add(routing_id)
            elif message[0] == b"bye":
                self.workers.discard(routing_id)
            self._pending.append((routing_id, key.encode(), message))
            urgent = urgent or message[0] in _URGENT
        if not self._pending:
            return
        assert self._loop is not None
        if urgent or len(self._pending) >= MAX_RELAYED_ITEMS or not self.settings.relay.batch_ms:
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = self._loop.call_later(self.settings.relay.batch_ms / 1000, self._flush)

    def _from_relay_below(self, routing_id: bytes, key: str, message: list[bytes]) -> bool:
        """A relay below this one (two levels): its items join this relay's envelopes, each under a
        tag of this relay's own that remembers where the reply goes. True if one is urgent.

        The same rules as the service's: only a relay's key (``relays/`` in this relay's
        keys) may send an envelope, and each item's worker key must be in its ``workers/``.
        """
        down = self._down
        assert down is not None  # set by run() before any reader starts
        if down.authenticates and down.relay_name(key) is None:
            self._refuse(f"relay key {key[:12]}…", "a relayed envelope from a key that is not a relay's: dropped")
            return False
        try:
            _, items = self.codec.decode_relayed(message)
        except ProtocolError as exc:
            self._refuse(f"relay key {key[:12]}…", str(exc))
            return False
        urgent = False
        for tag, worker_key, worker_message in items:
            if down.authenticates and not down.allows_worker(worker_key):
                self._refuse(f"relay key {key[:12]}…", "a relayed worker whose key is not in workers/: dropped")
                continue
            own_tag = self._routes.tag_for(routing_id, tag)
            self._pending.append((own_tag, (worker_key or "").encode(), worker_message))
            urgent = urgent or worker_message[0] in _URGENT
        return urgent

    def _refuse(self, who: str, why: str) -> None:
        self.refused += 1
        self.peers.report(who, Trouble.UNDECODABLE, why)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        while self._pending:
            items, self._pending = self._pending[:MAX_RELAYED_ITEMS], self._pending[MAX_RELAYED_ITEMS:]
            try:
                send_now(self._dealer, self.codec.encode_relayed(self.name, items))
                self.envelopes += 1
                self.forwarded += len(items)
            except zmq.Again:
                log.debug("service unreachable: %d workers' messages dropped", len(items))
        self._from_service.kick()

    # --- down: the service's answers to one worker ------------------------------------

    def _on_service(self, batch: Batch) -> None:
        for frames in batch:
            message = [frame.bytes for frame in frames]
            if len(message) != RELAYED_ITEM_FRAMES or message[0] != RELAYED_REPLY:
                self._refuse("the service", "not a relayed reply")
                continue
            below = self._routes.get(message[1])
            try:
                if below is None:
                    send_now(self._router, message[1:])  # the tag is the worker's routing id here
                else:  # a worker of a relay below: the reply goes down one more level
                    relay_id, tag = below
                    send_now(self._router, [relay_id, RELAYED_REPLY, tag, *message[2:]])
                self.replies += 1
            except zmq.Again:
                log.debug("a worker's welcome dropped: its queue is full")
        self._from_workers.kick()


class _Routes:
    """Tags of this relay's own for the workers of the relays below it, and back.

    A tag is ``b"\xff"`` and a number: ZeroMQ's own routing ids (this relay's
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


class _RelayCollector(Collector):
    """The relay's counters, read when scraped."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        relay = self.relay
        yield CounterMetricFamily("cachebus_relay_forwarded", "Workers' messages forwarded to the service",
                                  value=relay.forwarded)
        yield CounterMetricFamily("cachebus_relay_envelopes", "Envelopes sent to the service", value=relay.envelopes)
        yield CounterMetricFamily("cachebus_relay_replies", "The service's replies handed to a worker",
                                  value=relay.replies)
        yield CounterMetricFamily("cachebus_relay_refused", "Messages not passed on: not a worker's, or not a reply",
                                  value=relay.refused)
        yield GaugeMetricFamily("cachebus_relay_workers", "Worker connections that said hello and no bye",
                                value=len(relay.workers))


def make_pair(ctx: zmq.Context, control: zmq.Socket, sockets: list[zmq.Socket]) -> zmq.Socket:
    """The proxy's end of its control pair (the other end, ``control``, stops it)."""
    endpoint = f"inproc://cachebus-relay-control-{id(control)}"
    control.bind(endpoint)
    steer = zmq.Socket(ctx, zmq.PAIR)
    steer.connect(endpoint)
    sockets.append(steer)
    return steer


def _proxy(xsub: zmq.Socket, xpub: zmq.Socket, steer: zmq.Socket) -> None:
    try:
        zmq.proxy_steerable(xsub, xpub, None, steer)
    except zmq.ContextTerminated:
        pass
    except Exception:
        log.exception("the relay's command proxy stopped")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await Relay(settings).run(stop)

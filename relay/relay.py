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

import tornado.web
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tornado.httpserver import HTTPServer

from cachebus.bus.endpoints import split_endpoints
from cachebus.bus.peers import PeerLog
from cachebus.bus.protocol import Codec
from cachebus.bus.reader import Reader
from cachebus.bus.security import (
    RELAYS_DIR,
    BusMode,
    ClientSecurity,
    ServiceSecurity,
    ensure_keypair,
    key_name,
    private_dir,
)
from cachebus.bus.sockets import Sockets
from cachebus.bus.uplink import Uplink
from cachebus.bus.upstream import Upstream, watch_disconnects
from cachebus.metrics import MetricsHandler
from cachebus.settings import Settings

log = logging.getLogger("cachebus.relay")

#: Most messages read from the workers' socket before the loop gets a turn.
_MAX_BATCH = 1000


class Relay:
    """One relay process's sockets and loop work; :meth:`run` until ``stop`` is set."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.relay.name or socket.gethostname()
        bus = settings.bus
        self.codec = Codec(bus.key.encode(), max_age=bus.lease)
        self.peers = PeerLog(log)
        #: Its workers' messages up, welcomes down (set by :meth:`run`; /metrics reads its counters).
        self.uplink: Uplink | None = None

    async def run(self, stop: asyncio.Event) -> None:
        bus, relay = self.settings.bus, self.settings.relay
        ctx = zmq.asyncio.Context()
        down = ServiceSecurity(bus.mode, Path(relay.keys_dir), self.peers)
        up = self._upstream_security()
        down.start(ctx)
        sockets = Sockets(ctx)

        proxy: threading.Thread | None = None
        server: HTTPServer | None = None
        from_workers: Reader | None = None
        disconnects: Reader | None = None
        control = zmq.Socket(ctx, zmq.PAIR)
        try:
            # Commands: XSUB up, XPUB down, moved unchanged by ZeroMQ's own proxy in a thread.
            # No ZMTP heartbeat on the subscriber side (zeromq/libzmq#4767).
            xsub = sockets.open(zmq.XSUB, up, connect=split_endpoints(bus.publish),  # one per service instance
                                recv_hwm=bus.recv_hwm)
            xpub = sockets.open(zmq.XPUB, down, bind=relay.publish, send_hwm=bus.send_hwm)
            steer = make_pair(control, sockets)
            proxy = threading.Thread(target=_proxy, args=(xsub, xpub, steer), name="cachebus-relay-proxy",
                                     daemon=True)
            proxy.start()
            # The back channel: its workers' messages up in envelopes, welcomes down by tag.
            router = sockets.open(zmq.ROUTER, down, bind=relay.acks, send_hwm=bus.send_hwm)
            # One service instance at a time, so each worker's messages keep one path (bus.upstream).
            upstream = Upstream(split_endpoints(bus.acks), lambda: bus.lease)
            dealer = sockets.open(zmq.DEALER, up, connect=[upstream.current], heartbeat=bus.heartbeat_interval)
            uplink = self.uplink = Uplink(self.name, self.codec, router, down, relay.batch_ms, log,
                                          hold_ms=relay.hold_ms)
            from_workers = Reader(router, uplink.on_workers, _MAX_BATCH)
            uplink.start(dealer, kick_router=from_workers.kick, upstream=upstream)
            if len(upstream.endpoints) > 1:
                disconnects = watch_disconnects(sockets, dealer, uplink.lost)
                disconnects.start()
            from_workers.start()
            log.info("relay %s: commands from %s to %s, acks from %s to %s", self.name, bus.publish,
                     relay.publish, relay.acks, bus.acks)
            if relay.http_port:
                server = self._metrics_app().listen(relay.http_port, address=relay.http_host)
                log.info("relay %s: metrics on http://%s:%d/metrics", self.name, relay.http_host, relay.http_port)
            await stop.wait()
        finally:
            if server is not None:
                server.stop()
            if from_workers is not None:
                from_workers.close()
            if disconnects is not None:
                disconnects.close()
            if self.uplink is not None:
                self.uplink.close()
            if proxy is not None:
                control.send(b"TERMINATE")
                proxy.join(5)
            control.close(0)
            sockets.close()
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


class _RelayCollector(Collector):
    """The relay's counters, read when scraped."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        relay = self.relay.uplink
        if relay is None:
            return
        yield CounterMetricFamily("cachebus_relay_forwarded", "Workers' messages forwarded to the service",
                                  value=relay.forwarded)
        yield CounterMetricFamily("cachebus_relay_envelopes", "Envelopes sent to the service", value=relay.envelopes)
        yield CounterMetricFamily("cachebus_relay_full_rounds", "Envelopes of acks sent once every worker here had "
                                  "acked (the others went when relay.hold_ms ran out)", value=relay.full_rounds)
        yield CounterMetricFamily("cachebus_relay_replies", "The service's replies handed to a worker",
                                  value=relay.replies)
        yield CounterMetricFamily("cachebus_relay_refused", "Messages not passed on: not a worker's, or not a reply",
                                  value=relay.refused)
        yield GaugeMetricFamily("cachebus_relay_workers", "Worker connections heard that said no bye",
                                value=len(relay.workers))


def make_pair(control: zmq.SyncSocket, sockets: Sockets) -> zmq.SyncSocket:
    """The proxy's end of its control pair (the other end, ``control``, stops it)."""
    endpoint = f"inproc://cachebus-relay-control-{id(control)}"
    control.bind(endpoint)
    return sockets.open(zmq.PAIR, None, connect=[endpoint])


def _proxy(xsub: zmq.SyncSocket, xpub: zmq.SyncSocket, steer: zmq.SyncSocket) -> None:
    try:
        zmq.proxy_steerable(xsub, xpub, None, steer)
    except zmq.ContextTerminated:
        pass
    except Exception:
        log.exception("the relay's command proxy stopped")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await Relay(settings).run(stop)

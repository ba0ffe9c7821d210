"""The HTTP server's limits, against a real ``cachebus serve`` and raw sockets.

Slow clients (headers trickled, a body withheld, a kept-alive connection left idle)
are closed after their timeouts, a legitimate clear gets through while they hold
connections, the connection limit sheds the excess at once, an event stream
outlives every timeout, and at the file-descriptor limit the service neither spins
nor floods its log, and answers again once the connections are gone.

Limits are small here (20 connections, timeouts of a few seconds) so the tests stay
quick; docs/security.md has the defaults. Nothing waits on a fixed sleep: every wait
is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachebus.service.limits import (
    DESCRIPTOR_RESERVE,
    MAX_AUTOMATIC_CONNECTIONS,
    PAUSE,
    LimitedHTTPServer,
    ThrottledLog,
    max_connections,
)
from cachebus.settings import HttpSettings
from cachebus.testing import DEADLINE, Cluster, http, wait_for

from .support import EventStream

MAX_CONNECTIONS = 20
#: Long enough for a loaded machine to open 19 slow connections and make a clear
#: before the first of them times out.
SLOW = 4.0


def limits(**http_settings: Any) -> dict[str, Any]:
    return {"http": {"max_connections": MAX_CONNECTIONS, "header_timeout": 60.0, "body_timeout": 60.0,
                     "idle_timeout": 60.0, **http_settings}}


def connect(cluster: Cluster) -> socket.socket:
    return socket.create_connection(("127.0.0.1", cluster.port), timeout=DEADLINE)


def connect_or_shed(cluster: Cluster) -> socket.socket | None:
    """A connection, or None when the service reset it before ``connect`` even returned."""
    try:
        return connect(cluster)
    except ConnectionResetError:
        return None


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the service closed (or reset) ``sock``, without waiting; bytes it sent first are read and dropped."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except OSError:  # reset
            return True
    return False


def metric(cluster: Cluster, name: str, **labels: str) -> float:
    _, _, body = http("GET", cluster.url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def log_lines(cluster: Cluster, text: str) -> list[str]:
    assert cluster.service is not None
    return [line for line in cluster.service.output().splitlines() if text in line]


class Trickle:
    """Sends one byte to each socket every 0.2 s, as a slowloris does, until stopped."""

    def __init__(self, socks: list[socket.socket], byte: bytes) -> None:
        self.socks = socks
        self.byte = byte
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for sock in self.socks:
                try:
                    sock.send(self.byte)
                except OSError:
                    pass  # closed by the service: what the test waits for

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.mark.processes
def test_slow_clients_are_closed_after_their_timeouts_while_a_clear_gets_through(cluster: Cluster, sockets):
    cluster.start_service(settings=limits(header_timeout=SLOW, body_timeout=SLOW))
    trickled = [connect(cluster) for _ in range(10)]
    for sock in trickled:
        sock.sendall(b"POST /api/v1/cache/clear HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    withheld = [connect(cluster) for _ in range(MAX_CONNECTIONS - len(trickled) - 1)]
    for sock in withheld:
        sock.sendall(b"POST /api/v1/cache/clear HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ntoken=")
    sockets += trickled + withheld
    headers_trickle, body_trickle = Trickle(trickled, b"x"), Trickle(withheld, b"x")
    try:
        # 19 slow clients hold connections; the 20th, a real client, is served.
        status, _, body = cluster.clear()
        assert status == 204, body
        # None was closed early: all 19 still hold their connections once the clear is served.
        assert not any(closed_by_server(s) for s in sockets), \
            "the machine was too slow: a slow client timed out before the clear"
        # Trickled bytes never extended a deadline: every one is closed while its bytes keep coming.
        wait_for(lambda: all(closed_by_server(s) for s in sockets), what="the service to close every slow client")
    finally:
        headers_trickle.close()
        body_trickle.close()
    # ... and each for the timeout of the phase it was stuck in.
    assert metric(cluster, "cachebus_http_connections_timed_out_total", phase="header") == len(trickled)
    assert metric(cluster, "cachebus_http_connections_timed_out_total", phase="body") == len(withheld)
    assert len(log_lines(cluster, "closed connections: header timeout")) == 1
    assert len(log_lines(cluster, "closed connections: body timeout")) == 1
    assert "Traceback" not in cluster.service.output()  # type: ignore[union-attr]
    assert cluster.clear()[0] == 204


def held_connection(cluster: Cluster, sockets: list[socket.socket]) -> socket.socket:
    """A kept-alive connection the service has accepted and answered once.

    Retried while the limit sheds it: a connection the test closed (the start-up
    probe's, say) counts against the limit until the service sees it close.
    """
    def attempt() -> socket.socket | None:
        conn = HTTPConnection("127.0.0.1", cluster.port, timeout=DEADLINE)
        try:
            conn.request("GET", "/api/openapi.json")
            response = conn.getresponse()
            response.read()
        except OSError:
            conn.close()
            return None
        assert response.status == 200 and conn.sock is not None
        sockets.append(conn.sock)
        return conn.sock

    return wait_for(attempt, what="a connection the service keeps")


@pytest.mark.processes
def test_connections_past_the_limit_are_closed_at_once(cluster: Cluster, sockets):
    cluster.start_service(settings=limits())
    held = [held_connection(cluster, sockets) for _ in range(MAX_CONNECTIONS)]
    attempts = 50
    # The kernel completes them and the service resets them; a reset that arrives before
    # connect() returns (a loaded machine) is as much "closed at once" as one after it.
    extra = [s for _ in range(attempts) if (s := connect_or_shed(cluster)) is not None]
    sockets += extra
    wait_for(lambda: all(closed_by_server(s) for s in extra), what="the connections past the limit to be closed")
    assert not any(closed_by_server(s) for s in held)
    with pytest.raises(OSError):
        cluster.clear()  # the limit applies to everyone

    held.pop().close()
    assert wait_for(lambda: _clear_status(cluster) == 204, what="a clear once a connection is free")
    # Free the rest before scraping: the clear's own connection may not be counted as
    # closed yet, and the scrape must not be the one the limit sheds.
    for sock in held:
        sock.close()
    refused = wait_for(lambda: _metric_or_none(cluster, "cachebus_http_connections_refused_total", reason="limit"),
                       what="the metrics once connections are free")
    assert refused >= attempts + 1
    # 51 refusals, one log line (at most one per 10 s).
    assert 1 <= len(log_lines(cluster, "refused connections")) <= 2


def _metric_or_none(cluster: Cluster, name: str, **labels: str) -> float | None:
    try:
        return metric(cluster, name, **labels)
    except OSError:  # shed: the service has not yet seen a freed connection close
        return None


def _clear_status(cluster: Cluster) -> int | None:
    try:
        return cluster.clear()[0]
    except OSError:
        return None


@pytest.mark.processes
def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(cluster: Cluster):
    cluster.start_service(settings=limits(idle_timeout=1.0))
    conn = HTTPConnection("127.0.0.1", cluster.port, timeout=DEADLINE)
    try:
        for _ in range(2):  # kept alive between requests that come in time
            conn.request("GET", "/api/openapi.json")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
        assert conn.sock is not None
        wait_for(lambda: closed_by_server(conn.sock), what="the idle connection to be closed")
    finally:
        conn.close()
    # Closed by the idle timer, not at an answer: the second request went through on the same connection.
    assert metric(cluster, "cachebus_http_connections_timed_out_total", phase="idle") == 1


@pytest.mark.processes
def test_a_silent_connection_is_closed_after_the_header_timeout(cluster: Cluster, sockets):
    cluster.start_service(settings=limits(header_timeout=1.0))
    silent = connect(cluster)
    sockets.append(silent)
    wait_for(lambda: closed_by_server(silent), what="the silent connection to be closed")
    assert metric(cluster, "cachebus_http_connections_timed_out_total", phase="header") == 1


@pytest.mark.processes
def test_headers_over_the_size_limit_close_the_connection(cluster: Cluster, sockets):
    cluster.start_service(settings=limits(max_header_size=4096))
    sock = connect(cluster)
    sockets.append(sock)
    sock.sendall(b"GET /api/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 8192 + b"\r\n\r\n")
    wait_for(lambda: closed_by_server(sock), what="the connection with oversized headers to be closed")
    status, _, _ = http("GET", cluster.url + "/api/openapi.json", headers={"X-Fits": "x" * 2048})
    assert status == 200


@pytest.mark.processes
def test_an_event_stream_outlives_every_timeout(cluster: Cluster, sockets):
    cluster.start_service(settings=limits(header_timeout=1.0, body_timeout=1.0, idle_timeout=1.0))
    stream = EventStream(cluster)
    try:
        assert stream.open().status == 200
        assert stream.next()[1] == "snapshot"  # type: ignore[index]
        # A connection opened after the stream, and silent: once it is closed for its
        # header timeout, every timeout has passed for the stream too.
        silent = connect(cluster)
        sockets.append(silent)
        wait_for(lambda: closed_by_server(silent), what="a silent connection to time out")
        status, headers, _ = cluster.clear()
        assert status == 204
        clear_id = headers["Cache-Clear-Id"]
        stream.until(lambda kind, data: kind == "clear.published" and data["clear_id"] == clear_id,
                     "the clear on the stream")
    finally:
        stream.close()


# --- the file-descriptor limit -------------------------------------------------

#: The service's descriptor limit: room for its own (~40) and about 200 connections.
NOFILE = 256


def accept_queue(port: int) -> int:
    """Connections waiting to be accepted on the sockets listening on ``port`` (the kernel's own count)."""
    waiting: list[int] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                    waiting.append(int(fields[4].partition(":")[2], 16))  # rx_queue: the accept queue
    assert waiting, f"nothing listens on port {port}"
    return sum(waiting)


@pytest.mark.processes
def test_at_the_descriptor_limit_the_service_sheds_without_spinning_and_recovers(cluster: Cluster, sockets):
    # A connection limit far above the descriptor limit, so accept() meets EMFILE.
    service = cluster.start_service(settings=limits(max_connections=10_000),
                                    prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"])
    attempts = NOFILE + 100
    sockets += [s for _ in range(attempts) if (s := connect_or_shed(cluster)) is not None]
    # The service holds what it can; the rest are reset as it sheds them.
    wait_for(lambda: attempts - sum(not closed_by_server(s) for s in sockets) >= 100,
             what="the service to shed connections")

    # Still exhausted, with connections arriving: each one is shed, and none is left waiting. A
    # loop that cannot accept leaves them queued, and spins: the listening socket stays readable.
    for _ in range(20):
        extra = connect_or_shed(cluster)
        if extra is not None:
            sockets.append(extra)
            wait_for(lambda: closed_by_server(extra), what="a connection at the limit to be shed")  # noqa: B023
    wait_for(lambda: accept_queue(cluster.port) == 0, what="the service to empty its accept queue")
    assert service.alive()

    for sock in sockets:
        sock.close()
    sockets.clear()
    assert wait_for(lambda: _clear_status(cluster) == 204, what="a clear once the connections are gone")
    assert metric(cluster, "cachebus_http_connections_refused_total", reason="descriptors") >= 100
    output = service.output()
    assert len(output.splitlines()) < 20, output[-3000:]
    assert "Traceback" not in output


# --- the pieces ------------------------------------------------------------------


@pytest.mark.processes
def test_a_flood_of_malformed_request_lines_writes_a_few_log_lines(cluster: Cluster):
    cluster.start_service()
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=DEADLINE) as sock:
            sock.sendall(b"NOT A REQUEST LINE\r\n\r\n")
            sock.recv(4096)  # Tornado's bare 400, then the close
    assert cluster.service is not None
    # Tornado writes one line per malformed message; the service lets 5 per 10 s through.
    lines = [line for line in cluster.service.output().splitlines() if "Malformed HTTP" in line]
    assert 1 <= len(lines) <= 5, lines


def test_throttled_log_writes_one_line_per_interval_with_the_count(caplog):
    now = [100.0]
    throttled = ThrottledLog(logging.getLogger("test.throttled"), "refused", interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.throttled")
    for _ in range(1000):
        throttled.event()
    now[0] += 10.0
    throttled.event()
    assert [r.getMessage() for r in caplog.records] == [
        "refused; more are counted, and logged at most every 10 s",
        "refused: 1000 since the last line",
    ]


def test_automatic_connection_limit_follows_the_descriptor_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert max_connections(7) == 7
    assert max_connections(0) == max(1, min(soft - DESCRIPTOR_RESERVE, MAX_AUTOMATIC_CONNECTIONS))


@pytest.mark.gen_test
async def test_an_accept_that_keeps_failing_pauses_the_loop_instead_of_spinning(caplog):
    class FailingSocket(socket.socket):
        """A listening socket whose accept fails as no connection-level error does."""

        attempts = 0

        def accept(self) -> Any:
            FailingSocket.attempts += 1
            raise OSError(errno.EINVAL, "accept refused")

    listener = FailingSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    server = LimitedHTTPServer(lambda request: None, limits=HttpSettings())
    server.add_sockets([listener])
    client = socket.create_connection(listener.getsockname())  # stays in the backlog: readable for good
    try:
        started = time.monotonic()
        while FailingSocket.attempts < 1:
            assert time.monotonic() - started < DEADLINE, "the accept loop never tried"
            await asyncio.sleep(0.01)
        # The socket stays readable: a loop that did not pause would try again on each of these
        # turns. A paused one waits for its timer (one pause, or two on a stalled machine).
        tried = FailingSocket.attempts
        for _ in range(50):
            await asyncio.sleep(0)
        assert FailingSocket.attempts - tried < 10, f"{FailingSocket.attempts - tried} attempts in 50 turns"
        while FailingSocket.attempts < 3:
            assert time.monotonic() - started < DEADLINE, "the accept loop stopped retrying"
            await asyncio.sleep(0.01)
        lines = [r.getMessage() for r in caplog.records if r.name == "cachebus.http"]
        assert lines == [f"accept failed, accepting paused for {PAUSE} s at a time (EINVAL); more are counted, "
                         "and logged at most every 10 s"]
    finally:
        server.stop()
        client.close()

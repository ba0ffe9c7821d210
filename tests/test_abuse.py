"""Attacks on the credentials, as an attacker on the same host would make them.

A flood of wrong access tokens from one loopback address (127.0.0.2, bound
as the client's source address, so the service sees it as ``remote_ip``)
against a real service while the token's owner clears from 127.0.0.1; a
service stopped with slow verifications queued; token directories that
hold links, a lock file that is a directory, a file nested 500 deep, and a
killed writer's leftovers. These tests check behaviour and exact counts;
how much the flood delays the owner is measured by ``make bench``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from tornado.httpclient import HTTPRequest

from cachebus.service.auth import file as token_file
from cachebus.service.instance import Service
from cachebus.testing import DEADLINE, Cluster, create_token, http, wait_for

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_TYPE = "application/json;charset=UTF-8"
TOO_MANY = (b'{"title":"Too Many Requests","message":"Too many requests; retry after the number of seconds in '
            b'Retry-After","http_status_code":429}')
BAD_REQUEST = b'{"title":"Bad Request","message":"Validation for this particular item failed","http_status_code":400}'
ATTACKER = "127.0.0.2"


def scrape(url: str) -> dict[str, float]:
    status, _, body = http("GET", url + "/metrics")
    assert status == 200, body
    return {name: float(value) for line in body.decode().splitlines() if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]}


def post_from(source: str, port: int, connections: int, requests: int, body: Any) -> list[tuple[int, str, bytes]]:
    """``requests`` POSTs per connection from ``source``, on ``connections`` keep-alive connections at once.

    ``body(i)`` makes the i-th body. Returns (status, Retry-After, body) for each.
    """
    results: list[tuple[int, str, bytes]] = []
    lock = threading.Lock()

    def run(c: int) -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=DEADLINE, source_address=(source, 0))
        try:
            for i in range(requests):
                conn.request("POST", "/api/v1/cache/clear", body(c * requests + i), FORM)
                response = conn.getresponse()
                payload = response.read()
                with lock:
                    results.append((response.status, response.getheader("Retry-After") or "", payload))
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- the bcrypt flood ------------------------------------------------------------------


@pytest.mark.processes
def test_a_flood_from_one_address_is_slowed_and_never_locks_the_owner_out(cluster: Cluster) -> None:
    failures, connections = 5, 4
    cluster.start_service(settings={"api": {"auth": {"failures": failures, "failure_window": 600}}})
    attacker_done = threading.Event()
    flood: list[tuple[int, str, bytes]] = []

    def attack() -> None:
        try:
            flood.extend(post_from(ATTACKER, cluster.port, connections, 50, lambda i: urllib.parse.urlencode(
                {"token": cluster.token, "access_token": f"guess-{i:04d}"})))
        finally:
            attacker_done.set()

    attacker = threading.Thread(target=attack)
    attacker.start()
    owner = []
    try:
        # The owner clears from its own address while the flood runs: the first clear is cold (bcrypt).
        while not attacker_done.is_set() or len(owner) < 20:
            owner.append(cluster.clear()[0])
    finally:
        attacker.join()

    assert owner == [204] * len(owner)
    statuses = [status for status, _, _ in flood]
    assert len(statuses) == connections * 50
    refused = [(retry, body) for status, retry, body in flood if status == 429]
    # A few failures, then 429: verifications under way count as failures to come, so exactly `failures`.
    assert statuses.count(401) == failures
    assert statuses.count(401) + len(refused) == len(statuses)
    assert all(body == TOO_MANY and re.fullmatch(r"[1-9][0-9]*", retry) and int(retry) <= 600
               for retry, body in refused)

    calls = yaml.safe_load((cluster.tokens_dir / cluster.token / "token.yaml").read_text())["calls"]
    assert calls == len(owner)
    m = scrape(cluster.url)
    assert m['cachebus_auth_failures_total{reason="wrong_access_token"}'] == statuses.count(401)
    assert m['cachebus_auth_failures_total{reason="too_many_failures"}'] == len(refused)
    assert m['cachebus_http_requests_total{method="POST",route="/api/v1/cache/clear",status="204"}'] == len(owner)
    assert m['cachebus_http_requests_total{method="POST",route="/api/v1/cache/clear",status="429"}'] == len(refused)
    # The refusals are logged, rate-limited: not one line each.
    assert cluster.service is not None
    lines = [line for line in cluster.service.output().splitlines() if "(too_many_failures)" in line]
    assert 1 <= len(lines) < len(refused) / 10


@pytest.fixture
def overrides() -> dict[str, Any]:
    return {"api.auth.failures": 2}


@pytest.mark.gen_test
async def test_the_429_is_flextypes_shape_with_retry_after(http_client, base_url, credentials, service: Service,
                                                           caplog) -> None:
    token, access = credentials
    caplog.set_level(logging.INFO)

    async def clear(access_token: str, source: str):
        request = HTTPRequest(base_url + "/api/v1/cache/clear", method="POST", headers=FORM,
                              body=urllib.parse.urlencode({"token": token, "access_token": access_token}),
                              network_interface=source)
        return await http_client.fetch(request, raise_error=False)

    assert [(await clear("guess", ATTACKER)).code for _ in range(2)] == [401, 401]
    for _ in range(3):
        response = await clear("guess", ATTACKER)
        assert response.code == 429
        assert response.body == TOO_MANY
        assert response.headers["Content-Type"] == JSON_TYPE
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert (await clear(access, "127.0.0.1")).code == 204
    registry = service.metrics.registry
    assert registry.get_sample_value("cachebus_auth_failures_total", {"reason": "too_many_failures"}) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "cachebus.api" and "429" in r.getMessage()]
    assert warnings == [f"POST /api/v1/cache/clear -> 429 (too_many_failures) from {ATTACKER}"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in logged and "guess" not in logged and access not in logged


# --- stopping with work queued ---------------------------------------------------------


@pytest.mark.processes
def test_sigterm_stops_the_service_whatever_is_queued(cluster: Cluster) -> None:
    # One thread, and a hash at the cost ceiling (about a second each): 40 queued
    # verifications would keep a service that waited for them busy past the deadline.
    slow = "$2y$" + bcrypt.hashpw(b"secret", bcrypt.gensalt(14)).decode()[4:]
    path = cluster.tokens_dir / cluster.token / "token.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "hashed_access_token": slow}))
    service = cluster.start_service(settings={"api": {"max_bcrypt_cost": 14, "auth": {
        "bcrypt_threads": 1, "bcrypt_queue": 100, "per_address": 1, "per_address_queue": 100, "failures": 0}}})
    queued = 40
    sockets = []
    for i in range(queued):
        sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=DEADLINE)
        body = urllib.parse.urlencode({"token": cluster.token, "access_token": f"guess-{i:04d}"}).encode()
        sock.sendall(b"POST /api/v1/cache/clear HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sockets.append(sock)
    # Once one verification has been answered, the service holds the rest in its queue.
    first = wait_for(lambda: next((s for s in sockets if _readable(s)), None), what="the first answer")
    assert _answer(first).startswith(b"HTTP/1.1 401")
    service.signal(15)
    assert service.popen.wait(timeout=DEADLINE) == 0  # raises TimeoutExpired if it hangs
    answers = [_answer(s) for s in sockets if s is not first]
    # Every request got an answer or a closed connection, never a hang; those
    # answered while stopping got 503 with Retry-After.
    stopped = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert stopped and all(b"\r\nRetry-After: 1\r\n" in a for a in stopped)
    assert all(a == b"" or a.startswith((b"HTTP/1.1 503", b"HTTP/1.1 401")) for a in answers), answers
    assert "Traceback" not in service.output()


def _readable(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def _answer(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return b"".join(chunks)


# --- hostile token directories ----------------------------------------------------------


@pytest.mark.gen_test
async def test_a_lock_file_that_is_a_directory_or_a_file_nested_500_deep_is_a_400(http_client, base_url,
                                                                                   tokens_dir: Path) -> None:
    locked_out, _ = create_token(tokens_dir)
    (tokens_dir / locked_out / token_file.LOCK_FILE).unlink()
    (tokens_dir / locked_out / token_file.LOCK_FILE).mkdir()
    nested, access = create_token(tokens_dir)
    path = tokens_dir / nested / "token.yaml"
    path.write_text(path.read_text() + "x: " + "[" * 500 + "]" * 500 + "\n")
    for token in (locked_out, nested):
        response = await http_client.fetch(base_url + "/api/v1/cache/clear", method="POST", headers=FORM,
                                           body=urllib.parse.urlencode({"token": token, "access_token": access}),
                                           raise_error=False)
        assert (response.code, response.body) == (400, BAD_REQUEST), token


@pytest.mark.processes
def test_links_out_of_the_tokens_directory_are_not_followed_nor_written_through(cluster: Cluster,
                                                                                tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    linked, linked_access = create_token(outside)
    (cluster.tokens_dir / linked).symlink_to(outside / linked)  # a linked token directory
    file_token, file_access = create_token(outside)
    (cluster.tokens_dir / file_token).mkdir()
    (cluster.tokens_dir / file_token / "token.yaml").symlink_to(outside / file_token / "token.yaml")
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    cluster.start_service()
    for token, access in ((linked, linked_access), (file_token, file_access)):
        body = urllib.parse.urlencode({"token": token, "access_token": access}).encode()
        status, _, payload = http("POST", cluster.url + "/api/v1/cache/clear", body, FORM)
        assert status == 401 and json.loads(payload)["message"] == "Token is wrong"
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert (cluster.tokens_dir / file_token / "token.yaml").is_symlink()
    assert cluster.clear()[0] == 204  # the real token still works


@pytest.mark.processes
def test_a_killed_writers_temporary_files_are_removed_at_start(cluster: Cluster) -> None:
    directory = cluster.tokens_dir / cluster.token
    stale = directory / ".token.yaml.0123456789abcdef.tmp"
    stale.write_text("half a token file")
    other = directory / "notes.tmp"
    other.write_text("not ours")
    cluster.start_service()
    assert not stale.exists() and other.exists()
    assert cluster.service is not None
    assert "removed 1 temporary token file(s) left by a killed writer" in cluster.service.output()
    assert cluster.clear()[0] == 204
    assert sorted(p.name for p in directory.iterdir()) == [token_file.LOCK_FILE, "notes.tmp", "token.yaml"]

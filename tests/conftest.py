"""Shared fixtures: real services and workers on free loopback ports.

Nothing here mocks a cachebus component. In-process fixtures run the real
Tornado application with real ZeroMQ sockets; :class:`Proc` runs the real
``cachebus`` processes. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq.asyncio

from bench.run import free_port, free_ports
from cachebus.service import token_admin
from cachebus.service.app import Service, make_app
from cachebus.settings import Settings
from cachebus.workers.content import copy_tree, demo_content

ROOT = Path(__file__).resolve().parent.parent

FIXTURES = Path(__file__).resolve().parent / "fixtures"

#: Generous: a loaded 2-core CI machine can be slow, and waits end as soon as
#: their condition holds.
DEADLINE = 30.0




def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """A blocking HTTP call that returns (status, headers, body) for any status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def http_json(url: str) -> Any:
    status, _, body = http("GET", url)
    assert status == 200, (status, body)
    return json.loads(body)


class Proc:
    """A cachebus process started with ``python -m``, its output in a file."""

    def __init__(self, module: str, args: list[str], log_path: Path, cwd: Path = ROOT,
                 prefix: list[str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CACHEBUS_CONFIG", None)
        self.popen = subprocess.Popen([*(prefix or []), sys.executable, "-m", module, *args], cwd=cwd,
                                      stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = DEADLINE) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self._log.close()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()


class Cluster:
    """A service process and any number of worker processes on free ports."""

    def __init__(self, tmp: Path, tokens_dir: Path, content_dir: Path, bus_host: str = "127.0.0.1") -> None:
        self.tmp = tmp
        self.tokens_dir = tokens_dir
        self.content_dir = content_dir
        self.port, publish_port, acks_port = free_ports(3)
        self.publish = f"tcp://{bus_host}:{publish_port}"
        self.acks = f"tcp://{bus_host}:{acks_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.service: Proc | None = None
        self.workers: dict[str, tuple[Proc, str]] = {}
        self.token, self.access_token = create_token(tokens_dir)

    def bus_args(self) -> list[str]:
        return ["--bus-publish", self.publish, "--bus-acks", self.acks]

    def config(self, name: str, settings: dict[str, Any] | None) -> list[str]:
        """``--config FILE`` for nested ``settings``, or nothing."""
        if not settings:
            return []
        path = self.tmp / f"{name}-settings.yaml"
        path.write_text(yaml.safe_dump(settings))
        return ["--config", str(path)]

    def start_service(self, *extra: str, settings: dict[str, Any] | None = None) -> Proc:
        self.service = Proc("cachebus.service", ["--port", str(self.port), "--tokens-dir", str(self.tokens_dir),
                                        *self.bus_args(), *self.config("service", settings), *extra],
                            self.tmp / f"service-{time.monotonic_ns()}.log")
        wait_for(lambda: self._answers(self.url + "/"), what="the service to answer HTTP")
        return self.service

    def start_worker(self, name: str, wait: bool = True, settings: dict[str, Any] | None = None,
                     prefix: list[str] | None = None) -> str:
        port = free_port()
        proc = Proc("cachebus.workers", ["--name", name, "--http-port", str(port), "--content-dir",
                                str(self.content_dir), *self.bus_args(), *self.config(name, settings)],
                    self.tmp / f"{name}.log", prefix=prefix)
        host = (settings or {}).get("worker", {}).get("host", "127.0.0.1")
        url = f"http://{host}:{port}"
        self.workers[name] = (proc, url)
        if wait:
            self.wait_worker_live(name)
        return url

    def wait_worker_live(self, name: str) -> None:
        """Wait until the worker process started as ``name`` is live in the record."""
        pid = self.workers[name][0].pid
        wait_for(lambda: any(w["name"] == name and w["state"] == "live" and w["pid"] == pid
                             for w in self.worker_list()), what=f"worker {name} to join")

    def wait_worker_live_named(self, name: str) -> None:
        """Wait until some worker called ``name`` (an embedded one, say) is live."""
        wait_for(lambda: any(w["name"] == name and w["state"] == "live" for w in self.worker_list()),
                 what=f"worker {name} to join")

    def _answers(self, url: str) -> bool:
        try:
            http("GET", url, timeout=2)
            return True
        except OSError:
            return False

    def creds(self) -> str:
        return urllib.parse.urlencode({"token": self.token, "access_token": self.access_token})

    def clear(self, **extra: Any) -> tuple[int, dict[str, str], bytes]:
        body = urllib.parse.urlencode({"token": self.token, "access_token": self.access_token, **extra})
        return http("POST", self.url + "/api/v1/cache/clear", body.encode(),
                    {"Content-Type": "application/x-www-form-urlencoded"})

    def flood(self, count: int, connections: int = 2) -> None:
        """Publish ``count`` clears as fast as keep-alive connections allow."""
        body = urllib.parse.urlencode({"token": self.token, "access_token": self.access_token})
        failures: list[int] = []

        def run(n: int) -> None:
            conn = HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
            try:
                for _ in range(n):
                    conn.request("POST", "/api/v1/cache/clear", body,
                                 {"Content-Type": "application/x-www-form-urlencoded"})
                    response = conn.getresponse()
                    response.read()
                    if response.status != 204:
                        failures.append(response.status)
            finally:
                conn.close()

        threads = [threading.Thread(target=run, args=(count // connections + (i < count % connections),))
                   for i in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:5]

    def worker_list(self) -> list[dict[str, Any]]:
        try:
            return http_json(f"{self.url}/api/v1/cache/workers?{self.creds()}")["workers"]
        except OSError:
            return []

    def clear_record(self, clear_id: str) -> dict[str, Any]:
        return http_json(f"{self.url}/api/v1/cache/clears/{clear_id}?{self.creds()}")

    def stop(self) -> None:
        for proc, _ in self.workers.values():
            proc.stop()
        if self.service is not None:
            self.service.stop()


class EventStream:
    """A blocking Server-Sent Events client: each event as (id, kind, data)."""

    def __init__(self, cluster: Cluster, last_event_id: str | None = None, rcvbuf: int = 0) -> None:
        self.conn = HTTPConnection("127.0.0.1", cluster.port, timeout=DEADLINE)
        if rcvbuf:
            self.conn.sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=DEADLINE)
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.conn.request("GET", f"/api/v1/cache/events?{cluster.creds()}", headers=headers)
        self.response: HTTPResponse | None = None
        self.last_id: str | None = None

    def open(self) -> HTTPResponse:
        if self.response is None:
            self.response = self.conn.getresponse()
        return self.response

    def next(self) -> tuple[str | None, str, Any] | None:
        """The next event, or None when the server ended the stream."""
        fields: dict[str, str] = {}
        data: list[str] = []
        while True:
            line = self.open().fp.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if data or "event" in fields:
                    if "id" in fields:
                        self.last_id = fields["id"]
                    return fields.get("id"), fields.get("event", "message"), json.loads("\n".join(data))
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(": ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value

    def until(self, predicate: Callable[[str, Any], bool], what: str) -> list[tuple[str | None, str, Any]]:
        """Events up to and including the first that matches ``predicate``."""
        seen = []
        while True:
            event = self.next()
            if event is None:
                raise AssertionError(f"stream ended before {what}; saw {[e[1] for e in seen]}")
            seen.append(event)
            if predicate(event[1], event[2]):
                return seen

    def close(self) -> None:
        self.conn.close()


def create_token(tokens_dir: Path, limit_calls: int = 0) -> tuple[str, str]:
    created = token_admin.create_token(tokens_dir, limit_calls=limit_calls)
    return created.token, created.access_token


@pytest.fixture
def content_dir(tmp_path: Path) -> Path:
    target = tmp_path / "content"
    copy_tree(demo_content(), target)
    return target


@pytest.fixture
def cluster(tmp_path: Path, content_dir: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, tmp_path / "tokens", content_dir)
    yield c
    c.stop()


# --- in-process service, for pytest-tornado's http_server / http_client ----


@pytest.fixture
def tokens_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.mkdir()
    return path


@pytest.fixture
def credentials(tokens_dir: Path) -> tuple[str, str]:
    return create_token(tokens_dir)


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings a test module may override for the in-process service."""
    return {}


@pytest.fixture
def settings(tokens_dir: Path, overrides: dict[str, Any]) -> Settings:
    publish_port, acks_port = free_ports(2)
    return Settings().replace({
        "service.tokens_dir": str(tokens_dir),
        "bus.publish": f"tcp://127.0.0.1:{publish_port}",
        "bus.acks": f"tcp://127.0.0.1:{acks_port}",
        **overrides,
    })


@pytest.fixture
def service(io_loop: Any, settings: Settings) -> Iterator[Service]:
    ctx = zmq.asyncio.Context()
    svc = Service.create(settings, ctx)

    async def start() -> None:
        svc.start()

    io_loop.run_sync(start)
    yield svc
    io_loop.run_sync(svc.stop)
    ctx.term()


@pytest.fixture
def app(service: Service) -> Any:
    return make_app(service)

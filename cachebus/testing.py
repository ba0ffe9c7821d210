"""Run cachebus for real in an embedding application's own tests: processes, ports, tokens, waits.

An application that embeds the subscriber can test it end to end with this kit
(docs/embedding.md, "Testing your own deployment"): :class:`Cluster` starts a
real ``cachebus serve`` (and reference workers) on free loopback ports and says
what a subscriber needs to join it; :func:`wait_for` waits on a condition with a
deadline, never a fixed sleep; :class:`Proc` and :class:`Processes` run the
application's own servers (as tests/test_deployments.py runs gunicorn and
uvicorn). Nothing here mocks a cachebus component. This project's tests and
``make bench`` use the same kit; the helpers only they need live in
tests/support.py, which is not shipped.

Only the standard library and the base install are imported at module level;
:func:`create_token` needs the ``service`` extra (bcrypt) when it is called.
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
from collections.abc import Callable, Sequence
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, TypeVar

import yaml

#: Generous: a loaded 2-core CI machine can be slow, and waits end as soon as
#: their condition holds.
DEADLINE = 30.0

T = TypeVar("T")


# --- ports, waits and HTTP -------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports on ``host`` (held open together, so none repeats)."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def wait_for(condition: Callable[[], T | None], timeout: float = DEADLINE, what: str = "condition",
             check: Callable[[], None] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises :class:`AssertionError` naming ``what`` at the deadline. ``check`` runs
    between polls and may raise to fail early, as when a child process died.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = condition()
        if result:
            return result
        if check is not None:
            check()
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
    """GET ``url``, which must answer 200, and parse its JSON body."""
    status, _, body = http("GET", url)
    if status != 200:
        raise AssertionError(f"GET {url.split('?')[0]} answered {status}: {body[:200]!r}")
    return json.loads(body)


def answers(url: str) -> bool:
    """Whether anything answers HTTP at ``url`` (any status)."""
    try:
        http("GET", url, timeout=2)
        return True
    except OSError:
        return False


# --- processes ---------------------------------------------------------------------


class Proc:
    """A child process, its output appended to ``log_path``."""

    def __init__(self, command: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # The child reads the settings it is given, not whatever this shell points at.
        env.pop("CACHEBUS_CONFIG", None)
        self.popen = subprocess.Popen(command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @classmethod
    def python(cls, module: str, args: list[str], log_path: Path, cwd: Path | None = None,
               prefix: list[str] | None = None) -> Proc:
        """``python -m module args…`` with this interpreter, behind an optional ``prefix`` (``ip netns exec …``)."""
        return cls([*(prefix or []), sys.executable, "-m", module, *args], log_path, cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = DEADLINE) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit status."""
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
        self._log.close()


class Processes:
    """Child processes started for one measurement or test, each logging to ``<logs>/<name>.log``."""

    def __init__(self, logs: Path, cwd: Path | None = None) -> None:
        self.logs = logs
        self.cwd = cwd
        self.children: list[Proc] = []

    def start(self, name: str, command: list[str]) -> Proc:
        child = Proc(command, self.logs / f"{name}.log", self.cwd)
        self.children.append(child)
        return child

    def python(self, name: str, module: str, *args: str) -> Proc:
        return self.start(name, [sys.executable, "-m", module, *args])

    def check(self) -> None:
        """Fail at once if a child died, instead of waiting out a deadline (a ``check`` for :func:`wait_for`)."""
        for child in self.children:
            if not child.alive():
                command = " ".join(map(str, child.popen.args[:4]))  # type: ignore[index]
                raise RuntimeError(f"{command} exited with {child.popen.returncode}; see {child.log_path}")

    def stop(self) -> None:
        for child in self.children:
            child.signal(signal.SIGTERM)
        for child in self.children:
            child.stop(timeout=10)
        self.children = []


# --- tokens ------------------------------------------------------------------------


def create_token(tokens_dir: Path, limit_calls: int = 0) -> tuple[str, str]:
    """A new enabled token in ``tokens_dir``: ``(token, access_token)``. Needs the service extra."""
    from cachebus.service.auth import admin as token_admin

    created = token_admin.create_token(tokens_dir, limit_calls=limit_calls)
    return created.token, created.access_token


# --- a whole deployment on loopback ------------------------------------------------


class Cluster:
    """A ``cachebus serve`` process and any number of reference workers, on free ports.

    The ports are chosen once, so a restarted service comes back where its
    workers expect it. ``cwd`` is where the processes start (settings paths
    are relative to it). The bus keys live in ``<tmp>/keys`` (never in the
    repository's ``var/``); ``bus`` holds ``bus.*`` settings for the service
    and every worker alike, such as ``{"key": "…"}`` for the HMAC mode or
    ``{"insecure": True}``.
    """

    def __init__(self, tmp: Path, tokens_dir: Path, content_dir: Path, bus_host: str = "127.0.0.1",
                 cwd: Path | None = None, bus: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.tokens_dir = tokens_dir
        self.content_dir = content_dir
        self.cwd = cwd
        self.bus = dict(bus or {})
        self.keys_dir = tmp / "keys"
        self.port, publish_port, acks_port = free_ports(3)
        self.publish = f"tcp://{bus_host}:{publish_port}"
        self.acks = f"tcp://{bus_host}:{acks_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.service: Proc | None = None
        self.workers: dict[str, tuple[Proc, str]] = {}
        self.token, self.access_token = create_token(tokens_dir)

    def bus_args(self) -> list[str]:
        return ["--bus-publish", self.publish, "--bus-acks", self.acks, "--keys-dir", str(self.keys_dir)]

    def subscriber_options(self) -> dict[str, Any]:
        """What an embedded :class:`~cachebus.workers.subscriber.Subscriber` needs to join this cluster."""
        return {"publish": self.publish, "acks": self.acks, "keys_dir": self.keys_dir,
                "key": self.bus.get("key", ""), "insecure": self.bus.get("insecure", False)}

    def config(self, name: str, settings: dict[str, Any] | None) -> list[str]:
        """``--config FILE`` for nested ``settings`` (with the cluster's ``bus`` settings), or nothing."""
        merged = dict(settings or {})
        if self.bus:
            merged["bus"] = {**self.bus, **merged.get("bus", {})}
        if not merged:
            return []
        path = self.tmp / f"{name}-settings.yaml"
        path.write_text(yaml.safe_dump(merged))
        return ["--config", str(path)]

    def start_service(self, *extra: str, settings: dict[str, Any] | None = None,
                      prefix: list[str] | None = None) -> Proc:
        """Start (or restart) the service, behind an optional ``prefix`` (``prlimit …``); returns once it
        answers HTTP."""
        service = Proc.python("cachebus.service", ["--port", str(self.port), "--tokens-dir", str(self.tokens_dir),
                                                   *self.bus_args(), *self.config("service", settings), *extra],
                              self.tmp / f"service-{time.monotonic_ns()}.log", self.cwd, prefix=prefix)
        self.service = service

        def died() -> None:
            if not service.alive():
                raise AssertionError(f"the service exited with {service.popen.returncode}:\n{service.output()}")

        wait_for(lambda: answers(self.url + "/"), what="the service to answer HTTP", check=died)
        return service

    def start_worker(self, name: str, wait: bool = True, settings: dict[str, Any] | None = None,
                     prefix: list[str] | None = None, args: Sequence[str] = ()) -> str:
        """Start a reference worker called ``name``; returns its read API's URL.

        ``args`` go last on its command line, so they override the cluster's flags
        (``("--bus-acks", endpoint)`` to route its back channel through a proxy, say).
        """
        running = self.workers.get(name)
        if running is not None and running[0].alive():
            # Workers are kept by name here: a second one would never be stopped. Many processes may
            # share a name on the bus; start them as embedded subscribers (subscriber_options()).
            raise ValueError(f"a worker named {name} is still running in this cluster")
        port = free_port()
        proc = Proc.python("cachebus.workers", ["--name", name, "--http-port", str(port), "--content-dir",
                                                str(self.content_dir), *self.bus_args(), *self.config(name, settings),
                                                *args],
                           self.tmp / f"{name}.log", self.cwd, prefix=prefix)
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

    def creds(self) -> str:
        return urllib.parse.urlencode({"token": self.token, "access_token": self.access_token})

    def clear(self, **extra: Any) -> tuple[int, dict[str, str], bytes]:
        """The Flextype clear call, with ``extra`` parameters (``wait="all"``)."""
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
        if failures:
            raise AssertionError(f"{len(failures)} clears failed: {failures[:5]}")

    def worker_list(self) -> list[dict[str, Any]]:
        """``GET /api/v1/cache/workers``; empty while the service does not answer."""
        try:
            return list(http_json(f"{self.url}/api/v1/cache/workers?{self.creds()}")["workers"])
        except OSError:
            return []

    def live_workers(self) -> int:
        return sum(w["state"] == "live" for w in self.worker_list())

    def clear_record(self, clear_id: str) -> dict[str, Any]:
        return dict(http_json(f"{self.url}/api/v1/cache/clears/{clear_id}?{self.creds()}"))

    def wait_all_acked(self, clear_id: str, names: set[str]) -> dict[str, Any]:
        """The clear's record once every worker in ``names`` has acked it."""
        def acked() -> dict[str, Any] | None:
            record = self.clear_record(clear_id)
            return record if {a["name"] for a in record["acks"]} >= names else None
        return wait_for(acked, what=f"acks from {sorted(names)}")

    def stop(self) -> None:
        for proc, _ in self.workers.values():
            proc.stop()
        if self.service is not None:
            self.service.stop()



"""Fixtures: real services and workers on free loopback ports.

Nothing here mocks a cachebus component. In-process fixtures run the real
Tornado application with real ZeroMQ sockets; the ``cluster`` fixture runs the
real ``cachebus`` processes. The helpers the tests call live in
:mod:`cachebus.testing` (processes, waits, HTTP, a whole Cluster: the kit shipped for
embedders' own tests, shared with the benchmark) and in tests/support.py (this
suite's own).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from cachebus.service.app import make_app, make_server
from cachebus.service.instance import Service
from cachebus.settings import Settings
from cachebus.testing import Cluster, create_token, free_ports

from .played import PlayedService
from .support import copy_demo_content

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def content_dir(tmp_path: Path) -> Path:
    return copy_demo_content(tmp_path / "content")


@pytest.fixture
def cluster(tmp_path: Path, content_dir: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, tmp_path / "tokens", content_dir, cwd=ROOT)
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
def settings(tmp_path: Path, tokens_dir: Path, overrides: dict[str, Any]) -> Settings:
    publish_port, acks_port = free_ports(2)
    return Settings().replace({
        "service.tokens_dir": str(tokens_dir),
        "bus.publish": f"tcp://127.0.0.1:{publish_port}",
        "bus.acks": f"tcp://127.0.0.1:{acks_port}",
        # Never the repository's var/keys.
        "bus.keys_dir": str(tmp_path / "keys"),
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


@pytest.fixture
def http_server(request: Any, io_loop: Any, app: Any, service: Service, _unused_port: Any) -> Iterator[Any]:
    """pytest-tornado's server fixture, but the server ``cachebus serve`` runs: with the ``http.*`` limits."""
    server = make_server(service, app)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=request.config.option.async_test_timeout)


@pytest.fixture
def played() -> Iterator[PlayedService]:
    """A service the test plays with its own PUB and ROUTER (tests/played.py)."""
    service = PlayedService()
    yield service
    service.close()


# --- markers that stay true ---------------------------------------------------------------

#: Process starts seen so far (Python's audit events): (marker the test must carry, command).
_started: list[tuple[str, str]] = []
_SPAWNS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in _SPAWNS:
        return
    argv = [str(a) for a in args[1]] if event == "subprocess.Popen" and isinstance(args[1], list | tuple) else []
    command = " ".join(argv) or event
    _started.append(("processes", command))
    if argv[:3] == ["ip", "netns", "add"]:
        _started.append(("netns", command))
    if argv and Path(argv[0]).name.startswith(("chromium", "chrome", "google-chrome")):
        _started.append(("browser", command))


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _marked_as_what_it_starts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that starts a process (or a namespace, or Chromium) without the marker saying
    so: `make test-fast` leaves out exactly the marked ones (pytest.ini)."""
    before = len(_started)
    yield
    missing = {(marker, command) for marker, command in _started[before:]
               if request.node.get_closest_marker(marker) is None}
    if missing:
        marker, command = min(missing)
        pytest.fail(f"started {command[:120]!r} without @pytest.mark.{marker}", pytrace=False)

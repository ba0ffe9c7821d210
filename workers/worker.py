"""The reference worker: a small replica of a content API with an in-memory cache.

``GET /entries/<id>`` serves ``<content_dir>/<id>/entry.yaml`` as JSON through
the cache, with ``X-Cache: HIT`` or ``MISS``; ``GET /stats`` shows the cache
and bus state, ``GET /metrics`` the same counters for Prometheus. Edit an entry
and the worker keeps serving the old value until the service publishes a clear.

With ``worker.purge_dirs`` (``--purge-dir``), each clear also empties those
directories of cache files, as Flextype's own clear empties its ``var/tmp``
(:class:`~cachebus.workers.directory.DirectoryTarget`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import tornado.web

from cachebus.bus.security import SERVICE_KEY, BusMode
from cachebus.flextype_errors import CONTENT_TYPE
from cachebus.metrics import MetricsHandler
from cachebus.settings import Settings, SettingsError

from .cache import Cache
from .content import EntryError, load_entry
from .directory import DirectoryTarget
from .metrics import worker_registry
from .options import subscriber_options
from .subscriber import Subscriber

log = logging.getLogger("cachebus.worker")

_MISSING = object()


class WorkerHandler(tornado.web.RequestHandler):
    def initialize(self, cache: Cache, subscriber: Subscriber, content_dir: Path) -> None:
        self.cache = cache
        self.subscriber = subscriber
        self.content_dir = content_dir

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(json.dumps(data, separators=(",", ":"), default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.write_json({"error": self._reason, "status": status_code}, status_code)


class EntryHandler(WorkerHandler):
    """``GET /entries/<id>``: the entry's fields, from the cache when it has them."""

    async def get(self, entry_id: str) -> None:
        entry = self.cache.get(entry_id, _MISSING)
        if entry is not _MISSING:
            self.set_header("X-Cache", "HIT")
            self.write_json(entry)
            return
        generation = self.cache.generation
        try:
            entry = await asyncio.get_running_loop().run_in_executor(
                None, load_entry, self.content_dir, entry_id)
        except EntryError as exc:
            self.set_header("X-Cache", "MISS")
            self.write_json({"error": str(exc), "id": entry_id}, exc.status)
            return
        # A clear that ran while the file was read must win over what was read.
        self.cache.set(entry_id, entry, generation=generation)
        self.set_header("X-Cache", "MISS")
        self.write_json(entry)


class StatsHandler(WorkerHandler):
    """``GET /stats``: cache counters and where this worker stands on the bus."""

    def get(self) -> None:
        sub = self.subscriber
        self.write_json({
            "name": sub.name,
            "instance": sub.instance,
            "cache": self.cache.stats(),
            "bus": {"epoch": sub.epoch, "seq": sub.seq, "synced": sub.synced, "trusted": sub.trusted,
                    "purges": sub.purges, "last_purge_cause": sub.last_cause},
        })


def make_app(cache: Cache, subscriber: Subscriber, content_dir: Path, settings: Settings) -> tornado.web.Application:
    args = {"cache": cache, "subscriber": subscriber, "content_dir": content_dir}
    metrics = {"registry": worker_registry(cache, subscriber), "settings": settings.metrics,
               "listen_host": settings.worker.host}
    return tornado.web.Application([
        (r"/entries/(.+)", EntryHandler, args),
        (r"/stats", StatsHandler, args),
        (r"/metrics", MetricsHandler, metrics),
    ])


async def _wait_for_file(path: Path, stop: asyncio.Event) -> None:
    """Return once ``path`` exists or ``stop`` is set, saying once what is awaited."""
    if path.exists():
        return
    log.info("waiting for the service's public key %s (the service writes it on its first start; "
             "for a worker on another host, copy it there)", path)
    while not path.exists() and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def purge_dirs(settings: Settings) -> list[DirectoryTarget]:
    """A target for each of ``worker.purge_dirs``; a :class:`SettingsError` naming the key for one refused."""
    targets = []
    for path in settings.worker.purge_dirs:
        try:
            targets.append(DirectoryTarget(path))
        except ValueError as exc:
            raise SettingsError(f"worker.purge_dirs: {exc}") from None
    return targets


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run a reference worker until ``stop`` is set."""
    cfg = settings.worker
    content_dir = Path(cfg.content_dir)
    # First: a directory refused stops the worker before it joins the bus.
    directories = purge_dirs(settings)
    cache = Cache(max_entries=cfg.cache_max_entries, ttl=cfg.cache_ttl or None)
    bus = settings.bus
    # The options an embedder's Subscriber.from_settings reads, from the same settings. No environment:
    # the command-line flags are already in `settings`, and a variable must not override them. Unnamed:
    # the host name, a label (and a keypair) every unnamed worker on this host shares; the service tells
    # the processes apart by their instance. The lease terms come from the service.
    subscriber = Subscriber([cache, *directories], subscriber_options(
        settings,
        environ={},
        endpoint=f"http://{cfg.host}:{cfg.http_port}",
    ))
    server = make_app(cache, subscriber, content_dir, settings).listen(cfg.http_port, address=cfg.host)
    try:
        if bus.mode is BusMode.CURVE:
            # `make run` starts the service and its workers at once: wait for the key the service writes.
            await _wait_for_file(Path(bus.keys_dir) / f"{SERVICE_KEY}.key", stop)
        if not stop.is_set():
            await subscriber.start()
            log.info("worker %s serving %s on http://%s:%d", subscriber.name, content_dir, cfg.host, cfg.http_port)
            for directory in directories:
                log.info("worker %s empties %s on every clear", subscriber.name, directory.path)
        await stop.wait()
    finally:
        server.stop()
        await subscriber.stop()
        log.info("worker %s stopped", subscriber.name)

"""A tiny WSGI app whose processes each hold a cachebus :class:`~cachebus.Cache`.

Run it under gunicorn with the hooks in ``gunicorn.conf.py`` beside it::

    CACHEBUS_NAME=web gunicorn -w 3 -c gunicorn.conf.py wsgi_app:app

The cache is a plain object and may exist before gunicorn forks (``--preload``
makes it so); the subscriber may not, because its sockets and its thread would
not survive the fork. So this module only *offers* :func:`start_subscriber`, and
gunicorn's ``post_fork`` hook calls it in each worker process.

The bus settings come from ``from_settings``: the environment
(``CACHEBUS_PUBLISH``, ``CACHEBUS_ACKS``, ``CACHEBUS_KEYS_DIR``, ``CACHEBUS_KEY``,
``CACHEBUS_INSECURE``, ``CACHEBUS_NAME``, …), else the service's settings file
named by ``CACHEBUS_CONFIG``, else the defaults. Every process of this app
shares the one name (``web`` above); the service tells the processes apart.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from cachebus import Cache, ThreadedSubscriber

#: Hot entries each process loads once it is in sync with the bus.
WARM_ENTRIES = 5

cache = Cache(max_entries=10_000)
subscriber: ThreadedSubscriber | None = None


def start_subscriber() -> None:
    """Join the bus from this process: call it once per process, after the fork."""
    global subscriber
    subscriber = ThreadedSubscriber.from_settings([cache])
    subscriber.start()
    threading.Thread(target=warm, args=(subscriber,), name="warm-cache", daemon=True).start()


def stop_subscriber() -> None:
    """Say bye to the service, so that it stops expecting this process at once."""
    if subscriber is not None:
        subscriber.stop()


def warm(joined: ThreadedSubscriber) -> None:
    """Load the hot entries once the bus is in sync: the cache keeps nothing before
    (its first sync purges it), so warming earlier would be lost."""
    if joined.wait_synced():
        cache.set_many((f"page-{n}", f"page {n}, rendered by process {os.getpid()}") for n in range(WARM_ENTRIES))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Every path: this process's id and cache size, as JSON."""
    body = json.dumps({"pid": os.getpid(), "entries": len(cache)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

"""A tiny ASGI app whose processes each hold a cachebus :class:`~cachebus.Cache`.

Run it with any number of uvicorn workers::

    CACHEBUS_NAME=api uvicorn asgi_app:app --workers 2

Each worker process runs the app's lifespan, and the lifespan starts the
:class:`~cachebus.Subscriber` on that process's running event loop, so every
process joins the bus on its own. The bus settings come from the same
``CACHEBUS_*`` variables as in ``wsgi_app.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from cachebus import Cache, Subscriber

#: Hot entries each process loads once it is in sync with the bus.
WARM_ENTRIES = 5

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

cache = Cache(max_entries=10_000)


async def warm(subscriber: Subscriber) -> None:
    """Load the hot entries once the bus is in sync (before, the cache keeps nothing)."""
    if await subscriber.wait_synced():
        cache.set_many((f"page-{n}", f"page {n}, rendered by process {os.getpid()}") for n in range(WARM_ENTRIES))


async def lifespan(receive: Receive, send: Send) -> None:
    message = await receive()
    assert message["type"] == "lifespan.startup"
    subscriber = Subscriber.from_settings([cache])
    await subscriber.start()
    warming = asyncio.create_task(warm(subscriber))
    await send({"type": "lifespan.startup.complete"})
    await receive()  # lifespan.shutdown
    warming.cancel()
    await subscriber.stop()
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Every path: this process's id and cache size, as JSON."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = json.dumps({"pid": os.getpid(), "entries": len(cache)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

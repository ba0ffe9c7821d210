"""What teams build instead of cachebus, doing the same job for the benchmark.

Each peer is an HTTP service with ``POST /clear`` that fans a clear out to N
worker processes, each purging a full :class:`~bench.worker.FullCache`, and
answers once all of them acknowledged:

* **redis**: publish on a Redis channel; workers purge and publish their ack
  on another channel, which the service reads with one subscriber connection.
  hiredis parses replies, and the service uses the asyncio client: the
  fastest honest setup we know.
* **http**: the service POSTs to every worker's ``/purge`` concurrently and
  waits for all of them.

Neither checks a token or writes anything durable; cachebus does both.

``python -m bench.peers service redis|http PORT ARGS...`` runs a peer service,
``python -m bench.peers worker redis|http NAME ARGS...`` one of its workers.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import tornado.httpclient
import tornado.web

from .worker import FullCache

CLEAR_CHANNEL = "cachebus-bench:clear"
ACK_CHANNEL = "cachebus-bench:acks"


class ClearHandler(tornado.web.RequestHandler):
    def initialize(self, fan_out) -> None:
        self.fan_out = fan_out

    async def post(self) -> None:
        await self.fan_out()
        self.write(b"{}")


def serve(fan_out, port: int) -> None:
    tornado.web.Application([(r"/clear", ClearHandler, {"fan_out": fan_out})],
                            log_function=lambda handler: None).listen(port, "127.0.0.1")


# --- Redis -------------------------------------------------------------------


async def redis_service(port: int, redis_port: int, workers: int) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=redis_port)
    pubsub = client.pubsub()
    await pubsub.subscribe(ACK_CHANNEL)
    waiting: dict[str, tuple[asyncio.Future[None], list[int]]] = {}
    ids = itertools.count()

    async def read_acks() -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            entry = waiting.get(message["data"].decode())
            if entry is not None:
                entry[1][0] += 1
                if entry[1][0] == workers and not entry[0].done():
                    entry[0].set_result(None)

    async def fan_out() -> None:
        clear_id = str(next(ids))
        done = asyncio.get_running_loop().create_future()
        waiting[clear_id] = (done, [0])
        try:
            await client.publish(CLEAR_CHANNEL, clear_id)
            await done
        finally:
            del waiting[clear_id]

    reader = asyncio.create_task(read_acks())
    serve(fan_out, port)
    await reader


def redis_worker(redis_port: int, entries: int) -> None:
    import redis

    client = redis.Redis(port=redis_port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CLEAR_CHANNEL)
    cache = FullCache(entries)
    for message in pubsub.listen():
        cache.clear_now()
        client.publish(ACK_CHANNEL, message["data"])
        cache.refill()


# --- naive HTTP fan-out --------------------------------------------------------


async def http_service(port: int, worker_urls: list[str]) -> None:
    client = tornado.httpclient.AsyncHTTPClient(max_clients=max(10, len(worker_urls)))

    async def fan_out() -> None:
        await asyncio.gather(*(client.fetch(url, method="POST", body=b"") for url in worker_urls))

    serve(fan_out, port)
    await asyncio.Event().wait()


class PurgeHandler(tornado.web.RequestHandler):
    def initialize(self, cache: FullCache) -> None:
        self.cache = cache

    def post(self) -> None:
        self.cache.clear_now()
        self.write(b"{}")
        asyncio.get_running_loop().call_soon(self.cache.refill)


async def http_worker(port: int, entries: int) -> None:
    tornado.web.Application([(r"/purge", PurgeHandler, {"cache": FullCache(entries)})],
                            log_function=lambda handler: None).listen(port, "127.0.0.1")
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    role, kind, *args = argv
    if (role, kind) == ("service", "redis"):
        asyncio.run(redis_service(int(args[0]), int(args[1]), int(args[2])))
    elif (role, kind) == ("service", "http"):
        asyncio.run(http_service(int(args[0]), args[1].split(",")))
    elif (role, kind) == ("worker", "redis"):
        redis_worker(int(args[0]), int(args[1]))
    elif (role, kind) == ("worker", "http"):
        asyncio.run(http_worker(int(args[0]), int(args[1])))
    else:
        raise SystemExit(f"unknown peer {role} {kind}")


if __name__ == "__main__":
    main(sys.argv[1:])

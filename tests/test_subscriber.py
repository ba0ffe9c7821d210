"""Embedding the subscriber in a Python process: the thread flavour and the asyncio flavour."""

from __future__ import annotations

import asyncio

from cachebus.testing import DEADLINE, Cluster, wait_for
from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import Subscriber, ThreadedSubscriber


def test_threaded_subscriber_purges_an_embedded_cache_and_acks(cluster: Cluster):
    cluster.start_service()
    cache = Cache()
    subscriber = ThreadedSubscriber([cache], name="wsgi-app", **cluster.subscriber_options())
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("wsgi-app")
        cache.set("page:/", "<html>old</html>")
        status, headers, _ = cluster.clear()
        assert status == 204
        record = cluster.wait_all_acked(headers["Cache-Clear-Id"], {"wsgi-app"})
        assert record["acks"][0]["entries_dropped"] == 1
        assert cache.get("page:/") is None
        assert cache.stats()["last_clear_id"] == headers["Cache-Clear-Id"]
    finally:
        subscriber.stop()
    wait_for(lambda: {w["name"]: w["state"] for w in cluster.worker_list()}["wsgi-app"] == "left",
             what="the stopped subscriber to leave")


def test_asyncio_subscriber_with_several_targets(cluster: Cluster):
    cluster.start_service()
    pages, fragments = Cache(), Cache()

    async def main() -> None:
        async with Subscriber([pages, fragments], name="async-app",
                              **cluster.subscriber_options()) as subscriber:
            assert await subscriber.wait_synced(DEADLINE)
            await asyncio.to_thread(cluster.wait_worker_live_named, "async-app")
            pages.set("a", 1)
            fragments.set("b", 2)
            fragments.set("c", 3)
            _, headers, _ = await asyncio.to_thread(cluster.clear)
            record = await asyncio.to_thread(cluster.wait_all_acked, headers["Cache-Clear-Id"], {"async-app"})
            assert record["acks"][0]["entries_dropped"] == 3
            assert len(pages) == len(fragments) == 0

    asyncio.run(main())

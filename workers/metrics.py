"""The reference worker's Prometheus metrics: its cache's counters, its purges by cause, failed purges,
and time served degraded.

Read from the cache and the subscriber when scraped, so serving reads costs
nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .cache import Cache
from .subscriber import Subscriber


class _CacheCollector(Collector):
    def __init__(self, cache: Cache, subscriber: Subscriber) -> None:
        self.cache = cache
        self.subscriber = subscriber

    def collect(self) -> Iterator[Metric]:
        stats = self.cache.stats()
        yield CounterMetricFamily("cachebus_cache_hits", "Cache lookups that hit", value=stats["hits"])
        yield CounterMetricFamily("cachebus_cache_misses", "Cache lookups that missed", value=stats["misses"])
        yield GaugeMetricFamily("cachebus_cache_entries", "Entries in the cache", value=stats["entries"])
        yield CounterMetricFamily("cachebus_cache_purges", "Times the cache was emptied", value=stats["purges"])
        yield CounterMetricFamily("cachebus_cache_bypass_seconds",
                                  "Time the cache was bypassed: no lease, or bypass turned on",
                                  value=stats["bypass_seconds"])
        purges = CounterMetricFamily("cachebus_worker_purges", "Purges this worker performed, by cause",
                                     labels=["cause"])
        for cause, count in sorted(self.subscriber.purges_by_cause.items()):
            purges.add_metric([cause.value], count)
        yield purges
        yield CounterMetricFamily("cachebus_worker_purge_failures",
                                  "Purge target clears that raised, in purges and in retries",
                                  value=self.subscriber.purge_failures)
        yield GaugeMetricFamily("cachebus_worker_failing_targets",
                                "Purge targets whose last clear raised; retried on every command and heartbeat",
                                value=len(self.subscriber.failing))
        yield GaugeMetricFamily("cachebus_worker_degraded",
                                "1 while the caches serve without the bound: no service heard for a lease, "
                                "and bus.on_silence is serve",
                                value=int(self.subscriber.degraded))
        yield CounterMetricFamily("cachebus_worker_degraded_seconds",
                                  "Time the caches served without the bound (bus.on_silence: serve)",
                                  value=self.subscriber.degraded_seconds)


def worker_registry(cache: Cache, subscriber: Subscriber) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_CacheCollector(cache, subscriber))
    return registry

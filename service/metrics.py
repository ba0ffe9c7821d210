"""The service's Prometheus metrics, fed by the event log and the HTTP layer.

Counters move as events happen (:meth:`ServiceMetrics.observe` is an
:class:`~cachebus.service.events.EventLog` listener); the numbers of workers by state
and of event stream clients are read from the record when scraped. This module
observes and does not serve: ``GET /metrics`` is
:class:`~cachebus.service.pages.ServiceMetricsHandler`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachebus.bus.protocol import Ack, PurgeCause, PurgeOutcome

from .events import ClearAcked, ClearCompleted, ClearPublished, Event, EventLog, WorkerPurged, WorkerStateChanged
from .limits import TIMED_PHASES, Phase, Refusal
from .record import Record
from .views import AckView, WorkerState

#: Seconds; from a loopback millisecond to a worker that took half a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _StateCollector(Collector):
    """Gauges read at scrape time: workers by state, stream clients, dropped clients."""

    def __init__(self, record: Record, events: EventLog) -> None:
        self.record = record
        self.events = events
        #: Whether this instance holds the lead (docs/scale-out.md); set by the service.
        self.leading: Callable[[], bool] = lambda: True

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("cachebus_service_leading", "1 while this instance holds the lead and publishes; "
                                "0 while it passes requests and workers' messages to the one that does",
                                value=int(self.leading()))
        workers = GaugeMetricFamily("cachebus_workers", "Worker processes the record knows, by state",
                                    labels=["state"])
        by_name = GaugeMetricFamily("cachebus_worker_processes", "Worker processes the record knows, by name and "
                                    "state", labels=["name", "state"])
        known = self.record.workers()
        counts = collections.Counter(worker.state for worker in known)
        for state in WorkerState:
            if state != WorkerState.FORGOTTEN:  # a forgotten worker is no longer in the record
                workers.add_metric([state.value], counts[state])
        for (name, state_name), count in sorted(collections.Counter((w.name, w.state.value) for w in known).items()):
            by_name.add_metric([name, state_name], count)
        degraded = GaugeMetricFamily("cachebus_worker_processes_degraded", "Worker processes whose caches may "
                                     "serve without the bound (bus.on_silence: serve, and silent), by name",
                                     labels=["name"])
        for name, count in sorted(collections.Counter(w.name for w in known if w.degraded).items()):
            degraded.add_metric([name], count)
        yield workers
        yield by_name
        yield degraded
        yield GaugeMetricFamily("cachebus_event_stream_clients", "Open event streams", value=self.events.clients)
        yield CounterMetricFamily("cachebus_event_stream_dropped", "Event stream clients dropped for falling behind",
                                  value=self.events.dropped_clients)


class ServiceMetrics:
    """Every metric the service reports, in a registry of its own."""

    def __init__(self, record: Record, events: EventLog) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.clears_published = Counter("cachebus_clears_published", "Clears published on the bus", registry=r)
        self.clears_completed = Counter("cachebus_clears_completed",
                                        "Clears that every expected worker acked, or that timed out",
                                        ["outcome"], registry=r)
        self.acks_received = Counter("cachebus_acks_received", "Acks received from workers", registry=r)
        self.ack_latency = Histogram("cachebus_ack_latency_seconds",
                                     "Publish to one worker process's successful ack, per clear, by worker name",
                                     ["name"], buckets=LATENCY_BUCKETS, registry=r)
        self.all_acked = Histogram("cachebus_clear_all_acked_seconds", "Publish to the last expected ack",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.purges = Counter("cachebus_worker_purges", "Purges workers reported, by cause", ["cause"], registry=r)
        self.failed_purges = Counter("cachebus_worker_purges_failed",
                                     "Purges workers reported as failed (a target raised), by worker name",
                                     ["name"], registry=r)
        self.auth_failures = Counter("cachebus_auth_failures", "Requests refused by authentication, by reason",
                                     ["reason"], registry=r)
        self.http_requests = Counter("cachebus_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_connections_refused = Counter(
            "cachebus_http_connections_refused",
            "Connections closed as soon as accepted: http.max_connections open (limit), or no file descriptor "
            "left (descriptors)", ["reason"], registry=r)
        self.http_connections_timed_out = Counter(
            "cachebus_http_connections_timed_out",
            "Connections closed for taking too long: to send headers (header), a body (body), or a next request "
            "(idle)", ["phase"], registry=r)
        for refusal in Refusal:  # every series from the start, at 0
            self.http_connections_refused.labels(refusal.value)
        for phase in TIMED_PHASES:
            self.http_connections_timed_out.labels(phase.value)
        self.record = record
        #: Children of labelled metrics looked up once, since every ack updates them.
        self._latency_by_name: dict[str, Any] = {}
        self._purges_by_cause = {cause: self.purges.labels(cause.value) for cause in PurgeCause}
        #: Scrape-time gauges; the service tells it whether this instance leads.
        self.state = _StateCollector(record, events)
        r.register(self.state)
        events.listeners.append(self.observe)

    def connection_refused(self, why: Refusal) -> None:
        """The HTTP server closed a connection as soon as it accepted it."""
        self.http_connections_refused.labels(why.value).inc()

    def connection_timed_out(self, phase: Phase) -> None:
        """The HTTP server closed a connection for taking too long in ``phase``."""
        self.http_connections_timed_out.labels(phase.value).inc()

    def observe(self, event: Event) -> None:
        match event.payload:
            case ClearPublished():
                self.clears_published.inc()
            case ClearAcked(ack=AckView(name=name, latency_ms=latency_ms, outcome=PurgeOutcome.OK)):
                latency = self._latency_by_name.get(name)
                if latency is None:  # labels() takes a lock and builds a key: once per name, not per ack
                    latency = self._latency_by_name[name] = self.ack_latency.labels(name)
                latency.observe(latency_ms / 1000)
            case ClearCompleted(complete=complete, expected=expected, duration_ms=duration_ms):
                self.clears_completed.labels("complete" if complete else "timeout" if expected else "empty").inc()
                if complete and duration_ms is not None:
                    self.all_acked.observe(duration_ms / 1000)
            case WorkerPurged(ack=Ack(cause=cause, outcome=outcome, name=name)):
                self.acks_received.inc()
                self._purges_by_cause[cause].inc()
                if outcome is PurgeOutcome.FAILED:
                    self.failed_purges.labels(name).inc()
            case WorkerStateChanged(name=name, state=WorkerState.FORGOTTEN):
                # Series are per name, which many processes share: drop them with the last one.
                if not any(worker.name == name for worker in self.record.workers()):
                    self._latency_by_name.pop(name, None)
                    for metric in (self.ack_latency, self.failed_purges):
                        try:
                            metric.remove(name)
                        except KeyError:
                            pass


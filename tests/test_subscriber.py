"""Embedding the subscriber in a Python process: the thread flavour and the asyncio flavour.

Real services and sockets throughout. Where a test must see every ack a
subscriber sends (a failed one, and the retry's), the test plays the service
with its own PUB and ROUTER sockets (:class:`PlayedService`), as
tests/test_fanout.py does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import socket
import threading
from collections import UserDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import cachetools
import pytest
import zmq
from prometheus_client import generate_latest

from cachebus.bus.protocol import (
    Ack,
    Hello,
    Message,
    OnSilence,
    PurgeCause,
    PurgeOutcome,
    WorkerHeartbeat,
)
from cachebus.testing import DEADLINE, Cluster, free_ports, wait_for
from cachebus.workers.cache import Cache
from cachebus.workers.metrics import worker_registry
from cachebus.workers.subscriber import ForkedSubscriberError, Subscriber, ThreadedSubscriber

from .played import Flaky, PlayedService

M = TypeVar("M", bound=Message)


@pytest.mark.processes
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


@pytest.mark.processes
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


# --- any cache library is a target --------------------------------------------------


class AsyncStore:
    """A target that does I/O to clear: an async clear() with no arguments and no count."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    async def clear(self) -> None:
        await asyncio.sleep(0)
        self.data.clear()


def django_cache() -> Any:
    """Django's local-memory cache backend, configured as a Django project would."""
    from django.conf import settings
    if not settings.configured:
        settings.configure(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
    from django.core.cache import caches
    return caches["default"]


@pytest.mark.processes
def test_every_kind_of_target_is_purged_by_a_real_clear(cluster: Cluster):
    cluster.start_service()

    @functools.lru_cache(maxsize=100)
    def render(page: str) -> str:
        return f"<html>{page}</html>"

    @functools.cache
    def lookup(key: str) -> str:
        return key.upper()

    cache, plain, user_dict = Cache(), {}, UserDict()
    ttl, lru = cachetools.TTLCache(maxsize=100, ttl=600), cachetools.LRUCache(maxsize=100)
    store, django = AsyncStore(), django_cache()
    subscriber = ThreadedSubscriber([cache, plain, user_dict, ttl, lru, render, lookup, store, django],
                                    name="any-cache", **cluster.subscriber_options())
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("any-cache")
        cache.set("a", 1)
        plain["a"] = 1
        user_dict["a"] = 1
        ttl["a"], ttl["b"] = 1, 2
        lru["a"] = 1
        render("/"), render("/about")
        lookup("a")
        store.data["a"] = 1  # counted as 0: no len(), no count returned
        django.set("page", "<html>", None)  # counted as 0 too
        _, headers, _ = cluster.clear()
        record = cluster.wait_all_acked(headers["Cache-Clear-Id"], {"any-cache"})
        assert record["acks"][0]["entries_dropped"] == 1 + 1 + 1 + 2 + 1 + 2 + 1
        assert len(cache) == len(plain) == len(user_dict) == len(ttl) == len(lru) == len(store.data) == 0
        assert render.cache_info().currsize == lookup.cache_info().currsize == 0
        assert django.get("page") is None
        assert subscriber.subscriber.stats()["failing"] is False
    finally:
        subscriber.stop()


# --- failing targets ---------------------------------------------------------------


def test_a_failing_target_is_acked_as_failed_withdraws_the_lease_and_is_retried_until_ok(
        played: PlayedService, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cachebus.subscriber")
    cache, flaky, plain = Cache(), Flaky(), {}
    threaded = ThreadedSubscriber([cache, flaky, plain], name="app", **played.options())
    threaded.start()
    sub = threaded.subscriber
    try:
        played.next(Hello)
        assert threaded.wait_synced(DEADLINE)
        cache.set("k", "v")
        flaky.data["k"] = plain["k"] = 1
        flaky.down = True
        played.clear("c1")
        failed = played.next(Ack, lambda a: a.clear_id == "c1")

        # Acked at once as failed: the type and message, without the credentials.
        assert (failed.outcome, failed.cause, failed.seq, failed.instance) == (
            PurgeOutcome.FAILED, PurgeCause.CLEAR, 1, sub.instance)
        assert failed.error == "ConnectionError: cannot reach redis://***@cache:6379/0 (password=***)"
        assert failed.dropped == 2  # the targets that did purge: the Cache and the dict
        assert plain == {} and len(cache) == 0 and flaky.data == {"k": 1}
        # The lease is withdrawn: the Cache serves nothing and keeps nothing while a target fails.
        assert cache.bypass and not sub.trusted
        cache.set("k", "v")
        assert cache.get("k") is None
        # Still alive: it hears the service and heartbeats, and says it is failing.
        beat = played.next(WorkerHeartbeat)
        assert beat.stats["failing"] is True and beat.stats["failing_targets"] == 1
        metrics = generate_latest(worker_registry(cache, sub)).decode()
        assert "cachebus_worker_failing_targets 1.0" in metrics

        # Retried on every heartbeat, silently on the wire until it succeeds.
        mark = len(played.received)
        played.pump_until(lambda: sub.purge_failures >= 3, "retries of the failing target")
        assert not [m for m in played.received[mark:] if isinstance(m, Ack)]
        # Logged once, with its traceback, and no credential anywhere.
        lines = [r for r in caplog.records if "target 1 (Flaky)" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.ERROR
        assert "Traceback (most recent call last)" in lines[0].getMessage()
        assert not [r for r in caplog.records if "s3cret" in r.getMessage() or "hunter2" in r.getMessage()]

        # A new clear while failing purges every target, as usual.
        plain["x"] = 1
        played.clear("c2")
        again = played.next(Ack, lambda a: a.clear_id == "c2")
        assert (again.outcome, again.seq) == (PurgeOutcome.FAILED, 2)
        assert plain == {}

        # Back up: the retry purges it, the purge is acked ok at the current seq, the lease comes back.
        flaky.down = False
        ok = played.next(Ack, lambda a: a.outcome is PurgeOutcome.OK)
        assert (ok.clear_id, ok.seq, ok.cause, ok.error) == ("c2", 2, PurgeCause.CLEAR, "")
        assert flaky.data == {}
        stats = sub.stats()
        assert stats["failing"] is False and stats["failing_targets"] == 0 and stats["purge_failures"] >= 4
        wait_for(lambda: sub.trusted and not cache.bypass, what="the lease to be renewed")
        cache.set("k", "fresh")
        assert cache.get("k") == "fresh"
        metrics = generate_latest(worker_registry(cache, sub)).decode()
        assert f"cachebus_worker_purge_failures_total {float(sub.purge_failures)}" in metrics
        assert "cachebus_worker_failing_targets 0.0" in metrics
    finally:
        threaded.stop()


def test_a_target_raising_type_error_is_a_failed_ack_and_the_subscriber_keeps_going(played: PlayedService):
    # The case: a clear() that raises TypeError used to kill the task handling commands.
    broken = Flaky(TypeError)
    broken.down = True
    cache = Cache()

    async def main() -> None:
        async with Subscriber([broken, cache], name="app", **played.options()) as sub:
            await asyncio.to_thread(played.next, Hello)
            assert await sub.wait_synced(DEADLINE)
            played.clear("c1")
            ack = await asyncio.to_thread(played.next, Ack, lambda a: a.clear_id == "c1")
            assert ack.outcome is PurgeOutcome.FAILED and ack.error.startswith("TypeError: ")
            broken.down = False
            ok = await asyncio.to_thread(played.next, Ack, lambda a: a.outcome is PurgeOutcome.OK)
            assert ok.seq == 1
            # Still handling commands.
            played.clear("c2")
            ok = await asyncio.to_thread(played.next, Ack, lambda a: a.clear_id == "c2")
            assert ok.outcome is PurgeOutcome.OK

    asyncio.run(main())


@pytest.mark.processes
def test_a_failing_target_is_a_failed_purge_on_the_service_until_the_retry_succeeds(cluster: Cluster):
    cluster.start_service()
    flaky = Flaky()
    threaded = ThreadedSubscriber([Cache(), flaky], name="app", **cluster.subscriber_options())
    threaded.start()
    try:
        assert threaded.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("app")
        flaky.down = True
        status, _, body = cluster.clear(wait="all", timeout="2")
        assert status == 202
        assert json.loads(body)["complete"] is False
        # Its failed ack comes in (however long this machine takes): a failure, never a missing ack.
        record = wait_for(lambda: (r := cluster.clear_record(json.loads(body)["id"]))["failed"] and r,
                          what="the failed ack")
        assert record["complete"] is False and record["missing"] == []
        [failed] = record["failed"]
        assert (failed["worker"], failed["name"]) == (threaded.subscriber.instance, "app")
        assert failed["error"] == "ConnectionError: cannot reach redis://***@cache:6379/0 (password=***)"
        assert b"s3cret" not in body and b"hunter2" not in body
        assert "s3cret" not in json.dumps(record) and "hunter2" not in json.dumps(record)
        flaky.down = False
        wait_for(lambda: cluster.clear_record(record["id"])["complete"], what="the retry to complete the clear")
        assert cluster.clear(wait="all")[0] == 200
    finally:
        threaded.stop()


# --- identity and forks ----------------------------------------------------------------


def test_each_start_makes_an_instance_of_this_process_and_the_default_name_is_the_host():
    publish, acks = (f"tcp://127.0.0.1:{port}" for port in free_ports(2))

    async def main() -> None:
        first = Subscriber([{}], publish=publish, acks=acks, insecure=True)
        second = Subscriber([{}], publish=publish, acks=acks, insecure=True)
        assert first.name == second.name == socket.gethostname()
        assert first.instance == ""  # made by start(), in the process that starts it
        async with first, second:
            pattern = rf"{re.escape(socket.gethostname())}:{os.getpid()}:[0-9a-f]{{6}}"
            assert re.fullmatch(pattern, first.instance) and re.fullmatch(pattern, second.instance)
            assert first.instance != second.instance
            before = first.instance
        async with first:
            assert first.instance != before

    asyncio.run(main())


def in_child(work: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Run ``work`` in a forked child of this process: the child's pid and what ``work`` returned."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, whatever happens
        try:
            os.close(read_fd)
            try:
                report = work()
            except BaseException as exc:
                report = {"child raised": repr(exc)}
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        def exited() -> tuple[int] | None:
            done, status = os.waitpid(pid, os.WNOHANG)
            return (status,) if done else None
        try:
            [status] = wait_for(exited, what="the forked child to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        assert os.waitstatus_to_exitcode(status) == 0
        report = json.loads(pipe.read() or b"{}")
    assert "child raised" not in report, report
    return pid, report


def refused(uses: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """Each use's ForkedSubscriberError message (or what it did instead)."""
    errors = {}
    for name, use in uses.items():
        try:
            use()
        except ForkedSubscriberError as exc:
            errors[name] = str(exc)
        else:
            errors[name] = "not refused"
    return errors


@pytest.mark.processes
def test_an_asyncio_subscriber_started_before_a_fork_is_refused_in_the_child(cluster: Cluster):
    cluster.start_service()
    cache = Cache()

    def child(sub: Subscriber) -> dict[str, Any]:
        served = cache.get("page")
        # The forked copy of the loop thread is inside a coroutine: use the subscriber from a fresh loop.
        errors: dict[str, str] = {}
        thread = threading.Thread(target=lambda: errors.update(refused({
            "start": lambda: asyncio.run(sub.start()),
            "stop": lambda: asyncio.run(sub.stop()),
            "wait_synced": lambda: asyncio.run(sub.wait_synced(0)),
        })))
        thread.start()
        thread.join()
        return {"served": served, "errors": errors}

    async def main() -> None:
        async with Subscriber([cache], name="forked", **cluster.subscriber_options()) as sub:
            assert await sub.wait_synced(DEADLINE)
            cache.set("page", "cached in the parent")
            pid, report = in_child(lambda: child(sub))
            # The child's cache stopped serving at once; the parent's is untouched and still purged.
            assert report["served"] is None
            assert cache.get("page") == "cached in the parent"
            assert set(report["errors"]) == {"start", "stop", "wait_synced"}
            for message in report["errors"].values():
                assert f"started in process {os.getpid()}, and this is process {pid}" in message
                assert "post_fork" in message and "lifespan" in message
            _, headers, _ = await asyncio.to_thread(cluster.clear)
            await asyncio.to_thread(cluster.wait_all_acked, headers["Cache-Clear-Id"], {"forked"})
            assert cache.get("page") is None

    asyncio.run(main())


@pytest.mark.processes
def test_a_threaded_subscriber_started_before_a_fork_is_refused_in_the_child(cluster: Cluster):
    cluster.start_service()
    store: dict[str, int] = {}
    threaded = ThreadedSubscriber([store], name="threaded-parent", **cluster.subscriber_options())
    threaded.start()
    try:
        assert threaded.wait_synced(DEADLINE)
        pid, report = in_child(lambda: refused({
            "start": threaded.start, "stop": threaded.stop, "wait_synced": lambda: threaded.wait_synced(0)}))
        assert set(report) == {"start", "stop", "wait_synced"}
        for message in report.values():
            assert f"started in process {os.getpid()}, and this is process {pid}" in message
        # The parent's subscriber was not disturbed.
        store["page"] = 1
        _, headers, _ = cluster.clear()
        cluster.wait_all_acked(headers["Cache-Clear-Id"], {"threaded-parent"})
        assert store == {}
    finally:
        threaded.stop()


@pytest.mark.processes
def test_a_subscriber_built_before_a_fork_and_started_in_the_child_is_the_childs_own(cluster: Cluster):
    cluster.start_service()
    threaded = ThreadedSubscriber([Cache()], name="post-fork", **cluster.subscriber_options())

    def child() -> dict[str, Any]:
        threaded.start()
        try:
            return {"synced": threaded.wait_synced(DEADLINE), "instance": threaded.subscriber.instance}
        finally:
            threaded.stop()

    pid, report = in_child(child)
    assert report["synced"] is True
    assert report["instance"].startswith(f"{socket.gethostname()}:{pid}:")
    assert threaded.subscriber.instance == ""  # this process never started it
    assert any(w["name"] == "post-fork" and w["pid"] == pid for w in cluster.worker_list())


# --- one path to the service ------------------------------------------------------------


def unanswered(service: PlayedService, speak: bool = True) -> Message | None:
    """What :meth:`PlayedService.poll` does, minus the welcome: an instance that stopped answering
    (dead behind its socket, or a follower cut off from the leader). ``speak=False``: no heartbeat either."""
    if speak:
        service.heartbeat()
    try:
        frames = service.router.recv_multipart()
    except zmq.Again:
        return None
    msg = service.codec.decode(frames[1:])
    service.received.append(msg)
    return msg


def test_the_back_channel_talks_to_one_instance_and_moves_to_the_next_when_it_falls_silent(
        caplog: pytest.LogCaptureFixture):
    first, second = PlayedService(), PlayedService()
    options = {"publish": f"{first.publish},{second.publish}", "acks": f"{first.acks},{second.acks}",
               "insecure": True}
    cache = Cache()

    async def main() -> None:
        async with Subscriber([cache], name="app", **options) as sub:
            # Everything goes to the first instance; the second, listed too, hears nothing.
            await asyncio.to_thread(first.next, Hello)
            assert await sub.wait_synced(DEADLINE)

            def answered_heartbeats(count: int) -> bool:
                assert second.poll() is None
                first.poll()
                return sum(isinstance(m, WorkerHeartbeat) for m in first.received) >= count

            await asyncio.to_thread(wait_for, lambda: answered_heartbeats(3), what="heartbeats answered by the first")
            assert second.received == [] and sub.session.upstream.current == first.acks

            # The first stops answering: within a lease of its first unanswered message, the worker
            # says hello to the second, and purges nothing for moving.
            purges = sub.purges

            def hello_at_second() -> Hello | None:
                unanswered(first)
                second.poll()
                return next((m for m in second.received if isinstance(m, Hello)), None)

            hello = await asyncio.to_thread(wait_for, hello_at_second, what="a hello at the second")
            assert hello.instance == sub.instance and second.received[0] == hello
            assert sub.session.upstream.current == second.acks and sub.purges == purges
            assert await sub.wait_synced(DEADLINE)
            moved = [r.getMessage() for r in caplog.records if "moving to" in r.getMessage()]
            assert len(moved) == 1 and first.acks in moved[0] and f"moving to {second.acks}" in moved[0]

            # From now on, everything goes to the second (the first no longer speaks either):
            # a clear's ack, heartbeats at the clear's seq.
            cache.set("k", "v")
            second.clear("c1")
            ack = await asyncio.to_thread(second.next, Ack, lambda a: a.clear_id == "c1")
            assert ack.seq == 1 and ack.cause is PurgeCause.CLEAR and cache.get("k") is None
            await asyncio.to_thread(second.next, WorkerHeartbeat, lambda h: h.seq == 1)
            # Drain what the first had queued before the move: nothing sent since reached it.
            await asyncio.to_thread(wait_for, lambda: unanswered(first, speak=False) is None,
                                    what="the first drained")
            assert not [m for m in first.received if getattr(m, "seq", 0) >= 1]

    try:
        asyncio.run(main())
    finally:
        first.close()
        second.close()


# --- lease terms from the service ------------------------------------------------------


@pytest.mark.processes
def test_the_lease_follows_the_service_and_different_settings_log_one_warning(
        cluster: Cluster, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cachebus.subscriber")
    cluster.start_service(settings={"bus": {"heartbeat_interval": 0.2, "liveness": 2}})
    configured = ThreadedSubscriber([Cache()], name="configured", heartbeat_interval=0.5, liveness=3,
                                    **cluster.subscriber_options())
    following = ThreadedSubscriber([Cache()], name="following", **cluster.subscriber_options())
    configured.start()
    following.start()
    try:
        assert configured.wait_synced(DEADLINE) and following.wait_synced(DEADLINE)
        for threaded in (configured, following):
            session = threaded.subscriber.session
            assert session.terms_from_service
            assert (session.heartbeat_interval, session.liveness, session.lease_seconds) == (0.2, 2, 0.4)
            assert threaded.subscriber.codec.max_age == 0.4
        # Many heartbeats later (a clear acked by both), still one warning, for the configured one only.
        cluster.wait_worker_live_named("configured")
        cluster.wait_worker_live_named("following")
        _, headers, _ = cluster.clear()
        cluster.wait_all_acked(headers["Cache-Clear-Id"], {"configured", "following"})
        warnings = [r.getMessage() for r in caplog.records if "the service uses" in r.getMessage()]
        assert len(warnings) == 1
        assert "configured" in warnings[0] and "heartbeat_interval 0.5 s and liveness 3" in warnings[0]
        assert "the service uses 0.2 s and 2" in warnings[0] and "a lease of 0.4 s" in warnings[0]
    finally:
        configured.stop()
        following.stop()


# --- ThreadedSubscriber.start never blocks forever -----------------------------------


def test_a_bad_endpoint_is_refused_at_once():
    with pytest.raises(ValueError, match="publish: 'not-an-endpoint' is not a ZeroMQ endpoint"):
        ThreadedSubscriber([Cache()], publish="not-an-endpoint")
    with pytest.raises(ValueError, match="acks: '' is not a ZeroMQ endpoint"):
        Subscriber([Cache()], acks="")
    # Well formed, but ZeroMQ refuses it (no port): start() raises ZeroMQ's error, naming it.
    threaded = ThreadedSubscriber([Cache()], name="no-port", publish="tcp://127.0.0.1", insecure=True)
    with pytest.raises(zmq.ZMQError, match=re.escape("tcp://127.0.0.1")):
        threaded.start()
    assert not [t for t in threading.enumerate() if t.name == "cachebus-subscriber-no-port"]


def test_an_unknown_on_silence_is_refused_at_once():
    with pytest.raises(ValueError, match="on_silence must be bypass or serve, not 'stale'"):
        Subscriber([Cache()], on_silence="stale")
    assert Subscriber([Cache()], on_silence="serve").options.on_silence is OnSilence.SERVE


def test_start_gives_up_after_its_timeout_when_the_thread_never_reports(tmp_path: Path):
    # Reading the service's key blocks for as long as nobody writes to this FIFO.
    keys = tmp_path / "keys"
    keys.mkdir()
    os.mkfifo(keys / "service.key")
    threaded = ThreadedSubscriber([Cache()], name="blocked", keys_dir=keys)
    with pytest.raises(TimeoutError, match=re.escape("did not report within 0.2 s")):
        threaded.start(timeout=0.2)

    def writer() -> list[int] | None:
        try:
            return [os.open(keys / "service.key", os.O_WRONLY | os.O_NONBLOCK)]
        except OSError:  # ENXIO until the reader has the FIFO open
            return None

    # Unblocked, the start fails (an empty key file), and the abandoned thread ends on its own.
    os.close(wait_for(writer, what="the blocked reader")[0])
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "cachebus-subscriber-blocked"],
             what="the abandoned thread to end")

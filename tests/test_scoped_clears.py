"""Scoped clears (docs/scoped-clears.md): keys, prefixes, tags and groups, end to end.

The API's parsing and limits run against the in-process service; the purges
against real subscribers on a real ``cachebus serve``; the sequence rules
against a subscriber whose service the test plays (tests/test_subscriber.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any

import pytest

from cachebus.bus.protocol import Ack, Clear, Hello, PurgeCause
from cachebus.bus.scope import MAX_SCOPE_ITEM_BYTES, MAX_SCOPE_ITEMS
from cachebus.service.instance import Service
from cachebus.testing import DEADLINE, Cluster, http, wait_for
from cachebus.workers.subscriber import Subscriber, ThreadedSubscriber

from .played import Flaky, PlayedService
from .test_api import CLEAR, FORM, fetch, token_file

BAD_SCOPE = (b'{"title":"Bad Request","message":"keys, prefixes, tags and group take at most '
             + f"{MAX_SCOPE_ITEMS} entries in all, each a string of 1 to {MAX_SCOPE_ITEM_BYTES} ".encode()
             + b'bytes without control characters","http_status_code":400}')


def scope_of(service: Service, clear_id: str) -> dict[str, Any]:
    entry = service.record.clear(clear_id)
    assert entry is not None
    return service.record.clear_json(entry)["scope"]


# --- the API ------------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("encode, content_type", [
    # Repeated form fields, PHP's brackets, and a JSON body's arrays (or one string).
    (lambda c: urllib.parse.urlencode([*c, ("keys", "a"), ("keys", "b"), ("prefixes", "blog/"), ("tags", "t1"),
                                       ("group", "web")]), FORM["Content-Type"]),
    (lambda c: urllib.parse.urlencode([*c, ("keys[]", "a"), ("keys[]", "b"), ("prefixes[]", "blog/"),
                                       ("tags[]", "t1"), ("group[]", "web")]), FORM["Content-Type"]),
    (lambda c: json.dumps({**dict(c), "keys": ["a", "b", "a"], "prefixes": "blog/", "tags": ["t1"],
                           "group": ["web"]}), "application/json"),
])
async def test_every_way_of_naming_lists_gives_the_same_scope(http_client, base_url, credentials, service,
                                                              encode, content_type):
    token, access = credentials
    body = encode([("token", token), ("access_token", access)])
    response = await fetch(http_client, base_url, CLEAR, body=body, headers={"Content-Type": content_type})
    assert response.code == 204, response.body
    assert scope_of(service, response.headers["Cache-Clear-Id"]) == {
        "keys": ["a", "b"], "prefixes": ["blog/"], "tags": ["t1"], "group": ["web"]}


@pytest.mark.gen_test
async def test_a_clear_called_as_flextype_calls_it_is_still_everything(http_client, base_url, credentials, service):
    token, access = credentials
    body = urllib.parse.urlencode({"token": token, "access_token": access})
    response = await fetch(http_client, base_url, CLEAR, body=body, headers=FORM)
    assert response.code == 204 and response.body == b""
    assert scope_of(service, response.headers["Cache-Clear-Id"]) == {
        "keys": [], "prefixes": [], "tags": [], "group": []}


@pytest.mark.gen_test
@pytest.mark.parametrize("lists", [
    {"keys": [f"k{i}" for i in range(MAX_SCOPE_ITEMS + 1)]},
    {"keys": [f"k{i}" for i in range(60)], "tags": [f"t{i}" for i in range(41)]},
    {"keys": ["x" * (MAX_SCOPE_ITEM_BYTES + 1)]},
    {"keys": ["é" * (MAX_SCOPE_ITEM_BYTES // 2 + 1)]},  # counted in UTF-8 bytes
    {"tags": [""]},
    {"prefixes": ["a\nb"]},
    {"group": [3]},
    {"keys": [["nested"]]},
    {"keys": {"a": 1}},
])
async def test_a_scope_past_the_limits_is_a_400_and_counts_no_call(http_client, base_url, credentials, tokens_dir,
                                                                   lists):
    token, access = credentials
    body = json.dumps({"token": token, "access_token": access, **lists})
    response = await fetch(http_client, base_url, CLEAR, body=body, headers={"Content-Type": "application/json"})
    assert response.code == 400
    assert response.body == BAD_SCOPE
    assert token_file(tokens_dir, token)["calls"] == 0


@pytest.mark.gen_test
async def test_the_limit_itself_is_allowed(http_client, base_url, credentials, service):
    token, access = credentials
    keys = [f"{i}".ljust(MAX_SCOPE_ITEM_BYTES, "x") for i in range(MAX_SCOPE_ITEMS)]
    body = json.dumps({"token": token, "access_token": access, "keys": keys})
    response = await fetch(http_client, base_url, CLEAR, body=body, headers={"Content-Type": "application/json"})
    assert response.code == 204, response.body
    assert scope_of(service, response.headers["Cache-Clear-Id"])["keys"] == keys


# --- real subscribers on a real service ----------------------------------------------


def clear(cluster: Cluster, *pairs: tuple[str, str]) -> tuple[int, dict[str, Any]]:
    body = urllib.parse.urlencode([("token", cluster.token), ("access_token", cluster.access_token),
                                   ("wait", "all"), ("timeout", "10"), *pairs])
    status, _, answer = http("POST", cluster.url + CLEAR, body.encode(), FORM)
    return status, json.loads(answer)


@pytest.mark.processes
def test_keys_prefixes_and_groups_reach_exactly_the_processes_and_entries_named(cluster: Cluster):
    cluster.start_service()
    web, api = {}, {}
    subscribers = [ThreadedSubscriber([web], name="web", labels=["eu"], **cluster.subscriber_options()),
                   ThreadedSubscriber([api], name="api", **cluster.subscriber_options())]
    for subscriber in subscribers:
        subscriber.start()
    try:
        for name in ("web", "api"):
            cluster.wait_worker_live_named(name)
        fill = {"a": 1, "b": 2, "blog/1": 3, "blog/2": 4, "about": 5}
        web.update(fill)
        api.update(fill)

        status, proof = clear(cluster, ("keys", "a"), ("prefixes", "blog/"))
        assert status == 200, proof
        assert proof["scope"] == {"keys": ["a"], "prefixes": ["blog/"], "tags": [], "group": []}
        assert sorted((a["name"], a["scope"], a["entries_dropped"]) for a in proof["acks"]) == [
            ("api", "scoped", 3), ("web", "scoped", 3)]
        assert web == api == {"b": 2, "about": 5}

        # A group names a worker by name or by label; only those purge, and only they are expected.
        for group in ("web", "eu"):
            web.update(fill)
            api.update(fill)
            status, proof = clear(cluster, ("group", group))
            assert status == 200, proof
            assert [a["name"] for a in proof["acks"]] == ["web"] and proof["groups"].keys() == {"web"}
            assert web == {} and api == fill

        # A mapping cannot know tags: it drops everything, and its ack says so.
        status, proof = clear(cluster, ("tags", "news"))
        assert status == 200
        assert {a["scope"] for a in proof["acks"]} == {"all"}
        assert api == {}

        # A group nobody is in: nobody expected, nothing proven, nothing purged.
        api.update(fill)
        status, proof = clear(cluster, ("group", "nobody"))
        assert status == 202 and proof["workers"] == []
        status, proof = clear(cluster, ("keys", "b"))  # the next clear: both still in step
        assert status == 200 and api == {k: v for k, v in fill.items() if k != "b"}
        workers = {w["name"]: w for w in cluster.worker_list()}
        assert workers["web"]["labels"] == ["eu"] and workers["api"]["labels"] == []
    finally:
        for subscriber in subscribers:
            subscriber.stop()


# --- the sequence: every worker counts every clear --------------------------------------


def scoped(played: PlayedService, clear_id: str, **lists: tuple[str, ...]) -> None:
    played.seq += 1
    played.pub.send_multipart(played.codec.encode(Clear(epoch=played.epoch, seq=played.seq, id=clear_id,
                                                        ts=time.time(), **lists)))


def test_a_worker_outside_a_group_purges_nothing_yet_a_missed_clear_of_any_group_purges_everything(
        played: PlayedService):
    cache: dict[str, int] = {}

    async def main() -> None:
        async with Subscriber([cache], name="api", **played.options()) as sub:
            await asyncio.to_thread(played.next, Hello)
            assert await sub.wait_synced(DEADLINE)
            cache.update(a=1, b=2)
            scoped(played, "c1", group=("web",))
            await asyncio.to_thread(played.pump_until, lambda: sub.seq == 1, "seq 1 counted")
            assert cache == {"a": 1, "b": 2}
            assert not [m for m in played.received if isinstance(m, Ack) and m.seq == 1]

            scoped(played, "c2", keys=("a",))
            ack = await asyncio.to_thread(played.next, Ack, lambda a: a.seq == 2)
            assert (ack.seq, ack.cause, ack.extent, ack.dropped) == (2, PurgeCause.CLEAR, "scoped", 1)
            assert cache == {"b": 2}

            # The service sends seq 3 for web only; this worker never gets it. The heartbeat at 3
            # reveals the gap, and a gap may hide a clear meant for anyone: everything goes.
            played.seq += 1
            ack = await asyncio.to_thread(played.next, Ack, lambda a: a.seq == 3)
            assert (ack.seq, ack.cause, ack.extent) == (3, PurgeCause.GAP, "all")
            assert cache == {}

    asyncio.run(main())


def test_clears_arriving_together_purge_what_they_name_together(played: PlayedService):
    cache: dict[str, int] = {}

    async def main() -> None:
        async with Subscriber([cache], name="web", **played.options()) as sub:
            await asyncio.to_thread(played.next, Hello)
            assert await sub.wait_synced(DEADLINE)
            cache.update(a=1, b=2, c=3, d=4)
            scoped(played, "c1", keys=("a",))
            scoped(played, "c2", keys=("b",), group=("api",))  # not for this worker
            scoped(played, "c3", prefixes=("c",))
            await asyncio.to_thread(played.pump_until, lambda: sub.seq == 3, "three clears handled")
            wait_for(lambda: cache == {"b": 2, "d": 4}, what="a and c dropped, b and d kept")

    asyncio.run(main())


def test_a_target_that_failed_is_purged_entirely_by_the_next_scoped_clear(played: PlayedService):
    flaky, cache = Flaky(), {"a": 1, "b": 2}

    async def main() -> None:
        async with Subscriber([flaky, cache], name="web", **played.options()) as sub:
            await asyncio.to_thread(played.next, Hello)
            assert await sub.wait_synced(DEADLINE)
            flaky.data.update(x=1, y=2)
            flaky.down = True
            played.clear("c1")
            failed = await asyncio.to_thread(played.next, Ack, lambda a: a.clear_id == "c1")
            assert failed.outcome == "failed"
            flaky.down = False
            flaky.data.update(x=1, y=2)
            cache.update(a=1, b=2)
            # What c1 should have dropped from the failed target is not known any more: all of it goes,
            # while the healthy target drops only the key.
            scoped(played, "c2", keys=("a",))
            ack = await asyncio.to_thread(played.next, Ack, lambda a: a.clear_id == "c2")
            assert (ack.outcome, ack.extent) == ("ok", "all")
            assert flaky.data == {} and cache == {"b": 2} and not sub.failing

    asyncio.run(main())

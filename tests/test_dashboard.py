"""The dashboard in a real headless Chromium, against a real service and real workers.

Everything the page shows here came over its own EventSource: the test only
reads the DOM, and changes the world from outside (an HTTP clear, a killed
worker, a restarted service). Screenshots at a desktop and a phone size go to
``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.parse
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from cachebus import Cache, ThreadedSubscriber
from cachebus.bus.security import WORKERS_DIR, ensure_keypair, private_dir
from cachebus.testing import DEADLINE, Cluster, Proc, create_token, free_ports, http, http_json, wait_for

from .browser import Browser, find_chromium
from .support import FlakyCache

ROOT = Path(__file__).resolve().parent.parent

ARTIFACTS = ROOT / "test-artifacts"
#: Small, so a killed worker turns lost within seconds; big enough that a busy
#: 2-core machine does not make live workers look lost.
SETTINGS = {"record": {"lost_after": 2.0, "complete_within": 3.0}}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary found (tests/install-browser.sh installs Debian's chromium when run as root)")
    b = Browser(binary, tmp_path / "chromium.log", timeout=DEADLINE)
    try:
        yield b
    finally:
        b.close()


def js(value: Any) -> str:
    return json.dumps(value)


def worker_field(name: str, field: str) -> str:
    """JS: the cell text of the (first) row of a worker called ``name``, or null while there is none."""
    return (f"(document.querySelector('#workers tr[data-name={js(name)}] [data-field={field}]')"
            f"?.textContent ?? null)")


def clear_view(browser: Browser, clear_id: str) -> dict[str, Any] | None:
    """What the page shows for one clear, or None while it is not listed."""
    return browser.evaluate(f"""(() => {{
        const li = document.querySelector('#clears [data-clear=' + CSS.escape({js(clear_id)}) + ']');
        if (!li) return null;
        const outcome = li.querySelector('[data-field=duration]');
        const field = (name) => li.querySelector('[data-field=' + name + ']');
        return {{
            acked: [...li.querySelectorAll('.chip[data-acked=true]')].map(c => c.dataset.ackName).sort(),
            chips: [...li.querySelectorAll('.chip')].map(c => c.dataset.ackName).sort(),
            chip_ids: [...li.querySelectorAll('.chip')].map(c => c.dataset.ackWorker).sort(),
            dropped: Object.fromEntries([...li.querySelectorAll('.chip')].map(
                c => [c.dataset.ackName, c.querySelector('[data-field=dropped]')?.textContent ?? null])),
            progress: field('progress').textContent,
            published_at: field('published_at').textContent,
            token: field('token')?.textContent ?? null,
            outcome: outcome.dataset.outcome,
            text: outcome.textContent,
        }};
    }})()""")


def wait_for_acks(browser: Browser, clear_id: str, workers: list[str]) -> dict[str, Any]:
    def shown() -> str:
        return f"""(() => {{
            const li = document.querySelector('#clears [data-clear=' + CSS.escape({js(clear_id)}) + ']');
            return !!li && li.querySelectorAll('.chip[data-acked=true]').length === {len(workers)}
                && li.querySelector('[data-field=duration]').dataset.outcome === 'complete';
        }})()"""
    browser.wait_for(shown(), what=f"the page to show {len(workers)} acks for clear {clear_id}")
    view = clear_view(browser, clear_id)
    assert view is not None
    return view


def clear_now(browser: Browser) -> None:
    """Press "Clear now" and confirm it in the page's dialog."""
    browser.click("#clear-now")
    browser.wait_for("document.getElementById('confirm-clear').open", what="the confirmation dialog")
    browser.click("#confirm-clear-ok")


def log_in(browser: Browser, token: str, access_token: str) -> None:
    browser.type("#token", token)
    browser.type("#access-token", access_token)
    browser.click("#login-submit")
    browser.wait_for("document.getElementById('status').dataset.state === 'live'", what="the stream to open")


def every_time_carries_its_date(browser: Browser) -> int:
    """Every <time> the page shows has its full date as title, and no visible text holds a
    time of day without its date; the number of <time> elements."""
    shown = browser.evaluate(r"""(() => {
        const full = /^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$/;
        const times = [...document.querySelectorAll('time')];
        const text = document.body.innerText;
        const bare = [...text.matchAll(/\b\d{2}:\d{2}:\d{2}\b/g)]
            .filter(m => !/\d{4}-\d{2}-\d{2} $/.test(text.slice(Math.max(0, m.index - 11), m.index)))
            .map(m => text.slice(Math.max(0, m.index - 20), m.index + 10));
        return {count: times.length, bare: bare,
                bad: times.filter(t => !full.test(t.title) || !t.dateTime).map(t => t.outerHTML)};
    })()""")
    assert shown["bad"] == [] and shown["bare"] == [], shown
    return int(shown["count"])


def local_date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def clear_count(cluster: Cluster) -> int:
    return len(http_json(f"{cluster.url}/api/v1/cache/clears?{cluster.creds()}")["clears"])


def status(browser: Browser) -> str:
    return browser.evaluate("document.getElementById('status').dataset.state")


def no_horizontal_overflow(browser: Browser) -> None:
    widths = browser.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page is wider than the viewport: {widths}"


def http_clear(cluster: Cluster) -> str:
    """A clear from a client that is not the page: plain http.client, Flextype's form body."""
    conn = HTTPConnection("127.0.0.1", cluster.port, timeout=DEADLINE)
    try:
        body = urllib.parse.urlencode({"token": cluster.token, "access_token": cluster.access_token})
        conn.request("POST", "/api/v1/cache/clear", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        assert response.status == 204, response.status
        clear_id = response.getheader("Cache-Clear-Id")
        assert clear_id
        return clear_id
    finally:
        conn.close()


@pytest.mark.processes
@pytest.mark.browser
def test_the_dashboard_follows_clears_acks_and_workers_live(cluster: Cluster, browser: Browser):
    cluster.start_service(settings=SETTINGS)
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    pids = {name: proc.pid for name, (proc, _) in cluster.workers.items()}

    browser.set_viewport(1280, 800)
    browser.navigate(cluster.url + "/dashboard")
    browser.wait_for("!document.getElementById('login').hidden", what="the credentials form")

    # A wrong access token: the stream is refused, and the page says so on the form.
    browser.type("#token", cluster.token)
    browser.type("#access-token", "not-the-access-token")
    browser.click("#login-submit")
    message = browser.wait_for(
        "!document.getElementById('login').hidden && document.getElementById('login-error').textContent",
        what="the page to send a bad credential back to the form")
    assert "Token is wrong" in message and "401" in message
    assert browser.evaluate("sessionStorage.length") == 0
    browser.events.clear()  # the 401s above are expected; from here on the console stays clean

    browser.type("#token", cluster.token)
    browser.type("#access-token", cluster.access_token)
    browser.click("#login-submit")
    browser.wait_for("document.getElementById('status').dataset.state === 'live'", what="the stream to open")
    assert browser.evaluate("[sessionStorage.getItem('cachebus.token'),"
                            " sessionStorage.getItem('cachebus.access_token'), localStorage.length,"
                            " document.getElementById('access-token').value]") == \
        [cluster.token, cluster.access_token, 0, ""]
    assert cluster.access_token not in browser.evaluate("document.documentElement.outerHTML")

    # Both workers, live, from the snapshot: one row per process, in a group per name.
    browser.wait_for(f"{worker_field('w1', 'state')} === 'live' && {worker_field('w2', 'state')} === 'live'",
                     what="both workers to show live")
    ids = {w["name"]: w.get("id", w["name"]) for w in cluster.worker_list()}
    for name, pid in pids.items():
        assert browser.evaluate(worker_field(name, "pid")) == str(pid)
        assert browser.evaluate(worker_field(name, "host")) not in ("", "–")
        assert browser.evaluate(f"document.querySelector('#workers tr[data-name={js(name)}]').dataset.worker"
                                ) == ids[name]
    assert browser.evaluate("[...document.querySelectorAll('#workers tbody')].map(b => [b.dataset.group,"
                            " b.querySelector('[data-field=group-count]').textContent,"
                            " b.querySelectorAll('tr[data-worker]').length])") == \
        [["w1", "1 process, 1 live", 1], ["w2", "1 process, 1 live", 1]]

    # A clear from another client: every worker's ack shows up under its id.
    first = http_clear(cluster)
    view = wait_for_acks(browser, first, ["w1", "w2"])
    assert view["acked"] == ["w1", "w2"] and view["chips"] == ["w1", "w2"]
    assert view["chip_ids"] == sorted(ids.values())
    assert view["progress"] == "2/2"
    assert view["text"].startswith("all acked in ")
    record = cluster.clear_record(first)
    assert record["complete"] is True
    # Its time carries its date, as every time on the page does.
    assert view["published_at"] == local_date(record["published_at"])
    assert every_time_carries_its_date(browser) >= 3
    browser.wait_for(f"{worker_field('w1', 'last_purge_cause')} === 'clear'"
                     f" && {worker_field('w2', 'last_purge_cause')} === 'clear'",
                     what="the purges to show in the worker rows")
    seq = str(cluster.clear_record(first)["seq"])
    browser.wait_for(f"{worker_field('w1', 'last_acked_seq')} === {js(seq)}"
                     f" && {worker_field('w2', 'last_acked_seq')} === {js(seq)}",
                     what="the workers' last acked seq to follow the acks")

    # Reads through w1's cache: its entries and hit ratio follow, from worker.stats events.
    w1_url = cluster.workers["w1"][1]
    assert [http("GET", w1_url + "/entries/hello")[1]["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    browser.wait_for(f"{worker_field('w1', 'entries')} === '1' && {worker_field('w1', 'hit_ratio')} === '50.0 %'",
                     what="w1's cache entries and hit ratio to update")

    # "Clear now" asks first: cancelled, nothing is sent.
    clears_before = clear_count(cluster)
    browser.click("#clear-now")
    browser.wait_for("document.getElementById('confirm-clear').open", what="the confirmation dialog")
    assert browser.evaluate("document.getElementById('clear-result').hidden") is True
    browser.click("#confirm-clear-cancel")
    browser.wait_for("!document.getElementById('confirm-clear').open", what="the dialog to close")

    # Confirmed: a new clear, newest first, acked by both; w1 dropped the entry it cached.
    clear_now(browser)
    second = browser.wait_for(
        f"(() => {{ const id = document.getElementById('clear-result').dataset.clearId;"
        f" return id && id !== {js(first)} ? id : null; }})()",
        what="the page's own clear to be accepted")
    view = wait_for_acks(browser, second, ["w1", "w2"])
    assert view["progress"] == "2/2"
    assert view["dropped"] == {"w1": "1 entry dropped", "w2": "0 entries dropped"}
    assert browser.evaluate("[...document.querySelectorAll('#clears [data-clear]')].map(li => li.dataset.clear)"
                            )[:2] == [second, first]
    assert browser.evaluate("document.getElementById('clear-result').dataset.kind") == "ok"
    assert clear_count(cluster) == clears_before + 1, "the cancelled clear was sent"

    # A worker killed without a goodbye: a clear published at once still expects it (it
    # was live a moment ago) and times out naming it; then it turns lost, and its last
    # seen keeps counting.
    cluster.workers["w2"][0].kill()
    orphan = http_clear(cluster)
    browser.wait_for(f"['complete', 'timeout'].includes(document.querySelector('#clears [data-clear='"
                     f" + CSS.escape({js(orphan)}) + '] [data-field=duration]')?.dataset.outcome)",
                     timeout=DEADLINE + 3.0, what="the clear published as w2 died to complete or time out")
    record, view = cluster.clear_record(orphan), clear_view(browser, orphan)
    assert view is not None and view["chip_ids"] == sorted(record["workers"])
    if ids["w2"] in record["workers"]:  # it almost always is: w2 was live a few ms earlier
        missing = [m if isinstance(m, str) else m["worker"] for m in record["missing"]]
        assert record["complete"] is False and missing == [ids["w2"]]
        assert view["outcome"] == "timeout" and view["acked"] == ["w1"] and view["progress"] == "1/2"
        assert view["text"].startswith("timed out after ") and view["text"].endswith(", missing: w2")
    browser.wait_for(f"{worker_field('w2', 'state')} === 'lost'", what="the killed worker to show lost")
    assert browser.evaluate("document.querySelector('#workers tr[data-name=w2] .badge').dataset.state") == "lost"
    assert browser.evaluate(worker_field("w1", "state")) == "live"
    seen = browser.evaluate(worker_field("w2", "last_seen"))
    assert seen.endswith(" ago"), seen
    browser.wait_for(f"{worker_field('w2', 'last_seen')} !== {js(seen)}", what="last seen to tick")
    # Relative, with the full date it counts from as its title.
    w2_seen = next(w["last_seen"] for w in cluster.worker_list() if w["name"] == "w2")
    assert browser.evaluate("document.querySelector('#workers tr[data-name=w2] [data-field=last_seen] time').title"
                            ) == local_date(w2_seen)
    every_time_carries_its_date(browser)

    # Published with only w1 live, so only w1 is expected.
    third = http_clear(cluster)
    view = wait_for_acks(browser, third, ["w1"])
    assert view["chips"] == ["w1"] and view["progress"] == "1/1"

    # Nothing came from outside the service, and nothing went wrong in the page.
    origin = browser.evaluate("location.origin")
    assert origin == cluster.url
    resources = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert {cluster.url + "/dashboard/app.js", cluster.url + "/dashboard/app.css"} <= set(resources)
    outside = [url for url in resources if not url.startswith(origin + "/")]
    assert not outside, f"the page loaded resources from outside the service: {outside}"
    assert browser.problems() == []

    # Readable on a desktop and on a phone, with no sideways scrolling of the page.
    ARTIFACTS.mkdir(exist_ok=True)
    no_horizontal_overflow(browser)
    browser.screenshot(ARTIFACTS / "dashboard-1280x800.png")
    browser.set_viewport(390, 844, scale=2, mobile=True)
    browser.wait_for("getComputedStyle(document.querySelector('#workers thead')).display === 'none'",
                     what="the workers table to collapse into cards")
    no_horizontal_overflow(browser)
    browser.screenshot(ARTIFACTS / "dashboard-390x844.png")
    browser.set_viewport(1280, 800)

    # The service goes away: the page says it is reconnecting, then follows the new run.
    epoch = browser.evaluate("document.getElementById('epoch').textContent")
    assert cluster.service is not None
    cluster.service.stop()
    browser.wait_for("document.getElementById('status').dataset.state === 'reconnecting'",
                     what="the page to show that it is reconnecting")
    assert "reconnecting" in browser.evaluate("document.getElementById('status').textContent")
    cluster.start_service(settings=SETTINGS)
    browser.wait_for(f"document.getElementById('status').dataset.state === 'live'"
                     f" && document.getElementById('epoch').textContent !== {js(epoch)}",
                     what="a snapshot of the restarted service")
    browser.wait_for(f"{worker_field('w1', 'state')} === 'live'", what="w1 to rejoin the new service")
    assert clear_view(browser, first) is None, "the new run's snapshot replaced the old clears"

    # Forgetting the credentials ends the stream and empties session storage.
    browser.click("#forget")
    browser.wait_for("!document.getElementById('login').hidden", what="the credentials form")
    assert browser.evaluate("sessionStorage.length") == 0
    assert status(browser) == "idle"


@pytest.mark.processes
@pytest.mark.browser
def test_clear_now_shows_flextype_s_error_message(cluster: Cluster, browser: Browser):
    cluster.start_service(settings=SETTINGS)
    token, access_token = create_token(cluster.tokens_dir, limit_calls=1)
    browser.navigate(cluster.url + "/dashboard")
    log_in(browser, token, access_token)

    clear_now(browser)
    accepted = browser.wait_for("document.getElementById('clear-result').dataset.clearId",
                                what="the first clear to be accepted")
    browser.wait_for(f"!!document.querySelector('#clears [data-clear=' + CSS.escape({js(accepted)}) + ']')",
                     what="the accepted clear to be listed")
    # The token's one call is used: Flextype's 400, whose message the page shows; reading still works.
    clear_now(browser)
    text = browser.wait_for("document.getElementById('clear-result').dataset.kind === 'error'"
                            " && document.getElementById('clear-result').textContent",
                            what="the refused clear's message")
    assert "HTTP 400: Validation for this particular item failed" in text
    assert status(browser) == "live"
    assert browser.evaluate("document.querySelectorAll('#clears [data-clear]').length") == 1


# --- GET /: the index (no browser) -------------------------------------------------

INDEX_LINKS = {"dashboard": "/dashboard", "openapi": "/api/openapi.json", "metrics": "/metrics"}


@pytest.mark.gen_test
async def test_the_index_lists_every_endpoint_without_credentials(http_client, base_url):
    async def fetch(path: str, method: str = "GET") -> Any:
        return await http_client.fetch(base_url + path, method=method, raise_error=False,
                                       allow_nonstandard_methods=True)

    response = await fetch("/")
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json;charset=UTF-8"
    # The CORS headers of every other answer, and compact JSON as the record's.
    other = await fetch("/api/v1/cache/workers")
    assert other.code == 400
    for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Headers", "Access-Control-Allow-Methods"):
        assert response.headers[name] == other.headers[name]
    index = json.loads(response.body)
    assert response.body == json.dumps(index, separators=(",", ":")).encode()
    assert index["service"] == "cachebus" and index["links"] == INDEX_LINKS

    endpoints = index["endpoints"]
    assert endpoints["clearCache"] == {"method": "POST", "path": "/api/v1/cache/clear",
                                       "summary": "Publish a clear to every worker"}
    assert "clearCacheWithGet" not in endpoints, "GET on the clear route is off by default"
    assert {e["path"] for e in endpoints.values()} == {
        "/", "/api/v1/cache/clear", "/api/v1/cache/clears", "/api/v1/cache/clears/{clear_id}",
        "/api/v1/cache/workers", "/api/v1/cache/events", "/metrics", "/dashboard", "/dashboard/{asset}",
        "/api/openapi.json"}
    assert all(e["method"] in ("GET", "POST") and e["summary"] for e in endpoints.values())
    # Every link leads somewhere, without credentials.
    for path in INDEX_LINKS.values():
        assert (await fetch(path)).code == 200, path

    # Like every route: OPTIONS empty, another method Flextype's 405 with Allow.
    options = await fetch("/", "OPTIONS")
    assert options.code == 200 and options.body == b""
    for method in ("POST", "DELETE", "HEAD"):
        refused = await fetch("/", method)
        assert refused.code == 405 and refused.headers["Allow"] == "GET, OPTIONS", method


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"api.cache.methods": ["POST", "GET"]}])
async def test_the_index_lists_the_clear_route_s_configured_methods(http_client, base_url, overrides):
    response = await http_client.fetch(base_url + "/")
    endpoints = json.loads(response.body)["endpoints"]
    assert endpoints["clearCacheWithGet"]["method"] == "GET"
    assert endpoints["clearCache"]["method"] == "POST"


# --- processes grouped by name, tokens, failed purges ------------------------------------


def is_red(browser: Browser, selector: str) -> bool:
    """Whether the element's text has the page's colour for what is lost or failed."""
    return browser.evaluate(f"""(() => {{
        const probe = document.createElement('span');
        probe.style.color = 'var(--lost)';
        document.body.append(probe);
        const red = getComputedStyle(probe).color;
        probe.remove();
        const el = document.querySelector({js(selector)});
        return !!el && getComputedStyle(el).color === red;
    }})()""")


@pytest.mark.processes
@pytest.mark.browser
def test_processes_by_group_the_token_of_each_clear_and_failed_purges_in_red(cluster: Cluster, browser: Browser):
    cluster.start_service(settings=SETTINGS)
    cluster.start_worker("w1")
    flaky = FlakyCache()
    options = cluster.subscriber_options()
    subscribers = [ThreadedSubscriber([Cache()], name="web", **options) for _ in range(2)]
    subscribers.append(ThreadedSubscriber([flaky], name="flaky", **options))
    try:
        for subscriber in subscribers:
            subscriber.start()
            assert subscriber.wait_synced(DEADLINE)
        wait_for(lambda: sorted(w["name"] for w in cluster.worker_list() if w["state"] == "live")
                 == ["flaky", "w1", "web", "web"], what="every process to be live")
        web_ids = sorted(w["id"] for w in cluster.worker_list() if w["name"] == "web")

        browser.set_viewport(1280, 800)
        browser.navigate(cluster.url + "/dashboard")
        log_in(browser, cluster.token, cluster.access_token)
        rows = "#workers tbody[data-group=web] tr[data-worker]"
        browser.wait_for(f"document.querySelectorAll({js(rows)}).length === 2", what="both web processes")
        assert browser.evaluate(f"[...document.querySelectorAll({js(rows)})].map(tr => tr.dataset.worker)") == web_ids
        assert browser.evaluate(f"[...document.querySelectorAll({js(rows + ' [data-field=id]')})]"
                                f".map(td => td.textContent)") == web_ids
        assert browser.evaluate("document.querySelector('#workers tbody[data-group=web] [data-field=group-count]')"
                                ".textContent") == "2 processes, 2 live"
        assert browser.evaluate("[...document.querySelectorAll('#workers tbody')].map(b => b.dataset.group)") == \
            ["flaky", "w1", "web"]

        # A clear that flaky's purge fails: its chip, the clear and its row turn red, with the error.
        flaky.failing = True
        clear_id = http_clear(cluster)
        item = f"#clears [data-clear={js(clear_id)}]"
        chip = f"{item} .chip[data-ack-name=flaky]"
        browser.wait_for(f"document.querySelector({js(chip)})?.dataset.outcome === 'failed'",
                         what="flaky's failed purge on its chip")
        assert is_red(browser, chip) and browser.evaluate(f"document.querySelector({js(chip)}).dataset.acked") == \
            "false"
        title = browser.evaluate(f"document.querySelector({js(chip)}).title")
        assert "RuntimeError" in title and "the backing store is down" in title
        assert is_red(browser, f"{item} [data-field=failed_count]")
        # Which token started it: its first 8 characters, from the clear.published event.
        view = clear_view(browser, clear_id)
        assert view is not None and view["token"] == "token " + cluster.token[:8]
        assert cluster.access_token[:8] not in browser.evaluate("document.body.innerText")
        # Two processes share the name web: each chip says which one it is.
        web_chips = browser.evaluate(f"[...document.querySelectorAll({js(item + ' .chip[data-ack-name=web]')})]"
                                     ".map(c => c.querySelector('.chip-name').textContent)")
        assert sorted(web_chips) == sorted("web " + wid.split(":", 1)[1] for wid in web_ids)
        browser.wait_for(f"['timeout', 'failed'].includes(document.querySelector({js(item)}"
                         f" + ' [data-field=duration]')?.dataset.outcome)", timeout=DEADLINE + 3.0,
                         what="the record to stop waiting for the failed purge")
        view = clear_view(browser, clear_id)
        assert view is not None and "failed: flaky" in view["text"] and view["progress"] == "3/4"
        assert is_red(browser, f"{item} [data-field=duration]")
        purge_cell = "#workers tr[data-name=flaky] [data-field=last_purge_cause]"
        browser.wait_for(f"document.querySelector({js(purge_cell)})?.dataset.outcome === 'failed'",
                         what="flaky's row to show its failed purge")
        assert is_red(browser, purge_cell)
        assert "the backing store is down" in browser.evaluate(f"document.querySelector({js(purge_cell)}).title")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.screenshot(ARTIFACTS / "dashboard-failed-purge-1280x800.png")

        # Reloaded, the page shows the same from the snapshot's clear JSON.
        browser.navigate(cluster.url + "/dashboard")
        browser.wait_for(f"document.querySelector({js(chip)})?.dataset.outcome === 'failed'",
                         what="the failed purge, from the snapshot")
        view = clear_view(browser, clear_id)
        assert view is not None and view["token"] == "token " + cluster.token[:8]
        assert "failed: flaky" in view["text"] and is_red(browser, chip)
        every_time_carries_its_date(browser)

        # The store is back: the subscriber's retry succeeds and the row is no longer red.
        flaky.failing = False
        browser.wait_for(f"document.querySelector({js(purge_cell)})?.dataset.outcome === 'ok'",
                         what="flaky's retried purge to succeed")
        assert not is_red(browser, purge_cell)
        assert browser.problems() == []
    finally:
        for subscriber in subscribers:
            subscriber.stop()


@pytest.mark.processes
@pytest.mark.browser
def test_a_serving_worker_that_goes_silent_is_marked_degraded(cluster: Cluster, browser: Browser):
    """bus.on_silence: serve trades the bound for availability; the dashboard says where it was traded."""
    cluster.start_service(settings=SETTINGS)
    cluster.start_worker("w-serve", settings={"bus": {"on_silence": "serve"}})
    cluster.start_worker("w-bypass")
    wait_for(lambda: any(w["name"] == "w-serve" and w["on_silence"] == "serve" for w in cluster.worker_list()),
             what="w-serve's first heartbeat")

    browser.navigate(cluster.url + "/dashboard")
    log_in(browser, cluster.token, cluster.access_token)
    badge = "#workers tr[data-name=w-serve] [data-degraded=true]"
    state = "#workers tr[data-name={}] [data-field=state]"
    browser.wait_for(f"document.querySelector({js(state.format('w-bypass'))}) !== null", what="the worker rows")
    assert browser.evaluate(f"document.querySelector({js(badge)}) === null")

    frozen = [cluster.workers[name][0] for name in ("w-serve", "w-bypass")]
    for proc in frozen:
        proc.signal(signal.SIGSTOP)
    try:
        browser.wait_for(f"document.querySelector({js(badge)}) !== null", what="w-serve marked degraded")
        assert browser.evaluate(f"document.querySelector({js(badge)}).textContent") == "degraded"
        browser.wait_for(f"document.querySelector({js(state.format('w-bypass'))}).dataset.state !== 'live'",
                         what="w-bypass to go suspect")
        # Silent too, but it bypasses its caches: the bound holds, nothing to flag.
        assert browser.evaluate("document.querySelector('#workers tr[data-name=w-bypass] [data-degraded]')"
                                " === null")
    finally:
        for proc in frozen:
            proc.signal(signal.SIGCONT)
    browser.wait_for(f"document.querySelector({js(badge)}) === null", what="w-serve live again, not degraded")


@pytest.mark.processes
@pytest.mark.browser
def test_a_worker_heard_through_a_relay_shows_the_relay(cluster: Cluster, browser: Browser, tmp_path: Path):
    cluster.start_service(settings=SETTINGS)
    relay_keys = tmp_path / "relay-keys"
    publish_port, acks_port = free_ports(2)
    publish, acks = f"tcp://127.0.0.1:{publish_port}", f"tcp://127.0.0.1:{acks_port}"
    relay = Proc.python("cachebus.relay", ["--name", "host-b", "--publish", publish, "--acks", acks,
                                           "--relay-keys-dir", str(relay_keys), "--http-port", "0",
                                           *cluster.bus_args()], tmp_path / "relay.log")
    try:
        wait_for(lambda: (relay_keys / "service.key").exists(), what="the relay's keys")
        keypair, _ = ensure_keypair(private_dir(private_dir(relay_keys) / WORKERS_DIR), "far")
        shutil.copy(keypair.public_file, cluster.keys_dir / WORKERS_DIR / keypair.public_file.name)
        cluster.start_worker("far", args=("--bus-publish", publish, "--bus-acks", acks,
                                          "--keys-dir", str(relay_keys)))
        cluster.start_worker("near")
        browser.navigate(cluster.url + "/dashboard")
        log_in(browser, cluster.token, cluster.access_token)
        via = "#workers tr[data-name=far] [data-field=host] [data-via]"
        browser.wait_for(f"document.querySelector({js(via)}) !== null", what="far's relay")
        assert browser.evaluate(f"document.querySelector({js(via)}).textContent") == "via host-b"
        assert browser.evaluate("document.querySelector('#workers tr[data-name=near] [data-via]') === null")
    finally:
        relay.stop()


# --- scoped clears (docs/scoped-clears.md) ---------------------------------------------

#: The service's 400 for a scope past its limits (tests/test_scoped_clears.py checks the body itself).
BAD_SCOPE_MESSAGE = ("keys, prefixes, tags and group take at most 100 entries in all, each a string of 1 to 200 "
                     "bytes without control characters")


def dialog_text(browser: Browser) -> list[str]:
    """The confirmation dialog's title and its confirm button's text."""
    return browser.evaluate("[document.getElementById('confirm-clear-title').textContent,"
                            " document.getElementById('confirm-clear-ok').textContent]")


def scoped_clear_now(browser: Browser, **lists: list[str]) -> None:
    """Open "Clear now", type each list into its field (one entry per line), and confirm."""
    browser.click("#clear-now")
    browser.wait_for("document.getElementById('confirm-clear').open", what="the confirmation dialog")
    for field, entries in lists.items():
        browser.type(f"#scope-{field}", "\n".join(entries))
    browser.click("#confirm-clear-ok")


def accepted_clear(browser: Browser, before: str | None) -> str:
    """The id of the page's next accepted clear (one that is not ``before``)."""
    return browser.wait_for(
        f"(() => {{ const r = document.getElementById('clear-result');"
        f" return r.dataset.kind === 'ok' && r.dataset.clearId && r.dataset.clearId !== {js(before)}"
        f" ? r.dataset.clearId : null; }})()", what="the page's clear to be accepted")


def chip_badges(browser: Browser, clear_id: str) -> dict[str, str | None]:
    """Each chip of a clear: its "dropped everything" badge's text, or None."""
    return browser.evaluate(f"""Object.fromEntries([...document.querySelectorAll(
        '#clears [data-clear=' + CSS.escape({js(clear_id)}) + '] .chip')].map(
        c => [c.dataset.ackName, c.querySelector('[data-field=ack-scope]')?.textContent ?? null]))""")


def scope_text(browser: Browser, clear_id: str) -> str | None:
    return browser.evaluate(f"document.querySelector('#clears [data-clear=' + CSS.escape({js(clear_id)}) + ']"
                            f" [data-field=scope]')?.textContent ?? null")


@pytest.mark.processes
@pytest.mark.browser
def test_a_scoped_clear_from_the_dialog_reaches_only_its_group_and_drops_only_what_it_names(
        cluster: Cluster, browser: Browser):
    cluster.start_service(settings=SETTINGS)
    w1_url = cluster.start_worker("w1")
    cluster.start_worker("w2")
    # A plain mapping cannot drop by key or tag: it drops everything, and its acks say so.
    plain: dict[str, int] = {}
    subscriber = ThreadedSubscriber([plain], name="plain", labels=["eu", "edge"], **cluster.subscriber_options())
    subscriber.start()
    try:
        cluster.wait_worker_live_named("plain")
        ids = {w["name"]: w["id"] for w in cluster.worker_list()}

        browser.set_viewport(1280, 800)
        browser.navigate(cluster.url + "/dashboard")
        log_in(browser, cluster.token, cluster.access_token)
        browser.wait_for(" && ".join(f"{worker_field(name, 'state')} === 'live'" for name in ("w1", "w2", "plain")),
                         what="the three workers to show live")
        # Labels show next to the name, for a process that has any.
        assert browser.evaluate(worker_field("plain", "labels")) == "eu, edge"
        assert browser.evaluate(worker_field("w1", "labels")) is None

        # Unscoped, the dialog says it clears everything; each field is a labelled textarea.
        browser.click("#clear-now")
        browser.wait_for("document.getElementById('confirm-clear').open", what="the confirmation dialog")
        assert dialog_text(browser) == ["Clear every cache now?", "Clear every cache"]
        assert browser.evaluate("['keys', 'prefixes', 'tags', 'group'].map(f => {"
                                " const t = document.getElementById('scope-' + f);"
                                " return [t.tagName, t.labels[0].textContent]; })") == \
            [["TEXTAREA", "Keys"], ["TEXTAREA", "Prefixes"], ["TEXTAREA", "Tags"], ["TEXTAREA", "Group"]]
        assert "empty" in browser.evaluate("document.getElementById('scope-hint').textContent")
        # Filling one in changes what it says; emptying it changes it back.
        browser.type("#scope-tags", "menu")
        assert dialog_text(browser) == ["Clear what you named?", "Clear what you named"]
        ARTIFACTS.mkdir(exist_ok=True)
        browser.screenshot(ARTIFACTS / "dashboard-scoped-dialog-1280x800.png")
        browser.type("#scope-tags", "")
        assert dialog_text(browser) == ["Clear every cache now?", "Clear every cache"]
        browser.click("#confirm-clear-cancel")
        browser.wait_for("!document.getElementById('confirm-clear').open", what="the dialog to close")

        # w1 caches an entry; a clear of two keys (one with a comma, so lines, not commas, part
        # entries) for the group w1 reaches only w1, which drops only that entry.
        assert http("GET", w1_url + "/entries/hello")[1]["X-Cache"] == "MISS"
        scoped_clear_now(browser, keys=["  hello ", "", "a, b"], group=["w1"])
        first = accepted_clear(browser, None)
        view = wait_for_acks(browser, first, ["w1"])
        assert view["chips"] == ["w1"] and view["progress"] == "1/1"
        assert view["dropped"] == {"w1": "1 entry dropped"}
        assert scope_text(browser, first) == "keys: hello, a, b · group: w1"
        record = cluster.clear_record(first)
        assert record["scope"] == {"keys": ["hello", "a, b"], "prefixes": [], "tags": [], "group": ["w1"]}
        assert record["workers"] == [ids["w1"]]
        assert [(a["name"], a["scope"]) for a in record["acks"]] == [("w1", "scoped")]
        assert chip_badges(browser, first) == {"w1": None}
        # Sent: the fields are empty for the next clear.
        assert browser.evaluate("['keys', 'group'].map(f => document.getElementById('scope-' + f).value)") == \
            ["", ""]

        # A tag for everyone: the reference workers' caches drop by tag, the plain mapping cannot,
        # so only its chip says it dropped everything.
        plain.update(a=1, b=2)
        scoped_clear_now(browser, tags=["menu"])
        second = accepted_clear(browser, first)
        view = wait_for_acks(browser, second, ["w1", "w2", "plain"])
        assert scope_text(browser, second) == "tags: menu"
        assert view["dropped"]["plain"] == "2 entries dropped"
        assert chip_badges(browser, second) == {"w1": None, "w2": None, "plain": "dropped everything"}
        assert {a["name"]: a["scope"] for a in cluster.clear_record(second)["acks"]} == {
            "w1": "scoped", "w2": "scoped", "plain": "all"}
        browser.screenshot(ARTIFACTS / "dashboard-scoped-clears-1280x800.png")

        # A group by label: only the process with it. A clear of a whole group is no scoped purge,
        # so dropping everything there is no news: no badge. An unscoped clear shows no scope.
        group = http_clear_with(cluster, ("group", "edge"))
        view = wait_for_acks(browser, group, ["plain"])
        assert scope_text(browser, group) == "group: edge" and chip_badges(browser, group) == {"plain": None}
        everything = http_clear(cluster)
        wait_for_acks(browser, everything, ["w1", "w2", "plain"])
        assert scope_text(browser, everything) is None

        # Reloaded, the snapshot's clears show the same.
        browser.navigate(cluster.url + "/dashboard")
        browser.wait_for(f"document.querySelector('#clears [data-clear=' + CSS.escape({js(second)}) + ']"
                         f" [data-field=ack-scope]') !== null", what="the badge, from the snapshot")
        assert scope_text(browser, first) == "keys: hello, a, b · group: w1"
        assert chip_badges(browser, second) == {"w1": None, "w2": None, "plain": "dropped everything"}
        assert browser.problems() == []

        # An entry past the limits: the service's 400, in the page's words for a refused clear.
        # The field keeps it, to be fixed; nothing was published.
        count = clear_count(cluster)
        scoped_clear_now(browser, keys=["ok", "x" * 201])
        text = browser.wait_for("document.getElementById('clear-result').dataset.kind === 'error'"
                                " && document.getElementById('clear-result').textContent",
                                what="the refused scoped clear's message")
        assert text == "Clear refused: HTTP 400: " + BAD_SCOPE_MESSAGE
        assert browser.evaluate("document.getElementById('scope-keys').value") == "ok\n" + "x" * 201
        assert clear_count(cluster) == count
        assert status(browser) == "live"

        # On a phone, the dialog's fields fit the screen.
        browser.set_viewport(390, 844, scale=2, mobile=True)
        browser.click("#clear-now")
        browser.wait_for("document.getElementById('confirm-clear').open", what="the confirmation dialog")
        assert dialog_text(browser) == ["Clear what you named?", "Clear what you named"]
        no_horizontal_overflow(browser)
        assert browser.evaluate("(() => { const r = document.getElementById('scope-group')"
                                ".getBoundingClientRect(); return r.left >= 0 && r.right <= window.innerWidth; })()")
        browser.screenshot(ARTIFACTS / "dashboard-scoped-dialog-390x844.png")
        browser.click("#confirm-clear-cancel")
        browser.wait_for("!document.getElementById('confirm-clear').open", what="the dialog to close")
    finally:
        subscriber.stop()


def http_clear_with(cluster: Cluster, *pairs: tuple[str, str]) -> str:
    """A clear from another client with scope fields (repeated form fields); its id."""
    body = urllib.parse.urlencode([("token", cluster.token), ("access_token", cluster.access_token), *pairs])
    status_code, headers, _ = http("POST", cluster.url + "/api/v1/cache/clear", body.encode(),
                                   {"Content-Type": "application/x-www-form-urlencoded"})
    assert status_code == 204, status_code
    return headers["Cache-Clear-Id"]

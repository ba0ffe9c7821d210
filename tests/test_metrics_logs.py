"""Metrics and logs as an operator sees them: real servers, scraped and read back.

Most tests run real processes; the ones that count single requests and their
log lines run the service in-process (a real Tornado server on a loopback port)
so that ``caplog`` sees every record.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from cachebus.service.instance import Service
from cachebus.testing import Cluster, http, wait_for


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    status, _, body = http("GET", url + "/metrics", headers=headers)
    assert status == 200, body
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.processes
def test_service_metrics_count_clears_acks_states_auth_failures_and_requests(cluster: Cluster):
    cluster.start_service()
    w1 = cluster.start_worker("w1")
    cluster.start_worker("w2")
    for _ in range(3):
        status, _, _ = cluster.clear(wait="all", timeout="20")
        assert status == 200
    status, _, _ = http("POST", cluster.url + "/api/v1/cache/clear", b"token=" + cluster.token.encode()
                        + b"&access_token=wrong", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 401
    http("POST", cluster.url + "/api/v1/cache/clear", b"", {"Content-Type": "application/x-www-form-urlencoded"})

    m = wait_for(lambda: (s := scrape(cluster.url)).get("cachebus_clears_completed_total{outcome=\"complete\"}") == 3
                 and s, what="three completed clears")
    assert m["cachebus_clears_published_total"] == 3
    assert m["cachebus_acks_received_total"] >= 6
    assert m['cachebus_worker_purges_total{cause="clear"}'] >= 6
    assert m['cachebus_ack_latency_seconds_count{name="w1"}'] == 3
    assert m['cachebus_ack_latency_seconds_count{name="w2"}'] == 3
    assert m["cachebus_clear_all_acked_seconds_count"] == 3
    assert m['cachebus_workers{state="live"}'] == 2
    assert m['cachebus_worker_processes{name="w1",state="live"}'] == 1
    assert m['cachebus_auth_failures_total{reason="wrong_access_token"}'] == 1
    assert m['cachebus_auth_failures_total{reason="missing_credentials"}'] == 1
    assert m['cachebus_http_requests_total{method="POST",route="/api/v1/cache/clear",status="200"}'] == 3
    assert m['cachebus_http_requests_total{method="POST",route="/api/v1/cache/clear",status="401"}'] == 1

    worker = scrape(w1)
    assert worker["cachebus_cache_purges_total"] >= 3
    assert worker['cachebus_worker_purges_total{cause="clear"}'] >= 3
    assert {"cachebus_cache_hits_total", "cachebus_cache_misses_total", "cachebus_cache_entries",
            "cachebus_cache_bypass_seconds_total"} <= worker.keys()


@pytest.mark.processes
def test_metrics_auth_is_a_setting(cluster: Cluster):
    cluster.start_service(settings={"metrics": {"auth": "required", "token": "scrape-secret"}})
    status, headers, body = http("GET", cluster.url + "/metrics")
    assert status == 401 and json.loads(body)["http_status_code"] == 401
    assert {k.lower(): v for k, v in headers.items()}["www-authenticate"].startswith("Bearer")
    status, _, _ = http("GET", cluster.url + "/metrics", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert "cachebus_clears_published_total" in scrape(cluster.url, {"Authorization": "Bearer scrape-secret"})


@pytest.mark.processes
def test_metrics_auth_without_a_token_refuses_and_says_why(cluster: Cluster):
    service = cluster.start_service(settings={"metrics": {"auth": "required"}})
    status, _, body = http("GET", cluster.url + "/metrics")
    assert status == 403 and "metrics.token" in json.loads(body)["message"]
    wait_for(lambda: "metrics.token is not set" in service.output(), what="the reason in the log")


@pytest.mark.processes
def test_json_logs_have_one_structured_line_per_clear_and_no_credentials(cluster: Cluster):
    service = cluster.start_service("--log-format", "json")
    cluster.start_worker("w1")
    status, headers, _ = cluster.clear(wait="all", timeout="20")
    assert status == 200
    clear_id = headers["Cache-Clear-Id"]
    # Credentials in the query string, the body, a JSON body, and wrong ones.
    http("GET", f"{cluster.url}/api/v1/cache/workers?{cluster.creds()}")
    http("POST", f"{cluster.url}/api/v1/cache/clear?{cluster.creds()}&wait=nope")
    http("POST", cluster.url + "/api/v1/cache/clear",
         json.dumps({"token": cluster.token, "access_token": cluster.access_token + "x"}).encode(),
         {"Content-Type": "application/json"})
    http("GET", f"{cluster.url}/api/v1/cache/events?token={cluster.token}&access_token=x{cluster.access_token}")

    def clear_line():
        for line in service.output().splitlines():
            if line.startswith("{") and json.loads(line).get("clear_id") == clear_id:
                return json.loads(line)
    line = wait_for(clear_line, what="the clear's log line")
    assert line["level"] == "INFO" and line["logger"] == "cachebus.record"
    assert (line["expected"], line["acked"], line["complete"]) == (1, 1, True)
    assert line["all_acked_ms"] >= 0 and isinstance(line["seq"], int)
    wait_for(lambda: "401" in service.output(), what="the refused requests in the log")

    output = service.output()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    assert cluster.access_token not in output and cluster.token not in output
    assert re.search(r"access_token=REDACTED", output)


# --- one error path: every refusal logged once and counted, every request counted ---


async def call(client: AsyncHTTPClient, url: str, method: str = "GET", body: str | None = None) -> HTTPResponse:
    return await client.fetch(url, method=method, body=body, raise_error=False, allow_nonstandard_methods=True)


def sample(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.gen_test
async def test_a_wrong_access_token_is_counted_and_logged_once_on_read_and_clear(
        http_client, base_url, credentials, service: Service, caplog):
    token, _ = credentials
    secret = "wrong-secret-1f2e3d"
    wrong = urllib.parse.urlencode({"token": token, "access_token": secret})
    caplog.set_level(logging.INFO)
    requests = [
        ("GET", f"/api/v1/cache/workers?{wrong}", None),
        ("POST", "/api/v1/cache/clear", wrong),
    ]
    for count, (method, path, body) in enumerate(requests, 1):
        caplog.clear()
        response = await call(http_client, base_url + path, method, body)
        assert response.code == 401
        assert sample(service, "cachebus_auth_failures_total", reason="wrong_access_token") == count
        warnings = [r.getMessage() for r in caplog.records if r.name == "cachebus.api"]
        assert warnings == [f"{method} {path.partition('?')[0]} -> 401 (wrong_access_token) from 127.0.0.1"]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert token not in logged and secret not in logged
    assert sample(service, "cachebus_http_requests_total", route="/api/v1/cache/workers", method="GET",
                  status="401") == 1
    assert sample(service, "cachebus_http_requests_total", route="/api/v1/cache/clear", method="POST",
                  status="401") == 1


@pytest.mark.gen_test
async def test_every_route_counts_its_requests_by_pattern_method_and_status(http_client, base_url, service: Service):
    cases = [
        ("GET", "/api/v1/nope", 404, "unmatched"),
        ("POST", "/also/missing", 404, "unmatched"),
        ("OPTIONS", "/anywhere", 200, "unmatched"),
        ("DELETE", "/api/v1/cache/clear", 405, "/api/v1/cache/clear"),
        ("FOO", "/api/v1/cache/clear", 405, "/api/v1/cache/clear"),
        ("BAR", "/api/v1/cache/clear", 405, "/api/v1/cache/clear"),
        ("POST", "/api/v1/cache/clear", 400, "/api/v1/cache/clear"),
        ("GET", "/api/v1/cache/clears/abc", 400, "/api/v1/cache/clears/([^/]+)"),
        ("GET", "/metrics", 200, "/metrics"),
        ("POST", "/metrics", 405, "/metrics"),
        ("GET", "/dashboard", 200, "/dashboard"),
        ("GET", "/dashboard/app.js", 200, "/dashboard/(.+)"),
        ("GET", "/dashboard/nothing.js", 404, "/dashboard/(.+)"),
        ("GET", "/api/openapi.json", 200, "/api/openapi.json"),
    ]
    for method, path, status, route in cases:
        body = "" if method == "POST" else None
        response = await call(http_client, base_url + path, method, body)
        assert response.code == status, (method, path, response.body)
        labels = {"route": route, "method": method, "status": str(status)}
        if method in ("FOO", "BAR"):
            continue  # counted together below
        assert sample(service, "cachebus_http_requests_total", **labels) == 1, labels
    # A method HTTP does not define is counted as "other": a client inventing methods
    # cannot make the service keep a new time series for each one.
    assert sample(service, "cachebus_http_requests_total", route="/api/v1/cache/clear", method="other",
                  status="405") == 2
    counted = sum(s.value for m in service.metrics.registry.collect() if m.name == "cachebus_http_requests"
                  for s in m.samples if s.name == "cachebus_http_requests_total")
    assert counted == len(cases)


@pytest.mark.gen_test
async def test_a_flood_of_bad_requests_writes_a_bounded_number_of_lines(http_client, base_url, service: Service,
                                                                        caplog):
    from cachebus.service.errors import LINES_PER_WINDOW

    caplog.set_level(logging.INFO)
    for _ in range(60):
        response = await http_client.fetch(base_url + "/api/v1/cache/clear", method="POST", body="{not json",
                                           headers={"Content-Type": "application/json"}, raise_error=False)
        assert response.code == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "cachebus.api"]
    # Every refusal is answered and counted; only the first few of a kind within the window are written.
    assert sample(service, "cachebus_http_requests_total", route="/api/v1/cache/clear", method="POST",
                  status="400") == 60
    assert 1 <= len(lines) <= LINES_PER_WINDOW, lines
    assert all("(malformed_json)" in line for line in lines)

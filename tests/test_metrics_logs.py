"""Metrics and logs as an operator sees them: real processes, scraped and read back."""

from __future__ import annotations

import json
import re

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
    assert m['cachebus_ack_latency_seconds_count{worker="w1"}'] == 3
    assert m['cachebus_ack_latency_seconds_count{worker="w2"}'] == 3
    assert m["cachebus_clear_all_acked_seconds_count"] == 3
    assert m['cachebus_workers{state="live"}'] == 2
    assert m['cachebus_auth_failures_total{reason="wrong_access_token"}'] == 1
    assert m['cachebus_auth_failures_total{reason="missing_credentials"}'] == 1
    assert m['cachebus_http_requests_total{method="POST",route="/api/v1/cache/clear",status="200"}'] == 3
    assert m['cachebus_http_requests_total{method="POST",route="/api/v1/cache/clear",status="401"}'] == 1

    worker = scrape(w1)
    assert worker["cachebus_cache_purges_total"] >= 3
    assert worker['cachebus_worker_purges_total{cause="clear"}'] >= 3
    assert {"cachebus_cache_hits_total", "cachebus_cache_misses_total", "cachebus_cache_entries",
            "cachebus_cache_bypass_seconds_total"} <= worker.keys()


def test_metrics_auth_is_a_setting(cluster: Cluster):
    cluster.start_service(settings={"metrics": {"auth": "required", "token": "scrape-secret"}})
    status, headers, body = http("GET", cluster.url + "/metrics")
    assert status == 401 and json.loads(body)["http_status_code"] == 401
    assert {k.lower(): v for k, v in headers.items()}["www-authenticate"].startswith("Bearer")
    status, _, _ = http("GET", cluster.url + "/metrics", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert "cachebus_clears_published_total" in scrape(cluster.url, {"Authorization": "Bearer scrape-secret"})


def test_metrics_auth_without_a_token_refuses_and_says_why(cluster: Cluster):
    service = cluster.start_service(settings={"metrics": {"auth": "required"}})
    status, _, body = http("GET", cluster.url + "/metrics")
    assert status == 403 and "metrics.token" in json.loads(body)["message"]
    wait_for(lambda: "metrics.token is not set" in service.output(), what="the reason in the log")


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

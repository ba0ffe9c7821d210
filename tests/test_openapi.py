"""The OpenAPI 3.1 description: valid, served as written, complete, and exact.

The document is only useful if it matches what the service does, so these
tests tie it to the code: every route ``make_app`` registers must be described
(and nothing else), every method a handler implements must be documented (and
nothing else), the documented error bodies must be the ones
``service.errors.error_body`` sends, and the record's real JSON must validate
against the documented schemas.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from tornado.routing import PathMatches, Router
from tornado.web import RequestHandler

from cachebus.bus.protocol import Ack, OnSilence, PurgeCause, PurgeOutcome
from cachebus.bus.scope import PurgeExtent
from cachebus.service.errors import Reason, error_body, reason_message
from cachebus.service.events import ClearAcked, WorkerJoined, WorkerPurged
from cachebus.service.pages import OPENAPI_FILE
from cachebus.service.views import AckView, WorkerId, WorkerState, WorkerView
from cachebus.testing import Cluster, http, http_json

from .support import EventStream

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: Statuses whose bodies Flextype (and so cachebus) fixes word for word.
FLEXTYPE_STATUSES = (400, 401, 404, 405, 413, 500)
JSON_TYPE = "application/json;charset=UTF-8"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with OPENAPI_FILE.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s until a real object."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are expected, got {ref}"
        node = spec
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# --- 1. served as written, and valid ------------------------------------------


@pytest.mark.gen_test
async def test_served_document_is_the_yaml_file_and_valid_openapi_31(http_client, base_url, spec):
    response = await http_client.fetch(base_url + "/api/openapi.json", raise_error=False)
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    served = json.loads(response.body)
    assert served == spec
    assert served["openapi"] == "3.1.0"
    validate(served)  # raises on any violation of the OpenAPI 3.1 schema


# --- 2. every route documented, every documented path routed ------------------

_GROUP = re.compile(r"\((?:[^()\\]|\\.)*\)")
_PARAM = re.compile(r"\{[^{}/]+\}")


def route_template(pattern: str) -> str:
    """``/api/v1/cache/clears/([^/]+)$`` -> ``/api/v1/cache/clears/{}``."""
    template = _GROUP.sub("{}", pattern.removesuffix("$"))
    template = template.replace(r"\.", ".").replace(r"\-", "-")
    leftover = re.sub(r"\{\}", "", template)
    # An unescaped "." is fine (it matches itself too); anything else would need a human.
    assert not re.search(r"[\\\[\]()*+?|^$]", leftover), f"cannot turn route {pattern!r} into a path template"
    return template


def registered_routes(app: Any) -> dict[str, type[RequestHandler]]:
    """Every path template the application routes, with its handler class."""
    routes: dict[str, type[RequestHandler]] = {}

    def walk(router: Router) -> None:
        for rule in router.rules:  # type: ignore[attr-defined]
            if isinstance(rule.target, Router):
                walk(rule.target)  # the default router's catch-all rule leads to the wildcard router
                continue
            assert isinstance(rule.matcher, PathMatches), f"route {rule!r} is not a path; describe it by hand"
            routes[route_template(rule.matcher.regex.pattern)] = rule.target

    walk(app.default_router)
    return routes


def documented_paths(spec: dict[str, Any]) -> dict[str, str]:
    """Documented templates with their parameters anonymised (``{clear_id}`` -> ``{}``)."""
    return {_PARAM.sub("{}", path): path for path in spec["paths"]}


def implemented_methods(handler: type[RequestHandler]) -> set[str]:
    return {m for m in HTTP_METHODS
            if m.upper() in handler.SUPPORTED_METHODS
            and getattr(handler, m, None) is not getattr(RequestHandler, m, None)}


def test_every_route_is_described_and_every_described_path_is_routed(app, spec):
    routes = registered_routes(app)
    documented = documented_paths(spec)
    assert routes, "found no routes in the application"
    undocumented = sorted(set(routes) - set(documented))
    unrouted = sorted(documented[t] for t in set(documented) - set(routes))
    assert not undocumented, f"routes registered in make_app but missing from service/openapi.yaml: {undocumented}"
    assert not unrouted, f"paths in service/openapi.yaml that make_app does not register: {unrouted}"


def test_documented_methods_are_exactly_the_implemented_ones(app, spec):
    """A handler method without documentation, or documentation of a method no handler has, fails."""
    documented = documented_paths(spec)
    mismatches = {}
    for template, handler in registered_routes(app).items():
        item = spec["paths"][documented[template]]
        described = {m for m in HTTP_METHODS if m in item}
        implemented = implemented_methods(handler)
        if described != implemented:
            mismatches[documented[template]] = {"documented": sorted(described), "implemented": sorted(implemented)}
    assert not mismatches, mismatches


def test_path_parameters_match_the_templates(spec):
    for path, item in spec["paths"].items():
        names = set(re.findall(r"\{([^{}/]+)\}", path))
        for method in (m for m in HTTP_METHODS if m in item):
            params = [resolve(spec, p) for p in item.get("parameters", []) + item[method].get("parameters", [])]
            in_path = {p["name"] for p in params if p["in"] == "path"}
            assert in_path == names, (path, method, in_path)


def test_route_template_conversion():
    assert route_template(r"/api/v1/cache/clears/([^/]+)$") == "/api/v1/cache/clears/{}"
    assert route_template(r"/dashboard/(.+)$") == "/dashboard/{}"
    assert route_template(r"/api/openapi.json$") == "/api/openapi.json"
    with pytest.raises(AssertionError):
        route_template(r"/files/.*$")


# --- 3. the error bodies, word for word ---------------------------------------


def test_error_examples_are_the_bodies_the_service_sends(spec):
    examples = spec["components"]["examples"]
    by_name = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
               413: "PayloadTooLarge", 500: "InternalServerError"}
    for status, name in by_name.items():
        value = examples[name]["value"]
        # Compact, in Flextype's key order: byte for byte what the service sends.
        assert json.dumps(value, separators=(",", ":")).encode() == error_body(status), name


def test_every_documented_flextype_error_response_uses_the_exact_body(spec):
    """Wherever a 400/401/404/405/413/500 JSON response is documented, its examples are the real bodies."""
    seen = set()
    for path, item in spec["paths"].items():
        for method in (m for m in HTTP_METHODS if m in item):
            for status, response in item[method]["responses"].items():
                if int(status) not in FLEXTYPE_STATUSES:
                    continue
                response = resolve(spec, response)
                media = response.get("content", {}).get(JSON_TYPE)
                if media is None:
                    continue  # Tornado's own pages on the ops routes; described as HTML
                examples = [resolve(spec, e)["value"] for e in media.get("examples", {}).values()]
                assert examples, (path, method, status)
                for value in examples:
                    body = json.dumps(value, separators=(",", ":")).encode()
                    assert body == error_body(int(status)), (path, method, status)
                seen.add(int(status))
    assert seen == set(FLEXTYPE_STATUSES)


@pytest.mark.gen_test
async def test_the_documented_bodies_are_what_the_service_answers(http_client, base_url, spec):
    examples = spec["components"]["examples"]

    async def body(path: str, method: str = "GET", payload: bytes | None = None) -> tuple[int, Any, str]:
        response = await http_client.fetch(base_url + path, method=method, body=payload, raise_error=False,
                                           allow_nonstandard_methods=True)
        return response.code, json.loads(response.body), response.headers["Content-Type"]

    cases = [
        ("/api/v1/cache/clear", "POST", b"", 400, "BadRequest"),
        ("/api/v1/cache/clear", "POST", b"token=nope&access_token=x", 401, "Unauthorized"),
        ("/api/v1/cache/nowhere", "GET", None, 404, "NotFound"),
        ("/api/v1/cache/clear", "DELETE", None, 405, "MethodNotAllowed"),
        ("/api/v1/cache/clear", "POST", b"x" * (64 * 1024 + 1), 413, "PayloadTooLarge"),
    ]
    for path, method, payload, status, name in cases:
        assert await body(path, method, payload) == (status, examples[name]["value"], JSON_TYPE), name


# --- the documented schemas against the record's real JSON --------------------


def validator(spec: dict[str, Any], name: str) -> OAS31Validator:
    """A validator for ``components/schemas/<name>`` that resolves references in ``spec``."""
    return OAS31Validator({**spec, "$ref": f"#/components/schemas/{name}"})


@pytest.mark.processes
def test_real_responses_and_events_match_the_documented_schemas(cluster: Cluster, spec):
    cluster.start_service()
    worker_url = cluster.start_worker("w1")
    stream = EventStream(cluster)
    try:
        response = stream.open()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"

        def event() -> dict[str, Any]:
            got = stream.next()
            assert got is not None, "the stream ended"
            event_id, kind, data = got
            return {"event": kind, "data": data, **({"id": event_id} if event_id is not None else {})}

        snapshot = event()
        assert snapshot["event"] == "snapshot"

        status, headers, raw = cluster.clear(wait="all", timeout="20")
        assert status == 200
        assert re.fullmatch(r"[0-9a-f]{32}", headers["Cache-Clear-Id"])
        validator(spec, "ClearProof").validate(json.loads(raw))

        assert http("GET", worker_url + "/entries/hello")[0] == 200  # new cache counters: a worker.stats
        events = [snapshot]
        wanted = {"snapshot", "clear.published", "worker.purged", "clear.acked", "clear.completed", "worker.stats"}
        while not wanted <= {e["event"] for e in events}:
            events.append(event())
        for e in events:
            validator(spec, "StreamEvent").validate(e)
    finally:
        stream.close()

    creds = cluster.creds()
    clear_id = headers["Cache-Clear-Id"]
    validator(spec, "ClearRecord").validate(http_json(f"{cluster.url}/api/v1/cache/clears/{clear_id}?{creds}"))
    for clear in http_json(f"{cluster.url}/api/v1/cache/clears?{creds}")["clears"]:
        validator(spec, "ClearRecord").validate(clear)
    workers = http_json(f"{cluster.url}/api/v1/cache/workers?{creds}")["workers"]
    assert [w["name"] for w in workers] == ["w1"]
    for worker in workers:
        validator(spec, "Worker").validate(worker)

    status, _, raw = http("GET", cluster.url + "/metrics")
    assert status == 200 and b"cachebus_clears_published_total 1.0" in raw


# --- the abuse limits' answers -------------------------------------------------------

#: Statuses cachebus adds to Flextype's, with their exact bodies and a Retry-After header.
LIMIT_STATUSES = {429: "TooManyRequests", 503: "ServiceUnavailable"}
#: Every body each of them is sent with: the usual one, and a follower's that cannot reach the leader.
BODIES = {429: [error_body(429)], 503: [error_body(503), error_body(503, reason_message(Reason.NO_LEAD))]}


def test_the_abuse_limits_answers_are_documented_on_every_credentialed_route_with_exact_bodies(spec):
    examples = spec["components"]["examples"]
    for status, name in LIMIT_STATUSES.items():
        assert json.dumps(examples[name]["value"], separators=(",", ":")).encode() == error_body(status), name
    credentialed = [(path, method) for path, item in spec["paths"].items() for method in HTTP_METHODS
                    if method in item and "401" in item[method]["responses"] and path.startswith("/api/v1/")]
    assert len(credentialed) >= 5
    for path, method in credentialed:
        for status in LIMIT_STATUSES:
            response = resolve(spec, spec["paths"][path][method]["responses"].get(str(status)))
            assert response, (path, method, status)
            assert "Retry-After" in response["headers"], (path, method, status)
            values = [resolve(spec, e)["value"] for e in response["content"][JSON_TYPE]["examples"].values()]
            assert [json.dumps(v, separators=(",", ":")).encode() for v in values] == BODIES[status]


# --- the documented schemas against the one serializer of each concept ----------------


def _acks() -> list[AckView]:
    """An ack of every cause, outcome and extent the wire allows."""
    return [AckView(WorkerId("host:1:ab"), "web", 1_800_000_000.0, 1.23456, 7, 0.5, cause, outcome,
                    "ValueError: down" if outcome is PurgeOutcome.FAILED else "", extent)
            for cause in PurgeCause for outcome in PurgeOutcome for extent in PurgeExtent]


def _workers() -> list[WorkerView]:
    """A worker in every state it can be in (forgotten is only ever an event's word), with and
    without a key, a relay and labels, never acked or acked."""
    views = []
    for state in (s for s in WorkerState if s is not WorkerState.FORGOTTEN):
        for acked in (False, True):
            views.append(WorkerView(
                name="web", instance=WorkerId("host:1:ab"), host="host", pid=1, endpoint="http://127.0.0.1:1",
                state=state, joined_at=1.0, last_seen=2.0, last_acked_seq=3 if acked else None,
                last_acked_clear="c" * 32 if acked else None, last_purge_cause=PurgeCause.CLEAR if acked else None,
                last_outcome=PurgeOutcome.OK if acked else None, last_error="", acks=int(acked), epoch="e",
                seq=3, stats={"purges": 1, "hits": 2} if acked else {}, key="k" * 40 if acked else None,
                on_silence=OnSilence.SERVE if acked else OnSilence.BYPASS, degraded=acked,
                via="host-b" if acked else "", labels=("eu",) if acked else ()))
    return views


def test_each_concepts_one_serializer_matches_its_documented_schema(spec):
    """AckView, WorkerView and the events built from them validate against openapi.yaml, whatever
    their values: the schema cannot drift from the one place each concept becomes JSON."""
    for ack in _acks():
        validator(spec, "WorkerAck").validate(ack.to_json())
        event = ClearAcked("c" * 32, 3, ack, acked=1, expected=2, failed=0)
        validator(spec, "ClearAckedEventData").validate(event.to_json())
        wire = Ack(name=ack.name, instance=ack.worker, epoch="e", seq=3, clear_id="c" * 32, dropped=ack.dropped,
                   purge_ms=ack.purge_ms, cause=ack.cause, outcome=ack.outcome, error=ack.error, extent=ack.extent)
        validator(spec, "WorkerPurgedEventData").validate(WorkerPurged(wire).to_json())
    for worker in _workers():
        validator(spec, "Worker").validate(worker.to_json())
        validator(spec, "Worker").validate(WorkerJoined(worker).to_json())
    # Nothing documented that the serializer never sends (additionalProperties catches the reverse).
    assert set(_acks()[0].to_json()) == set(resolve(spec, spec["components"]["schemas"]["WorkerAck"])["properties"])
    assert set(_workers()[0].to_json()) == set(resolve(spec, spec["components"]["schemas"]["Worker"])["properties"])

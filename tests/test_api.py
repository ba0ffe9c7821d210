"""The Flextype endpoint over real HTTP: validation order, bodies, CORS, settings.

The service runs in-process (real Tornado server on a free loopback port, real
ZeroMQ sockets), driven by pytest-tornado's ``http_client``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from cachebus.service.instance import Service

BAD_REQUEST = b'{"title":"Bad Request","message":"Validation for this particular item failed","http_status_code":400}'
UNAUTHORIZED = b'{"title":"Unauthorized","message":"Token is wrong","http_status_code":401}'
NOT_FOUND = (b'{"title":"Not Found","message":"The requested resource or endpoint could not be found",'
             b'"http_status_code":404}')
PAYLOAD_TOO_LARGE = (b'{"title":"Payload Too Large","message":"The request body is larger than this endpoint accepts",'
                     b'"http_status_code":413}')
JSON_TYPE = "application/json;charset=UTF-8"
CLEAR = "/api/v1/cache/clear"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def fetch(client: AsyncHTTPClient, base_url: str, path: str, method: str = "POST",
                body: bytes | str | None = None, headers: dict[str, str] | None = None) -> HTTPResponse:
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    return await client.fetch(base_url + path, method=method, body=body, headers=headers,
                              raise_error=False, allow_nonstandard_methods=True)


def form(**values: Any) -> str:
    return urllib.parse.urlencode(values)


def token_file(tokens_dir: Path, token: str) -> dict[str, Any]:
    return yaml.safe_load((tokens_dir / token / "token.yaml").read_text())


def write_token_file(tokens_dir: Path, token: str, data: dict[str, Any]) -> None:
    (tokens_dir / token / "token.yaml").write_text(yaml.safe_dump(data))


def assert_error(response: HTTPResponse, status: int, body: bytes) -> None:
    assert response.code == status, response.body
    assert response.body == body
    assert response.headers["Content-Type"] == JSON_TYPE


# --- success ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_clear_succeeds_with_204_and_clear_id(http_client, base_url, credentials, tokens_dir, service: Service):
    token, access = credentials
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert response.code == 204
    assert response.body == b""
    clear_id = response.headers["Cache-Clear-Id"]
    assert service.record.clear(clear_id) is not None
    assert token_file(tokens_dir, token)["calls"] == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("where", ["query", "form", "json", "multipart"])
async def test_credentials_accepted_from_query_and_every_body_type(http_client, base_url, credentials, where):
    token, access = credentials
    path, body, headers = CLEAR, None, None
    if where == "query":
        path = f"{CLEAR}?{form(token=token, access_token=access)}"
    elif where == "form":
        body, headers = form(token=token, access_token=access), FORM
    elif where == "json":
        body, headers = json.dumps({"token": token, "access_token": access}), {"Content-Type": "application/json"}
    else:
        boundary = "cachebusboundary"
        parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                        for k, v in (("token", token), ("access_token", access)))
        body = parts + f"--{boundary}--\r\n"
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = await fetch(http_client, base_url, path, body=body, headers=headers)
    assert response.code == 204, response.body


@pytest.mark.gen_test
async def test_body_wins_over_query(http_client, base_url, credentials):
    token, access = credentials
    wrong = f"{CLEAR}?{form(token=token, access_token='wrong')}"
    response = await fetch(http_client, base_url, wrong, body=form(access_token=access), headers=FORM)
    assert response.code == 204
    right = f"{CLEAR}?{form(token=token, access_token=access)}"
    response = await fetch(http_client, base_url, right, body=form(access_token="wrong"), headers=FORM)
    assert_error(response, 401, UNAUTHORIZED)


# --- validation order ---------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("params", [{}, {"token": "x"}, {"access_token": "x"}])
async def test_missing_parameter_is_400(http_client, base_url, params):
    response = await fetch(http_client, base_url, CLEAR, body=form(**params), headers=FORM)
    assert_error(response, 400, BAD_REQUEST)


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"api.cache.enabled": False}])
async def test_disabled_api_is_400_before_the_token_is_looked_at(http_client, base_url, overrides, credentials):
    token, access = credentials
    for params in ({"token": token, "access_token": access}, {"token": "unknown", "access_token": "x"}):
        response = await fetch(http_client, base_url, CLEAR, body=form(**params), headers=FORM)
        assert_error(response, 400, BAD_REQUEST)


@pytest.mark.gen_test
@pytest.mark.parametrize("token", ["0" * 32, "../tokens", "a/b", "x" * 129, "", "%2e%2e", "tok en"])
async def test_unknown_or_malformed_token_is_401(http_client, base_url, token):
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token="x"), headers=FORM)
    assert_error(response, 401, UNAUTHORIZED)


@pytest.mark.gen_test
@pytest.mark.parametrize("missing", ["state", "limit_calls", "calls"])
async def test_token_file_without_required_field_is_400(http_client, base_url, credentials, tokens_dir, missing):
    token, access = credentials
    data = token_file(tokens_dir, token)
    del data[missing]
    write_token_file(tokens_dir, token, data)
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert_error(response, 400, BAD_REQUEST)


@pytest.mark.gen_test
@pytest.mark.parametrize("change", [{"state": "disabled"}, {"limit_calls": 3, "calls": 3}])
async def test_disabled_or_exhausted_token_is_400(http_client, base_url, credentials, tokens_dir, change):
    token, access = credentials
    write_token_file(tokens_dir, token, {**token_file(tokens_dir, token), **change})
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert_error(response, 400, BAD_REQUEST)


@pytest.mark.gen_test
async def test_limit_calls_allows_exactly_that_many(http_client, base_url, credentials, tokens_dir):
    token, access = credentials
    write_token_file(tokens_dir, token, {**token_file(tokens_dir, token), "limit_calls": 2})
    codes = [(await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access),
                          headers=FORM)).code for _ in range(3)]
    assert codes == [204, 204, 400]
    assert token_file(tokens_dir, token)["calls"] == 2


@pytest.mark.gen_test
async def test_missing_hash_or_wrong_access_token_is_401(http_client, base_url, credentials, tokens_dir):
    token, access = credentials
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token="wrong"), headers=FORM)
    assert_error(response, 401, UNAUTHORIZED)
    data = token_file(tokens_dir, token)
    del data["hashed_access_token"]
    write_token_file(tokens_dir, token, data)
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert_error(response, 401, UNAUTHORIZED)
    assert token_file(tokens_dir, token)["calls"] == 0


@pytest.mark.gen_test
async def test_php_written_2y_token_directory_works_unchanged(http_client, base_url, tokens_dir):
    fixture = Path(__file__).parent / "fixtures" / "tokens" / "flextype-php"
    (tokens_dir / "flextype-php").mkdir()
    (tokens_dir / "flextype-php" / "token.yaml").write_bytes((fixture / "token.yaml").read_bytes())
    response = await fetch(http_client, base_url, CLEAR,
                           body=form(token="flextype-php", access_token="rasmuslerdorf"), headers=FORM)
    assert response.code == 204
    assert token_file(tokens_dir, "flextype-php")["hashed_access_token"].startswith("$2y$10$")


# --- bad input ----------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("body", [
    '{"token": 123, "access_token": "x"}',
    '{"token": "x", "access_token": ["x"]}',
    '{"token": null, "access_token": "x"}',
    '{"token": "x", "access_token": {"a": 1}}',
    '{"token": "x", "access_token": "y"',
    '["token", "access_token"]',
    "\xff\xfe",
])
async def test_bad_json_is_400_not_500(http_client, base_url, body):
    response = await fetch(http_client, base_url, CLEAR, body=body.encode("latin-1"),
                           headers={"Content-Type": "application/json"})
    assert_error(response, 400, BAD_REQUEST)


@pytest.mark.gen_test
async def test_body_over_limit_is_413(http_client, base_url, credentials):
    token, access = credentials
    big = form(token=token, access_token=access, padding="x" * (64 * 1024))
    response = await fetch(http_client, base_url, CLEAR, body=big, headers=FORM)
    assert response.code == 413
    assert json.loads(response.body) == {"title": "Payload Too Large",
                                         "message": "The request body is larger than this endpoint accepts",
                                         "http_status_code": 413}
    assert response.headers["Content-Type"] == JSON_TYPE


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"service.max_body_size": 100}])
async def test_body_limit_is_a_setting_and_applies_to_chunked_bodies(http_client, base_url, overrides, credentials):
    token, access = credentials

    async def chunks(write):
        for _ in range(5):
            await write(b"padding=" + b"x" * 40 + b"&")

    response = await http_client.fetch(base_url + CLEAR, method="POST", body_producer=chunks,
                                       headers=FORM, raise_error=False)
    assert response.code == 413
    small = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert small.code == 204


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"service.max_body_size": 100}])
async def test_chunked_body_over_limit_gets_the_flextype_413_and_one_log_line(http_client, base_url, overrides,
                                                                              caplog):
    caplog.set_level(logging.INFO)

    async def chunks(write):
        for _ in range(5):
            await write(b"padding=" + b"x" * 40 + b"&")

    response = await http_client.fetch(base_url + CLEAR, method="POST", body_producer=chunks,
                                       headers=FORM, raise_error=False)
    assert "Content-Length" not in response.request.headers  # sent chunked: the limit trips mid-body
    assert_error(response, 413, PAYLOAD_TOO_LARGE)
    api = [r.getMessage() for r in caplog.records if r.name == "cachebus.api"]
    assert api == ["POST /api/v1/cache/clear -> 413 (body_too_large) from 127.0.0.1"]
    access = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert len(access) == 1 and access[0].startswith("413 POST /api/v1/cache/clear ")


# --- routes, methods, CORS -----------------------------------------------------

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Accept, Origin, Authorization",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, PATCH, OPTIONS",
}


@pytest.mark.gen_test
async def test_unknown_route_is_flextype_404(http_client, base_url):
    for method in ("GET", "POST", "DELETE"):
        response = await fetch(http_client, base_url, "/api/v1/nope", method=method)
        assert_error(response, 404, NOT_FOUND)


@pytest.mark.gen_test
async def test_wrong_method_is_405_with_allow(http_client, base_url):
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        response = await fetch(http_client, base_url, CLEAR, method=method)
        assert response.code == 405
        assert response.headers["Allow"] == "POST, OPTIONS"
        assert json.loads(response.body)["http_status_code"] == 405
        assert response.headers["Content-Type"] == JSON_TYPE


@pytest.mark.gen_test
async def test_options_on_any_route_is_empty(http_client, base_url):
    for path in (CLEAR, "/api/v1/cache/workers", "/anything/at/all"):
        response = await fetch(http_client, base_url, path, method="OPTIONS")
        assert response.code == 200
        assert response.body == b""
        for name, value in CORS.items():
            assert response.headers[name] == value


@pytest.mark.gen_test
async def test_every_response_carries_cors_headers(http_client, base_url, credentials):
    token, access = credentials
    responses = [
        await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM),
        await fetch(http_client, base_url, CLEAR, body=form(token=token), headers=FORM),
        await fetch(http_client, base_url, CLEAR, body=form(token="nope", access_token="x"), headers=FORM),
        await fetch(http_client, base_url, "/missing", method="GET"),
        await fetch(http_client, base_url, CLEAR, method="GET"),
    ]
    assert [r.code for r in responses] == [204, 400, 401, 404, 405]
    for response in responses:
        for name, value in CORS.items():
            assert response.headers[name] == value


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"cors.origin": "https://admin.example", "cors.methods": ["POST"]}])
async def test_cors_values_are_settings(http_client, base_url, overrides):
    response = await fetch(http_client, base_url, CLEAR, method="OPTIONS")
    assert response.headers["Access-Control-Allow-Origin"] == "https://admin.example"
    assert response.headers["Access-Control-Allow-Methods"] == "POST"


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"cors.enabled": False}])
async def test_cors_can_be_switched_off(http_client, base_url, overrides):
    response = await fetch(http_client, base_url, CLEAR, method="OPTIONS")
    assert "Access-Control-Allow-Origin" not in response.headers


# --- the two compatibility settings --------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"api.cache.methods": ["POST", "GET"], "api.cache.success_status": 200}])
async def test_doc_example_get_with_200_and_empty_object(http_client, base_url, overrides, credentials):
    token, access = credentials
    response = await fetch(http_client, base_url, f"{CLEAR}?{form(token=token, access_token=access)}", method="GET")
    assert response.code == 200
    assert response.body == b"{}"
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.headers["Cache-Clear-Id"]
    post = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert post.code == 200 and post.body == b"{}"


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"api.cache.methods": ["GET"]}])
async def test_methods_setting_can_refuse_post(http_client, base_url, overrides, credentials):
    token, access = credentials
    response = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    assert response.code == 405
    assert response.headers["Allow"] == "GET, OPTIONS"
    response = await fetch(http_client, base_url, f"{CLEAR}?{form(token=token, access_token=access)}", method="GET")
    assert response.code == 204


# --- the record's read endpoints ----------------------------------------------


@pytest.mark.gen_test
async def test_read_endpoints_check_the_token_but_do_not_consume_calls(http_client, base_url, credentials, tokens_dir):
    token, access = credentials
    write_token_file(tokens_dir, token, {**token_file(tokens_dir, token), "limit_calls": 1})
    first = await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    clear_id = first.headers["Cache-Clear-Id"]
    creds = form(token=token, access_token=access)
    for path in ("/api/v1/cache/clears", f"/api/v1/cache/clears/{clear_id}", "/api/v1/cache/workers"):
        for _ in range(3):
            response = await fetch(http_client, base_url, f"{path}?{creds}", method="GET")
            assert response.code == 200, (path, response.body)
            assert response.headers["Content-Type"] == JSON_TYPE
        unauthorized = await fetch(http_client, base_url, f"{path}?{form(token=token, access_token='no')}",
                                   method="GET")
        assert_error(unauthorized, 401, UNAUTHORIZED)
        missing = await fetch(http_client, base_url, path, method="GET")
        assert_error(missing, 400, BAD_REQUEST)
    assert token_file(tokens_dir, token)["calls"] == 1


@pytest.mark.gen_test
async def test_clear_record_and_recent_list(http_client, base_url, credentials):
    token, access = credentials
    creds = form(token=token, access_token=access)
    ids = []
    for _ in range(3):
        response = await fetch(http_client, base_url, CLEAR, body=creds, headers=FORM)
        ids.append(response.headers["Cache-Clear-Id"])
    listed = json.loads((await fetch(http_client, base_url, f"/api/v1/cache/clears?{creds}", method="GET")).body)
    assert [c["id"] for c in listed["clears"]] == ids[::-1]
    one = json.loads((await fetch(http_client, base_url, f"/api/v1/cache/clears/{ids[0]}?{creds}", method="GET")).body)
    assert one["id"] == ids[0]
    assert one["seq"] + 2 == listed["clears"][0]["seq"]
    assert one["workers"] == [] and one["acks"] == []
    assert isinstance(one["published_at"], float)
    unknown = await fetch(http_client, base_url, f"/api/v1/cache/clears/{'0' * 32}?{creds}", method="GET")
    assert_error(unknown, 404, NOT_FOUND)


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"record.list_limit": 2, "record.max_clears": 3}])
async def test_record_is_bounded_by_settings(http_client, base_url, overrides, credentials, service: Service):
    token, access = credentials
    creds = form(token=token, access_token=access)
    ids = [(await fetch(http_client, base_url, CLEAR, body=creds, headers=FORM)).headers["Cache-Clear-Id"]
           for _ in range(5)]
    listed = json.loads((await fetch(http_client, base_url, f"/api/v1/cache/clears?{creds}", method="GET")).body)
    assert [c["id"] for c in listed["clears"]] == [ids[4], ids[3]]
    gone = await fetch(http_client, base_url, f"/api/v1/cache/clears/{ids[0]}?{creds}", method="GET")
    assert gone.code == 404


# --- no credential in any log --------------------------------------------------


@pytest.mark.gen_test
async def test_no_credential_reaches_a_log_line(http_client, base_url, credentials, caplog):
    token, access = credentials
    caplog.set_level(logging.DEBUG)
    await fetch(http_client, base_url, f"{CLEAR}?{form(token=token, access_token=access)}")
    await fetch(http_client, base_url, f"{CLEAR}?{form(token=token, access_token='wrong-secret')}")
    await fetch(http_client, base_url, CLEAR, body=form(token=token, access_token=access), headers=FORM)
    await fetch(http_client, base_url, f"/api/v1/cache/workers?{form(token=token, access_token=access)}", method="GET")
    await fetch(http_client, base_url, f"{CLEAR}?{form(token=token, access_token=access)}", method="PUT")
    await fetch(http_client, base_url, f"/nowhere?{form(token=token, access_token=access)}", method="GET")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "REDACTED" in text
    assert "/api/v1/cache/clear" in text
    for secret in (token, access, "wrong-secret"):
        assert secret not in text


# --- waiting for proof -------------------------------------------------------


@pytest.mark.gen_test
async def test_wait_all_with_no_workers_is_no_proof_and_answers_202_at_once(http_client, base_url, credentials):
    """Nobody listening is not "all purged": a deploy script must not be told it was."""
    token, access = credentials
    # Answered at once, not at the timeout: the reason is the publish-time one, and the test's own
    # timeout (pytest-tornado's, a few seconds) would have ended a wait of 30 s.
    response = await fetch(http_client, base_url, CLEAR,
                           body=form(token=token, access_token=access, wait="all", timeout="30"), headers=FORM)
    assert response.code == 202
    body = json.loads(response.body)
    assert body["id"] == response.headers["Cache-Clear-Id"]
    assert body["workers"] == [] and body["acks"] == [] and body["missing"] == [] and body["failed"] == []
    assert body["complete"] is False and body["reason"].startswith("no live worker at publish time")
    assert body["token"] == token[:8]
    assert isinstance(body["seq"], int) and body["elapsed_ms"] >= 0


@pytest.mark.gen_test
@pytest.mark.parametrize("extra", [
    {"wait": "some"}, {"wait": ""}, {"wait": "all", "timeout": "soon"}, {"wait": "all", "timeout": "0"},
    {"wait": "all", "timeout": "-1"}, {"wait": "all", "timeout": "nan"}, {"wait": "all", "timeout": "61"},
    {"timeout": "abc"},
])
async def test_bad_wait_or_timeout_is_400_and_counts_no_call(http_client, base_url, credentials, tokens_dir, extra):
    token, access = credentials
    response = await fetch(http_client, base_url, f"{CLEAR}?{form(**extra)}",
                           body=form(token=token, access_token=access), headers=FORM)
    assert_error(response, 400, BAD_REQUEST)
    assert token_file(tokens_dir, token)["calls"] == 0


@pytest.mark.gen_test
async def test_wait_parameters_from_a_json_body(http_client, base_url, credentials):
    token, access = credentials
    body = {"token": token, "access_token": access, "wait": "all", "timeout": 2.5}
    response = await fetch(http_client, base_url, CLEAR, body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
    assert response.code == 202, "accepted: nobody is listening, so nothing is proven"
    body["timeout"] = True
    response = await fetch(http_client, base_url, CLEAR, body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
    assert_error(response, 400, BAD_REQUEST)


@pytest.mark.gen_test
@pytest.mark.parametrize("overrides", [{"api.cache.max_wait_timeout": 10.0}])
async def test_max_wait_timeout_is_a_setting(http_client, base_url, overrides, credentials):
    token, access = credentials
    response = await fetch(http_client, base_url, CLEAR,
                           body=form(token=token, access_token=access, wait="all", timeout="11"), headers=FORM)
    assert_error(response, 400, BAD_REQUEST)

"""Hostile HTTP input: every malformed request is a 4xx with Flextype's body and one log line.

Each case here answered 500 with a traceback before issue 12 (schemathesis found the
multipart ones by the thousand), or reached a handler that should never have seen it.
The service runs in-process behind the same HTTP server ``cachebus serve`` uses; what
an HTTP client library will not send (garbage ``Content-Length``, unknown methods) goes
over a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import urllib.parse

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from cachebus.service.events import EventLog
from cachebus.service.instance import Service

CLEAR = "/api/v1/cache/clear"
JSON_TYPE = "application/json;charset=UTF-8"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BAD_REQUEST = b'{"title":"Bad Request","message":"Validation for this particular item failed","http_status_code":400}'
NOT_FOUND = (b'{"title":"Not Found","message":"The requested resource or endpoint could not be found",'
             b'"http_status_code":404}')
METHOD_NOT_ALLOWED = (b'{"title":"Method Not Allowed",'
                      b'"message":"The requested method is not allowed for this endpoint","http_status_code":405}')
UNSUPPORTED = (b'{"title":"Unsupported Media Type","message":"The request body\'s encoding is not supported",'
               b'"http_status_code":415}')


def multipart(boundary: str, *parts: str) -> bytes:
    return ("".join(f"--{boundary}\r\n{part}\r\n" for part in parts) + f"--{boundary}--\r\n").encode()


def api_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The service's own warning lines about refused requests (/metrics has its own logger)."""
    return [r.getMessage() for r in caplog.records if r.name in ("cachebus.api", "cachebus.metrics")]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def post(client: AsyncHTTPClient, base_url: str, body: bytes, headers: dict[str, str],
               path: str = CLEAR) -> HTTPResponse:
    return await client.fetch(base_url + path, method="POST", body=body, headers=headers, raise_error=False,
                              decompress_response=False)


# --- bodies --------------------------------------------------------------------

DEEP_JSON = b'{"token":' + b"[" * 990 + b"]" * 990 + b"}"

MALFORMED_BODIES = {
    "multipart without a final boundary": (
        {"Content-Type": "multipart/form-data; boundary=xyz"}, b"--xyz\r\nContent-Disposition: form-data"),
    "multipart part without headers": (
        {"Content-Type": "multipart/form-data; boundary=xyz"}, multipart("xyz", "just a value")),
    "multipart without a boundary": (
        {"Content-Type": "multipart/form-data"},
        multipart("xyz", 'Content-Disposition: form-data; name="token"\r\n\r\nt')),
    "multipart with an empty boundary": (
        {"Content-Type": "multipart/form-data; boundary="}, b"----\r\n"),
    "multipart with a nameless part": (
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        multipart("xyz", "Content-Disposition: form-data\r\n\r\nv")),
    "multipart part that is not form-data": (
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        multipart("xyz", 'Content-Disposition: attachment; name="token"\r\n\r\nv')),
    "multipart part headers not UTF-8": (
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        b'--xyz\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nv\r\n--xyz--\r\n'),
    "multipart with too many parts": (
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        multipart("xyz", *[f'Content-Disposition: form-data; name="f{i}"\r\n\r\nv' for i in range(1001)])),
    "multipart/form-dataxyz": (
        {"Content-Type": "multipart/form-dataxyz; boundary=xyz"}, multipart("xyz", "x")),
    "urlencoded with 1,001 fields": (
        FORM, "&".join(f"f{i}=1" for i in range(1001)).encode()),
    "JSON nested 990 deep": (
        {"Content-Type": "application/json"}, DEEP_JSON),
    "JSON timeout beyond a float": (
        {"Content-Type": "application/json"}, b'{"token":"t","access_token":"a","timeout":1' + b"0" * 400 + b"}"),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", list(MALFORMED_BODIES))
async def test_malformed_body_is_a_flextype_400_with_one_log_line(http_client, base_url, case, caplog):
    headers, body = MALFORMED_BODIES[case]
    caplog.set_level(logging.INFO)
    response = await post(http_client, base_url, body, headers)
    assert response.code == 400, response.body
    assert response.body == BAD_REQUEST
    assert response.headers["Content-Type"] == JSON_TYPE
    assert len(api_lines(caplog)) == 1, api_lines(caplog)
    assert_no_traceback(caplog)


@pytest.mark.gen_test
async def test_1000_form_fields_are_still_read(http_client, base_url, credentials):
    token, access = credentials
    fields = [f"f{i}=1" for i in range(998)] + [urllib.parse.urlencode({"token": token, "access_token": access})]
    response = await post(http_client, base_url, "&".join(fields).encode(), FORM)
    assert response.code == 204, response.body


@pytest.mark.gen_test
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity, gzip", "x-anything"])
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "application/json",
                                          "multipart/form-data; boundary=xyz"])
async def test_encoded_body_is_415(http_client, base_url, credentials, tokens_dir, encoding, content_type, caplog):
    token, access = credentials
    caplog.set_level(logging.INFO)
    plain = urllib.parse.urlencode({"token": token, "access_token": access}).encode()
    response = await post(http_client, base_url, gzip.compress(plain),
                          {"Content-Type": content_type, "Content-Encoding": encoding})
    assert response.code == 415, response.body
    assert response.body == UNSUPPORTED
    assert response.headers["Content-Type"] == JSON_TYPE
    assert len(api_lines(caplog)) == 1
    assert_no_traceback(caplog)
    assert "calls: 0" in (tokens_dir / token / "token.yaml").read_text()


@pytest.mark.gen_test
async def test_identity_encoding_is_plain(http_client, base_url, credentials):
    token, access = credentials
    body = urllib.parse.urlencode({"token": token, "access_token": access}).encode()
    response = await post(http_client, base_url, body, {**FORM, "Content-Encoding": "identity"})
    assert response.code == 204, response.body


# --- raw requests: what no client library sends --------------------------------


async def raw(base_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; the status, headers and body of the one answer."""
    port = urllib.parse.urlsplit(base_url).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines if line)
        length = 0 if request.startswith(b"HEAD ") else int(headers.get("Content-Length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    """A raw request; a header is sent as Latin-1 bytes (``²`` is one byte, 0xB2), or else as UTF-8."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    encoded = [line.encode("latin-1") if max(line, default=" ") <= "\xff" else line.encode() for line in lines]
    return b"\r\n".join(encoded) + b"\r\n\r\n" + body


BAD_LENGTHS = ["\u00b2", "1\u00b2", "\u0663", "-1", "+5", "0x10", "5 5", "", "5, 6", "5,"]
ROUTES = {
    CLEAR: "POST",
    "/api/v1/cache/workers": "GET",
    "/api/v1/cache/clears/abc": "GET",
    "/api/v1/cache/events": "GET",
    "/metrics": "GET",
    "/dashboard": "GET",
    "/dashboard/app.css": "GET",
    "/api/openapi.json": "GET",
}


@pytest.mark.gen_test
@pytest.mark.parametrize("length", BAD_LENGTHS)
async def test_garbage_content_length_is_a_flextype_400(http_server, base_url, service, length, caplog):
    caplog.set_level(logging.INFO)
    for path, method in ROUTES.items():
        caplog.clear()
        status, headers, body = await raw(base_url, request(method, path, f"Content-Length: {length}",
                                                            body=b"token=x&access_token=y"))
        assert (status, body) == (400, BAD_REQUEST), (path, length)
        assert headers["Content-Type"] == JSON_TYPE
        assert api_lines(caplog) == [f"{method} {path} -> 400 (bad_content_length) from 127.0.0.1"], path
        assert_no_traceback(caplog)
        # Tornado would have said it twice: once here, once as a "Malformed HTTP message".
        assert not [r for r in caplog.records if r.name == "tornado.general"], path


@pytest.mark.gen_test
@pytest.mark.parametrize("framing", [
    ("Transfer-Encoding: gzip",),
    ("Transfer-Encoding: chunked, gzip",),
    ("Transfer-Encoding: chunked", "Content-Length: 5"),
])
async def test_unsupported_transfer_encoding_is_a_flextype_400(http_server, base_url, service, framing, caplog):
    caplog.set_level(logging.INFO)
    status, _, body = await raw(base_url, request("POST", CLEAR, *framing, body=b"5\r\nhello\r\n0\r\n\r\n"))
    assert (status, body) == (400, BAD_REQUEST)
    assert len(api_lines(caplog)) == 1
    assert_no_traceback(caplog)


@pytest.mark.gen_test
async def test_equal_repeated_content_length_is_accepted(http_server, base_url, credentials):
    token, access = credentials
    body = urllib.parse.urlencode({"token": token, "access_token": access}).encode()
    status, _, _ = await raw(base_url, request("POST", CLEAR, "Content-Type: application/x-www-form-urlencoded",
                                               f"Content-Length: {len(body)}, {len(body)}", body=body))
    assert status == 204


@pytest.mark.gen_test
async def test_query_string_with_too_many_fields_is_a_flextype_400(http_server, base_url, service, caplog):
    caplog.set_level(logging.INFO)
    query = "&".join(f"f{i}=1" for i in range(1001))
    for path, method in ROUTES.items():
        caplog.clear()
        status, headers, body = await raw(base_url, request(method, f"{path}?{query}"))
        assert (status, body) == (400, BAD_REQUEST), path
        assert headers["Content-Type"] == JSON_TYPE
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert len(api_lines(caplog)) == 1, api_lines(caplog)
        assert_no_traceback(caplog)


@pytest.mark.gen_test
@pytest.mark.parametrize("host", [None, "Host: a b", "Host: a, b"])
async def test_missing_or_malformed_host_is_a_flextype_400(http_server, base_url, service, host, caplog):
    caplog.set_level(logging.INFO)
    lines = ["GET /api/v1/cache/workers?token=t&access_token=a HTTP/1.1", *([host] if host else [])]
    status, _, body = await raw(base_url, "\r\n".join(lines).encode() + b"\r\n\r\n")
    assert (status, body) == (400, BAD_REQUEST)
    assert api_lines(caplog) == ["GET /api/v1/cache/workers -> 400 (unreadable_request) from 127.0.0.1"]
    assert_no_traceback(caplog)


@pytest.mark.gen_test
async def test_deep_json_without_content_type_is_a_flextype_400(http_server, base_url, service, caplog):
    status, _, body = await raw(base_url, request("POST", CLEAR, f"Content-Length: {len(DEEP_JSON)}", body=DEEP_JSON))
    assert (status, body) == (400, BAD_REQUEST)
    assert_no_traceback(caplog)


# --- methods -------------------------------------------------------------------

ALLOW = {
    CLEAR: "POST, OPTIONS",
    "/api/v1/cache/clears": "GET, OPTIONS",
    "/api/v1/cache/clears/abc": "GET, OPTIONS",
    "/api/v1/cache/workers": "GET, OPTIONS",
    "/api/v1/cache/events": "GET, OPTIONS",
    "/metrics": "GET, OPTIONS",
    "/dashboard": "GET, OPTIONS",
    "/dashboard/app.css": "GET, HEAD, OPTIONS",
    "/api/openapi.json": "GET, OPTIONS",
}


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "FOO", "PROPFIND"])
async def test_other_methods_are_405_with_allow_before_any_authentication(http_server, base_url, service, method,
                                                                          caplog):
    caplog.set_level(logging.INFO)
    for path, allow in ALLOW.items():
        # No credentials: a read endpoint used to answer 400 (missing) or 401 here.
        status, headers, body = await raw(base_url, request(method, path, "Content-Length: 0"))
        assert (status, body) == (405, METHOD_NOT_ALLOWED), (method, path)
        assert headers["Allow"] == allow, path
        assert headers["Content-Type"] == JSON_TYPE
    assert_no_traceback(caplog)
    assert service.metrics.auth_failures.collect()[0].samples == []


@pytest.mark.gen_test
async def test_head_is_405_where_only_get_is_served(http_server, base_url, service):
    for path, allow in ALLOW.items():
        if "HEAD" in allow:
            continue
        status, headers, _ = await raw(base_url, request("HEAD", path))
        assert status == 405 and headers["Allow"] == allow, path


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "FOO"])
async def test_unknown_route_is_404_whatever_the_method(http_server, base_url, service, method):
    status, _, body = await raw(base_url, request(method, "/api/v1/nothing/here", "Content-Length: 0"))
    assert status == 404
    assert body == (b"" if method == "HEAD" else NOT_FOUND)


# --- Last-Event-ID --------------------------------------------------------------


@pytest.mark.parametrize("number", ["\u00b2", "\u0663", "1\u00b2", "-1", "+1", " 1", "1" * 5000, "", "0x1"])
def test_last_event_id_that_is_not_an_ascii_number_is_unknown(number):
    log = EventLog("abcd", history=10, client_queue=10)
    assert log.since(f"abcd:{number}") is None


def test_last_event_id_that_is_a_number_replays():
    log = EventLog("abcd", history=10, client_queue=10)
    assert log.since("abcd:0") == []


@pytest.mark.gen_test
async def test_stream_with_a_garbage_last_event_id_starts_with_a_snapshot(http_server, base_url, credentials,
                                                                          service: Service, caplog):
    token, access = credentials
    query = urllib.parse.urlencode({"token": token, "access_token": access})
    port = urllib.parse.urlsplit(base_url).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("GET", f"/api/v1/cache/events?{query}",
                             f"Last-Event-ID: {service.events.epoch}:\u00b2"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        first = await asyncio.wait_for(reader.readuntil(b"event: snapshot"), 10)
        assert b"retry: 2000" in first
    finally:
        writer.close()
    assert_no_traceback(caplog)

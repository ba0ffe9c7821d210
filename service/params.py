"""Request parameters the way Flextype reads them.

Flextype merges the parsed body over the query string, so a body value wins.
The body may be JSON or form-encoded (urlencoded or multipart). Anything that
does not parse raises an :class:`~cachebus.service.errors.ApiError` 400, never a 500;
the handler lets it propagate. Every byte here comes from the network: a parser's
own exception (Tornado's ``HTTPInputError``, ``RecursionError`` from JSON nested a
thousand deep, ``OverflowError`` from a number too large for a float) is a 400 too.
"""

from __future__ import annotations

import json
from typing import Any

from tornado.httputil import (
    HTTPInputError,
    HTTPServerRequest,
    ParseBodyConfig,
    ParseMultipartConfig,
    ParseUrlEncodedConfig,
    parse_body_arguments,
)

from cachebus.bus.scope import EVERYWHERE, SCOPE_FIELDS, ClearScope

from .errors import ApiError, Reason

#: Most fields a form body may have, and most parts a multipart body may have. The clear
#: reads four; 1,000 is PHP's ``max_input_vars`` (so any body Flextype reads whole, this
#: reads whole) and Tornado's own cap on a query string's fields. More is a 400.
MAX_FIELDS = 1000

_FORM_LIMITS = ParseBodyConfig(multipart=ParseMultipartConfig(max_parts=MAX_FIELDS),
                               urlencoded=ParseUrlEncodedConfig(max_arguments=MAX_FIELDS))


def _last_values(arguments: dict[str, list[bytes]]) -> dict[str, Any]:
    # PHP keeps the last of repeated parameters; so do we.
    try:
        return {name: values[-1].decode("utf-8") for name, values in arguments.items() if values}
    except UnicodeDecodeError:
        raise ApiError(400, Reason.PARAMETER_NOT_UTF8) from None


def body_params(request: HTTPServerRequest) -> dict[str, Any]:
    """The parsed body: a JSON object's members, or form fields."""
    body = request.body
    if not body:
        return {}
    content_type = request.headers.get("Content-Type", "")
    if _is_json(request):
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, Reason.MALFORMED_JSON) from None
        if not isinstance(data, dict):
            raise ApiError(400, Reason.JSON_NOT_OBJECT)
        return data
    arguments: dict[str, list[bytes]] = {}
    files: dict[str, Any] = {}
    if body.count(b"&") >= MAX_FIELDS and content_type.startswith("application/x-www-form-urlencoded"):
        raise ApiError(400, Reason.TOO_MANY_FIELDS)  # the count parse_qs refuses, named for the log
    try:
        # No headers: a Content-Encoding was refused before the body was read (415).
        parse_body_arguments(content_type, body, arguments, files, config=_FORM_LIMITS)
    except HTTPInputError:
        raise ApiError(400, Reason.MALFORMED_FORM) from None
    return _last_values(arguments)


def request_params(request: HTTPServerRequest) -> dict[str, Any]:
    """Query parameters with the body's parameters merged over them."""
    return {**_last_values(request.query_arguments), **body_params(request)}


def credentials(params: dict[str, Any]) -> tuple[str, str]:
    """``token`` and ``access_token``, both required strings (Flextype step 1)."""
    token = params.get("token")
    access_token = params.get("access_token")
    if token is None or access_token is None:
        raise ApiError(400, Reason.MISSING_CREDENTIALS, auth=True)
    if not isinstance(token, str) or not isinstance(access_token, str):
        raise ApiError(400, Reason.CREDENTIALS_NOT_STRINGS, auth=True)
    return token, access_token


def wait_timeout(params: dict[str, Any], default: float, maximum: float) -> float | None:
    """``wait=all`` and ``timeout=SECONDS``: how long to wait for acks, or None.

    ``timeout`` must be a number of seconds above 0 and at most ``maximum``;
    ``wait`` accepts only ``all``. Anything else is a 400.
    """
    wait = params.get("wait")
    raw = params.get("timeout")
    timeout = default
    if raw is not None:
        try:
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                raise ValueError
            timeout = float(raw)
        except (ValueError, OverflowError):  # OverflowError: a JSON integer beyond any float
            raise ApiError(400, Reason.TIMEOUT_NOT_A_NUMBER) from None
        if not 0 < timeout <= maximum:  # also refuses NaN
            raise ApiError(400, Reason.TIMEOUT_OUT_OF_RANGE)
    if wait is None:
        return None
    if wait != "all":
        raise ApiError(400, Reason.WAIT_NOT_ALL)
    return timeout


def scope(request: HTTPServerRequest, params: dict[str, Any]) -> ClearScope:
    """``keys``, ``prefixes``, ``tags`` and ``group`` (docs/scoped-clears.md): what a clear drops
    and who applies it; everything, by everyone, when none is given, as Flextype's clear does.

    Each is a list: a JSON array (or one string) in a JSON body, a repeated
    parameter (``keys=a&keys=b``, or PHP's ``keys[]=a&keys[]=b``) in a form or
    the query. A list given in both the query and the body is the body's, as
    for every parameter. Past :data:`~cachebus.bus.scope.MAX_SCOPE_ITEMS`
    entries, or an entry that is empty, too long, not text or holds a control
    character: 400, before the token is checked, so it counts no call.
    """
    named = [name for name in SCOPE_FIELDS if name in params or f"{name}[]" in params]
    if not named:
        return EVERYWHERE  # Flextype's clear: nothing more is parsed
    lists: dict[str, list[object]] = {}
    json_body = _json_body(request)
    form = _form_arguments(request) if json_body is None else {}
    for name in named:
        if json_body is not None and name in json_body:
            value = json_body[name]
            lists[name] = value if isinstance(value, list) else [value]
        else:
            lists[name] = _values(name, form, request.query_arguments)
    try:
        return ClearScope.of(lists)
    except ValueError as exc:
        raise ApiError(400, Reason.BAD_SCOPE, log_message=str(exc)) from None


def _is_json(request: HTTPServerRequest) -> bool:
    """Whether the body is read as JSON: its content type says so, or it has none and starts with ``{``."""
    content_type = request.headers.get("Content-Type", "")
    return content_type.split(";")[0].strip().lower() in ("application/json", "text/json") or (
        not content_type and request.body.lstrip()[:1] == b"{")


def _json_body(request: HTTPServerRequest) -> dict[str, Any] | None:
    """The JSON body's members (parsed again: only a scoped clear gets here), or None for a form."""
    return body_params(request) if request.body and _is_json(request) else None


def _form_arguments(request: HTTPServerRequest) -> dict[str, list[bytes]]:
    """A form body's fields with every value of each (parsed again: only a scoped clear gets here)."""
    arguments: dict[str, list[bytes]] = {}
    if request.body:
        files: dict[str, Any] = {}
        try:
            parse_body_arguments(request.headers.get("Content-Type", ""), request.body, arguments, files,
                                 config=_FORM_LIMITS)
        except HTTPInputError:
            raise ApiError(400, Reason.MALFORMED_FORM) from None
    return arguments


def _values(name: str, form: dict[str, list[bytes]], query: dict[str, list[bytes]]) -> list[object]:
    """Every value of ``name`` (or ``name[]``): the body's when it has any, else the query's."""
    for source in (form, query):
        raw = source.get(name, []) + source.get(f"{name}[]", [])
        if raw:
            try:
                return [value.decode("utf-8") for value in raw]
            except UnicodeDecodeError:
                raise ApiError(400, Reason.PARAMETER_NOT_UTF8) from None
    return []

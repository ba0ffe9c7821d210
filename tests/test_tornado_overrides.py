"""The overrides of Tornado's internals were read against the Tornado versions they name.

Everything in ``service/tornado_overrides.py`` depends on what Tornado does not
promise. What each override does is tested where it matters (a request Tornado
cannot build in test_http_input.py, the connection limits and timeouts in
test_http_limits.py, a follower's routing in test_instances.py); this module
makes a Tornado upgrade stop here first, so that someone reads them again.
"""

from __future__ import annotations

import tornado
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from cachebus.service.tornado_overrides import CHECKED_WITH


def test_tornado_is_a_version_the_overrides_were_checked_against() -> None:
    assert any(tornado.version == v or tornado.version.startswith(f"{v}.") for v in CHECKED_WITH), (
        f"Tornado {tornado.version}: read each override in service/tornado_overrides.py against its source, "
        f"then add the version to CHECKED_WITH {CHECKED_WITH}")


def test_the_private_fields_the_overrides_use_are_there() -> None:
    """A renamed field would fail at the first request or connection; here it fails by name."""
    server = HTTPServer(lambda request: None)
    assert isinstance(server._sockets, dict) and isinstance(server._handlers, dict)
    assert server.conn_params.header_timeout is not None  # what no_header_timeout sets to None
    app = tornado.web.Application([(r"/clears/([^/]+)", tornado.web.RequestHandler)])
    request = HTTPServerRequest(start_line=RequestStartLine("GET", "/clears/c1", "HTTP/1.1"),
                                headers=HTTPHeaders({"Host": "127.0.0.1"}))
    found = app.find_handler(request)
    assert found.handler_class is tornado.web.RequestHandler
    assert list(found.path_args) == [b"c1"] and found.path_kwargs == {}

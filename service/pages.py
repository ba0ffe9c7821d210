"""Documents the service serves as they are: the index, the dashboard, the OpenAPI description, the metrics.

Every byte comes from files in this package, so the dashboard works with no
network beyond the service itself.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import as_file, files
from typing import Any

import tornado.web
import yaml

from cachebus.metrics import MetricsHandler

from .handlers import BaseHandler
from .responses import FlextypeResponses

PACKAGE = files("cachebus.service")
DASHBOARD = PACKAGE / "dashboard"
OPENAPI_FILE = PACKAGE / "openapi.yaml"

#: The route whose methods are a setting (``api.cache.methods``).
CLEAR_PATH = "/api/v1/cache/clear"
#: The methods the index lists; OPTIONS (every route) and HEAD (with a GET) go without saying.
INDEX_METHODS = ("get", "post", "put", "patch", "delete")
#: Where a person or a crawler goes next.
LINKS = {"dashboard": "/dashboard", "openapi": "/api/openapi.json", "metrics": "/metrics"}


class IndexHandler(BaseHandler):
    """``GET /``: what the service serves, as a small JSON document, rather than a 404.

    It asks for no credentials and reveals nothing the OpenAPI description does
    not: it is made from that description, so it lists every route there is.
    """

    def get(self) -> None:
        methods = {method.lower() for method in self.service.settings.api.cache.methods}
        endpoints = {name: {"method": method.upper(), "path": path, "summary": summary}
                     for name, method, path, summary in operations()
                     if path != CLEAR_PATH or method in methods}
        self.write_json({"service": "cachebus", "endpoints": endpoints, "links": LINKS})


@functools.cache
def openapi_spec() -> dict[str, Any]:
    with OPENAPI_FILE.open(encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.safe_load(f)
    return spec


@functools.cache
def operations() -> tuple[tuple[str, str, str, str], ...]:
    """``(operationId, method, path, summary)`` of each operation the description documents."""
    return tuple((operation["operationId"], method, path, operation.get("summary", ""))
                 for path, item in openapi_spec()["paths"].items()
                 for method, operation in item.items() if method in INDEX_METHODS)


class DashboardHandler(FlextypeResponses):
    """``GET /dashboard``: the single page; its assets are under ``/dashboard/``."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        # The page asks for credentials; keep it out of frames on other sites.
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        self.finish((DASHBOARD / "index.html").read_bytes())


class DashboardAssetHandler(FlextypeResponses, tornado.web.StaticFileHandler):
    """``GET /dashboard/<file>``: the page's scripts and styles."""

    def initialize(self) -> None:  # type: ignore[override]
        # StaticFileHandler serves from a real directory; an installed package is one
        # (the wheel is not zip-safe), so as_file hands back the directory itself.
        with as_file(DASHBOARD) as path:
            super().initialize(path=str(path))


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI 3.1 description, kept as YAML in the package and served as JSON."""
    return json.dumps(openapi_spec(), indent=1).encode()


class OpenApiHandler(FlextypeResponses):
    """``GET /api/openapi.json``."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(openapi_document())


class ServiceMetricsHandler(FlextypeResponses, MetricsHandler):
    """``GET /metrics`` on the service, with the CORS headers and error bodies of every other route."""

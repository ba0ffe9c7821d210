"""Documents the service serves as they are: the dashboard and the OpenAPI description.

Every byte comes from files in this package, so the dashboard works with no
network beyond the service itself.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import as_file, files

import tornado.web
import yaml

from .handlers import FlextypeResponses

PACKAGE = files("cachebus.service")
DASHBOARD = PACKAGE / "dashboard"
OPENAPI_FILE = PACKAGE / "openapi.yaml"


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
    with OPENAPI_FILE.open(encoding="utf-8") as f:
        return json.dumps(yaml.safe_load(f), indent=1).encode()


class OpenApiHandler(FlextypeResponses):
    """``GET /api/openapi.json``."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(openapi_document())

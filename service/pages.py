"""Documents the service serves as they are: the dashboard and the OpenAPI description.

Every byte comes from files in this package, so the dashboard works with no
network beyond the service itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import tornado.web
import yaml

from .handlers import FlextypeResponses

HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = HERE / "dashboard"
OPENAPI_FILE = HERE / "openapi.yaml"


class DashboardHandler(FlextypeResponses):
    """``GET /dashboard``: the single page; its assets are under ``/dashboard/``."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        # The page asks for credentials; keep it out of frames on other sites.
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        self.finish((DASHBOARD_DIR / "index.html").read_bytes())


class DashboardAssetHandler(FlextypeResponses, tornado.web.StaticFileHandler):
    """``GET /dashboard/<file>``: the page's scripts and styles."""

    def initialize(self) -> None:  # type: ignore[override]
        super().initialize(path=str(DASHBOARD_DIR))


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

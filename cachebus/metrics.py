"""``GET /metrics`` for any cachebus process: the Prometheus text format, optionally behind a bearer token.

The service and the reference worker each keep their own registry and serve
it with :class:`MetricsHandler`. ``metrics.auth`` decides whether a scraper
must send ``Authorization: Bearer <metrics.token>``: ``auto`` asks for it
only when the server listens beyond loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cachebus.settings import MetricsSettings

log = logging.getLogger("cachebus.metrics")

_ERRORS = {
    401: b'{"title":"Unauthorized","message":"Token is wrong","http_status_code":401}',
    403: b'{"title":"Forbidden","message":"Metrics need authentication, and metrics.token is not set",'
         b'"http_status_code":403}',
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_required(settings: MetricsSettings, listen_host: str) -> bool:
    if settings.auth == "auto":
        return not is_loopback(listen_host)
    return settings.auth == "required"


class MetricsHandler(tornado.web.RequestHandler):
    """Serves ``registry``; checks the bearer token when ``metrics.auth`` asks for one."""

    def initialize(self, registry: CollectorRegistry, settings: MetricsSettings, listen_host: str) -> None:
        self.registry = registry
        self.metrics_settings = settings
        self.listen_host = listen_host

    def get(self) -> None:
        if auth_required(self.metrics_settings, self.listen_host):
            expected = self.metrics_settings.token
            if not expected:
                log.warning("GET /metrics refused: metrics.auth asks for a token and metrics.token is not set")
                self._error(403)
                return
            scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
                log.warning("GET /metrics refused: missing or wrong bearer token from %s", self.request.remote_ip)
                self._error(401)
                return
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.registry))

    def _error(self, status: int) -> None:
        self.set_status(status)
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="cachebus metrics"')
        self.set_header("Content-Type", "application/json;charset=UTF-8")
        self.finish(_ERRORS[status])

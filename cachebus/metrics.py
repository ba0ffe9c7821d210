"""``GET /metrics`` for any cachebus process: the Prometheus text format, optionally behind a bearer token.

The service and the reference worker each keep their own registry and serve
it with :class:`MetricsHandler`. ``metrics.auth`` decides whether a scraper
must send ``Authorization: Bearer <metrics.token>``: ``auto`` asks for it
only when the server listens beyond loopback. A refusal is an
:class:`~cachebus.flextype_errors.ApiError`, logged and answered with a
Flextype body like every other error of the service.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cachebus.flextype_errors import ApiError, FlextypeErrors, Reason
from cachebus.settings import MetricsAuth, MetricsSettings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_required(settings: MetricsSettings, listen_host: str) -> bool:
    if settings.auth is MetricsAuth.AUTO:
        return not is_loopback(listen_host)
    return settings.auth is MetricsAuth.REQUIRED


class MetricsHandler(FlextypeErrors):
    """Serves ``registry``; checks the bearer token when ``metrics.auth`` asks for one."""

    error_log = logging.getLogger("cachebus.metrics")

    def initialize(self, registry: CollectorRegistry, settings: MetricsSettings, listen_host: str) -> None:
        self.registry = registry
        self.metrics_settings = settings
        self.listen_host = listen_host

    def get(self) -> None:
        if auth_required(self.metrics_settings, self.listen_host):
            expected = self.metrics_settings.token
            if not expected:
                raise ApiError(403, Reason.METRICS_TOKEN_NOT_SET,
                               log_message="metrics.auth asks for a token and metrics.token is not set")
            scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                raise ApiError(401, Reason.MISSING_BEARER_TOKEN)
            if not hmac.compare_digest(given.strip().encode(), expected.encode()):
                raise ApiError(401, Reason.WRONG_BEARER_TOKEN)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.registry))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="cachebus metrics"')
        super().write_error(status_code, **kwargs)

"""Default bus endpoints, and lists of them, in one place so the service, workers and docs agree."""

from __future__ import annotations

import re

#: The service binds a PUB socket here; workers subscribe to it for commands.
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"

#: The service binds a ROUTER socket here; workers connect a DEALER to say
#: hello, heartbeat and acknowledge purges.
DEFAULT_ACKS = "tcp://127.0.0.1:5557"

#: One ZeroMQ endpoint of a transport the bus uses: transport://address. ZeroMQ itself checks the
#: address when binding or connecting.
ENDPOINT = re.compile(r"(?:tcp|ipc|inproc)://[^\s,]+")

#: Most endpoints one setting may list: one per service instance (docs/scale-out.md).
MAX_ENDPOINTS = 16


def is_endpoint(value: object) -> bool:
    """Whether ``value`` is one endpoint: the one check every setting, option and flag uses."""
    return isinstance(value, str) and ENDPOINT.fullmatch(value) is not None


def split_endpoints(value: str) -> list[str]:
    """The endpoints of a setting that lists one per service instance, separated by commas.

    A worker or relay subscribes to every one (several ``cachebus serve``
    instances each bind their own, and only the one holding the lead speaks)
    and talks to one at a time on the back channel (:mod:`cachebus.bus.upstream`;
    docs/scale-out.md). Raises :class:`ValueError` naming what is wrong.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a ZeroMQ endpoint (tcp://host:port, ipc:///path, …)")
    parts = [part.strip() for part in value.split(",")]
    if len(parts) > MAX_ENDPOINTS:
        raise ValueError(f"{len(parts)} endpoints: at most {MAX_ENDPOINTS}, one per service instance")
    for part in parts:
        if not is_endpoint(part):
            raise ValueError(f"{part!r} is not a ZeroMQ endpoint (tcp://host:port, ipc:///path, …)")
    if len(set(parts)) != len(parts):
        raise ValueError(f"{value!r} names an endpoint twice")
    return parts

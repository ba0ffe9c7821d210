"""Settings for every cachebus process, read from one YAML file.

The defaults live here, in typed dataclasses; ``config/settings.yaml`` repeats
them with comments. A process reads ``config/settings.yaml`` (or the file named
by ``--config`` / ``CACHEBUS_CONFIG``), overlays command-line flags, and fails
at start with a one-line :class:`SettingsError` naming the file, the key and
what was expected, so a typo never surfaces later as a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from cachebus.bus.endpoints import DEFAULT_ACKS, DEFAULT_PUBLISH, is_endpoint, split_endpoints
from cachebus.bus.protocol import OnSilence
from cachebus.bus.scope import MAX_SCOPE_ITEM_BYTES, check_item
from cachebus.bus.security import DEFAULT_KEYS_DIR, BusMode, bus_mode

#: Where a process looks for its settings when neither flag nor env names one.
DEFAULT_CONFIG_PATH = Path("config/settings.yaml")
CONFIG_ENV = "CACHEBUS_CONFIG"


class SettingsError(Exception):
    """A settings file or flag that cannot be used. ``str()`` is one line."""


class MetricsAuth(enum.StrEnum):
    """Whether ``/metrics`` asks a scraper for ``metrics.token`` (cachebus.metrics)."""

    #: Only when the listener is reachable from other hosts (not loopback).
    AUTO = "auto"
    REQUIRED = "required"
    OFF = "off"


class LogFormat(enum.StrEnum):
    """How each log line is written (``log.format``)."""

    TEXT = "text"
    #: One JSON object a line, with the fields the service attaches.
    JSON = "json"


def _check(predicate: Callable[[Any], bool], expected: str) -> dict[str, Any]:
    return {"check": predicate, "expected": expected}


def _port(value: int) -> bool:
    return 0 <= value <= 65535


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _labels_ok(value: list[str]) -> bool:
    """Worker labels as a clear's ``group`` names them; no comma, so ``CACHEBUS_LABELS=a,b`` can list them."""
    try:
        return all("," not in check_item("labels", label) for label in value)
    except ValueError:
        return False


_endpoint = is_endpoint


def _endpoints(value: str) -> bool:
    """One endpoint, or several separated by commas (a worker's, one per service instance)."""
    try:
        split_endpoints(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ServiceSettings:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_check(_port, "a port number 0-65535"))
    tokens_dir: str = "var/tokens"
    max_body_size: int = field(default=64 * 1024, metadata=_check(_positive, "a positive byte count"))
    auth_threads: int = field(default=4, metadata=_check(_positive, "a positive thread count"))
    # Several instances sharing tokens_dir (docs/scale-out.md): one holds the lead, the others pass
    # their requests and their workers' messages to it.
    #: This instance's name among several; empty: <host name>:<port>.
    name: str = ""
    #: Where the other instances send the HTTP requests they pass on while this one leads;
    #: empty: http://<host>:<port>, with 127.0.0.1 for a wildcard host.
    peer_url: str = field(default="", metadata=_check(lambda v: v == "" or v.startswith(("http://", "https://")),
                                                       "empty, or an http:// or https:// URL"))
    #: Where the other instances send their workers' messages while this one leads; empty: bus.acks,
    #: with 127.0.0.1 for a wildcard host.
    peer_acks: str = field(default="", metadata=_check(lambda v: v == "" or _endpoint(v),
                                                        "empty, or a ZeroMQ endpoint like tcp://host:port"))
    #: Seconds between a follower's attempts to take the lead (a dead leader's lock is free at once).
    lead_poll: float = field(default=0.1, metadata=_check(lambda v: 0 < v <= 5, "0 to 5 seconds"))
    #: Seconds a follower waits for the leader's answer to a request it passed on, on top of the
    #: request's own wait; then 503.
    forward_timeout: float = field(default=5.0, metadata=_check(_positive, "a positive number of seconds"))


@dataclass(frozen=True)
class HttpSettings:
    """Limits of the service's HTTP server; docs/security.md says what each one stops."""

    #: Open connections at once; one more is accepted and closed at once. 0: the process's
    #: descriptor limit (RLIMIT_NOFILE) less a reserve, at most 10,000.
    max_connections: int = field(default=0, metadata=_check(lambda v: v >= 0, "a count >= 0 (0: automatic)"))
    #: Seconds from a new connection to its first request's complete headers; and on a
    #: kept-alive connection, from a request's first byte to its complete headers.
    header_timeout: float = field(default=10.0, metadata=_check(_positive, "a positive number of seconds"))
    #: Seconds from the end of a request's headers to the end of its body.
    body_timeout: float = field(default=30.0, metadata=_check(_positive, "a positive number of seconds"))
    #: Seconds a kept-alive connection may wait, after an answer, for the next request's first byte.
    idle_timeout: float = field(default=30.0, metadata=_check(_positive, "a positive number of seconds"))
    #: Bytes of a request line and headers together.
    max_header_size: int = field(default=16 * 1024, metadata=_check(lambda v: v >= 1024, "a byte count >= 1024"))


@dataclass(frozen=True)
class CacheApiSettings:
    enabled: bool = True
    methods: list[str] = field(
        default_factory=lambda: ["POST"],
        metadata=_check(lambda v: bool(v) and set(v) <= {"POST", "GET"}, "a non-empty list of POST and/or GET"),
    )
    success_status: int = field(default=204, metadata=_check(lambda v: v in (200, 204), "200 or 204"))
    wait_timeout: float = field(default=5.0, metadata=_check(_positive, "a positive number of seconds"))
    max_wait_timeout: float = field(default=60.0, metadata=_check(_positive, "a positive number of seconds"))


@dataclass(frozen=True)
class AuthSettings:
    """The ceiling on abuse of the credentials (docs/security.md, "Credentials and abuse")."""

    bcrypt_threads: int = field(default=4, metadata=_check(_positive, "a positive thread count"))
    bcrypt_queue: int = field(default=64, metadata=_check(_non_negative, "a count >= 0"))
    per_address: int = field(default=1, metadata=_check(_positive, "a positive count"))
    per_address_queue: int = field(default=8, metadata=_check(_non_negative, "a count >= 0"))
    failures: int = field(default=10, metadata=_check(_non_negative, "a count >= 0 (0: never slowed)"))
    failure_window: float = field(default=60.0, metadata=_check(_positive, "a positive number of seconds"))


@dataclass(frozen=True)
class ApiSettings:
    cache: CacheApiSettings = field(default_factory=CacheApiSettings)
    max_bcrypt_cost: int = field(default=14, metadata=_check(lambda v: 4 <= v <= 31, "a bcrypt cost 4-31"))
    auth: AuthSettings = field(default_factory=AuthSettings)


@dataclass(frozen=True)
class CorsSettings:
    enabled: bool = True
    origin: str = "*"
    headers: list[str] = field(
        default_factory=lambda: ["X-Requested-With", "Content-Type", "Accept", "Origin", "Authorization"])
    methods: list[str] = field(
        default_factory=lambda: ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])


@dataclass(frozen=True)
class RecordSettings:
    max_clears: int = field(default=1000, metadata=_check(_positive, "a positive count"))
    max_acks: int = field(default=200_000, metadata=_check(_positive, "a positive count"))
    list_limit: int = field(default=50, metadata=_check(_positive, "a positive count"))
    lost_after: float = field(default=5.0, metadata=_check(_positive, "a positive number of seconds"))
    forget_after: float = field(default=3600.0, metadata=_check(_positive, "a positive number of seconds"))
    complete_within: float = field(default=30.0, metadata=_check(_positive, "a positive number of seconds"))


@dataclass(frozen=True)
class EventsSettings:
    history: int = field(default=1000, metadata=_check(_positive, "a positive count"))
    client_queue: int = field(default=1000, metadata=_check(_positive, "a positive count"))
    keepalive: float = field(default=15.0, metadata=_check(_positive, "a positive number of seconds"))
    stats_interval: float = field(default=2.0, metadata=_check(lambda v: v >= 0, "a number of seconds >= 0"))


@dataclass(frozen=True)
class MetricsSettings:
    auth: MetricsAuth = MetricsAuth.AUTO
    token: str = ""


@dataclass(frozen=True)
class BusSettings:
    #: The service binds one endpoint; a worker or relay connects to each one listed, separated by
    #: commas, one per service instance (docs/scale-out.md).
    publish: str = field(default=DEFAULT_PUBLISH, metadata=_check(
        _endpoints, "a ZeroMQ endpoint like tcp://host:port, or several separated by commas"))
    acks: str = field(default=DEFAULT_ACKS, metadata=_check(
        _endpoints, "a ZeroMQ endpoint like tcp://host:port, or several separated by commas"))
    heartbeat_interval: float = field(default=0.5, metadata=_check(_positive, "a positive number of seconds"))
    liveness: int = field(default=3, metadata=_check(_positive, "a positive count of heartbeats"))
    send_hwm: int = field(default=10_000, metadata=_check(_positive, "a positive message count"))
    recv_hwm: int = field(default=10_000, metadata=_check(_positive, "a positive message count"))
    socket_buffer: int = field(default=0, metadata=_check(lambda v: v >= 0, "bytes >= 0 (0: the OS default)"))
    #: A shared secret: HMAC mode. Empty (and not insecure): CURVE with the keys in keys_dir.
    key: str = ""
    #: No authentication at all; refused together with a key (see :meth:`problem`).
    insecure: bool = False
    keys_dir: str = field(default=DEFAULT_KEYS_DIR, metadata=_check(bool, "a directory"))
    #: A worker's own secret key file; empty: <keys_dir>/workers/<worker name>.key_secret, made on first start.
    secret_key_file: str = ""
    max_workers: int = field(default=10_000, metadata=_check(_positive, "a positive count"))
    #: A worker's choice once no service is heard for a lease: bypass its caches (the bound
    #: holds) or keep serving them, degraded (see OnSilence and docs/delivery.md).
    on_silence: OnSilence = OnSilence.BYPASS

    def problem(self) -> tuple[str, str] | None:
        """A contradiction between fields, as (field, what is wrong), or None."""
        if self.insecure and self.key:
            return "insecure", ("true together with a bus.key: choose one (a key signs every message, "
                                "insecure checks nothing)")
        return None

    @property
    def mode(self) -> BusMode:
        return bus_mode(self.key, self.insecure)

    @property
    def lease(self) -> float:
        """Seconds a worker trusts its cache after the service was heard: also the HMAC replay window."""
        return self.heartbeat_interval * self.liveness


@dataclass(frozen=True)
class WorkerSettings:
    name: str = ""
    host: str = "127.0.0.1"
    http_port: int = field(default=8081, metadata=_check(_port, "a port number 0-65535"))
    content_dir: str = "var/content"
    cache_max_entries: int = field(default=10_000, metadata=_check(_positive, "a positive count"))
    cache_ttl: float = field(default=0.0, metadata=_check(lambda v: v >= 0, "seconds >= 0 (0 means no TTL)"))
    #: More names the worker answers to in a clear's ``group``, besides ``name`` (docs/scoped-clears.md).
    labels: list[str] = field(default_factory=list, metadata=_check(
        _labels_ok, f"a list of labels, each 1 to {MAX_SCOPE_ITEM_BYTES} bytes of text without commas"))
    #: Directories of cache files the worker empties on every clear, keeping each directory, as
    #: Flextype's clear empties its var/tmp (docs/scoped-clears.md, "The directory target").
    purge_dirs: list[str] = field(default_factory=list,
                                  metadata=_check(lambda v: all(v), "a list of directory paths, none empty"))


@dataclass(frozen=True)
class RelaySettings:
    """``cachebus relay`` (docs/scale-out.md): where its workers connect, and its own keys for them.

    Upstream it uses ``bus.publish``, ``bus.acks`` and ``bus.keys_dir`` as a worker would, with its
    keypair in ``<bus.keys_dir>/relays/<name>.key_secret``.
    """

    #: The relay's name: its key file's name at the service, shown as a worker's ``via``. Empty: the host name.
    name: str = ""
    publish: str = field(default="tcp://127.0.0.1:5566",
                         metadata=_check(_endpoint, "a ZeroMQ endpoint like tcp://host:port or ipc://path"))
    acks: str = field(default="tcp://127.0.0.1:5567",
                      metadata=_check(_endpoint, "a ZeroMQ endpoint like tcp://host:port or ipc://path"))
    #: The relay's own keys as its workers see them: its server keypair and their allow-list.
    keys_dir: str = field(default="var/relay-keys", metadata=_check(bool, "a directory"))
    #: Milliseconds a worker's message may wait for others to share its envelope.
    batch_ms: float = field(default=1.0, metadata=_check(lambda v: 0 <= v <= 100, "0 to 100 milliseconds"))
    #: Milliseconds a worker's ack may wait for the acks of the relay's other workers, so that one
    #: clear's acks go up in one envelope; 0: acks share the batch_ms window.
    hold_ms: float = field(default=50.0, metadata=_check(lambda v: 0 <= v <= 1000, "0 to 1000 milliseconds"))
    #: Where the relay serves ``GET /metrics`` (``metrics.auth`` applies as on the service); port 0: nowhere.
    http_host: str = "127.0.0.1"
    http_port: int = field(default=8090, metadata=_check(_port, "a port number 0-65535"))


@dataclass(frozen=True)
class LogSettings:
    level: str = field(default="INFO", metadata=_check(
        lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "one of DEBUG, INFO, WARNING, ERROR"))
    format: LogFormat = LogFormat.TEXT


@dataclass(frozen=True)
class Settings:
    service: ServiceSettings = field(default_factory=ServiceSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    record: RecordSettings = field(default_factory=RecordSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    bus: BusSettings = field(default_factory=BusSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    log: LogSettings = field(default_factory=LogSettings)

    def replace(self, overrides: dict[str, Any], source: str = "command line") -> Settings:
        """Return a copy with dotted-key ``overrides`` (``{"service.port": 9000}``) applied."""
        nested: dict[str, Any] = {}
        for dotted, value in overrides.items():
            node = nested
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return _build(type(self), nested, source, "", base=self)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _coerce(source: str, key: str, hint: Any, value: Any) -> Any:
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        # A setting that names a choice is its enum, so a typo is caught here, not where it is used.
        if not isinstance(value, str) or value not in hint.__members__.values():
            raise SettingsError(f"{source}: {key}: expected {_choices(hint)}, got {value!r}")
        return hint(value)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise SettingsError(f"{source}: {key}: expected a list of {_PLURALS[item]}, got {value!r}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise SettingsError(f"{source}: {key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise SettingsError(f"{source}: {key}: expected {_TYPE_NAMES[hint]}, got {value!r}")
    return value


def _choices(choice: type[enum.StrEnum]) -> str:
    names = [member.value for member in choice]
    return " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"


#: A settings section: one of the dataclasses below.
_Section = TypeVar("_Section", bound="DataclassInstance")


def _build(cls: type[_Section], data: Any, source: str, prefix: str, base: _Section | None = None) -> _Section:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise SettingsError(f"{source}: {where}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known:
            raise SettingsError(f"{source}: {prefix}{name}: unknown setting")
    values = {}
    for name, f in known.items():
        key = prefix + name
        hint = hints[name]
        current = getattr(base, name) if base is not None else None
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data.get(name, {}), source, key + ".", base=current)
            continue
        if name not in data:
            if base is not None:
                values[name] = current
            continue
        value = _coerce(source, key, hint, data[name])
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise SettingsError(f"{source}: {key}: expected {f.metadata['expected']}, got {value!r}")
        values[name] = value
    built = cls(**values)
    problem = getattr(built, "problem", None)
    found = problem() if problem is not None else None
    if found is not None:
        name, message = found
        raise SettingsError(f"{source}: {prefix}{name}: {message}")
    return built


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from ``path``, ``$CACHEBUS_CONFIG`` or the default file.

    A missing default file means "use the built-in defaults"; a missing file
    that was asked for by name is an error.
    """
    explicit = path or os.environ.get(CONFIG_ENV)
    config = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise SettingsError(f"{config}: settings file not found") from None
        return Settings()
    except OSError as exc:
        raise SettingsError(f"{config}: cannot read settings file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SettingsError(f"{config}: not valid YAML{where}: {problem}") from None
    return _build(Settings, data if data is not None else {}, str(config), "")

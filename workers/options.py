"""A subscriber's options: :class:`SubscriberOptions`, and how an embedder takes them from the settings file
and the environment.

:class:`SubscriberOptions` is the one definition of what a
:class:`~cachebus.workers.subscriber.Subscriber` can be told, checked when it
is made: ``Subscriber(targets, name="web")`` passes its keywords here, and an
unknown one is a :class:`TypeError` naming it.

``Subscriber.from_settings(targets)`` (and the same on ``ThreadedSubscriber``)
builds a subscriber from what the service already uses, so an application
repeats no endpoint or key by hand. Each option comes from the first of:

1. a keyword given to ``from_settings`` (``name="web"``);
2. an environment variable (:data:`ENV_VARS`: ``CACHEBUS_PUBLISH``, ``CACHEBUS_KEY``, …);
   an empty one counts as unset;
3. the settings file: ``path``, else ``$CACHEBUS_CONFIG``, else none (the built-in
   defaults). Unlike ``cachebus serve``, an embedder never reads
   ``config/settings.yaml`` unasked: that path, relative to the application's
   working directory, may well be the application's own file.

From the file it takes ``bus.publish``, ``bus.acks``, ``bus.key``, ``bus.insecure``,
``bus.keys_dir``, ``bus.secret_key_file``, ``bus.recv_hwm``, ``bus.socket_buffer``,
``bus.on_silence``, ``worker.name`` and ``worker.labels``. The lease terms (``heartbeat_interval``, ``liveness``) come
from the service itself. A bad value raises :class:`~cachebus.settings.SettingsError`
with one line that names the file and key, or the variable.

Only the base install is needed: :mod:`cachebus.settings` imports no part of the service.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq.asyncio
from zmq.utils import z85

from cachebus.bus.endpoints import DEFAULT_ACKS, DEFAULT_PUBLISH, split_endpoints
from cachebus.bus.protocol import OnSilence
from cachebus.bus.scope import check_item
from cachebus.bus.security import DEFAULT_KEYS_DIR, BusMode, bus_mode
from cachebus.settings import CONFIG_ENV, Settings, SettingsError, load


def default_name() -> str:
    """The host name: the label every unnamed subscriber on this host shares (processes differ by instance)."""
    return socket.gethostname()


@dataclass(frozen=True, kw_only=True)
class SubscriberOptions:
    """What a subscriber is told, checked once, here: a bad value is a :class:`ValueError` naming it.

    Security, as ``bus.*`` in the settings: by default CURVE with the keys in
    ``keys_dir`` (``server_key`` gives the service's z85 public key instead of
    ``<keys_dir>/service.key``, ``secret_key_file`` this process's keypair
    instead of ``<keys_dir>/workers/<name>.key_secret``); a shared ``key`` for
    HMAC; or ``insecure=True``.

    ``heartbeat_interval`` and ``liveness`` may be left out: the service sends
    its own, and the subscriber follows them (with one warning if given values
    differ). Until it hears the service they only time reconnects.
    """

    #: A label many processes share, a role such as ``web``; also names the CURVE keypair. Empty: the host name.
    name: str = ""
    #: More names this process answers to in a clear's ``group`` (``web``, ``eu``, ``host-3``); any iterable.
    labels: tuple[str, ...] = ()
    #: The service's endpoints, one per instance when several share the lead (docs/scale-out.md),
    #: separated by commas: every instance's PUB, and every instance's ack ROUTER (used one at a time).
    publish: str = DEFAULT_PUBLISH
    acks: str = DEFAULT_ACKS
    #: This process's read API, if it has one, as the service lists it.
    endpoint: str = ""
    key: str | bytes = b""
    insecure: bool = False
    keys_dir: str | os.PathLike[str] = DEFAULT_KEYS_DIR
    server_key: str | bytes | None = None
    secret_key_file: str | os.PathLike[str] | None = None
    heartbeat_interval: float | None = None
    liveness: int | None = None
    recv_hwm: int = 10_000
    socket_buffer: int = 0
    #: What the targets do once the service is silent for a lease (``bus.on_silence``); a string is taken too.
    on_silence: OnSilence = OnSilence.BYPASS
    #: The ZeroMQ context to make the sockets in; by default one of the subscriber's own, made at start
    #: (a context made before a fork is unusable in the child).
    context: zmq.asyncio.Context | None = None

    def __post_init__(self) -> None:
        # Normalized in place (the dataclass is frozen only to its users): a shared default name,
        # labels as a checked tuple, on_silence as its enum.
        object.__setattr__(self, "name", self.name or default_name())
        object.__setattr__(self, "labels", tuple(dict.fromkeys(check_item("labels", label)
                                                               for label in self.labels)))
        # Checked now, not at start: a typo fails where the subscriber is built.
        _check_endpoints("publish", self.publish)
        _check_endpoints("acks", self.acks)
        bus_mode(self.raw_key, self.insecure)
        if self.heartbeat_interval is not None and not self.heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be a positive number of seconds, "
                             f"not {self.heartbeat_interval!r}")
        if self.liveness is not None and not self.liveness >= 1:
            raise ValueError(f"liveness must be a positive count of heartbeats, not {self.liveness!r}")
        if self.on_silence not in OnSilence.__members__.values():
            raise ValueError(f"on_silence must be {' or '.join(OnSilence)}, not {self.on_silence!r}")
        object.__setattr__(self, "on_silence", OnSilence(self.on_silence))

    @classmethod
    def of(cls, options: SubscriberOptions | None = None, /, **fields: Any) -> SubscriberOptions:
        """``options`` (else the defaults) with ``fields`` changed; an unknown field is a :class:`TypeError`."""
        unknown = sorted(set(fields) - _FIELDS)
        if unknown:
            raise TypeError(f"unknown subscriber option{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}: the options are {', '.join(sorted(_FIELDS))}")
        if options is None:
            return cls(**fields)
        return dataclasses.replace(options, **fields) if fields else options

    @property
    def raw_key(self) -> bytes:
        """The shared HMAC key as bytes (empty without one)."""
        return self.key.encode() if isinstance(self.key, str) else self.key

    @property
    def mode(self) -> BusMode:
        """CURVE, HMAC or insecure, as the key and ``insecure`` ask."""
        return bus_mode(self.raw_key, self.insecure)

    @property
    def publish_endpoints(self) -> list[str]:
        return _check_endpoints("publish", self.publish)

    @property
    def acks_endpoints(self) -> list[str]:
        return _check_endpoints("acks", self.acks)


_FIELDS = frozenset(f.name for f in dataclasses.fields(SubscriberOptions))


def _check_endpoints(option: str, endpoints: str) -> list[str]:
    try:
        return split_endpoints(endpoints)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


def _text(value: str) -> str:
    return value


def _boolean(value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes"):
        return True
    if word in ("0", "false", "no"):
        return False
    raise ValueError("expected 1, true, yes, 0, false or no")


def _integer(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def _labels(value: str) -> list[str]:
    """``eu,web-3``: labels separated by commas (a label holds none)."""
    return [label.strip() for label in value.split(",") if label.strip()]


def _server_key(value: str) -> str:
    """A z85 CURVE public key, checked here so a typo names its variable rather than failing at start."""
    try:
        valid = len(value) == 40 and len(z85.decode(value)) == 32
    except ValueError:
        valid = False
    if not valid:
        raise ValueError("expected the service's z85-encoded CURVE public key (40 characters)")
    return value


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: the subscriber option it sets, and the setting it stands for."""

    name: str
    option: str
    #: The dotted settings key, checked by the settings' own rules; "" for an option with no setting.
    setting: str
    parse: Callable[[str], Any] = _text


ENV_VARS = (
    EnvVar("CACHEBUS_PUBLISH", "publish", "bus.publish"),
    EnvVar("CACHEBUS_ACKS", "acks", "bus.acks"),
    # Before the key: with a file's `insecure: true`, CACHEBUS_INSECURE=0 CACHEBUS_KEY=… is no contradiction.
    EnvVar("CACHEBUS_INSECURE", "insecure", "bus.insecure", _boolean),
    EnvVar("CACHEBUS_KEY", "key", "bus.key"),
    EnvVar("CACHEBUS_KEYS_DIR", "keys_dir", "bus.keys_dir"),
    EnvVar("CACHEBUS_SERVER_KEY", "server_key", "", _server_key),
    EnvVar("CACHEBUS_SECRET_KEY_FILE", "secret_key_file", "bus.secret_key_file"),
    EnvVar("CACHEBUS_NAME", "name", "worker.name"),
    EnvVar("CACHEBUS_LABELS", "labels", "worker.labels", _labels),
    EnvVar("CACHEBUS_RECV_HWM", "recv_hwm", "bus.recv_hwm", _integer),
    EnvVar("CACHEBUS_ON_SILENCE", "on_silence", "bus.on_silence"),
)


def embedder_settings(path: str | os.PathLike[str] | None = None, *,
                      environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings file an embedder reads: ``path``, else ``$CACHEBUS_CONFIG``, else the built-in defaults."""
    chosen = path or environ.get(CONFIG_ENV)
    return load(chosen) if chosen else Settings()


def subscriber_options(settings: Settings, *, environ: Mapping[str, str] = os.environ,
                       **overrides: Any) -> SubscriberOptions:
    """A subscriber's options: ``overrides``, then ``environ``, then ``settings``.

    ``overrides`` are :class:`SubscriberOptions` fields (an unknown one is a
    :class:`TypeError`). A variable whose option is overridden is not read at
    all. The reference worker passes ``environ={}``: its command-line flags
    are already in its settings and must win over the environment.
    """
    found: dict[str, Any] = {}
    for var in ENV_VARS:
        raw = environ.get(var.name, "")
        if not raw or var.option in overrides:
            continue
        try:
            value = var.parse(raw)
        except ValueError as exc:
            # The message never repeats the value: CACHEBUS_KEY is a secret.
            raise SettingsError(f"{var.name}: {exc}") from None
        if var.setting:
            # The settings' own checks (an endpoint, a positive count), and the same one-line error.
            settings = settings.replace({var.setting: value}, source=var.name)
        else:
            found[var.option] = value
    bus = settings.bus
    from_settings: dict[str, Any] = {
        "name": settings.worker.name,
        "labels": tuple(settings.worker.labels),
        "publish": bus.publish,
        "acks": bus.acks,
        "key": bus.key,
        "insecure": bus.insecure,
        "keys_dir": bus.keys_dir,
        "secret_key_file": bus.secret_key_file or None,
        "recv_hwm": bus.recv_hwm,
        "socket_buffer": bus.socket_buffer,
        "on_silence": OnSilence(bus.on_silence),
    }
    return SubscriberOptions.of(**{**from_settings, **found, **overrides})

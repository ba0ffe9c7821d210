"""A subscriber's options from the settings file and the environment, for embedders.

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

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zmq.utils import z85

from cachebus.bus.protocol import OnSilence
from cachebus.settings import CONFIG_ENV, Settings, SettingsError, load


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
                       **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``Subscriber``: ``overrides``, then ``environ``, then ``settings``.

    A variable whose option is overridden is not read at all. The reference
    worker passes ``environ={}``: its command-line flags are already in its
    settings and must win over the environment.
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
    return {
        "name": settings.worker.name or None,
        "labels": settings.worker.labels,
        "publish": bus.publish,
        "acks": bus.acks,
        "key": bus.key,
        "insecure": bus.insecure,
        "keys_dir": bus.keys_dir,
        "secret_key_file": bus.secret_key_file or None,
        "recv_hwm": bus.recv_hwm,
        "socket_buffer": bus.socket_buffer,
        "on_silence": OnSilence(bus.on_silence),
        **found,
        **overrides,
    }

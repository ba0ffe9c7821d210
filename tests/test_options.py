"""Subscriber.from_settings: an embedder's subscriber from the settings file and CACHEBUS_* variables."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.asyncio
import zmq.auth

from cachebus import Cache, Subscriber, ThreadedSubscriber
from cachebus.bus.endpoints import DEFAULT_ACKS, DEFAULT_PUBLISH
from cachebus.bus.protocol import OnSilence
from cachebus.bus.security import BusMode
from cachebus.settings import CONFIG_ENV, SettingsError
from cachebus.testing import DEADLINE, Cluster, wait_for
from cachebus.workers.options import ENV_VARS, SubscriberOptions, embedder_settings, subscriber_options

FILE = """
bus:
  publish: tcp://10.0.0.5:5556
  acks: tcp://10.0.0.5:5557
  keys_dir: /etc/cachebus/keys
  secret_key_file: /etc/cachebus/web.key_secret
  recv_hwm: 500
  socket_buffer: 65536
  on_silence: serve
  heartbeat_interval: 2.0
  liveness: 9
worker:
  name: web
  labels: [eu, blue]
"""


def options(path: Path | None = None, environ: dict[str, str] | None = None,
            **overrides: object) -> SubscriberOptions:
    environ = environ or {}
    return subscriber_options(embedder_settings(path, environ=environ), environ=environ, **overrides)


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(FILE)
    return path


def test_the_file_gives_the_bus_settings_and_the_name_but_not_the_lease_terms(settings_file: Path):
    assert options(settings_file) == SubscriberOptions(
        name="web", labels=("eu", "blue"), publish="tcp://10.0.0.5:5556", acks="tcp://10.0.0.5:5557",
        key="", insecure=False, keys_dir="/etc/cachebus/keys",
        secret_key_file="/etc/cachebus/web.key_secret", recv_hwm=500, socket_buffer=65536,
        on_silence=OnSilence.SERVE)  # no heartbeat_interval, no liveness: the service's terms rule


def test_keywords_beat_the_environment_which_beats_the_file(settings_file: Path):
    environ = {"CACHEBUS_PUBLISH": "tcp://10.0.0.6:5556", "CACHEBUS_NAME": "web-env", "CACHEBUS_RECV_HWM": "42"}
    assert options(settings_file, environ, publish="tcp://10.0.0.7:5556").publish == "tcp://10.0.0.7:5556"
    got = options(settings_file, environ)
    assert (got.publish, got.name, got.recv_hwm) == ("tcp://10.0.0.6:5556", "web-env", 42)
    assert got.acks == "tcp://10.0.0.5:5557"  # not in the environment: from the file
    got = options(None, environ)
    assert (got.publish, got.acks, got.recv_hwm) == ("tcp://10.0.0.6:5556", DEFAULT_ACKS, 42)


def test_every_variable(tmp_path: Path):
    server_public, _ = zmq.auth.create_certificates(tmp_path, "service")
    server_key = zmq.auth.load_certificate(server_public)[0].decode()
    environ = {"CACHEBUS_PUBLISH": "tcp://a:1", "CACHEBUS_ACKS": "tcp://a:2", "CACHEBUS_KEY": "shared-secret",
               "CACHEBUS_KEYS_DIR": "/k", "CACHEBUS_SERVER_KEY": server_key, "CACHEBUS_SECRET_KEY_FILE": "/k/me",
               "CACHEBUS_NAME": "api", "CACHEBUS_RECV_HWM": "7", "CACHEBUS_ON_SILENCE": "serve",
               "CACHEBUS_LABELS": "eu, blue,,"}
    assert options(None, environ) == SubscriberOptions(
        name="api", labels=("eu", "blue"), publish="tcp://a:1", acks="tcp://a:2",
        key="shared-secret", insecure=False,
        keys_dir="/k", server_key=server_key, secret_key_file="/k/me", recv_hwm=7, socket_buffer=0,
        on_silence=OnSilence.SERVE)
    # Each variable sets a field of the one definition of the options.
    assert {var.option for var in ENV_VARS} <= {f.name for f in dataclasses.fields(SubscriberOptions)}


@pytest.mark.parametrize(("value", "insecure"), [("1", True), ("true", True), ("YES", True), ("0", False),
                                                 ("false", False), ("no", False)])
def test_insecure_words(value: str, insecure: bool):
    assert options(None, {"CACHEBUS_INSECURE": value}).insecure is insecure


def test_the_settings_file_is_path_else_cachebus_config_else_none(settings_file: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    other = tmp_path / "other.yaml"
    other.write_text("bus:\n  publish: tcp://10.0.0.9:5556\n")
    assert options(settings_file, {CONFIG_ENV: str(other)}).publish == "tcp://10.0.0.5:5556"
    assert options(None, {CONFIG_ENV: str(other)}).publish == "tcp://10.0.0.9:5556"
    # An application's own config/settings.yaml is never read unasked (cachebus serve's default path).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings.yaml").write_text("database: {url: postgres://app}\n")
    assert options().publish == DEFAULT_PUBLISH


def test_empty_variables_are_unset_and_overridden_ones_are_not_read(settings_file: Path):
    got = options(settings_file, {"CACHEBUS_PUBLISH": "", "CACHEBUS_NAME": "", "CACHEBUS_RECV_HWM": "many"},
                  recv_hwm=3)
    assert (got.publish, got.name, got.recv_hwm) == ("tcp://10.0.0.5:5556", "web", 3)


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("CACHEBUS_INSECURE", "maybe", "expected 1, true, yes, 0, false or no"),
    ("CACHEBUS_RECV_HWM", "ten", "expected an integer"),
    ("CACHEBUS_RECV_HWM", "0", "bus.recv_hwm: expected a positive message count, got 0"),
    ("CACHEBUS_PUBLISH", "10.0.0.5:5556", "bus.publish: expected a ZeroMQ endpoint like tcp://host:port"),
    ("CACHEBUS_ACKS", "http://10.0.0.5", "bus.acks: expected a ZeroMQ endpoint like tcp://host:port"),
    ("CACHEBUS_SERVER_KEY", "not-a-key", "expected the service's z85-encoded CURVE public key"),
    ("CACHEBUS_ON_SILENCE", "stale", "bus.on_silence: expected bypass or serve, got 'stale'"),
    ("CACHEBUS_LABELS", "eu,bl\x01ue", "worker.labels: expected a list of labels, each 1 to 200 bytes of text "
                                     "without commas"),
])
def test_a_bad_variable_is_one_line_naming_it(variable: str, value: str, says: str):
    with pytest.raises(SettingsError) as caught:
        options(None, {variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and says in message and "\n" not in message


def test_a_contradiction_names_the_variable_and_never_the_key(tmp_path: Path):
    insecure = tmp_path / "insecure.yaml"
    insecure.write_text("bus:\n  insecure: true\n")
    with pytest.raises(SettingsError) as caught:
        options(insecure, {"CACHEBUS_KEY": "s3cret-bus-key"})
    assert str(caught.value).startswith("CACHEBUS_KEY: bus.insecure: true together with a bus.key")
    assert "s3cret" not in str(caught.value)
    # Turned off in the environment too: no contradiction, whatever the order of the variables.
    assert options(insecure, {"CACHEBUS_KEY": "s3cret-bus-key", "CACHEBUS_INSECURE": "0"}).insecure is False


def test_a_bad_settings_file_names_the_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bus:\n  recv_hwm: lots\n")
    with pytest.raises(SettingsError, match=rf"^{bad}: bus.recv_hwm: expected an integer, got 'lots'$"):
        Subscriber.from_settings([Cache()], bad, environ={})
    with pytest.raises(SettingsError, match="settings file not found"):
        ThreadedSubscriber.from_settings([Cache()], environ={CONFIG_ENV: str(tmp_path / "missing.yaml")})


def test_from_settings_builds_the_subscriber(settings_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CACHEBUS_KEY", "shared")  # os.environ unless told otherwise
    ctx = zmq.asyncio.Context()
    try:
        subscriber = Subscriber.from_settings([Cache()], settings_file, context=ctx, endpoint="http://web:8000")
        got = subscriber.options
        assert (subscriber.name, got.publish, got.acks) == ("web", "tcp://10.0.0.5:5556", "tcp://10.0.0.5:5557")
        assert (subscriber.mode, got.recv_hwm, got.socket_buffer) == (BusMode.HMAC, 500, 65536)
        assert got.endpoint == "http://web:8000" and got.context is ctx
    finally:
        ctx.term()


def test_the_options_are_one_checked_value_given_whole_or_by_keyword():
    base = SubscriberOptions(name="web", labels=["eu", "blue", "eu"], insecure=True, on_silence="serve")
    assert (base.labels, base.on_silence) == (("eu", "blue"), OnSilence.SERVE)
    subscriber = Subscriber([Cache()], base, publish="tcp://10.0.0.5:5556")
    assert subscriber.options == dataclasses.replace(base, publish="tcp://10.0.0.5:5556")
    assert subscriber.name == "web" and subscriber.labels == ("eu", "blue")
    assert ThreadedSubscriber([Cache()], base).subscriber.options is base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.name = "api"  # type: ignore[misc]
    for build in (Subscriber, ThreadedSubscriber):
        with pytest.raises(TypeError, match="unknown subscriber option 'nmae': the options are acks, context"):
            build([Cache()], nmae="web")
    with pytest.raises(ValueError, match="liveness must be a positive count of heartbeats, not 0"):
        SubscriberOptions(liveness=0)
    with pytest.raises(ValueError, match="acks: 'tcp://a:1,tcp://a:1' names an endpoint twice"):
        Subscriber([Cache()], acks="tcp://a:1,tcp://a:1")


@pytest.mark.processes
def test_embedding_needs_only_the_base_install():
    probe = ("import sys, cachebus, cachebus.workers.options, cachebus.workers.lease\n"
             "print(sorted(m for m in ('tornado', 'bcrypt', 'prometheus_client', 'cachetools') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.processes
def test_an_embedded_subscriber_joins_from_the_environment(cluster: Cluster, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    cluster.start_service()
    config = tmp_path / "embedded.yaml"
    config.write_text(f"bus:\n  publish: {cluster.publish}\n  keys_dir: {cluster.keys_dir}\nworker:\n  name: web\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("CACHEBUS_ACKS", cluster.acks)
    monkeypatch.setenv("CACHEBUS_NAME", "embedded-web")
    cache = Cache()
    subscriber = ThreadedSubscriber.from_settings([cache])
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("embedded-web")
        cache.set("k", "old")
        status, _, _ = cluster.clear()
        assert status == 204
        wait_for(lambda: len(cache) == 0, what="the clear to purge the embedded cache")
    finally:
        subscriber.stop()


@pytest.mark.processes
def test_the_reference_worker_takes_its_flags_over_the_environment(cluster: Cluster,
                                                                   monkeypatch: pytest.MonkeyPatch):
    # What an embedder's subscriber would read; the reference worker's --name and --bus-* flags must win.
    monkeypatch.setenv("CACHEBUS_PUBLISH", "tcp://127.0.0.1:9")
    monkeypatch.setenv("CACHEBUS_NAME", "from-env")
    cluster.start_service()
    cluster.start_worker("w1")  # joins, as w1, through the cluster's endpoints
    assert "from-env" not in {w["name"] for w in cluster.worker_list()}

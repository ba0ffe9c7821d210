"""Settings: the shipped file matches the built-in defaults, and errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachebus import settings
from cachebus.bus.protocol import OnSilence
from cachebus.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_settings_file_states_every_default():
    assert settings.load(ROOT / "config" / "settings.yaml") == Settings()


def test_every_setting_in_the_shipped_file_has_a_comment():
    lines = (ROOT / "config" / "settings.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert any(lines[j].strip().startswith("#") for j in range(max(0, i - 4), i)), line


def test_missing_default_file_means_built_in_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(settings.CONFIG_ENV, raising=False)
    assert settings.load() == Settings()


@pytest.mark.parametrize("text, message", [
    ("service:\n  port: eighty\n", "service.port: expected an integer, got 'eighty'"),
    ("service:\n  port: 70000\n", "service.port: expected a port number 0-65535, got 70000"),
    ("servce: {}\n", "servce: unknown setting"),
    ("api:\n  cache:\n    methods: POST\n", "api.cache.methods: expected a list of strings"),
    ("api:\n  cache:\n    methods: [DELETE]\n", "api.cache.methods: expected a non-empty list of POST and/or GET"),
    ("bus:\n  publish: 127.0.0.1:5556\n", "bus.publish: expected a ZeroMQ endpoint"),
    ("bus: 3\n", "bus: expected a mapping of settings"),
    ("- a\n", "top level: expected a mapping of settings"),
    ("service: [\n", "not valid YAML at line"),
    ("api:\n  cache:\n    enabled: yes please\n", "api.cache.enabled: expected true or false"),
    ("bus:\n  insecure: true\n  key: s3cret\n", "bus.insecure: true together with a bus.key"),
    ("bus:\n  max_workers: 0\n", "bus.max_workers: expected a positive count"),
    ("bus:\n  keys_dir: ''\n", "bus.keys_dir: expected a directory"),
    ("worker:\n  purge_dirs: /srv/flextype/var/tmp\n", "worker.purge_dirs: expected a list of strings"),
    ("worker:\n  purge_dirs: ['']\n", "worker.purge_dirs: expected a list of directory paths, none empty"),
    # A setting that names a choice is an enum: a typo is refused here, naming the choices.
    ("metrics:\n  auth: requried\n", "metrics.auth: expected one of auto, required, off, got 'requried'"),
    ("log:\n  format: yaml\n", "log.format: expected text or json, got 'yaml'"),
    ("bus:\n  on_silence: 1\n", "bus.on_silence: expected bypass or serve, got 1"),
])
def test_bad_file_names_file_key_and_expectation(tmp_path: Path, text: str, message: str):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        settings.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_partial_file_keeps_other_defaults(tmp_path: Path):
    path = tmp_path / "settings.yaml"
    path.write_text("bus:\n  heartbeat_interval: 2\n")
    loaded = settings.load(path)
    assert loaded.bus.heartbeat_interval == 2.0
    assert loaded.bus.liveness == Settings().bus.liveness
    assert loaded.service == Settings().service


def test_overrides_are_validated_like_the_file():
    assert Settings().replace({"service.port": 9000}).service.port == 9000
    with pytest.raises(SettingsError, match=r"command line --port: service\.port"):
        Settings().replace({"service.port": -1}, source="command line --port")


def test_a_choice_is_read_as_its_enum(tmp_path: Path):
    path = tmp_path / "settings.yaml"
    path.write_text("metrics:\n  auth: required\nlog:\n  format: json\nbus:\n  on_silence: serve\n")
    loaded = settings.load(path)
    assert loaded.metrics.auth is settings.MetricsAuth.REQUIRED
    assert loaded.log.format is settings.LogFormat.JSON
    assert loaded.bus.on_silence is OnSilence.SERVE

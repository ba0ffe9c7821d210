"""The ``cachebus`` command: tokens, settings errors, and the module entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cachebus.testing import free_port

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent

CACHEBUS = str(Path(sys.executable).parent / "cachebus")


def run(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CACHEBUS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_tokens_create_json_list_and_disable(tmp_path: Path):
    tokens = tmp_path / "tokens"
    created = run("tokens", "create", "--tokens-dir", str(tokens), "--limit-calls", "5", "--json")
    assert created.returncode == 0, created.stderr
    data = json.loads(created.stdout)
    assert set(data) == {"token", "access_token", "path"}
    path = Path(data["path"])
    assert path == tokens / data["token"] / "token.yaml"
    stored = yaml.safe_load(path.read_text())
    assert stored["limit_calls"] == 5 and stored["calls"] == 0 and stored["state"] == "enabled"
    assert stored["hashed_access_token"].startswith("$2y$")
    assert data["access_token"] not in path.read_text()

    listed = run("tokens", "list", "--tokens-dir", str(tokens))
    assert listed.returncode == 0
    assert data["token"] in listed.stdout and "enabled" in listed.stdout
    assert data["access_token"] not in listed.stdout

    disabled = run("tokens", "disable", "--tokens-dir", str(tokens), data["token"])
    assert disabled.returncode == 0
    assert yaml.safe_load(path.read_text())["state"] == "disabled"
    unknown = run("tokens", "disable", "--tokens-dir", str(tokens), "0" * 32)
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1


def test_bad_settings_file_is_one_line_naming_file_key_and_expectation(tmp_path: Path):
    bad = tmp_path / "settings.yaml"
    bad.write_text("service:\n  port: eighty\n")
    for command in (["serve"], ["worker"]):
        result = run(*command, "--config", str(bad))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert str(bad) in result.stderr and "service.port" in result.stderr and "integer" in result.stderr
        assert "Traceback" not in result.stderr
    bad.write_text("bus:\n  heartbeat_intervall: 1\n")
    result = run("serve", "--config", str(bad))
    assert "bus.heartbeat_intervall: unknown setting" in result.stderr


def test_config_file_from_environment(tmp_path: Path):
    bad = tmp_path / "env.yaml"
    bad.write_text("api:\n  cache:\n    success_status: 201\n")
    result = subprocess.run([CACHEBUS, "serve"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"CACHEBUS_CONFIG": str(bad), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert f"{bad}: api.cache.success_status: expected 200 or 204, got 201" in result.stderr


def test_missing_named_settings_file_is_an_error(tmp_path: Path):
    result = run("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "settings file not found" in result.stderr


def test_bad_flags_are_one_line(tmp_path: Path):
    for args in (["serve", "--port", "x"], ["serve", "--port", "70000"], ["worker", "--bus-acks", "localhost"],
                 ["serve", "--bogus"], ["worker", "--content-dir", str(tmp_path / "missing")]):
        result = run(*args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--port", str(free_port()), "--tokens-dir", str(tmp_path),
                     "--bus-publish", f"tcp://127.0.0.1:{port}", "--bus-acks", f"tcp://127.0.0.1:{free_port()}",
                     "--keys-dir", str(tmp_path / "keys"))
    assert result.returncode == 2
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_entry_points_match_the_console_script():
    for module, command in (("service", "serve"), ("workers", "worker")):
        via_module = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=60)
        via_script = run(command, "--help")
        assert via_module.returncode == via_script.returncode == 0
        assert via_module.stdout == via_script.stdout


def test_demo_prepares_token_content_and_prints_a_working_command(tmp_path: Path):
    result = run("demo", "--tokens-dir", str(tmp_path / "tokens"), "--content-dir", str(tmp_path / "content"),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "content" / "hello" / "entry.yaml").exists()
    creds = json.loads((tmp_path / "var" / "demo-credentials.json").read_text())
    assert f"token={creds['token']}" in result.stdout
    assert "curl" in result.stdout and "/api/v1/cache/clear" in result.stdout
    again = run("demo", "--tokens-dir", str(tmp_path / "tokens"), "--content-dir", str(tmp_path / "content"),
                cwd=tmp_path)
    assert again.stdout == result.stdout
    assert len(list((tmp_path / "tokens").iterdir())) == 1

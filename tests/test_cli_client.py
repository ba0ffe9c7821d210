"""``cachebus clear`` and ``cachebus workers`` against a real service and real workers."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from cachebus.client import progress_bar, worker_table
from cachebus.testing import DEADLINE, Cluster, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

CACHEBUS = str(Path(sys.executable).parent / "cachebus")


def cachebus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script with no credentials or settings file from this shell."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("CACHEBUS_TOKEN", "CACHEBUS_ACCESS_TOKEN", "CACHEBUS_CONFIG")}
    return subprocess.run([CACHEBUS, *args], cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE * 2,
                          env={**base, **(env or {})})


def creds(cluster: Cluster) -> list[str]:
    return ["--url", cluster.url, "--token", cluster.token, "--access-token", cluster.access_token]


def one_line_error(result: subprocess.CompletedProcess[str], status: int = 1) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("cachebus: error: ") and "Traceback" not in result.stderr
    return result.stderr


def start_with_workers(cluster: Cluster, *names: str, settings: dict | None = None) -> None:
    cluster.start_service(settings=settings)
    for name in names:
        cluster.start_worker(name)


def test_clear_without_wait_and_with_no_live_workers(cluster: Cluster):
    cluster.start_service()
    result = cachebus("clear", *creds(cluster))
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert result.stdout.count("\n") == 1 and words[0] == "clear" and words[2] == "accepted", result.stdout
    assert cluster.clear_record(words[1])["id"] == words[1]

    waited = cachebus("clear", *creds(cluster), "--wait", "--timeout", "5")
    assert waited.returncode == 0, waited.stderr
    assert "no workers were live" in waited.stdout


def test_errors_are_one_line_and_exit_1(cluster: Cluster):
    cluster.start_service()
    wrong = cachebus("clear", "--url", cluster.url, "--token", cluster.token, "--access-token", "not-it")
    assert "HTTP 401" in one_line_error(wrong) and "Token is wrong" in wrong.stderr
    assert "not-it" not in wrong.stdout + wrong.stderr
    unknown = cachebus("workers", "--url", cluster.url, "--token", "nope", "--access-token", cluster.access_token)
    assert "HTTP 401" in one_line_error(unknown) and "Token is wrong" in unknown.stderr
    assert cluster.access_token not in unknown.stdout + unknown.stderr

    missing = cachebus("clear", "--url", cluster.url, "--token", cluster.token)
    assert "--access-token" in one_line_error(missing) and "CACHEBUS_ACCESS_TOKEN" in missing.stderr
    assert "--timeout" in one_line_error(cachebus("clear", *creds(cluster), "--wait", "--timeout", "x"))
    assert "--bogus" in one_line_error(cachebus("workers", *creds(cluster), "--bogus"))

    # Nothing listens on a free port.
    for command in ("clear", "workers"):
        unreachable = cachebus(command, "--url", f"http://127.0.0.1:{free_port()}", "--token", cluster.token,
                               "--access-token", cluster.access_token)
        assert "cannot reach" in one_line_error(unreachable)
        assert cluster.access_token not in unreachable.stderr


def test_credentials_from_the_environment_and_flags_win(cluster: Cluster):
    cluster.start_service()
    env = {"CACHEBUS_TOKEN": cluster.token, "CACHEBUS_ACCESS_TOKEN": cluster.access_token}
    from_env = cachebus("clear", "--url", cluster.url, env=env)
    assert from_env.returncode == 0 and " accepted" in from_env.stdout, from_env.stderr
    assert cachebus("workers", "--url", cluster.url, env=env).returncode == 0

    flag_wins = cachebus("clear", "--url", cluster.url, "--access-token", "not-it", env=env)
    assert "Token is wrong" in one_line_error(flag_wins)
    env_wrong = {**env, "CACHEBUS_ACCESS_TOKEN": "not-it"}
    assert cachebus("clear", "--url", cluster.url, "--access-token", cluster.access_token,
                    env=env_wrong).returncode == 0


def test_wait_until_both_workers_acked_and_the_worker_table(cluster: Cluster):
    start_with_workers(cluster, "w1", "w2")
    result = cachebus("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "\r" not in result.stdout, "no progress bar when stdout is not a terminal"
    lines = result.stdout.splitlines()
    assert "waiting for 2 workers" in lines[0]
    acks = sorted(line for line in lines if " acked in " in line and "(cause: " in line)
    assert [line.split()[0] for line in acks] == ["w1", "w2"], lines
    assert " ms (cause: clear)" in acks[0]
    assert "all 2 workers acked" in lines[-1]
    clear_id = lines[0].split()[1]
    assert cluster.clear_record(clear_id)["complete"] is True

    # Wait for a heartbeat after the ack, so both rows show the ack and the cache stats.
    def acked_with_stats() -> bool:
        return all(w["last_acked_seq"] is not None and "entries" in w["stats"] for w in cluster.worker_list())

    wait_for(acked_with_stats, what="both workers to report the ack and their stats")
    table = cachebus("workers", *creds(cluster))
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split("  ")[0] == "NAME"
    for column in ("STATE", "HOST", "PID", "LAST SEEN", "LAST ACKED SEQ", "ENTRIES", "HIT RATIO", "LAST PURGE"):
        assert column in header
    assert [row.split()[:2] for row in rows] == [["w1", "live"], ["w2", "live"]]
    for row in rows:
        assert "s ago" in row and "clear" in row.split()[-1]
    assert str(cluster.workers["w1"][0].pid) in rows[0]

    raw = cachebus("workers", *creds(cluster), "--json")
    assert raw.returncode == 0
    assert sorted(w["name"] for w in json.loads(raw.stdout)["workers"]) == ["w1", "w2"]


def test_wait_times_out_listing_the_killed_worker(cluster: Cluster):
    # A liveness window far longer than the test, so the killed worker stays
    # live, and therefore expected, however slow this machine is.
    start_with_workers(cluster, "w1", "w2", settings={"bus": {"liveness": 120}, "record": {"lost_after": 120.0}})
    cluster.workers["w2"][0].kill()
    started = time.monotonic()
    result = cachebus("clear", *creds(cluster), "--wait", "--timeout", "1.5")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert time.monotonic() - started >= 1.5
    lines = result.stdout.splitlines()
    assert any(line.startswith("w1 acked in ") for line in lines), lines
    assert not any(line.startswith("w2 acked") for line in lines), lines
    timed_out = next(i for i, line in enumerate(lines) if "timed out after" in line)
    assert "1 of 2 workers acked" in lines[timed_out]
    missing = lines[timed_out + 1:]
    assert len(missing) == 1 and missing[0].split()[:2] == ["w2", "live,"], missing
    assert "last seen" in missing[0] and missing[0].endswith("s ago")
    assert result.stderr == ""


def test_wait_defaults_to_the_settings_wait_timeout(cluster: Cluster, tmp_path: Path):
    start_with_workers(cluster, "w1", settings={"bus": {"liveness": 120}, "record": {"lost_after": 120.0}})
    cluster.workers["w1"][0].kill()
    config = tmp_path / "client.yaml"
    config.write_text("api:\n  cache:\n    wait_timeout: 0.5\n")
    result = cachebus("clear", *creds(cluster), "--wait", "--config", str(config))
    assert result.returncode == 2, (result.stdout, result.stderr)
    took = float(result.stdout.split("timed out after ")[1].split(" s,")[0])
    # The setting (0.5 s), not the client's own old default of 10 s.
    assert 0.5 <= took < 10, result.stdout


def run_in_pty(*args: str) -> tuple[int, str]:
    """Run the command with a terminal as its stdout; return its status and what the terminal got."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([CACHEBUS, *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal,
                            stderr=subprocess.PIPE)
    os.close(terminal)
    received = b""
    deadline = time.monotonic() + DEADLINE * 2
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
        status = proc.wait(DEADLINE)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()  # type: ignore[union-attr]
    return status, received.decode(errors="replace")


def test_progress_bar_on_a_terminal(cluster: Cluster):
    start_with_workers(cluster, "w1", "w2")
    status, screen = run_in_pty("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE))
    assert status == 0, screen
    assert "\r" + progress_bar(2, 2) in screen, repr(screen)
    assert " acked in " not in screen.replace("all 2 workers acked in", ""), "no per-ack lines on a terminal"
    assert "all 2 workers acked" in screen


def test_rendering():
    assert progress_bar(0, 2, width=4) == "[----] 0/2 acked"
    assert progress_bar(1, 2, width=4) == "[##--] 1/2 acked"
    assert progress_bar(2, 2, width=4) == "[####] 2/2 acked"
    table = worker_table([{"name": "w1", "state": "lost", "host": "h", "pid": 7, "last_seen": 100.0,
                           "last_acked_seq": None, "last_purge_cause": None, "stats": {}}], now=112.5)
    header, row = table.splitlines()
    assert row.split() == ["w1", "lost", "h", "7", "12.5s", "ago", "-", "-", "-", "-"]
    assert len(header) >= len(row)

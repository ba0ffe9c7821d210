"""``cachebus clear`` and ``cachebus workers`` against a real service and real workers."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachebus import Cache, ThreadedSubscriber
from cachebus.client import ClearProgress, ack_line, progress_bar, worker_table
from cachebus.testing import DEADLINE, Cluster, free_port, http_json, wait_for

from .support import FlakyCache, read_entry

ROOT = Path(__file__).resolve().parent.parent

CACHEBUS = str(Path(sys.executable).parent / "cachebus")


def client_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This shell's environment without its credentials or settings file, plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("CACHEBUS_TOKEN", "CACHEBUS_ACCESS_TOKEN", "CACHEBUS_CONFIG")}
    return {**base, **(env or {})}


def cachebus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script with no credentials or settings file from this shell."""
    return subprocess.run([CACHEBUS, *args], cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE * 2,
                          env=client_env(env))


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


@pytest.mark.processes
def test_clear_without_wait_and_with_no_live_workers(cluster: Cluster):
    cluster.start_service()
    result = cachebus("clear", *creds(cluster))
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert result.stdout.count("\n") == 1 and words[0] == "clear" and words[2] == "accepted", result.stdout
    assert cluster.clear_record(words[1])["id"] == words[1]

    # Nobody was listening: no proof, a status of its own, one line saying how to accept it.
    waited = cachebus("clear", *creds(cluster), "--wait", "--timeout", "5")
    assert waited.returncode == 3, (waited.stdout, waited.stderr)
    assert waited.stdout.count("\n") == 1 and "nobody was listening" in waited.stdout
    assert "--allow-empty" in waited.stdout and waited.stderr == ""
    allowed = cachebus("clear", *creds(cluster), "--wait", "--timeout", "5", "--allow-empty")
    assert allowed.returncode == 0, (allowed.stdout, allowed.stderr)
    assert allowed.stdout.count("\n") == 1 and "nobody was listening" in allowed.stdout


@pytest.mark.processes
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
    clears = len(http_json(f"{cluster.url}/api/v1/cache/clears?{cluster.creds()}")["clears"])
    for bad, flag in ((["--wait", "--expect", "0"], "--expect"), (["--wait", "--expect", "-2"], "--expect"),
                      (["--wait", "--expect", "x"], "--expect"), (["--wait", "--expect", "1.5"], "--expect"),
                      (["--expect", "2"], "--expect"), (["--allow-empty"], "--allow-empty"),
                      (["--timeout", "3"], "--timeout"), (["--wait", "--expect", "2", "--allow-empty"],
                                                          "--allow-empty")):
        refused = cachebus("clear", *creds(cluster), *bad)
        assert flag in one_line_error(refused), (bad, refused.stderr)
        assert refused.stdout == ""
    # A usage error is refused before the call: no clear was published.
    assert len(http_json(f"{cluster.url}/api/v1/cache/clears?{cluster.creds()}")["clears"]) == clears

    # Nothing listens on a free port.
    for command in ("clear", "workers"):
        unreachable = cachebus(command, "--url", f"http://127.0.0.1:{free_port()}", "--token", cluster.token,
                               "--access-token", cluster.access_token)
        assert "cannot reach" in one_line_error(unreachable)
        assert cluster.access_token not in unreachable.stderr


@pytest.mark.processes
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


@pytest.mark.processes
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
    header = table.stdout.splitlines()[0]
    assert header.split("  ")[0] == "NAME"
    rows = table_rows(table.stdout)
    assert list(rows[0]) == ["NAME", "ID", "STATE", "HOST", "VIA", "PID", "LAST SEEN", "LAST ACKED SEQ", "ENTRIES",
                             "HIT RATIO", "LAST PURGE"]
    assert [(row["NAME"], row["STATE"]) for row in rows] == [("w1", "live"), ("w2", "live")]
    for row, worker in zip(rows, sorted(cluster.worker_list(), key=lambda w: w["name"]), strict=True):
        assert row["LAST SEEN"].endswith("s ago") and row["LAST PURGE"] == "clear"
        assert row["ID"] == worker.get("id", worker["instance"])
    assert rows[0]["PID"] == str(cluster.workers["w1"][0].pid)

    raw = cachebus("workers", *creds(cluster), "--json")
    assert raw.returncode == 0
    assert sorted(w["name"] for w in json.loads(raw.stdout)["workers"]) == ["w1", "w2"]


@pytest.mark.processes
def test_expect_n_asks_for_at_least_n_acks(cluster: Cluster):
    start_with_workers(cluster, "w1", "w2")
    enough = cachebus("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE), "--expect", "2")
    assert enough.returncode == 0, (enough.stdout, enough.stderr)
    assert "all 2 workers acked" in enough.stdout.splitlines()[-1]
    # Every live process acked, but a deploy that started three expected three.
    short = cachebus("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE), "--expect", "3")
    assert short.returncode == 2, (short.stdout, short.stderr)
    lines = short.stdout.splitlines()
    assert "all 2 workers acked" in lines[-2]
    assert lines[-1].endswith(": only 2 workers acked, --expect asked for at least 3"), lines


@pytest.mark.processes
def test_wait_times_out_listing_the_killed_worker(cluster: Cluster):
    # A liveness window far longer than the test, so the killed worker stays
    # live, and therefore expected, however slow this machine is.
    start_with_workers(cluster, "w1", "w2", settings={"bus": {"liveness": 120}, "record": {"lost_after": 120.0}})
    cluster.workers["w2"][0].kill()
    # A window for w1's ack, not a bound on anything: the wait ends at the timeout whatever comes.
    result = cachebus("clear", *creds(cluster), "--wait", "--timeout", "3")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert any(line.startswith("w1 ") and " acked in " in line for line in lines), lines
    assert not any(line.startswith("w2 ") and " acked " in line for line in lines), lines
    timed_out = next(i for i, line in enumerate(lines) if "timed out after" in line)
    assert "1 of 2 workers acked" in lines[timed_out]
    assert lines[timed_out + 1:timed_out + 2] == ["missing:"]
    missing = lines[timed_out + 2:]
    assert len(missing) == 1 and missing[0].split()[0] == "w2", missing
    assert " live, last seen " in missing[0] and missing[0].endswith("s ago")
    assert "failed" not in result.stdout
    assert result.stderr == ""


@pytest.mark.processes
def test_wait_defaults_to_the_settings_wait_timeout(cluster: Cluster, tmp_path: Path):
    start_with_workers(cluster, "w1", settings={"bus": {"liveness": 120}, "record": {"lost_after": 120.0}})
    cluster.workers["w1"][0].kill()
    config = tmp_path / "client.yaml"
    config.write_text("api:\n  cache:\n    wait_timeout: 0.5\n")
    # The setting (0.5 s), not the client's own old default of 10 s: it gives up on the clear while
    # a client told to wait 10 s, started first, still waits for its own.
    told = subprocess.Popen([CACHEBUS, "clear", *creds(cluster), "--wait", "--timeout", "10"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=client_env())
    try:
        result = cachebus("clear", *creds(cluster), "--wait", "--config", str(config))
        still_waiting = told.poll() is None
    finally:
        told.kill()
        told.wait()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert re.search(r": timed out after [\d.]+ s, 0 of 1 worker acked$", result.stdout, re.M), result.stdout
    assert still_waiting, "it waited as long as a client told to wait 10 s"


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


@pytest.mark.processes
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
    assert progress_bar(1, 2, width=4, failed=1) == "[##--] 1/2 acked, 1 failed"
    table = worker_table([{"name": "w1", "id": "h:7:abc", "state": "lost", "host": "h", "pid": 7,
                           "last_seen": 100.0, "last_acked_seq": None, "last_purge_cause": None, "stats": {}}],
                         now=112.5)
    header, row = table.splitlines()
    assert row.split() == ["w1", "h:7:abc", "lost", "h", "-", "7", "12.5s", "ago", "-", "-", "-", "-"]
    assert len(header) >= len(row)

    # One row per process, grouped by name (then id); a failed last purge says so.
    grouped = worker_table([{"name": "web", "id": "h:9:b"}, {"name": "api", "id": "h:3:z"},
                            {"name": "web", "id": "h:8:a", "last_purge_cause": "clear", "last_outcome": "failed"}])
    rows = [line.split()[:2] for line in grouped.splitlines()[1:]]
    assert rows == [["api", "h:3:z"], ["web", "h:8:a"], ["web", "h:9:b"]]
    assert grouped.splitlines()[2].endswith("clear (failed)")

    # A worker behind a relay says which; one serving without the bound says so beside its state.
    relayed = worker_table([{"name": "far", "id": "b:1:c", "state": "suspect", "host": "b", "via": "host-b",
                             "degraded": True}])
    assert relayed.splitlines()[1].split()[:6] == ["far", "b:1:c", "suspect", "(degraded)", "b", "host-b"]

    ok = {"worker": "h:8:a", "name": "web", "latency_ms": 2.25, "cause": "clear", "outcome": "ok"}
    assert ack_line(ok) == "web h:8:a acked in 2.2 ms (cause: clear)"
    assert ack_line({"worker": "w1", "latency_ms": 1, "cause": "gap"}) == "w1 acked in 1.0 ms (cause: gap)"
    failed = {**ok, "worker": "h:9:b", "outcome": "failed", "error": "ConnectionError: refused\n\x1b[2Jagain"}
    assert ack_line(failed) == ("web h:9:b purge FAILED after 2.2 ms (cause: clear): "
                                "ConnectionError: refused  [2Jagain")


def test_what_proves_a_clear():
    progress = ClearProgress("c1", {"h:1:a": "web", "h:2:b": "web", "h:3:c": "api"})
    assert not progress.proven and progress.missing == []
    progress.published({"expected": ["h:1:a", "h:2:b", "h:3:c"]})
    assert progress.groups(with_acks=False) == " (api: 1, web: 2)"
    progress.acked({"worker": "h:1:a", "outcome": "ok"})
    progress.acked({"worker": "h:2:b", "outcome": "failed", "error": "E: x"})
    progress.acked({"worker": "h:1:a", "outcome": "failed", "error": "E: later"})  # an ok stays proof
    assert progress.missing == ["h:3:c"] and list(progress.failed) == ["h:2:b"]
    assert progress.groups(with_acks=True) == " (api: 0/1, web: 1/2)"
    progress.acked({"worker": "h:3:c", "outcome": "ok"})
    assert not progress.proven
    progress.acked({"worker": "h:2:b", "outcome": "ok"})  # the retry succeeded
    assert progress.proven and progress.failed == {} and progress.acked_ok() == 3
    # One process per name: a count per name says nothing more.
    single = ClearProgress("c2", {"a": "w1"})
    single.published({"expected": ["a"]})
    assert single.groups(with_acks=True) == ""
    # Nobody expected is never proof; a failure the service reports counts as one.
    nobody = ClearProgress("c3")
    nobody.published({"expected": []})
    nobody.complete({"complete": True, "failed": []})
    assert not nobody.proven
    late = ClearProgress("c4")
    late.published({"expected": ["x"]})
    late.complete({"complete": False, "failed": ["x"], "missing": []})
    assert list(late.failed) == ["x"] and not late.proven


# --- processes grouped by name, failed purges, excluded workers ---------------------------


@pytest.mark.processes
def test_processes_sharing_a_name_are_each_expected_and_listed_by_group(cluster: Cluster):
    start_with_workers(cluster, "w1")
    subscribers = [ThreadedSubscriber([Cache()], name="web", **cluster.subscriber_options()) for _ in range(2)]
    try:
        for subscriber in subscribers:
            subscriber.start()
            assert subscriber.wait_synced(DEADLINE)
        wait_for(lambda: sum(w["name"] == "web" and w["state"] == "live" for w in cluster.worker_list()) == 2,
                 what="both web processes to be live")
        result = cachebus("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE), "--expect", "3")
        assert result.returncode == 0, (result.stdout, result.stderr)
        lines = result.stdout.splitlines()
        assert lines[0].endswith(" accepted: waiting for 3 workers (w1: 1, web: 2)"), lines
        web_acks = [line for line in lines if line.startswith("web ") and " acked in " in line]
        assert len(web_acks) == 2 and web_acks[0].split()[1] != web_acks[1].split()[1], lines
        assert " acked in " in lines[-1] and lines[-1].endswith(" (w1: 1/1, web: 2/2)"), lines

        rows = table_rows(cachebus("workers", *creds(cluster)).stdout)
        assert [row["NAME"] for row in rows] == ["w1", "web", "web"]
        ids = [row["ID"] for row in rows[1:]]
        assert ids == sorted(ids) and len(set(ids)) == 2
        assert {row["PID"] for row in rows[1:]} == {str(os.getpid())}
    finally:
        for subscriber in subscribers:
            subscriber.stop()


@pytest.mark.processes
def test_a_failed_purge_is_no_proof_and_names_the_error(cluster: Cluster):
    start_with_workers(cluster, "w1")
    cache = FlakyCache()
    subscriber = ThreadedSubscriber([cache], name="flaky", **cluster.subscriber_options())
    subscriber.start()
    try:
        assert subscriber.wait_synced(DEADLINE)
        cluster.wait_worker_live_named("flaky")
        cache.failing = True
        result = cachebus("clear", *creds(cluster), "--wait", "--timeout", "3")
        assert result.returncode == 2, (result.stdout, result.stderr)
        lines = result.stdout.splitlines()
        assert any(line.startswith("w1 ") and " acked in " in line for line in lines), lines
        failed_acks = [line for line in lines if line.startswith("flaky ") and " purge FAILED after " in line]
        assert failed_acks, lines
        assert "RuntimeError" in failed_acks[0] and "the backing store is down" in failed_acks[0]
        summary = next(line for line in lines if "timed out after" in line or "stopped waiting" in line)
        assert "1 of 2 workers acked" in summary
        listed = lines[lines.index("failed (a purge raised, so no proof):") + 1]
        assert listed.split()[0] == "flaky" and "the backing store is down" in listed and "last seen" in listed
        assert "missing:" not in lines
        assert result.stderr == ""

        # The subscriber kept working: once the store is back, a clear is proven again.
        cache.failing = False
        again = cachebus("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE))
        assert again.returncode == 0, (again.stdout, again.stderr)
        assert "all 2 workers acked" in again.stdout
    finally:
        subscriber.stop()


@pytest.mark.processes
def test_workers_not_live_at_publish_time_are_named_outside_the_proof(cluster: Cluster):
    start_with_workers(cluster, "w1", "w2", settings={"record": {"lost_after": 120.0}})
    frozen = cluster.workers["w2"][0]
    frozen.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: any(w["name"] == "w2" and w["state"] == "suspect" for w in cluster.worker_list()),
                 what="the frozen worker to turn suspect")
        result = cachebus("clear", *creds(cluster), "--wait", "--timeout", str(DEADLINE))
        assert result.returncode == 0, (result.stdout, result.stderr)
        lines = result.stdout.splitlines()
        excluded = lines.index("not expected (not live when the clear was published, so outside this proof):")
        assert "all 1 worker acked" in lines[excluded - 1]
        assert lines[excluded + 1].split()[0] == "w2" and " suspect, last seen " in lines[excluded + 1]
    finally:
        frozen.signal(signal.SIGCONT)


def table_rows(stdout: str) -> list[dict[str, str]]:
    """``cachebus workers``' table as one dict per row (cells are separated by two spaces or more)."""
    header, *rows = stdout.splitlines()
    columns = re.split(r"\s{2,}", header.strip())
    return [dict(zip(columns, re.split(r"\s{2,}", row.strip()), strict=True)) for row in rows]


@pytest.mark.processes
def test_a_scoped_clear_for_a_group_waits_for_that_group_only(cluster: Cluster):
    start_with_workers(cluster, "w1", "w2")
    urls = {name: url for name, (_, url) in cluster.workers.items()}
    for url in urls.values():
        read_entry(url, "hello")
        read_entry(url, "about")
    result = cachebus("clear", *creds(cluster), "--key", "hello", "--prefix", "blog/", "--group", "w1", "--wait",
                      "--timeout", str(DEADLINE))
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert "waiting for 1 worker" in lines[0] and "all 1 worker" in lines[-1], lines
    record = cluster.clear_record(lines[0].split()[1])
    assert record["scope"] == {"keys": ["hello"], "prefixes": ["blog/"], "tags": [], "group": ["w1"]}
    assert [(a["name"], a["scope"], a["entries_dropped"]) for a in record["acks"]] == [("w1", "scoped", 1)]
    # w1 dropped the one key; w2, outside the group, dropped nothing.
    assert [read_entry(urls["w1"], entry)[0] for entry in ("hello", "about")] == ["MISS", "HIT"]
    assert [read_entry(urls["w2"], entry)[0] for entry in ("hello", "about")] == ["HIT", "HIT"]

    error = one_line_error(cachebus("clear", *creds(cluster), "--tag", "x" * 201))
    assert "tags: an entry is longer than 200 bytes" in error

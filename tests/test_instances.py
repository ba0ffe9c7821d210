"""Several service instances sharing one tokens directory (docs/scale-out.md): real processes on loopback.

Each instance binds its own HTTP port and bus endpoints; workers subscribe to
every instance's and talk to one at a time. The instance holding the lead
publishes; the other passes its requests and its workers' messages to it, and
takes over when it dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachebus.service.errors import Reason, error_body, reason_message
from cachebus.service.lead import LEAD_FILE, LeadRecord
from cachebus.testing import Cluster, Proc, answers, free_ports, http, http_json, wait_for

from .support import ClearLoop, edit_entry, read_entry

pytestmark = pytest.mark.processes


class Instances(Cluster):
    """A :class:`Cluster` whose service runs as ``count`` instances; its workers list all of them."""

    def __init__(self, tmp: Path, tokens_dir: Path, content_dir: Path, count: int = 2,
                 settings: dict[str, Any] | None = None) -> None:
        super().__init__(tmp, tokens_dir, content_dir)
        self.ports = [free_ports(3) for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{http_port}" for http_port, _, _ in self.ports]
        self.publish = ",".join(f"tcp://127.0.0.1:{p}" for _, p, _ in self.ports)
        self.acks = ",".join(f"tcp://127.0.0.1:{a}" for _, _, a in self.ports)
        self.url = self.urls[0]
        self.settings = settings or {}
        self.procs: dict[int, Proc] = {}

    def start_instance(self, i: int, keys_dir: Path | None = None) -> Proc:
        http_port, publish, acks = self.ports[i]
        settings = {**self.settings, "service": {**self.settings.get("service", {}), "name": f"s{i}"}}
        proc = Proc.python("cachebus.service", [
            "--port", str(http_port), "--tokens-dir", str(self.tokens_dir),
            "--keys-dir", str(keys_dir or self.keys_dir),
            "--bus-publish", f"tcp://127.0.0.1:{publish}", "--bus-acks", f"tcp://127.0.0.1:{acks}",
            *self.config(f"s{i}", settings)], self.tmp / f"s{i}-{time.monotonic_ns()}.log")
        self.procs[i] = proc
        wait_for(lambda: answers(self.urls[i] + "/"), what=f"instance s{i} to answer HTTP",
                 check=lambda: _alive(proc))
        return proc

    def clear_via(self, i: int, **extra: Any) -> tuple[int, dict[str, str], bytes]:
        body = urllib.parse.urlencode({"token": self.token, "access_token": self.access_token, **extra})
        return http("POST", self.urls[i] + "/api/v1/cache/clear", body.encode(),
                    {"Content-Type": "application/x-www-form-urlencoded"})

    def proof_via(self, i: int) -> tuple[int, dict[str, Any]]:
        status, _, body = self.clear_via(i, wait="all", timeout="5")
        return status, json.loads(body)

    def workers_via(self, i: int) -> list[dict[str, Any]]:
        try:
            return list(http_json(f"{self.urls[i]}/api/v1/cache/workers?{self.creds()}")["workers"])
        except OSError:
            return []

    def calls(self) -> int:
        return int(yaml.safe_load((self.tokens_dir / self.token / "token.yaml").read_text())["calls"])

    def stop(self) -> None:
        super().stop()
        for proc in self.procs.values():
            proc.stop()


def _alive(proc: Proc) -> None:
    if not proc.alive():
        raise AssertionError(f"an instance exited with {proc.popen.returncode}:\n{proc.output()}")


@pytest.fixture
def instances(tmp_path: Path, content_dir: Path) -> Iterator[Instances]:
    # A short forward timeout, so a test of an unreachable leader does not wait five seconds.
    c = Instances(tmp_path, tmp_path / "tokens", content_dir, settings={"service": {"forward_timeout": 1.0}})
    yield c
    c.stop()


def _live_via(instances: Instances, i: int, names: set[str]) -> None:
    wait_for(lambda: {w["name"] for w in instances.workers_via(i) if w["state"] == "live"} >= names,
             what=f"{sorted(names)} live as seen through s{i}")


def test_a_clear_through_either_instance_reaches_every_worker_with_proof(instances: Instances):
    instances.start_instance(0)
    instances.start_instance(1)
    urls = {name: instances.start_worker(name, wait=False) for name in ("w1", "w2")}
    _live_via(instances, 0, {"w1", "w2"})
    _live_via(instances, 1, {"w1", "w2"})  # s1 passes the read to the leader
    before = instances.calls()
    for i in (0, 1, 1, 0):
        status, body = instances.proof_via(i)
        assert status == 200, body
        assert sorted(a["name"] for a in body["acks"]) == ["w1", "w2"]
    # Every call was counted once, by the leader: none twice, none lost on the way.
    assert instances.calls() == before + 4
    # Content edited, then one clear through the follower: both workers serve the new version.
    for url in urls.values():
        read_entry(url)
    edit_entry(instances.content_dir, "hello", "edited")
    assert instances.clear_via(1)[0] == 204
    for url in urls.values():
        wait_for(lambda url=url: read_entry(url)[1]["title"] == "edited", what="the new title")
    leader = http_json(f"{instances.urls[1]}/api/v1/cache/workers?{instances.creds()}")
    assert all(w["via"] == "" for w in leader["workers"])
    # Each instance's own /metrics says which one leads.
    for i, leading in ((0, 1), (1, 0)):
        _, _, text = http("GET", f"{instances.urls[i]}/metrics")
        assert f"cachebus_service_leading {leading}.0" in text.decode()


def test_killing_the_leader_while_clears_run_loses_no_clear_and_keeps_every_cache(instances: Instances):
    leader = instances.start_instance(0)
    instances.start_instance(1)
    urls = {name: instances.start_worker(name, wait=False) for name in ("w1", "w2")}
    _live_via(instances, 0, {"w1", "w2"})
    for url in urls.values():
        read_entry(url)
    bypassed = {url: http_json(f"{url}/stats")["cache"]["bypass_seconds"] for url in urls.values()}
    before = instances.calls()
    # Like a load balancer: both instances, then only the one left once the other is gone.
    with ClearLoop(lambda i: instances.clear_via(i)[0], [0, 1]) as clears:
        answers_seen = clears.seen
        wait_for(lambda: answers_seen.count(204) >= 20, what="clears before the kill")
        leader.signal(signal.SIGKILL)
        clears.targets = [1]
        seen = len(answers_seen)
        wait_for(lambda: answers_seen[-10:].count(204) == 10 and len(answers_seen) > seen + 20,
                 what="clears answered by the instance that took over")
    # No answer other than 204, or 503 / a dropped connection for clears the killed leader had.
    assert set(answers_seen) <= {204, 503, 0}, answers_seen
    lost_answers = len(answers_seen) - answers_seen.count(204)
    # Every 204 was counted, and at most the unanswered ones besides.
    assert answers_seen.count(204) <= instances.calls() - before <= answers_seen.count(204) + lost_answers
    # The survivor continued the stream: no worker purged for a new epoch, or lost its lease.
    for url in urls.values():
        stats = http_json(f"{url}/stats")
        assert stats["bus"]["last_purge_cause"] == "clear", stats["bus"]
        assert stats["cache"]["bypass_seconds"] == bypassed[url], stats["cache"]
    # (A leader killed between writing its record and sending the clear leaves a one-seq gap,
    # and a purge for it: safe, and no epoch change.)
    for proc, _ in instances.workers.values():
        assert "epoch changed" not in proc.output()
    # And the survivor proves a clear by every worker, edited content and all.
    edit_entry(instances.content_dir, "hello", "after the failover")
    status, body = instances.proof_via(1)
    assert status == 200 and sorted(a["name"] for a in body["acks"]) == ["w1", "w2"], body
    for url in urls.values():
        assert read_entry(url)[1]["title"] == "after the failover"


def test_a_follower_that_cannot_reach_the_leader_refuses_the_clear(instances: Instances):
    leader = instances.start_instance(0)
    instances.start_instance(1)
    instances.start_worker("w1", wait=False)
    _live_via(instances, 0, {"w1"})
    before = instances.calls()
    leader.signal(signal.SIGSTOP)  # alive and holding the lead, but answering nothing
    try:
        status, headers, body = instances.clear_via(1)
        # Never 204 for a clear that may not reach every worker; Flextype's shape, and when to retry.
        assert status == 503, body
        assert body == error_body(503, reason_message(Reason.NO_LEAD))  # "title":"Service Unavailable"
        assert headers["Retry-After"] == "1"
        # Nor does it hold an event stream open on a leader that answers nothing.
        status, headers, body = http("GET", f"{instances.urls[1]}/api/v1/cache/events?{instances.creds()}")
        assert status == 503 and headers["Retry-After"] == "1"
        assert body == error_body(503, reason_message(Reason.NO_LEAD))
    finally:
        leader.signal(signal.SIGCONT)
    assert instances.calls() == before
    assert instances.clear_via(1)[0] == 204


def _leading(instances: Instances) -> list[int]:
    leading = []
    for i, url in enumerate(instances.urls):
        try:
            text = http("GET", f"{url}/metrics")[2].decode()
        except OSError:
            continue
        if "cachebus_service_leading 1.0" in text:
            leading.append(i)
    return leading


def test_a_forged_lead_record_sends_nothing_anywhere(instances: Instances, tmp_path: Path):
    instances.start_instance(0)
    follower = instances.start_instance(1)
    instances.start_worker("w1", wait=False)
    _live_via(instances, 0, {"w1"})
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.setblocking(False)
    # Whoever can write the tokens directory writes a record pointing the follower at itself.
    forged = LeadRecord(name="evil", url=f"http://127.0.0.1:{trap.getsockname()[1]}", acks="tcp://127.0.0.1:1",
                        epoch="00" * 8, seq=10**9, pid=1, boot="")
    fd = os.open(instances.tokens_dir / LEAD_FILE, os.O_WRONLY)
    forgery = forged.to_bytes(b"a guess")
    assert "does not verify" not in follower.output()

    def read_by_the_follower() -> bool:
        os.pwrite(fd, forgery, 0)
        assert instances.clear_via(1)[0] == 204
        os.pwrite(fd, forgery, 0)  # the leader rewrites its record at every publish: keep at it
        return "does not verify" in follower.output()  # what the follower says when it reads one

    try:
        wait_for(read_by_the_follower, what="the follower to read the forged record")
        assert instances.clear_via(1)[0] == 204  # and it still passes clears to the leader
    finally:
        os.close(fd)
    with pytest.raises(BlockingIOError):
        trap.accept()  # nobody came: the follower never took the forged record for the leader's
    trap.close()
    assert "evil" not in follower.output()


def test_removing_the_lead_file_leaves_one_leader(instances: Instances):
    leader = instances.start_instance(0)
    instances.start_instance(1)
    instances.start_worker("w1", wait=False)
    _live_via(instances, 0, {"w1"})
    (instances.tokens_dir / LEAD_FILE).unlink()
    # The leader lets go of a lock that no longer guards the name; then exactly one leads again.
    wait_for(lambda: "giving up the lead" in leader.output(), what="the leader to give up")
    wait_for(lambda: len(_leading(instances)) == 1, what="one leader again")
    # A new file holds no stream to continue: a new epoch, and w1 says hello to it.
    _live_via(instances, _leading(instances)[0], {"w1"})
    for i in (0, 1):
        # The other instance reads the new leader's record within a poll; until then it says 503.
        status, body = wait_for(lambda i=i: (answer := instances.proof_via(i))[0] != 503 and answer,
                                what=f"s{i} to answer with a proof")
        assert status == 200 and [a["name"] for a in body["acks"]] == ["w1"], json.dumps(body)


def test_an_instance_with_another_keypair_refuses_clears_and_says_why(instances: Instances, tmp_path: Path):
    instances.start_instance(0)
    stranger = instances.start_instance(1, keys_dir=tmp_path / "other-keys")
    # It cannot verify the leader's record, so it has no leader to pass clears to: never a 204.
    status, _, body = instances.clear_via(1)
    assert status == 503, body
    wait_for(lambda: "does not verify with this instance's key" in stranger.output(), what="the hint")


def test_a_follower_is_a_whole_front_door_clear_wait_and_the_event_stream_work_through_it(instances: Instances):
    """Behind a load balancer any instance gets the CLI's requests: ``clear --wait`` opens the
    event stream first, then clears, and both must work through the instance that follows."""
    instances.start_instance(0)
    instances.start_instance(1)
    for name in ("w1", "w2"):
        instances.start_worker(name, wait=False)
    _live_via(instances, 1, {"w1", "w2"})
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cachebus"), "clear", "--url", instances.urls[1], "--token",
         instances.token, "--access-token", instances.access_token, "--wait", "--timeout", "5"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                         if not k.startswith("CACHEBUS_")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "w1" in result.stdout and "w2" in result.stdout, result.stdout
    # The stream itself, relayed from the leader's record: its snapshot lists both workers.
    port = urllib.parse.urlsplit(instances.urls[1]).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET /api/v1/cache/events?{instances.creds()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while b"\n\n" not in received.partition(b"event: snapshot")[2]:  # the whole snapshot event
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in received, received[:300]
    data = next(line for line in received.split(b"\n") if line.startswith(b"data: {"))
    snapshot = json.loads(data.removeprefix(b"data: "))
    assert sorted(w["name"] for w in snapshot["workers"]) == ["w1", "w2"]


def _ack_connections(instances: Instances, name: str) -> list[int]:
    """The ack ports of the instances that worker ``name``'s process holds an established TCP
    connection to, as the kernel lists them (``ss -tnp``)."""
    pid = instances.workers[name][0].pid
    acks = {a for _, _, a in instances.ports}
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    ports = []
    for line in out.splitlines():
        fields = line.split()
        if f"pid={pid}," in line and len(fields) >= 4:
            port = int(fields[3].rpartition(":")[2])
            if port in acks:
                ports.append(port)
    return sorted(ports)


def test_a_worker_talks_to_one_instance_and_moves_to_the_next_when_it_dies(instances: Instances):
    """Each worker's back channel is one connection to one instance, so its messages take one
    path; when that instance dies, it moves to the next in its list and is proven there."""
    instances.start_instance(1)  # leads: the worker's first endpoint, s0's, is the follower's
    follower = instances.start_instance(0)
    instances.start_worker("w1", wait=False)
    _live_via(instances, 1, {"w1"})
    s0_acks, s1_acks = instances.ports[0][2], instances.ports[1][2]
    wait_for(lambda: _ack_connections(instances, "w1") == [s0_acks], what="w1's one connection, to s0")
    status, body = instances.proof_via(1)
    assert status == 200 and [a["name"] for a in body["acks"]] == ["w1"], body  # through the follower
    follower.signal(signal.SIGKILL)
    wait_for(lambda: _ack_connections(instances, "w1") == [s1_acks], what="w1 moved to s1, and only there")
    wait_for(lambda: instances.proof_via(1)[0] == 200, what="a proof of w1's purge through s1")

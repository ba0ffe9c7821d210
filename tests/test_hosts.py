"""Three "hosts" joined by a bridge (docs/scale-out.md): network namespaces this test makes itself.

Host A runs two service instances sharing one tokens directory; hosts B and C
each run a ``cachebus relay`` and reference workers that know only their
relay. Every address is on the test's own namespaces and bridge. Skipped,
with the reason, where ``ip netns`` cannot be used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachebus.bus.security import WORKERS_DIR, ensure_keypair, private_dir
from cachebus.testing import DEADLINE, Proc, answers, create_token, http, http_json, wait_for

from .support import ClearLoop, edit_entry, netns_unavailable, read_entry

pytestmark = [pytest.mark.processes, pytest.mark.netns]

#: Ports on every host: instance 0's HTTP, PUB and ROUTER, instance 1's, then a relay's PUB and ROUTER.
S0_HTTP, S0_PUB, S0_ACKS, S1_HTTP, S1_PUB, S1_ACKS, RELAY_PUB, RELAY_ACKS = range(17100, 17108)


@dataclass
class Host:
    ns: str
    ip: str
    #: The bridge side of its link: down cuts the host off.
    link: str

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    net = random.randrange(1, 250)
    bridge = f"cbbr{tag}"
    made: dict[str, Host] = {}
    _run("ip", "link", "add", bridge, "type", "bridge")
    try:
        _run("ip", "addr", "add", f"10.214.{net}.1/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for i, name in enumerate("abc"):
            host = Host(ns=f"cb{name}{tag}", ip=f"10.214.{net}.{i + 2}", link=f"cb{name}h{tag}")
            inside = f"cb{name}n{tag}"
            _run("ip", "netns", "add", host.ns)
            made[name] = host
            _run("ip", "link", "add", host.link, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", inside, "netns", host.ns)
            _run("ip", "link", "set", host.link, "master", bridge)
            _run("ip", "link", "set", host.link, "up")
            _run(*host.prefix(), "ip", "addr", "add", f"{host.ip}/24", "dev", inside)
            _run(*host.prefix(), "ip", "link", "set", inside, "up")
            _run(*host.prefix(), "ip", "link", "set", "lo", "up")
        yield made
    finally:
        for host in made.values():
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@dataclass
class Fleet:
    """Everything the three hosts run, and the test's view of it."""

    tmp: Path
    hosts: dict[str, Host]
    content_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    worker_urls: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens_dir = self.tmp / "tokens"
        self.keys = self.tmp / "keys"
        self.token, self.access_token = create_token(self.tokens_dir)
        a = self.hosts["a"].ip
        self.instance_urls = [f"http://{a}:{S0_HTTP}", f"http://{a}:{S1_HTTP}"]
        self.publish = f"tcp://{a}:{S0_PUB},tcp://{a}:{S1_PUB}"
        self.acks = f"tcp://{a}:{S0_ACKS},tcp://{a}:{S1_ACKS}"

    def start(self, name: str, module: str, args: list[str], host: str, settings: dict[str, Any] | None = None
              ) -> Proc:
        if settings:
            path = self.tmp / f"{name}-settings.yaml"
            path.write_text(yaml.safe_dump(settings))
            args = [*args, "--config", str(path)]
        proc = Proc.python(module, args, self.tmp / f"{name}-{time.monotonic_ns()}.log",
                           prefix=self.hosts[host].prefix())
        self.procs[name] = proc
        return proc

    def start_instance(self, i: int) -> Proc:
        a = self.hosts["a"].ip
        http_port, pub, acks = (S0_HTTP, S0_PUB, S0_ACKS) if i == 0 else (S1_HTTP, S1_PUB, S1_ACKS)
        proc = self.start(f"s{i}", "cachebus.service", [
            "--port", str(http_port), "--tokens-dir", str(self.tokens_dir),
            "--keys-dir", str(self.keys), "--bus-publish", f"tcp://{a}:{pub}", "--bus-acks", f"tcp://{a}:{acks}"],
            "a", {"service": {"name": f"s{i}", "host": a, "forward_timeout": 1.0}})
        wait_for(lambda: answers(self.instance_urls[i] + "/"), what=f"instance s{i}", check=lambda: _alive(proc))
        return proc

    def relay_keys(self, host: str) -> Path:
        return self.tmp / f"relay-keys-{host}"

    def start_relay(self, host: str) -> Proc:
        ip = self.hosts[host].ip
        proc = self.start(f"relay-{host}", "cachebus.relay", [
            "--name", f"host-{host}", "--publish", f"tcp://{ip}:{RELAY_PUB}", "--acks", f"tcp://{ip}:{RELAY_ACKS}",
            "--relay-keys-dir", str(self.relay_keys(host)), "--http-port", "0",
            "--bus-publish", self.publish, "--bus-acks", self.acks, "--keys-dir", str(self.keys)], host)
        wait_for(lambda: (self.relay_keys(host) / "service.key").exists(), what=f"relay host-{host}'s keys",
                 check=lambda: _alive(proc))
        return proc

    def allow(self, worker: str, host: str, key_from: str | None = None) -> Path:
        """The operator's step: the worker's keypair (made on ``key_from``'s relay keys, or this host's),
        allowed by this host's relay and by the service. Returns its secret key file."""
        keypair, _ = ensure_keypair(private_dir(private_dir(self.relay_keys(key_from or host)) / WORKERS_DIR),
                                    worker)
        for directory in (self.relay_keys(host) / WORKERS_DIR, self.keys / WORKERS_DIR):
            directory.mkdir(parents=True, exist_ok=True)
            if not (directory / keypair.public_file.name).exists():
                shutil.copy(keypair.public_file, directory / keypair.public_file.name)
        return keypair.path

    def start_worker(self, name: str, host: str, key_from: str | None = None) -> str:
        secret = self.allow(name, host, key_from)
        ip = self.hosts[host].ip
        port = 17200 + len(self.worker_urls)
        self.start(name, "cachebus.workers", [
            "--name", name, "--http-port", str(port), "--content-dir", str(self.content_dir),
            "--bus-publish", f"tcp://{ip}:{RELAY_PUB}", "--bus-acks", f"tcp://{ip}:{RELAY_ACKS}",
            "--keys-dir", str(self.relay_keys(host))], host,
            {"worker": {"host": ip}, "bus": {"secret_key_file": str(secret)}})
        self.worker_urls[name] = f"http://{ip}:{port}"
        return self.worker_urls[name]

    def creds(self) -> str:
        return urllib.parse.urlencode({"token": self.token, "access_token": self.access_token})

    def clear(self, i: int, **extra: Any) -> tuple[int, dict[str, Any] | None]:
        body = urllib.parse.urlencode({"token": self.token, "access_token": self.access_token, **extra})
        status, _, answer = http("POST", self.instance_urls[i] + "/api/v1/cache/clear", body.encode(),
                                 {"Content-Type": "application/x-www-form-urlencoded"})
        return status, json.loads(answer) if answer else None

    def workers(self, i: int = 0) -> dict[str, dict[str, Any]]:
        try:
            listed = http_json(f"{self.instance_urls[i]}/api/v1/cache/workers?{self.creds()}")["workers"]
        except OSError:
            return {}
        # The newest process of each name (a moved worker leaves its old one behind, lost).
        return {w["name"]: w for w in sorted(listed, key=lambda w: w["joined_at"])}

    def live(self, names: set[str], i: int = 0) -> None:
        wait_for(lambda: all(self.workers(i).get(n, {}).get("state") == "live" for n in names),
                 what=f"{sorted(names)} live through s{i}")

    def wait_acked(self, i: int, clear_id: str, names: set[str]) -> dict[str, Any]:
        """The clear's record through instance ``i`` once every worker in ``names`` has acked it."""
        def acked() -> dict[str, Any] | None:
            record = http_json(f"{self.instance_urls[i]}/api/v1/cache/clears/{clear_id}?{self.creds()}")
            return record if {a["name"] for a in record["acks"]} >= names else None
        return wait_for(acked, what=f"acks from {sorted(names)} through s{i}")

    def stats_on_its_host(self, name: str, host: str) -> dict[str, Any]:
        """A worker's ``/stats``, read from inside its own host: that works while the host is cut off."""
        return dict(json.loads(subprocess.run(
            [*self.hosts[host].prefix(), sys.executable, "-c", _GET, self.worker_urls[name] + "/stats"],
            check=True, capture_output=True, text=True, timeout=DEADLINE).stdout))

    def bypassed(self, name: str) -> float:
        return float(http_json(f"{self.worker_urls[name]}/stats")["cache"]["bypass_seconds"])

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


#: Prints what a GET of argv[1] answers (run inside a host's namespace).
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def _alive(proc: Proc) -> None:
    if not proc.alive():
        raise AssertionError(f"exited with {proc.popen.returncode}:\n{proc.output()}")


@pytest.fixture
def fleet(tmp_path: Path, content_dir: Path, hosts: dict[str, Host]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, hosts, content_dir)
    try:
        f.start_instance(0)
        f.start_instance(1)
        f.start_relay("b")
        f.start_relay("c")
        f.start_worker("b1", "b")
        f.start_worker("c1", "c")
        f.live({"b1", "c1"})
        yield f
    finally:
        f.stop()


def _proved(fleet: Fleet, i: int, names: list[str]) -> dict[str, Any]:
    status, body = fleet.clear(i, wait="all", timeout="5")
    assert status == 200 and body is not None, json.dumps(body, indent=1)
    assert sorted(a["name"] for a in body["acks"]) == names, body
    return body


def test_a_clear_through_either_instance_reaches_every_host(fleet: Fleet):
    for url in fleet.worker_urls.values():
        read_entry(url)
    edit_entry(fleet.content_dir, "hello", "edited")
    _proved(fleet, 1, ["b1", "c1"])  # through the follower
    _proved(fleet, 0, ["b1", "c1"])  # through the leader
    for url in fleet.worker_urls.values():
        assert read_entry(url)[1]["title"] == "edited"
    assert {name: w["via"] for name, w in fleet.workers(1).items()} == {"b1": "host-b", "c1": "host-c"}


def test_killing_an_instance_while_clears_run_loses_none_and_bypasses_no_cache(fleet: Fleet):
    bypassed = {name: fleet.bypassed(name) for name in fleet.worker_urls}
    with ClearLoop(lambda i: fleet.clear(i)[0], [0, 1]) as clears:
        seen = clears.seen
        wait_for(lambda: seen.count(204) >= 20, what="clears before the kill")
        fleet.procs["s0"].signal(signal.SIGKILL)
        clears.targets = [1]
        before = len(seen)
        wait_for(lambda: len(seen) > before + 20 and seen[-10:].count(204) == 10, what="clears after the kill")
    assert set(seen) <= {204, 503, 0}, seen
    edit_entry(fleet.content_dir, "hello", "after the kill")
    _proved(fleet, 1, ["b1", "c1"])
    for name, url in fleet.worker_urls.items():
        assert read_entry(url)[1]["title"] == "after the kill"
        assert fleet.bypassed(name) == bypassed[name], f"{name} bypassed its cache"


def test_cutting_a_relays_link_lapses_its_workers_only_and_they_come_back(fleet: Fleet):
    for url in fleet.worker_urls.values():
        read_entry(url)
    c1_bypassed = fleet.bypassed("c1")
    _run("ip", "link", "set", fleet.hosts["b"].link, "down")
    try:
        edit_entry(fleet.content_dir, "hello", "during the cut")
        status, body = fleet.clear(1, wait="all", timeout="1")
        assert status == 202 and body is not None
        assert "b1" in [m["name"] for m in body["missing"]]
        # The other host's worker acks (however long this machine takes); b1 never does.
        record = fleet.wait_acked(1, body["id"], {"c1"})
        assert [m["name"] for m in record["missing"]] == ["b1"]
        wait_for(lambda: fleet.workers().get("b1", {}).get("state") in ("suspect", "lost"),
                 what="b1 reported suspect")
        # b1's own lease runs as long as the service's suspicion takes, so the one does not imply the
        # other: wait for b1 itself to stop trusting its cache.
        wait_for(lambda: not fleet.stats_on_its_host("b1", "b")["bus"]["trusted"], what="b1's lease to lapse")
        assert fleet.workers()["c1"]["state"] == "live"
        assert read_entry(fleet.worker_urls["c1"])[1]["title"] == "during the cut"
        assert fleet.bypassed("c1") == c1_bypassed  # the other host kept its cache
    finally:
        _run("ip", "link", "set", fleet.hosts["b"].link, "up")
    fleet.live({"b1"})
    # b1 lapsed while cut off, so it purged when it heard the service again.
    assert read_entry(fleet.worker_urls["b1"])[1]["title"] == "during the cut"
    assert fleet.bypassed("b1") > 0
    _proved(fleet, 0, ["b1", "c1"])


def test_a_restarted_relay_brings_its_workers_back(fleet: Fleet):
    fleet.procs["relay-b"].kill()
    wait_for(lambda: fleet.workers().get("b1", {}).get("state") in ("suspect", "lost"), what="b1 suspect")
    fleet.start_relay("b")
    fleet.live({"b1"})
    _proved(fleet, 1, ["b1", "c1"])


def test_a_worker_that_moves_to_another_relay_is_proven_through_it(fleet: Fleet):
    fleet.start_worker("m", "b")
    fleet.live({"m"})
    assert fleet.workers()["m"]["via"] == "host-b"
    assert fleet.procs["m"].stop() == 0
    fleet.start_worker("m", "c", key_from="b")  # the same name and keypair, now on host C
    wait_for(lambda: fleet.workers().get("m", {}).get("via") == "host-c"
             and fleet.workers()["m"]["state"] == "live", what="m live through host-c")
    _proved(fleet, 0, ["b1", "c1", "m"])

"""Run the benchmark and write ``docs/benchmarks.md``.

``python -m bench.run`` (or ``make bench``) measures, in one run:

* the time from ``POST /api/v1/cache/clear?wait=all`` to the answer that every
  worker acked, with N real worker processes each holding 10,000 entries;
* the two floors under it: a bare ZeroMQ PUB -> N SUB -> DEALER ack round
  trip, and a bare Tornado handler answering ``{}``;
* the overhead ratio: cachebus's median divided by the sum of the floors';
* a flood of 100 wrong access tokens a second from one address (127.0.0.2),
  and what it does to the token owner's clears from another (127.0.0.1);
* scoped purges (a key, a tag, a prefix) of one process's 100,000-entry
  :class:`~cachebus.workers.cache.Cache`, against a full ``clear()``.

``--smoke`` runs N=2 with a few clears, only to prove the code works.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import NamedTuple

from cachebus.bus.scope import Scope
from cachebus.bus.security import WORKERS_DIR, ensure_keypair, private_dir
from cachebus.testing import Proc, Processes, answers, create_token, free_port, free_ports, wait_for
from cachebus.workers.cache import Cache

from . import floor_zmq, peers
from .stats import Summary

ROOT = Path(__file__).resolve().parent.parent
#: A memory file system: token files there cost no fsync, which isolates that cost.
SHM = Path("/dev/shm")
#: Seconds a benchmark's processes get to start and join.
SETUP_TIMEOUT = 120.0


def timed_posts(port: int, path: str, body: str, count: int, expect: int) -> list[float]:
    """``count`` sequential POSTs on one keep-alive connection; milliseconds each."""
    conn = HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            conn.request("POST", path, body, headers)
            response = conn.getresponse()
            payload = response.read()
            samples.append((time.perf_counter() - started) * 1000)
            if response.status != expect:
                raise RuntimeError(f"POST {path} answered {response.status}: {payload[:200]!r}")
    finally:
        conn.close()
    return samples


def up(port: int) -> bool:
    """Whether something answers HTTP on the loopback ``port``."""
    return answers(f"http://127.0.0.1:{port}/")


def live_workers(port: int, token: str, access_token: str) -> int:
    """How many workers the cachebus service on ``port`` lists as live."""
    creds = urllib.parse.urlencode({"token": token, "access_token": access_token})
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/api/v1/cache/workers?{creds}")
        listed = json.loads(conn.getresponse().read())["workers"]
    finally:
        conn.close()
    return sum(w["state"] == "live" for w in listed)


def tornado_floor(procs: Processes, count: int) -> Summary:
    port = free_port()
    procs.python("tornado-floor", "bench.floor_tornado", str(port))
    wait_for(lambda: up(port), SETUP_TIMEOUT, "the bare Tornado handler", check=procs.check)
    timed_posts(port, "/", "", 20, 200)
    return Summary.of(timed_posts(port, "/", "", count, 200))


def zmq_floor(procs: Processes, workers: int, count: int) -> Summary:
    publish, acks = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    for i in range(workers):
        procs.python(f"zmq-floor-{i}", "bench.floor_zmq", "sub", publish, acks)
    samples = floor_zmq.round_trips(publish, acks, workers, count + 20)
    return Summary.of(samples[20:])


class Started(NamedTuple):
    """A running ``cachebus serve``: its HTTP port, bus endpoints and process."""

    port: int
    publish: str
    acks: str
    process: Proc


def keys_dir(procs: Processes) -> Path:
    """The bus keys of this run's services and workers (CURVE, the default): never the repository's var/."""
    return procs.logs / "keys"


def start_service(procs: Processes, name: str, tokens: Path, *extra: str) -> Started:
    """A ``cachebus serve`` on free ports, returned once it answers."""
    port, publish_port, acks_port = free_ports(3)
    publish, acks = f"tcp://127.0.0.1:{publish_port}", f"tcp://127.0.0.1:{acks_port}"
    process = procs.python(name, "cachebus.service", *extra, "--port", str(port), "--tokens-dir", str(tokens),
                          "--bus-publish", publish, "--bus-acks", acks, "--keys-dir", str(keys_dir(procs)))
    wait_for(lambda: up(port), SETUP_TIMEOUT, "the cachebus service", check=procs.check)
    return Started(port, publish, acks, process)


def start_workers(procs: Processes, prefix: str, count: int, publish: str, acks: str, entries: int,
                  port: int, token: str, access_token: str) -> list[Proc]:
    """``count`` benchmark workers with full caches, returning once the service lists them all live."""
    started = [procs.python(f"{prefix}-{i}", "bench.worker", "--name", f"{prefix}-{i}", "--publish", publish,
                            "--acks", acks, "--entries", str(entries), "--keys-dir", str(keys_dir(procs)))
               for i in range(count)]
    wait_for(lambda: live_workers(port, token, access_token) == count, SETUP_TIMEOUT,
             f"{count} cachebus workers to join", check=procs.check)
    return started


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuPerClear(NamedTuple):
    """CPU milliseconds per clear: the service's, and the median worker's."""

    service: float
    worker: float


class Measured(NamedTuple):
    latency: Summary
    cpu: CpuPerClear


def cachebus(procs: Processes, tokens: Path, workers: int, count: int, entries: int) -> Measured:
    token, access_token = create_token(tokens)
    port, publish, acks, service = start_service(procs, "service", tokens)
    started = start_workers(procs, "bench", workers, publish, acks, entries, port, token, access_token)
    body = urllib.parse.urlencode({"token": token, "access_token": access_token, "wait": "all", "timeout": "30"})
    timed_posts(port, "/api/v1/cache/clear", body, 10, 200)
    pids = [service.pid, *(w.pid for w in started)]
    before = [cpu_seconds(pid) for pid in pids]
    latency = Summary.of(timed_posts(port, "/api/v1/cache/clear", body, count, 200))
    spent = [(cpu_seconds(pid) - was) * 1000 / count for pid, was in zip(pids, before, strict=True)]
    return Measured(latency, CpuPerClear(service=spent[0], worker=statistics.median(spent[1:])))


def redis_peer(procs: Processes, workers: int, count: int, entries: int) -> Summary | None:
    if shutil.which("redis-server") is None:
        return None
    import redis

    redis_port = free_port()
    procs.start("redis-server", ["redis-server", "--port", str(redis_port), "--save", "",
                                         "--appendonly", "no", "--bind", "127.0.0.1"])
    client = redis.Redis(port=redis_port)

    def pong() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(pong, SETUP_TIMEOUT, "redis-server", check=procs.check)
    for i in range(workers):
        procs.python(f"redis-worker-{i}", "bench.peers", "worker", "redis", str(redis_port), str(entries))
    wait_for(lambda: client.pubsub_numsub(peers.CLEAR_CHANNEL)[0][1] == workers, SETUP_TIMEOUT,
             "Redis workers to subscribe", check=procs.check)
    port = free_port()
    procs.python("redis-service", "bench.peers", "service", "redis", str(port), str(redis_port), str(workers))
    wait_for(lambda: up(port), SETUP_TIMEOUT, "the Redis fan-out service", check=procs.check)
    timed_posts(port, "/clear", "", 10, 200)
    samples = timed_posts(port, "/clear", "", count, 200)
    client.close()
    return Summary.of(samples)


def http_peer(procs: Processes, workers: int, count: int, entries: int) -> Summary:
    *worker_ports, port = free_ports(workers + 1)
    for i, worker_port in enumerate(worker_ports):
        procs.python(f"http-worker-{i}", "bench.peers", "worker", "http", str(worker_port), str(entries))
    wait_for(lambda: all(up(p) for p in worker_ports), SETUP_TIMEOUT, "the HTTP fan-out workers", check=procs.check)
    urls = [f"http://127.0.0.1:{worker_port}/purge" for worker_port in worker_ports]
    procs.python("http-service", "bench.peers", "service", "http", str(port), ",".join(urls))
    wait_for(lambda: up(port), SETUP_TIMEOUT, "the HTTP fan-out service", check=procs.check)
    timed_posts(port, "/clear", "", 10, 200)
    return Summary.of(timed_posts(port, "/clear", "", count, 200))


@dataclass
class Throughput:
    bare: float
    warm: float
    cold: float
    seconds: int


def wrk(url: str, body: str, seconds: int, scratch: Path, connections: int = 32) -> tuple[float, int]:
    """Requests per second ``wrk`` sustains POSTing ``body``, and how many were not 2xx/3xx."""
    script = scratch / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = "{body}"\n'
                      'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n')
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, int(errors.group(1)) if errors else 0


#: Settings that lift the per-address abuse limits, so that wrk's 32 connections
#: from one address measure bcrypt itself rather than how fast 429s are sent.
UNLIMITED_AUTH = ("api:\n  auth:\n    failures: 0\n    bcrypt_queue: 10000\n    per_address: 64\n"
                  "    per_address_queue: 10000\n")


def throughput(procs: Processes, tmp: Path, seconds: int) -> Throughput | None:
    """The Flextype endpoint without ``wait`` against the bare handler, under 32 connections."""
    if shutil.which("wrk") is None:
        return None
    bare_port = free_port()
    procs.python("tornado-floor-wrk", "bench.floor_tornado", str(bare_port))
    wait_for(lambda: up(bare_port), SETUP_TIMEOUT, "the bare Tornado handler", check=procs.check)
    bare, _ = wrk(f"http://127.0.0.1:{bare_port}/", "", seconds, tmp)
    procs.stop()

    tokens = tmp / "tokens-wrk"
    token, access_token = create_token(tokens)
    config = tmp / "wrk-settings.yaml"
    config.write_text(UNLIMITED_AUTH)
    port = start_service(procs, "service-wrk", tokens, "--config", str(config)).port
    url = f"http://127.0.0.1:{port}/api/v1/cache/clear"
    warm, failed = wrk(url, urllib.parse.urlencode({"token": token, "access_token": access_token}), seconds, tmp)
    if failed:
        raise RuntimeError(f"{failed} warm-credential clears failed under wrk")
    # An access token that never verifies is never remembered: every request pays bcrypt.
    cold, _ = wrk(url, urllib.parse.urlencode({"token": token, "access_token": "0" * 32}), seconds, tmp)
    procs.stop()
    return Throughput(bare=bare, warm=warm, cold=cold, seconds=seconds)


@dataclass
class Scale:
    subscribers: int
    processes: int
    latency: Summary
    service_rss_mib: float


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale(procs: Processes, tmp: Path, subscribers: int, processes: int, count: int) -> Scale:
    """Time to all-acked with ``subscribers`` asyncio subscribers spread over ``processes``."""
    token, access_token = create_token(tmp / "tokens-scale")
    port, publish, acks, service = start_service(procs, "service-scale", tmp / "tokens-scale")
    share, extra = divmod(subscribers, processes)
    swarms = [procs.python(f"swarm-{i}", "bench.swarm", publish, acks, f"swarm{i}", str(share + (i < extra)),
                           str(keys_dir(procs))) for i in range(processes)]
    latency, _, rss = _timed_scale(procs, port, token, access_token, subscribers, count, service, [], swarms,
                                   join_timeout=300, warmup=5, wait_timeout=30)
    return Scale(subscribers, processes, latency, rss)


#: The relayed scale run's heartbeat interval (a lease of 15 s): at the default 0.5 s, 10,000
#: subscribers' heartbeats alone take more than this machine's two cores.
RELAYED_HEARTBEAT = 5.0


@dataclass
class RelayedScale:
    """10,000 subscribers through relays, and the same connected directly (issue 15)."""

    subscribers: int
    relays: int
    #: Subscribers in the direct run: all of them, or as many as the service's descriptors allow.
    direct_subscribers: int
    direct: Summary
    relayed: Summary
    #: CPU milliseconds per clear: the service's directly and through relays, each relay's (mean),
    #: each subscriber process's (mean, through relays).
    service_direct_ms: float
    service_relayed_ms: float
    relay_ms: float
    swarm_ms: float
    rss_direct_mib: float
    rss_relayed_mib: float


def _timed_scale(procs: Processes, port: int, token: str, access_token: str, subscribers: int, count: int,
                 service: Proc, relays: list[Proc], swarms: list[Proc], *, join_timeout: float = 900,
                 warmup: int = 3, wait_timeout: int = 60) -> tuple[Summary, list[float], float]:
    """Wait for every subscriber, then time ``count`` wait=all clears (after ``warmup`` untimed ones)
    with the CPU per clear of every process; returns them and the service's RSS."""
    wait_for(lambda: live_workers(port, token, access_token) == subscribers, join_timeout,
             f"{subscribers} subscribers to join", check=procs.check)
    body = urllib.parse.urlencode({"token": token, "access_token": access_token, "wait": "all",
                                   "timeout": str(wait_timeout)})
    timed_posts(port, "/api/v1/cache/clear", body, warmup, 200)
    pids = [service.pid, *(p.pid for p in relays), *(p.pid for p in swarms)]
    before = [cpu_seconds(pid) for pid in pids]
    latency = Summary.of(timed_posts(port, "/api/v1/cache/clear", body, count, 200))
    spent = [(cpu_seconds(pid) - was) * 1000 / count for pid, was in zip(pids, before, strict=True)]
    return latency, spent, rss_mib(service.pid)


def relayed_scale(procs: Processes, tmp: Path, subscribers: int, relays: int, count: int) -> RelayedScale:
    """``subscribers`` in ``relays`` swarm processes, each behind a ``cachebus relay`` of its own
    (a host each), then the same swarms connected straight to a service."""
    config = tmp / "relayed-settings.yaml"
    config.write_text(f"bus:\n  heartbeat_interval: {RELAYED_HEARTBEAT}\n")
    share = subscribers // relays
    keys = keys_dir(procs)
    # Directly, the service holds two connections per subscriber: as many subscribers as its
    # descriptor limit allows (the hard limit here is 20,000, and raising it needs a privilege).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fits = relays if hard == resource.RLIM_INFINITY else min(relays, max(1, (hard - 1024) // 2 // share))
    token, access_token = create_token(tmp / "tokens-direct")
    port, publish, acks = free_ports(3)
    service = procs.python("service-direct", "cachebus.service", "--config", str(config), "--port", str(port),
                           "--tokens-dir", str(tmp / "tokens-direct"), "--bus-publish", f"tcp://127.0.0.1:{publish}",
                           "--bus-acks", f"tcp://127.0.0.1:{acks}", "--keys-dir", str(keys))
    wait_for(lambda: up(port), SETUP_TIMEOUT, "the cachebus service", check=procs.check)
    swarms = [procs.python(f"swarm-direct-{i}", "bench.swarm", f"tcp://127.0.0.1:{publish}",
                           f"tcp://127.0.0.1:{acks}", f"direct{i}", str(share), str(keys), str(RELAYED_HEARTBEAT))
              for i in range(fits)]
    direct, spent, rss_direct = _timed_scale(procs, port, token, access_token, fits * share, count, service, [],
                                             swarms)
    service_direct = spent[0]
    procs.stop()

    token, access_token = create_token(tmp / "tokens-relayed")
    port, publish_url, acks_url, service = start_service(procs, "service-relayed", tmp / "tokens-relayed",
                                                         "--config", str(config))
    relay_procs, swarms = [], []
    for r in range(relays):
        relay_publish, relay_acks = free_ports(2)
        relay_keys = tmp / f"relay-keys-{r}"
        relay_procs.append(procs.python(
            f"relay-{r}", "cachebus.relay", "--name", f"relay-{r}", "--publish", f"tcp://127.0.0.1:{relay_publish}",
            "--acks", f"tcp://127.0.0.1:{relay_acks}", "--relay-keys-dir", str(relay_keys), "--http-port", "0",
            "--bus-publish", publish_url, "--bus-acks", acks_url, "--keys-dir", str(keys)))
        wait_for(lambda relay_keys=relay_keys: (relay_keys / "service.key").exists(), SETUP_TIMEOUT,
                 "a relay's keys", check=procs.check)
        # The operator's step on each host: the swarm's key allowed by its relay and by the service.
        keypair, _ = ensure_keypair(private_dir(private_dir(relay_keys) / WORKERS_DIR), f"relayed{r}")
        shutil.copy(keypair.public_file, keys / WORKERS_DIR / keypair.public_file.name)
        swarms.append(procs.python(f"swarm-relayed-{r}", "bench.swarm", f"tcp://127.0.0.1:{relay_publish}",
                                   f"tcp://127.0.0.1:{relay_acks}", f"relayed{r}", str(share), str(relay_keys),
                                   str(RELAYED_HEARTBEAT)))
    relayed, spent, rss_relayed = _timed_scale(procs, port, token, access_token, relays * share, count, service,
                                               relay_procs, swarms)
    return RelayedScale(relays * share, relays, fits * share, direct, relayed, service_direct, spent[0],
                        statistics.mean(spent[1:1 + relays]), statistics.mean(spent[1 + relays:]), rss_direct,
                        rss_relayed)


@dataclass
class Burst:
    workers: int
    clears: int
    seconds: float
    purges: int
    purge_seconds: float
    fresh: Summary


def burst(procs: Processes, tmp: Path, workers: int, clears: int, entries: int, connections: int = 4) -> Burst:
    """Offer ``clears`` clears as fast as ``connections`` clients can send them to ``workers`` workers.

    Reports how fast they were accepted, how many purges the workers really
    did (coalescing), and per clear how long until every worker had purged
    after it, which is when a reader anywhere sees fresh data.
    """
    config = tmp / "burst-settings.yaml"
    config.write_text(f"record:\n  max_clears: {clears + 100}\n  list_limit: {clears + 100}\n")
    tokens = tmp / "tokens-burst"
    token, access_token = create_token(tokens)
    port, publish, acks, _ = start_service(procs, "service-burst", tokens, "--config", str(config))
    start_workers(procs, "burst", workers, publish, acks, entries, port, token, access_token)
    creds = urllib.parse.urlencode({"token": token, "access_token": access_token})
    started = time.perf_counter()
    threads = [threading.Thread(target=timed_posts, args=(port, "/api/v1/cache/clear", creds,
                                                          clears // connections + (i < clears % connections), 204))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    offered = time.perf_counter() - started

    def records() -> list[dict]:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("GET", f"/api/v1/cache/clears?{creds}")
            return json.loads(conn.getresponse().read())["clears"]
        finally:
            conn.close()

    wait_for(lambda: all(c["complete"] for c in records()), SETUP_TIMEOUT, "every worker to ack the burst",
             check=procs.check)
    listed = records()
    fresh = [max(a["latency_ms"] for a in c["acks"]) for c in listed if c["acks"]]
    purge_times = {(a["worker"], a["acked_at"]) for c in listed for a in c["acks"]}
    first = min(c["published_at"] for c in listed)
    last = max(t for _, t in purge_times)
    return Burst(workers, len(listed), offered, len(purge_times), last - first, Summary.of(fresh))


@dataclass
class CredentialFlood:
    """The owner's clears without and with a flood of wrong access tokens from another address."""

    rate: float
    cold: tuple[Summary, Summary]
    warm: tuple[Summary, Summary]
    sent: int
    seconds: float
    statuses: dict[str, int]


def cold_clears(port: int, credentials: list[tuple[str, str]]) -> Summary:
    """One clear per token, each its token's first: each pays one bcrypt."""
    return Summary.of([timed_posts(port, "/api/v1/cache/clear", urllib.parse.urlencode(
        {"token": token, "access_token": access_token}), 1, 204)[0] for token, access_token in credentials])


def credential_flood(procs: Processes, tmp: Path, samples: int, rate: int = 100) -> CredentialFlood:
    """The owner's clears from 127.0.0.1, cold and warm, quiet and under a flood from 127.0.0.2.

    The default abuse limits, as shipped. The flood targets the owner's own
    token, each request with another wrong access token, and the owner's
    clears are timed from the moment it starts, its onset included.
    """
    tokens = tmp / "tokens-flood"
    token, access_token = create_token(tokens)
    cold_tokens = [create_token(tokens) for _ in range(2 * samples)]
    port = start_service(procs, "service-flood", tokens).port
    warm_body = urllib.parse.urlencode({"token": token, "access_token": access_token})
    timed_posts(port, "/api/v1/cache/clear", warm_body, 10, 204)
    quiet_warm = Summary.of(timed_posts(port, "/api/v1/cache/clear", warm_body, 4 * samples, 204))
    quiet_cold = cold_clears(port, cold_tokens[:samples])
    stop = tmp / "stop-flood"
    flooder = procs.python("flooder", "bench.flood", str(port), token, str(rate), "127.0.0.2", str(stop))
    flooded_cold = cold_clears(port, cold_tokens[samples:])
    flooded_warm = Summary.of(timed_posts(port, "/api/v1/cache/clear", warm_body, 4 * samples, 204))
    stop.touch()
    flooder.popen.wait(120)
    report = json.loads(flooder.output().strip().splitlines()[-1])
    return CredentialFlood(rate, (quiet_cold, flooded_cold), (quiet_warm, flooded_warm), report["sent"],
                           report["seconds"], report["statuses"])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


@dataclass
class Row:
    workers: int
    cachebus: Summary
    cpu: CpuPerClear
    cachebus_tmpfs: Summary | None
    zmq_floor: Summary
    tornado_floor: Summary
    redis: Summary | None
    http: Summary | None


def _verdict(value: float, budget: float) -> str:
    return "(within)" if value <= budget else "(over)"


def purge_cpu_ms(entries: int, rounds: int = 200) -> float:
    """CPU milliseconds one benchmark worker spends to purge and refill a full cache, measured here."""
    from bench.worker import FullCache

    cache = FullCache(entries)
    spent = []
    for _ in range(rounds):
        started = time.thread_time()
        Cache.clear(cache)
        cache.refill()
        spent.append((time.thread_time() - started) * 1000)
    return statistics.median(spent)


@dataclass
class ScopedPurge:
    """Milliseconds one process's full :class:`Cache` takes to purge part of what it holds (medians)."""

    entries: int
    #: What each purge below dropped.
    tag_entries: int
    prefix_entries: int
    one_key_ms: float
    tag_ms: float
    #: The first purge by prefix, which builds the prefix index (once per cache).
    first_prefix_ms: float
    prefix_ms: float
    #: A tag again, once the prefix index exists: each key dropped leaves it too.
    tag_indexed_ms: float
    everything_ms: float

    def per_entry_us(self, ms: float, dropped: int) -> float:
        return ms * 1000 / max(dropped, 1)


#: Tags in the scoped purge benchmark: each is on 1% of the entries.
SCOPED_TAGS = 100


def scoped_purge_ms(entries: int = 100_000, rounds: int = 21) -> ScopedPurge:
    """Time scoped purges of a full ``Cache(max_entries=entries)``, in this process.

    Entry ``n`` has the key ``entries/<n>`` (zero-padded, so that a prefix
    names a run of them) and the tag ``tag-<n % 100>``. Each purge is timed
    with :func:`time.perf_counter`, ``rounds`` times (one key fifty times as
    often, a full clear, whose refill takes far longer, a quarter as often);
    what it dropped is put back between rounds, untimed, so that every purge
    meets a full cache. The median of each.
    """
    width = len(str(entries - 1))

    def key(n: int) -> str:
        return f"entries/{n:0{width}d}"

    def tag(n: int) -> str:
        return f"tag-{n % SCOPED_TAGS}"

    def fill(numbers: range) -> None:
        """Put back the entries ``numbers``, one ``set_many`` per tag."""
        for t in range(SCOPED_TAGS):
            first = numbers.start + (t - numbers.start) % SCOPED_TAGS
            cache.set_many({key(n): n for n in range(first, numbers.stop, SCOPED_TAGS)}, tags=[tag(t)])

    def timed(scope: Scope) -> tuple[float, int]:
        started = time.perf_counter()
        dropped = cache.clear_scope(scope)
        elapsed = (time.perf_counter() - started) * 1000
        assert dropped is not None
        return elapsed, dropped

    def by_tag() -> tuple[float, int]:
        samples, dropped = [], 0
        for r in range(rounds):
            t = r % SCOPED_TAGS
            elapsed, dropped = timed(Scope(tags=(tag(t),)))
            samples.append(elapsed)
            cache.set_many({key(n): n for n in range(t, entries, SCOPED_TAGS)}, tags=[tag(t)])
        return statistics.median(samples), dropped

    cache = Cache(max_entries=entries)
    everyone = range(entries)
    fill(everyone)
    one_key = []
    for r in range(rounds * 50):
        n = (r * 7919) % entries
        one_key.append(timed(Scope(keys=(key(n),)))[0])
        cache.set(key(n), n, tags=[tag(n)])
    tag_ms, tag_entries = by_tag()
    # The 1% of the keys in a row from the middle: entries/50 names entries/50000 to entries/50999 of 100,000.
    block = max(entries // 100, 1)
    middle = key(entries // 2)
    prefix = middle[:len(middle) - len(str(block - 1))] if block > 1 else middle
    first_prefix_ms, prefix_entries = timed(Scope(prefixes=(prefix,)))
    named = range(entries // 2, entries // 2 + prefix_entries)
    by_prefix = []
    for _ in range(rounds):
        fill(named)
        by_prefix.append(timed(Scope(prefixes=(prefix,)))[0])
    fill(named)
    tag_indexed_ms, _ = by_tag()
    everything = []
    for _ in range(max(rounds // 4, 1)):
        started = time.perf_counter()
        cache.clear()
        everything.append((time.perf_counter() - started) * 1000)
        fill(everyone)
    return ScopedPurge(entries, tag_entries, prefix_entries, statistics.median(one_key), tag_ms, first_prefix_ms,
                       statistics.median(by_prefix), tag_indexed_ms, statistics.median(everything))


def scoped_purge_report(scoped: ScopedPurge) -> list[str]:
    """The scoped purges' section: what each purge dropped and took, against a full clear."""
    s = scoped
    rows = [("one key", 1, s.one_key_ms), ("one tag", s.tag_entries, s.tag_ms),
            ("one prefix, index built", s.prefix_entries, s.prefix_ms),
            ("one tag, prefix index built", s.tag_entries, s.tag_indexed_ms),
            ("everything (`clear()`)", s.entries, s.everything_ms)]
    tag_us, clear_us = s.per_entry_us(s.tag_ms, s.tag_entries), s.per_entry_us(s.everything_ms, s.entries)
    prefix_us = s.per_entry_us(s.prefix_ms, s.prefix_entries)
    return [
        "",
        "## Scoped purges in one process's Cache",
        "",
        f"`Cache.clear_scope` on a full `Cache(max_entries={s.entries:,})` in the benchmark's own process: keys",
        f"`entries/<n>`, each entry with one of {SCOPED_TAGS} tags. Median of many purges each, what was dropped",
        "put back between them, untimed. A cache's first purge by prefix builds its prefix index",
        f"({s.first_prefix_ms:.1f} ms here, once), which is kept from then on.",
        "",
        "| purge | entries dropped | ms | µs per entry dropped |",
        "|---|---|---|---|",
        *(f"| {name} | {dropped:,} | {ms:.3f} | {s.per_entry_us(ms, dropped):.2f} |" for name, dropped, ms in rows),
        "",
        f"A scoped purge's cost follows what it drops, not the cache's size: {tag_us:.2f} µs per entry by tag and "
        f"{prefix_us:.2f} µs by",
        f"prefix, where `clear()` drops its whole table at {clear_us:.2f} µs an entry, so naming a scope is the "
        f"cheaper purge up to about {clear_us / tag_us:.0%}",
        f"of the cache by tag and {clear_us / prefix_us:.0%} by prefix.",
    ]


def _speedup(peer: Summary | None, ours: Summary) -> str:
    return f"{peer.p50 / ours.p50:.2f}×" if peer else "skipped"


def _cells(summary: Summary | None) -> str:
    return f"{summary.p50:.2f} | {summary.p99:.2f}" if summary else "not measured | -"


def report(rows: list[Row], load: Throughput | None, swarm: Scale | None, flood: Burst | None, clears: int,
           entries: int, elapsed: float, abuse: CredentialFlood | None = None, purge_ms: float = 0.0,
           relayed: RelayedScale | None = None, scoped: ScopedPurge | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} on {machine()}, "
        f"in one run of `make bench` ({elapsed:.0f} s). All times in milliseconds.",
        "",
        "## Time to all-acked, and the floors under it",
        "",
        f"`POST /api/v1/cache/clear?wait=all` end to end over a keep-alive connection, {clears} clears "
        f"per row, each of N worker processes holding {entries:,} cache entries before every clear. "
        "The floors are measured in the same run: a bare ZeroMQ PUB → N SUB → DEALER ack round trip, "
        "and a bare Tornado handler answering `{}`. The overhead ratio is cachebus's median divided "
        "by the sum of the two floors' medians.",
        "",
        "| N | cachebus p50 | p99 | min | max | ZeroMQ floor p50 | p99 | Tornado floor p50 | p99 "
        "| overhead ratio | tokens on tmpfs p50 | p99 | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        floors = row.zmq_floor.p50 + row.tornado_floor.p50
        tmpfs = row.cachebus_tmpfs
        lines.append(f"| {row.workers} | {' | '.join(row.cachebus.cells())} | {_cells(row.zmq_floor)} | "
                     f"{_cells(row.tornado_floor)} | {row.cachebus.p50 / floors:.2f} | {_cells(tmpfs)} | "
                     f"{f'{tmpfs.p50 / floors:.2f}' if tmpfs else '-'} |")
    lines += [
        "",
        "The *tokens on tmpfs* columns rerun cachebus with its token files on `/dev/shm`, where an",
        "fsync costs nothing: the difference between the two is what counting each call durably",
        "still adds (the fsyncs of the token file and its directory run while the clear is on the",
        "bus, and the answer waits for them).",
    ]
    lines += [
        "",
        "## CPU per clear",
        "",
        f"User plus system CPU from `/proc/<pid>/stat` around the {clears} timed clears above, divided by",
        "the clears: the service's, and the median worker's. A worker's figure includes its purge of",
        f"{entries:,} entries and the benchmark's refill of them; *worker, without purge* takes off",
        f"what that purge and refill cost, {purge_ms * 1000:.0f} µs, measured on its own in this run.",
        "Budgets (issue 14): service 0.4 ms + 20 µs per worker acked, worker 60 µs without the purge.",
        "",
        "| N | service | budget | worker | worker, without purge | budget |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        budget = 0.4 + 0.02 * row.workers
        bare = row.cpu.worker - purge_ms
        lines.append(f"| {row.workers} | {row.cpu.service:.3f} {_verdict(row.cpu.service, budget)} | {budget:.2f} | "
                     f"{row.cpu.worker:.3f} | {bare:.3f} {_verdict(bare, 0.06)} | 0.06 |")
    if scoped is not None:
        lines += scoped_purge_report(scoped)
    lines += [
        "",
        "## Peers doing the same job",
        "",
        "Each peer is an HTTP service whose `POST /clear` fans out to N worker processes with the same",
        "full caches and answers when all of them acked: Redis pub/sub with acks back over Redis",
        "(asyncio client, hiredis parser), and a naive fan-out that POSTs to every worker. Neither",
        "checks a token or counts calls durably; cachebus does both. Speed-up is the peer's median",
        "divided by cachebus's.",
        "",
        "| N | cachebus p50 | p99 | Redis p50 | p99 | HTTP fan-out p50 | p99 | vs Redis | vs HTTP fan-out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.workers} | {_cells(row.cachebus)} | {_cells(row.redis)} | {_cells(row.http)} | "
                     f"{_speedup(row.redis, row.cachebus)} | {_speedup(row.http, row.cachebus)} |")
    lines += [
        "",
        "cachebus's token files live on the same disk as a real deployment's, so each clear pays for",
        "counting the call durably (an fsync of the token file and its directory).",
        "",
        "## Throughput of the Flextype endpoint without `wait`",
        "",
    ]
    if load is None:
        lines.append("Not measured: `wrk` is not installed (`bash bench/install-deps.sh` installs it).")
    else:
        lines += [
            f"`wrk -t2 -c32 -d{load.seconds}s` POSTing to the endpoint, no workers attached. *Warm*: one",
            "valid credential, so bcrypt's verdict is remembered and each request reads, counts and",
            "rewrites the token file. *Cold*: an access token that never verifies, so every request",
            "pays bcrypt (and is answered 401). This service runs with the per-address abuse limits",
            "lifted, so that one address's 32 connections measure bcrypt, not how fast 429s go out.",
            "",
            "| | requests/s | ratio to the bare handler |",
            "|---|---|---|",
            f"| bare Tornado handler | {load.bare:,.0f} | 1.00 |",
            f"| cachebus, warm credential | {load.warm:,.0f} | {load.warm / load.bare:.2f} |",
            f"| cachebus, cold credential | {load.cold:,.0f} | {load.cold / load.bare:.2f} |",
        ]
    if swarm is not None:
        lat = swarm.latency
        lines += [
            "",
            "## Scale of fan-out",
            "",
            f"{swarm.subscribers:,} asyncio subscribers spread over {swarm.processes} processes, each with a small",
            f"cache, all registered with one service; {lat.count} `wait=all` clears.",
            "",
            "| subscribers | p50 | p99 | min | max | service RSS with all registered |",
            "|---|---|---|---|---|---|",
            f"| {swarm.subscribers:,} | {' | '.join(lat.cells())} | {swarm.service_rss_mib:.0f} MiB |",
        ]
    if relayed is not None:
        r = relayed
        lines += [
            "",
            "## Scale through relays",
            "",
            f"{r.subscribers:,} asyncio subscribers in {r.relays} processes (a host each), each process behind a",
            f"`cachebus relay` of its own, then the same {r.relays} processes connected straight to a service;",
            f"{r.relayed.count} `wait=all` clears each, CURVE on every hop, `bus.heartbeat_interval` "
            f"{RELAYED_HEARTBEAT:g} s (at",
            "0.5 s the subscribers' heartbeats alone would take both cores). CPU per clear from `/proc/<pid>/stat`.",
            "Targets (issue 15): at most 1,000 ms p50 through relays, and the service's CPU per clear at least",
            "ten times lower than directly.",
            "",
            "| | p50 | p99 | min | max | service CPU per clear | each relay | each subscriber process "
            "| service RSS |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {r.direct_subscribers:,} directly | {' | '.join(r.direct.cells())} | {r.service_direct_ms:.0f} ms "
            f"| | | {r.rss_direct_mib:.0f} MiB |",
            f"| {r.subscribers:,} through {r.relays} relays | {' | '.join(r.relayed.cells())} | "
            f"{r.service_relayed_ms:.0f} ms | {r.relay_ms:.0f} ms | {r.swarm_ms:.0f} ms | "
            f"{r.rss_relayed_mib:.0f} MiB |",
            "",
            f"Service CPU per subscriber and clear: {r.service_direct_ms * 1000 / r.direct_subscribers:.0f} µs "
            f"directly, {r.service_relayed_ms * 1000 / r.subscribers:.0f} µs through relays: "
            f"{r.service_direct_ms / r.direct_subscribers / max(r.service_relayed_ms / r.subscribers, 1e-9):.1f}× "
            "lower.",
        ]
        if r.direct_subscribers < r.subscribers:
            lines += [
                "",
                f"Directly, {r.direct_subscribers:,} subscribers are all one service process's descriptor limit "
                "allows on this machine",
                "(two connections each); through relays each relay holds its own.",
            ]
    if flood is not None:
        lines += [
            "",
            "## Burst",
            "",
            f"{flood.clears:,} clears offered as fast as 4 keep-alive clients can send them, to {flood.workers}",
            f"workers holding {entries:,} entries each. *Fresh after* is, per clear, the time from publishing",
            "it until the last worker acked a purge that covers it: from then on no reader anywhere gets",
            "pre-clear data.",
            "",
            "| clears accepted per second | purges performed | per worker | purges per second, all workers "
            "| fresh after p50 | p99 | max |",
            "|---|---|---|---|---|---|---|",
            f"| {flood.clears / flood.seconds:,.0f} | {flood.purges:,} | {flood.purges / flood.workers:,.0f} | "
            f"{flood.purges / max(flood.purge_seconds, 1e-9):,.0f} | {flood.fresh.p50:.1f} | {flood.fresh.p99:.1f} | "
            f"{flood.fresh.max:.1f} |",
        ]
    if abuse is not None:
        lines += flood_report(abuse)
    lines.append("")
    return "\n".join(lines)


def flood_report(abuse: CredentialFlood) -> list[str]:
    """The credential flood's section: the owner's clears, quiet and flooded, and what the attacker got."""
    statuses = ", ".join(f"{count:,} × {status}" for status, count in abuse.statuses.items())
    lines = [
        "",
        "## A flood of wrong credentials",
        "",
        f"One address (127.0.0.2) offers {abuse.rate:.0f} clears a second for the owner's token, each with",
        "another wrong access token, while the owner clears from 127.0.0.1, one clear at a time on a",
        "keep-alive connection. *Cold*: each of the owner's clears is its token's first, so it pays",
        "one bcrypt (cost 10); *warm*: its credential is remembered. The flooded clears are timed",
        "from the moment the flood starts. The default abuse limits (docs/security.md). The goal: the",
        "flood adds less than 100 ms to the owner's clears, and never locks the owner out.",
        "",
        "| owner's clear | quiet p50 | p99 | flooded p50 | p99 | added p50 | added p99 | clears |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (quiet, flooded) in (("cold", abuse.cold), ("warm", abuse.warm)):
        lines.append(f"| {name} | {quiet.p50:.2f} | {quiet.p99:.2f} | {flooded.p50:.2f} | {flooded.p99:.2f} | "
                     f"{flooded.p50 - quiet.p50:+.2f} | {flooded.p99 - quiet.p99:+.2f} | "
                     f"{quiet.count} + {flooded.count} |")
    lines += [
        "",
        f"The attacker sent {abuse.sent:,} requests in {abuse.seconds:.1f} s "
        f"({abuse.sent / max(abuse.seconds, 1e-9):.0f} a second), answered {statuses}: 401s paid bcrypt,",
        "429s were refused before the token file and bcrypt.",
    ]
    return lines


def plot(rows: list[Row], path: Path) -> bool:
    """Median time to all-acked against N, one line per contender; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [row.workers for row in rows]
    series = {
        "cachebus": [row.cachebus for row in rows],
        "cachebus, tokens on tmpfs": [row.cachebus_tmpfs for row in rows],
        "Redis pub/sub": [row.redis for row in rows],
        "naive HTTP fan-out": [row.http for row in rows],
        "ZeroMQ floor": [row.zmq_floor for row in rows],
        "Tornado floor": [row.tornado_floor for row in rows],
    }
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, summaries in series.items():
        points = [(n, s.p50) for n, s in zip(ns, summaries, strict=True) if s is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("worker processes (N)")
    ax.set_ylabel("median time to all-acked (ms)")
    ax.set_title("Time to all-acked, median of each run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,4,16,64", help="comma-separated worker counts")
    parser.add_argument("--clears", type=int, default=300, help="timed clears per worker count")
    parser.add_argument("--entries", type=int, default=10_000, help="cache entries per worker")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--swarm", type=int, default=1000, help="subscribers for the fan-out scale run")
    parser.add_argument("--swarm-clears", type=int, default=50, help="timed clears at that scale")
    parser.add_argument("--relayed", type=int, default=10_000, help="subscribers for the run through relays")
    parser.add_argument("--relays", type=int, default=10, help="relays (and subscriber processes) for that run")
    parser.add_argument("--relayed-clears", type=int, default=20, help="timed clears in that run, each way")
    parser.add_argument("--burst", type=int, default=5000, help="clears offered in the burst")
    parser.add_argument("--burst-workers", type=int, default=16, help="workers receiving the burst")
    parser.add_argument("--flood-samples", type=int, default=50,
                        help="cold clears timed quiet and flooded (warm: four times as many)")
    parser.add_argument("--smoke", action="store_true", help="N=2 and a few clears: check the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.clears, args.entries, args.seconds, args.swarm, args.swarm_clears = "2", 5, 100, 1, 10, 3
        args.burst, args.burst_workers, args.flood_samples = 50, 2, 3
        args.relayed, args.relays, args.relayed_clears = 20, 2, 2
    counts = [int(n) for n in args.workers.split(",")]
    load: Throughput | None = None
    swarm: Scale | None = None
    relayed: RelayedScale | None = None
    flood: Burst | None = None
    abuse: CredentialFlood | None = None
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cachebus-bench-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp, cwd=ROOT)
        try:
            for n in counts:
                print(f"N={n}: Tornado floor", flush=True)
                tornado = tornado_floor(procs, args.clears)
                procs.stop()
                print(f"N={n}: ZeroMQ floor", flush=True)
                floor = zmq_floor(procs, n, args.clears)
                procs.stop()
                print(f"N={n}: cachebus", flush=True)
                ours, cpu = cachebus(procs, tmp / f"tokens-{n}", n, args.clears, args.entries)
                procs.stop()
                print(f"N={n}: cachebus, token files on tmpfs", flush=True)
                ours_tmpfs = None
                if SHM.is_dir():
                    with tempfile.TemporaryDirectory(dir=SHM) as shm:
                        ours_tmpfs = cachebus(procs, Path(shm), n, args.clears, args.entries).latency
                        procs.stop()
                print(f"N={n}: Redis pub/sub peer", flush=True)
                via_redis = redis_peer(procs, n, args.clears, args.entries)
                procs.stop()
                print(f"N={n}: naive HTTP fan-out peer", flush=True)
                via_http = http_peer(procs, n, args.clears, args.entries)
                procs.stop()
                rows.append(Row(n, ours, cpu, ours_tmpfs, floor, tornado, via_redis, via_http))
                print(f"N={n}: cachebus p50 {ours.p50:.2f} ms, floors {floor.p50:.2f} + {tornado.p50:.2f} ms",
                      flush=True)
            print("throughput with wrk", flush=True)
            load = throughput(procs, tmp, args.seconds)
            procs.stop()
            print(f"{args.swarm} subscribers", flush=True)
            swarm = scale(procs, tmp, args.swarm, 4 if args.swarm >= 100 else 1, args.swarm_clears)
            procs.stop()
            print(f"{args.relayed} subscribers, directly and through {args.relays} relays", flush=True)
            relayed = relayed_scale(procs, tmp, args.relayed, args.relays, args.relayed_clears)
            procs.stop()
            print(f"burst of {args.burst} clears to {args.burst_workers} workers", flush=True)
            flood = burst(procs, tmp, args.burst_workers, args.burst, args.entries)
            procs.stop()
            print("a flood of wrong credentials from 127.0.0.2", flush=True)
            abuse = credential_flood(procs, tmp, args.flood_samples)
        finally:
            procs.stop()
    print("scoped purges of one Cache", flush=True)
    scoped = scoped_purge_ms(1_000, rounds=3) if args.smoke else scoped_purge_ms()
    text = report(rows, load, swarm, flood, args.clears, args.entries, time.monotonic() - started, abuse,
                  purge_cpu_ms(args.entries), relayed, scoped)
    # The profiles and fixes behind these numbers are kept by hand, beside the code.
    text += "\n" + (Path(__file__).parent / "history.md").read_text()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = output.with_name(output.stem + "-latency.png")
    if plot(rows, picture):
        text = text.replace("## Peers doing the same job", f"![median time to all-acked]({picture.name})\n\n"
                            "## Peers doing the same job", 1)
    output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

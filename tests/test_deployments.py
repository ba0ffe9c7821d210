"""The proof holds in real deployments: the subscriber embedded under real pre-fork and multi-process servers.

The apps are the ones docs/embedding.md shows, in ``examples/``, run as a user
runs them: ``gunicorn -w 3`` starts ``wsgi_app.py`` and its ``post_fork`` hook
(``gunicorn.conf.py``) starts a subscriber in each worker; ``uvicorn --workers 2``
starts ``asgi_app.py``, whose lifespan starts a subscriber on each worker's loop.
Every process of an app shares one name and reads the bus settings from
``CACHEBUS_*`` variables. Each process warms :data:`WARM_ENTRIES` entries once
it is in sync, so an ack's ``entries_dropped`` tells whose cache it emptied.

One ``wait=all`` clear must then list every process of the server (its pids
are the server's own children, read from ``/proc``), every ack must show that
process's entries dropped, and every process must report an empty cache
afterwards in its heartbeats. A gunicorn worker killed with SIGKILL is left out
of the next proof (listed as ``excluded``) and its replacement is in it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachebus.testing import Cluster, Proc, Processes, answers, free_port, http_json, wait_for

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: ``WARM_ENTRIES`` of both example apps: what each process caches once in sync.
WARM_ENTRIES = 5

Workers = dict[int, dict[str, Any]]


def children(pid: int) -> set[int]:
    """The pids of ``pid``'s living children, from ``/proc`` (zombies are dead, not living)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        # The command name, in parentheses, may hold spaces: the fields that matter follow the last ')'.
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def serving(pid: int) -> set[int]:
    """The server ``pid``'s worker processes: its children, less multiprocessing's resource tracker
    (uvicorn spawns its workers with multiprocessing, which starts one; it serves nothing)."""
    def tracker(child: int) -> bool:
        try:
            return b"multiprocessing.resource_tracker" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return True  # it exited meanwhile: not serving either
    return {child for child in children(pid) if not tracker(child)}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Processes]:
    """The app servers a test starts; on the way out each is stopped, and any worker it left behind killed."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        left = [pid for child in processes.children for pid in children(child.pid)]
        processes.stop()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it exited with its server, as it should


def bus_env(cluster: Cluster, name: str) -> list[str]:
    """``env CACHEBUS_…=…``: a command prefix that hands the app its bus settings, as a deployment would."""
    options = cluster.subscriber_options()
    return ["env", f"CACHEBUS_NAME={name}", f"CACHEBUS_PUBLISH={options['publish']}",
            f"CACHEBUS_ACKS={options['acks']}", f"CACHEBUS_KEYS_DIR={options['keys_dir']}",
            f"CACHEBUS_KEY={options['key']}", f"CACHEBUS_INSECURE={int(options['insecure'])}"]


def start_gunicorn(servers: Processes, cluster: Cluster, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    master = servers.start("gunicorn", [
        *bus_env(cluster, "web"), sys.executable, "-m", "gunicorn", "-w", "3", "-c", str(EXAMPLES / "gunicorn.conf.py"),
        "--chdir", str(EXAMPLES), "--bind", f"127.0.0.1:{port}", "--no-control-socket", *extra, "wsgi_app:app"])
    return master, f"http://127.0.0.1:{port}"


def start_uvicorn(servers: Processes, cluster: Cluster) -> tuple[Proc, str]:
    port = free_port()
    master = servers.start("uvicorn", [
        *bus_env(cluster, "api"), sys.executable, "-m", "uvicorn", "asgi_app:app", "--app-dir", str(EXAMPLES),
        "--workers", "2", "--host", "127.0.0.1", "--port", str(port)])
    return master, f"http://127.0.0.1:{port}"


def entries(worker: dict[str, Any]) -> int | None:
    """How many entries the process's cache held at its last heartbeat (None before its first)."""
    return worker["stats"].get("entries")


def warm_processes(cluster: Cluster, master: Proc, name: str, count: int) -> Workers | None:
    """The record's live workers called ``name``, by pid, when they are exactly the ``count`` children
    of ``master`` and each has cached its warm entries; else None."""
    live = {w["pid"]: w for w in cluster.worker_list() if w["name"] == name and w["state"] == "live"}
    ours = serving(master.pid)
    if set(live) != ours or len(ours) != count:
        return None
    return live if all(entries(w) == WARM_ENTRIES for w in live.values()) else None


def warmed(cluster: Cluster, servers: Processes, master: Proc, name: str, count: int) -> Workers:
    try:
        return wait_for(lambda: warm_processes(cluster, master, name, count), check=servers.check,
                        what=f"{count} {name} processes of pid {master.pid} to join and warm their caches")
    except AssertionError as exc:
        record = [(w["pid"], w["name"], w["state"], entries(w)) for w in cluster.worker_list()]
        raise AssertionError(f"{exc}\nserver's processes: {sorted(serving(master.pid))}\n"
                             f"record (pid, name, state, entries): {record}\n{master.output()[-3000:]}") from None


def prove(cluster: Cluster, name: str, workers: Workers) -> dict[str, Any]:
    """A ``wait=all`` clear, which must list exactly ``workers`` and show each one's warm entries dropped."""
    status, _, body = cluster.clear(wait="all")
    proof = json.loads(body)
    assert status == 200, proof
    ids = {w["id"] for w in workers.values()}
    assert set(proof["workers"]) == ids and len(proof["workers"]) == len(workers)
    assert proof["groups"] == {name: {"expected": len(workers), "acked": len(workers), "failed": 0, "missing": 0}}
    assert proof["complete"] and proof["missing"] == [] and proof["failed"] == []
    assert {a["worker"]: (a["name"], a["outcome"], a["cause"], a["entries_dropped"]) for a in proof["acks"]} == {
        worker: (name, "ok", "clear", WARM_ENTRIES) for worker in ids}
    return proof


def emptied(cluster: Cluster, app: str, workers: Workers) -> None:
    """Every process in ``workers`` reports an empty cache, and the app still serves."""
    def empty() -> bool:
        now = {w["id"]: w for w in cluster.worker_list()}
        return all(now[w["id"]]["state"] == "live" and entries(now[w["id"]]) == 0 for w in workers.values())

    wait_for(empty, what="every process to report an empty cache")
    served = http_json(app + "/")
    assert served["pid"] in workers and served["entries"] == 0


def test_gunicorn_workers_each_prove_their_purge(cluster: Cluster, servers: Processes):
    cluster.start_service()
    master, app = start_gunicorn(servers, cluster)
    wait_for(lambda: answers(app + "/"), what="gunicorn to answer", check=servers.check)
    workers = warmed(cluster, servers, master, "web", 3)
    assert len({w["id"] for w in workers.values()}) == 3  # one name, three processes, three ids

    prove(cluster, "web", workers)
    emptied(cluster, app, workers)


def test_gunicorn_replaces_a_killed_worker_and_the_next_proof_follows(cluster: Cluster, servers: Processes):
    cluster.start_service()
    # --preload: the app module, and its Cache, are made in the master before the fork; the
    # post_fork hook still starts each worker's own subscriber.
    master, app = start_gunicorn(servers, cluster, "--preload")
    before = warmed(cluster, servers, master, "web", 3)

    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> Workers | None:
        silent = all(w["state"] != "live" for w in cluster.worker_list() if w["id"] == before[victim]["id"])
        return warm_processes(cluster, master, "web", 3) if silent else None

    after = wait_for(replaced, what="the killed worker to fall silent and its replacement to join",
                     check=servers.check)
    (newcomer,) = set(after) - set(before)
    assert set(after) - {newcomer} == set(before) - {victim}

    proof = prove(cluster, "web", after)
    assert after[newcomer]["id"] in proof["workers"] and before[victim]["id"] not in proof["workers"]
    excluded = {e["worker"]: e for e in proof["excluded"]}
    assert set(excluded) == {before[victim]["id"]}
    assert excluded[before[victim]["id"]]["pid"] == victim
    assert excluded[before[victim]["id"]]["state"] in ("suspect", "lost")
    emptied(cluster, app, after)


def test_uvicorn_workers_each_prove_their_purge(cluster: Cluster, servers: Processes):
    cluster.start_service()
    master, app = start_uvicorn(servers, cluster)
    wait_for(lambda: answers(app + "/"), what="uvicorn to answer", check=servers.check)
    workers = warmed(cluster, servers, master, "api", 2)

    prove(cluster, "api", workers)
    emptied(cluster, app, workers)

"""The abuse limits alone: the failure log, the bcrypt pool's shares and bounds, stopping.

The pool runs real threads; the calls it runs here wait on events the test
sets, so that what runs, what waits and what is refused is decided by the
test, not by timing. The failure log takes a clock, so its window is tested
without waiting for it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from cachebus.service.auth.limits import BcryptPool, Busy, FailureLog, Overloaded, address_key
from cachebus.testing import wait_for

# --- the failure log -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_slowed_after_limit_failures_until_the_oldest_ages_out() -> None:
    clock = Clock()
    log = FailureLog(limit=3, window=60.0, clock=clock)
    for _ in range(2):
        log.failed("127.0.0.2")
        clock.now += 1
    assert log.retry_after("127.0.0.2") == 0
    log.failed("127.0.0.2")  # the third, at 1002
    assert log.retry_after("127.0.0.2") == 60 - 2  # the first, at 1000, ages out at 1060
    assert log.retry_after("127.0.0.1") == 0  # by address: another one is not slowed
    clock.now = 1059.5
    assert log.retry_after("127.0.0.2") == 1  # whole seconds, at least one
    clock.now = 1060.0
    assert log.retry_after("127.0.0.2") == 0
    log.failed("127.0.0.2")  # only the last `limit` failures count: 1001, 1002 and now
    assert log.retry_after("127.0.0.2") == 1


def test_a_zero_limit_slows_no_one() -> None:
    log = FailureLog(limit=0, window=60.0)
    for _ in range(100):
        log.failed("127.0.0.2")
    assert log.retry_after("127.0.0.2") == 0
    assert len(log) == 0


def test_the_log_keeps_a_bounded_number_of_addresses() -> None:
    log = FailureLog(limit=1, window=60.0, max_addresses=3)
    for i in range(10):
        log.failed(f"10.0.0.{i}")
    assert len(log) == 3
    assert log.retry_after("10.0.0.9") > 0 and log.retry_after("10.0.0.0") == 0


def test_addresses_are_keyed_by_host_and_ipv6_by_its_64() -> None:
    assert address_key("127.0.0.2") == "127.0.0.2"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:127.0.0.2") == "127.0.0.2"
    assert address_key("") == ""


# --- the bcrypt pool -------------------------------------------------------------


class Gate:
    """A call for the pool that blocks until released, and says when it started."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.started = threading.Event()
        self.release = threading.Event()
        self.log = log

    def __call__(self) -> str:
        self.log.append(self.name)
        self.started.set()
        assert self.release.wait(30)
        return self.name


async def until(condition: Callable[[], bool], what: str) -> None:
    """wait_for, without blocking the event loop the pool answers on."""
    await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(condition, what=what))


def test_one_address_cannot_take_more_than_its_share() -> None:
    async def main() -> None:
        pool = BcryptPool(threads=2, queue=10, per_address=1, per_address_queue=5)
        started: list[str] = []
        a1, a2, b1 = Gate("a1", started), Gate("a2", started), Gate("b1", started)
        first = asyncio.ensure_future(pool.run("127.0.0.2", a1))
        second = asyncio.ensure_future(pool.run("127.0.0.2", a2))
        await until(a1.started.is_set, "a1 to start")
        other = asyncio.ensure_future(pool.run("127.0.0.1", b1))
        # The attacker's second call waits for its own turn; the other address gets the free thread.
        await until(b1.started.is_set, "the other address's call to start")
        assert not a2.started.is_set()
        b1.release.set()
        assert await other == "b1"
        a1.release.set()
        assert await first == "a1"
        await until(a2.started.is_set, "a2 to start once a1 is done")
        a2.release.set()
        assert await second == "a2"
        assert started == ["a1", "b1", "a2"]
        assert pool.admitted == 0
        pool.close()

    asyncio.run(main())


def test_an_address_queue_and_the_pool_queue_are_bounded() -> None:
    async def main() -> None:
        pool = BcryptPool(threads=1, queue=2, per_address=1, per_address_queue=1)
        log: list[str] = []
        gates = [Gate(f"g{i}", log) for i in range(3)]
        running = asyncio.ensure_future(pool.run("a", gates[0]))
        await until(gates[0].started.is_set, "the first call to start")
        waiting = asyncio.ensure_future(pool.run("a", gates[1]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as info:  # a's own queue (1) is full
            await pool.run("a", gates[2])
        assert info.value.why is Busy.ADDRESS and info.value.retry_after == 1
        queued = asyncio.ensure_future(pool.run("b", gates[2]))
        await asyncio.sleep(0)
        assert pool.admitted == 3  # threads 1 + queue 2
        with pytest.raises(Overloaded) as info:
            await pool.run("c", gates[2])
        assert info.value.why is Busy.POOL
        for gate in gates:
            gate.release.set()
        assert await asyncio.gather(running, waiting, queued) == ["g0", "g1", "g2"]
        assert pool.admitted == 0
        pool.close()

    asyncio.run(main())


def test_an_exception_reaches_the_caller_and_frees_the_place() -> None:
    async def main() -> None:
        pool = BcryptPool(threads=1, queue=0, per_address=1, per_address_queue=0)

        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError):
            await pool.run("a", fail)
        assert await pool.run("a", lambda: 42) == 42
        pool.close()

    asyncio.run(main())


def test_a_cancelled_waiter_gives_up_its_place() -> None:
    async def main() -> None:
        pool = BcryptPool(threads=2, queue=4, per_address=1, per_address_queue=2)
        log: list[str] = []
        gate = Gate("first", log)
        first = asyncio.ensure_future(pool.run("a", gate))
        await until(gate.started.is_set, "the first call to start")
        waiter = asyncio.ensure_future(pool.run("a", lambda: "never"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.release.set()
        assert await first == "first"
        assert await pool.run("a", lambda: "next") == "next"
        assert pool.admitted == 0
        pool.close()

    asyncio.run(main())


def test_close_answers_running_queued_and_waiting_calls_at_once() -> None:
    async def main() -> None:
        pool = BcryptPool(threads=1, queue=10, per_address=1, per_address_queue=10)
        log: list[str] = []
        stuck = Gate("stuck", log)  # a hash that would take forever
        calls = [asyncio.ensure_future(pool.run("a", stuck))]
        await until(stuck.started.is_set, "the stuck call to start")
        calls += [asyncio.ensure_future(pool.run("a", lambda: "waiting")) for _ in range(3)]
        calls += [asyncio.ensure_future(pool.run("b", lambda: "queued"))]
        await asyncio.sleep(0)
        pool.close()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, Overloaded) and o.why is Busy.STOPPING for o in outcomes), outcomes
        with pytest.raises(Overloaded) as info:
            await pool.run("c", lambda: "late")
        assert info.value.why is Busy.STOPPING
        assert log == ["stuck"]  # nothing queued ever started
        stuck.release.set()

    asyncio.run(main())


#: A process that exits while its pool's thread is inside bcrypt, the hash ending during the
#: interpreter's finalization (the ballast makes module teardown last past it).
_EXIT_DURING_A_HASH = """
import asyncio, threading
import bcrypt
from cachebus.service.auth.limits import BcryptPool

hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(12))
started = threading.Event()
ballast = [{"n": [i]} for i in range(3_000_000)]


def verify():
    started.set()
    return bcrypt.checkpw(b"x", hashed)


async def main():
    pool = BcryptPool(threads=1)
    asyncio.ensure_future(pool.run("client", verify))
    while not started.is_set():
        await asyncio.sleep(0.001)

asyncio.run(main())
print("exiting during the hash", flush=True)
"""


@pytest.mark.processes
def test_a_process_that_exits_during_a_hash_exits_cleanly():
    """A daemon thread still in bcrypt at finalization was ended by pthread_exit, whose unwinding
    crosses bcrypt's Rust frames: the process aborted ("FATAL: exception not rethrown", 134), as a
    test run once did at its very end. The exit now waits for hashes under way."""
    result = subprocess.run([sys.executable, "-c", _EXIT_DURING_A_HASH], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exiting during the hash" in result.stdout

"""bus.reader: handlers run straight from the loop's reader callback, in order, over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import zmq

from cachebus.bus.reader import Batch, Reader, readable, send_now
from cachebus.eager import run_eagerly


def test_a_coroutine_that_never_waits_finishes_before_run_eagerly_returns():
    steps: list[str] = []

    async def purge() -> None:
        steps.append("purged")

    async def main() -> None:
        assert run_eagerly(purge()) is None
        assert steps == ["purged"]

    asyncio.run(main())


def test_a_coroutine_that_waits_is_finished_by_a_task_with_the_awaited_value():
    async def main() -> list[object]:
        seen: list[object] = []
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def purge() -> None:
            seen.append("started")
            seen.append(await gate)
            await asyncio.sleep(0)  # a bare yield is passed through too
            seen.append("done")

        rest = run_eagerly(purge())
        assert rest is not None and seen == ["started"]
        gate.set_result("opened")
        await rest
        return seen

    assert asyncio.run(main()) == ["started", "opened", "done"]


def test_an_awaited_failure_reaches_the_coroutine_and_then_its_task():
    async def main() -> list[str]:
        seen: list[str] = []
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def purge() -> None:
            try:
                await gate
            except KeyError:
                seen.append("handled")
                raise RuntimeError("purge failed") from None

        rest = run_eagerly(purge())
        assert rest is not None
        gate.set_exception(KeyError("x"))
        with pytest.raises(RuntimeError, match="purge failed"):
            await rest
        return seen

    assert asyncio.run(main()) == ["handled"]


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits():
    async def main() -> list[str]:
        seen: list[str] = []
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def purge() -> None:
            try:
                await gate
            finally:
                seen.append("cleaned up")

        rest = run_eagerly(purge())
        assert rest is not None
        await asyncio.sleep(0)
        rest.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rest
        assert gate.cancelled()
        return seen

    assert asyncio.run(main()) == ["cleaned up"]


def test_a_reader_hands_over_batches_in_order_and_waits_for_an_unfinished_handler():
    """Messages sent while an async handler waits are handled after it, in the order sent."""

    async def main() -> list[bytes]:
        ctx = zmq.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        try:
            port = pull.bind_to_random_port("tcp://127.0.0.1")
            push.connect(f"tcp://127.0.0.1:{port}")
            handled: list[bytes] = []
            gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def slow(batch: Batch) -> None:
                await gate
                handled.extend(bytes(frames[0].bytes) for frames in batch)

            def handle(batch: Batch) -> Coroutine[Any, Any, None] | None:
                if not handled and not gate.done():
                    return slow(batch)
                handled.extend(bytes(frames[0].bytes) for frames in batch)
                return None

            reader = Reader(pull, handle, limit=2)
            reader.start()
            send_now(push, [b"1"])
            await _until(lambda: reader.pending is not None)
            for number in (b"2", b"3", b"4", b"5"):
                send_now(push, [number])
            await _until(lambda: readable(pull))
            for _ in range(20):  # turns of the loop: the reader must leave them while the handler waits
                await asyncio.sleep(0)
            assert handled == [] and readable(pull)
            gate.set_result(None)
            await _until(lambda: len(handled) == 5)
            assert reader.close() is None
            return handled
        finally:
            pull.close(0)
            push.close(0)
            ctx.term()

    assert asyncio.run(main()) == [b"1", b"2", b"3", b"4", b"5"]


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)

"""Running a coroutine eagerly: now, up to its first real wait, without a task or a trip through the loop.

Python 3.12's eager task factory does this for every task; cachebus runs on
3.11 and needs it only where a coroutine usually finishes at once: a worker's
purge (nearly every target's ``clear`` is synchronous) and a token's count
(checked on the loop, see :mod:`cachebus.service.auth.store`). Each avoided task
was a pass through the event loop per clear (issue 14).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_eagerly"]


def run_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None] | None:
    """Run ``coro`` now, up to its first real suspension: None if it finished, else a task for the rest.

    A worker's purge is a coroutine because a target's ``clear`` may be async,
    but nearly every target is synchronous, and a task per clear would cost a
    trip through the loop. Python 3.12's eager tasks do the same; this is
    Python 3.11. An exception ``coro`` raises before suspending propagates.
    """
    try:
        awaited = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_resume(coro, awaited))


async def _resume(coro: Coroutine[Any, Any, None], awaited: Any) -> None:
    """Drive ``coro`` from where :func:`run_eagerly` left it, as a task would.

    ``awaited`` is what the coroutine yielded: an asyncio future it waits on,
    or None for a bare yield (``asyncio.sleep(0)``). The coroutine reads the
    future's outcome itself when resumed. Cancelling this task cancels that
    future, as cancelling a task does, so the coroutine sees the
    cancellation where it waits; a bare yield gets it thrown in.
    """
    while True:
        try:
            if awaited is None:
                await asyncio.sleep(0)
            else:
                # As a task does with what its coroutine yields: the future is marked as
                # being waited on, and awaiting it again requires the mark cleared.
                awaited._asyncio_future_blocking = False
                await awaited
        except asyncio.CancelledError as cancelled:
            if awaited is None or not awaited.done():
                try:
                    awaited = coro.throw(cancelled)
                except StopIteration:
                    return
                continue
        except Exception:  # the coroutine reads the future's outcome itself
            pass
        try:
            awaited = coro.send(None)
        except StopIteration:
            return

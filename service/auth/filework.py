"""Token-file work off the event loop: one executor, refused once the store closes.

The authenticator reads token files on it and the counter writes them; both
must stop at once when the service does, so whoever waits for work that will
never start hears :class:`~.limits.Overloaded` (``STOPPING``) instead of a
bare cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from .limits import Busy, Overloaded

T = TypeVar("T")


class FileWork:
    """Runs blocking file work on ``executor``; :meth:`close` refuses what comes after."""

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self.executor = executor
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the executor; :class:`Overloaded` once closed."""
        if self.closed:
            raise Overloaded(Busy.STOPPING)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        except asyncio.CancelledError:
            if self.closed:  # cancelled by close(), not by our caller
                raise Overloaded(Busy.STOPPING) from None
            raise

"""A benchmark worker: a subscriber whose cache holds ``--entries`` entries before every clear.

The cache refills right after each purge has been acked, so every timed clear
purges a full cache.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from cachebus.bus.security import DEFAULT_KEYS_DIR
from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import Subscriber


class FullCache(Cache):
    def __init__(self, entries: int) -> None:
        super().__init__(max_entries=entries)
        self.set_many({f"entry-{i}": i for i in range(entries)})
        with self._lock:
            self._full = self._data.copy()

    def refill(self) -> None:
        # Scaffolding, not what is measured: a copy of the full table, so the
        # refill costs well under a millisecond and cannot queue up behind the
        # next clear (set_many of 10,000 entries takes about 5 ms).
        with self._lock:
            self._data = self._full.copy()

    def clear(self, *, clear_id: str | None = None, seq: int | None = None) -> int:
        """The subscriber's purge; the refill runs once the ack has been sent."""
        dropped = super().clear(clear_id=clear_id, seq=seq)
        asyncio.get_running_loop().call_soon(self.refill)
        return dropped

    def clear_now(self) -> int:
        """A purge for peers that refill on their own schedule."""
        return super().clear()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--publish", required=True)
    parser.add_argument("--acks", required=True)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--keys-dir", default=DEFAULT_KEYS_DIR, help="the service's bus keys (CURVE)")
    parser.add_argument("--insecure", action="store_true", help="no bus authentication (to measure CURVE's share)")
    args = parser.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Subscriber([FullCache(args.entries)], name=args.name, publish=args.publish, acks=args.acks,
                          keys_dir=args.keys_dir, insecure=args.insecure):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())

"""Many subscribers in one process: ``python -m bench.swarm PUBLISH ACKS PREFIX COUNT [KEYS_DIR [HEARTBEAT]]``.

``HEARTBEAT`` is the service's ``bus.heartbeat_interval`` when it is not the default: until a
subscriber hears the service it times its reconnects by the terms it was given, and with
terms shorter than the service's it reconnects before the first heartbeat can arrive.

For the fan-out scale measurement: the benchmark spreads 1,000 asyncio
subscribers over a few of these processes, each subscriber with a small cache.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import zmq.asyncio

from cachebus.bus.security import DEFAULT_KEYS_DIR, BusMode, ClientSecurity
from cachebus.workers.cache import Cache
from cachebus.workers.subscriber import Subscriber

#: Subscribers started at once.
_STEP = 200


async def main(publish: str, acks: str, prefix: str, count: int, keys_dir: str = DEFAULT_KEYS_DIR,
               heartbeat: float | None = None) -> None:
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, 4 * count + 16)
    # One keypair for the whole swarm (one process, one host), named after its prefix.
    security = ClientSecurity.resolve(BusMode.CURVE, name=prefix, keys_dir=keys_dir)
    assert security.keypair is not None
    subscribers = [Subscriber([Cache(max_entries=100)], name=f"{prefix}-{i}", publish=publish, acks=acks,
                              keys_dir=keys_dir, secret_key_file=security.keypair.path, context=ctx,
                              heartbeat_interval=heartbeat)
                   for i in range(count)]
    # In steps, each synced before the next starts: thousands of CURVE handshakes at once on a
    # small machine outlast the first lease, and every subscriber not heard from connects again.
    for start in range(0, count, _STEP):
        step = subscribers[start:start + _STEP]
        for subscriber in step:
            await subscriber.start()
        await asyncio.gather(*(subscriber.wait_synced(60) for subscriber in step))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for subscriber in subscribers:
        await subscriber.stop()
    ctx.term()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6],
                     *(float(v) for v in sys.argv[6:7])))

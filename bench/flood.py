"""A flood of wrong access tokens from one address, for ``bench.run``'s credential flood.

``python -m bench.flood PORT TOKEN RATE SOURCE STOP_FILE`` sends ``RATE``
``POST /api/v1/cache/clear`` a second from the loopback address ``SOURCE``
(127.0.0.2: the service sees it as the client's address), each with another
wrong access token for ``TOKEN``, until ``STOP_FILE`` exists. It runs in a
process of its own so that it never shares a GIL with the client being
timed. On stop it prints one JSON object: the requests sent, the seconds, and
the count of each status.

The sending is paced, not closed-loop: ten keep-alive connections each send
on a fixed schedule, so a slow answer does not lower the rate offered.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import urllib.parse
from http.client import HTTPConnection

CONNECTIONS = 10


def main(argv: list[str]) -> int:
    port, token, rate, source, stop_file = int(argv[0]), argv[1], float(argv[2]), argv[3], argv[4]
    statuses: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def sender(n: int) -> None:
        interval = CONNECTIONS / rate
        next_at = started + n * interval / CONNECTIONS
        conn = HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
        i = 0
        try:
            while not stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
                body = urllib.parse.urlencode({"token": token, "access_token": f"wrong-{n}-{i}"})
                i += 1
                conn.request("POST", "/api/v1/cache/clear", body,
                             {"Content-Type": "application/x-www-form-urlencoded"})
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(CONNECTIONS)]
    for t in threads:
        t.start()
    while not os.path.exists(stop_file):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    print(json.dumps({"sent": sum(statuses.values()), "seconds": time.monotonic() - started,
                      "statuses": {str(k): v for k, v in sorted(statuses.items())}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

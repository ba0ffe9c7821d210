"""Reporting of undecodable messages: one log line per peer, then silence.

Both ends of the bus drop frames that do not decode. A broken or hostile peer
may send many; logging each would let it flood the log, so only the first from
each peer is logged and the rest are counted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import zmq


class BadFrames:
    """Counts dropped messages and logs the first one from each peer."""

    def __init__(self, log: logging.Logger, max_peers: int = 1024) -> None:
        self.log = log
        self.max_peers = max_peers
        self.count = 0
        self._seen: OrderedDict[str, None] = OrderedDict()

    def report(self, peer: str, reason: str) -> None:
        self.count += 1
        if peer in self._seen:
            return
        self._seen[peer] = None
        if len(self._seen) > self.max_peers:
            self._seen.popitem(last=False)
        self.log.warning("dropped undecodable message from %s: %s; further bad messages "
                         "from this peer are dropped without logging", peer, reason)


def peer_address(frame: zmq.Frame) -> str:
    """The remote address a received frame came from, when ZeroMQ knows it."""
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, AttributeError):
        return "unknown address"

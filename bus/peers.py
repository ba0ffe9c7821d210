"""Rate-limited reporting of what a receive loop could not use: one line per peer, then counts.

Both ends of the bus drop messages that do not decode, refuse messages from a
peer that may not send them, and survive a message whose handling raised. A
broken or hostile peer may send many; logging each would let it flood the log,
so each peer gets one line per kind of trouble per interval, the repeats are
counted, and the next line for that peer and kind says how many there were.
A global budget caps the lines of all peers together, for a peer that keeps
changing its address or identity.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter, OrderedDict

import zmq


class Trouble(enum.StrEnum):
    """What happened to a message a receive loop did not use, as its log line says it."""

    #: Not a cachebus message: wrong frames, version, signature, or a body that fails its checks.
    UNDECODABLE = "dropped undecodable message"
    #: A valid message this peer may not send: another worker's ack, a key that does not match, a full record.
    REFUSED = "refused message"
    #: Handling the message raised: a bug, reported so the loop can go on.
    FAILED = "failed to handle message"
    #: Not a message: a peer that stays silent (a worker waiting for a service that refuses its key).
    UNANSWERED = "no answer"


class PeerLog:
    """Logs the first message of each (peer, trouble) per ``interval`` seconds and counts the rest."""

    def __init__(self, log: logging.Logger, interval: float = 60.0, max_peers: int = 1024,
                 budget: int = 100) -> None:
        self.log = log
        self.interval = interval
        self.max_peers = max_peers
        #: Lines all peers together may write per interval.
        self.budget = budget
        #: Every message reported, by trouble (logged or not).
        self.counts: Counter[Trouble] = Counter()
        #: (peer, trouble) -> [when its last line was written, messages since not logged].
        self._peers: OrderedDict[tuple[str, Trouble], list[float]] = OrderedDict()
        self._window_start = float("-inf")
        self._window_lines = 0

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def report(self, peer: str, trouble: Trouble, reason: str, exc_info: BaseException | None = None) -> None:
        """Count one message; log it unless this peer had a line for this trouble within the interval."""
        self.counts[trouble] += 1
        now = time.monotonic()
        key = (peer, trouble)
        entry = self._peers.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        if now - self._window_start >= self.interval:
            self._window_start, self._window_lines = now, 0
        if self._window_lines >= self.budget:
            if entry is None:
                entry = self._remember(key, float("-inf"))
            entry[1] += 1
            return
        self._window_lines += 1
        silent = int(entry[1]) if entry is not None else 0
        self._remember(key, now)
        more = f" ({silent} more since the last line)" if silent else ""
        level = logging.ERROR if trouble is Trouble.FAILED else logging.WARNING
        self.log.log(level, "%s from %s: %s%s; more from this peer within %.0f s are counted, not logged",
                     trouble, peer, reason, more, self.interval, exc_info=exc_info)

    def failed(self, peer: str, exc: BaseException, context: str = "") -> None:
        """Report that handling a message (or ``context``) from ``peer`` raised ``exc``, with its traceback."""
        where = f"{context}: " if context else ""
        self.report(peer, Trouble.FAILED, f"{where}{type(exc).__name__}: {exc}", exc_info=exc)

    def _remember(self, key: tuple[str, Trouble], logged_at: float) -> list[float]:
        entry = self._peers[key] = [logged_at, 0]
        self._peers.move_to_end(key)
        if len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return entry


def peer_address(frame: zmq.Frame) -> str:
    """The remote address a received frame came from, when ZeroMQ knows it."""
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, AttributeError):
        return "unknown address"

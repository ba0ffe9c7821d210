"""A subscriber's purge targets: each purge, the targets that failed it, their retry, and what the ack says.

:class:`Purger` holds the targets as :func:`~cachebus.workers.targets.adapt`
made them. A purge clears every target (a target still failing from an
earlier purge entirely: what that purge should have dropped is not known any
more) and returns what the ack carries (:class:`Purged`). A target whose clear
raises never stops anything: its error is counted, logged with its traceback
(one line per target per minute, through the subscriber's
:class:`~cachebus.bus.peers.PeerLog`) and acked at once as a failed purge, its
message scrubbed of credentials (:func:`~cachebus.workers.targets.describe_error`).
From the first failure on, every leased target's lease is withdrawn: half a
purge may have been applied. :meth:`Purger.retry` clears the failed targets
again, and only those; once all have succeeded, the failed purge is acked as ok.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cachebus.bus.peers import PeerLog, Trouble
from cachebus.bus.protocol import Ack, PurgeCause, PurgeOutcome
from cachebus.bus.scope import EVERYTHING, PurgeExtent, Scope

from .targets import MAX_ERROR, Leased, Target, adapt, describe_error, describe_traceback

__all__ = ["Purged", "Purger"]

log = logging.getLogger("cachebus.subscriber")

#: Heartbeat stats summed over the targets that have ``stats()``.
_SUMMED_STATS = ("entries", "hits", "misses", "evictions", "bypass_seconds")


@dataclass(frozen=True, slots=True)
class Purged:
    """One purge (or retry) as its ack reports it: ok, or failed with ``error``."""

    cause: PurgeCause
    clear_id: str
    dropped: int
    purge_ms: float
    extent: PurgeExtent
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def ack(self, name: str, instance: str, epoch: str, seq: int) -> Ack:
        """The ack of this purge, from ``instance``, covering every command up to ``seq`` of ``epoch``."""
        return Ack(name=name, instance=instance, epoch=epoch, seq=seq, clear_id=self.clear_id,
                   dropped=self.dropped, purge_ms=self.purge_ms, cause=self.cause,
                   outcome=PurgeOutcome.FAILED if self.error else PurgeOutcome.OK, error=self.error,
                   extent=self.extent)


@dataclass
class _FailedPurge:
    """A purge some target failed: what the ok ack says once every target has been purged since."""

    cause: PurgeCause
    clear_id: str
    dropped: int
    purge_ms: float


class Purger:
    """Purges ``targets`` (any cache objects :mod:`cachebus.workers.targets` accepts; one it cannot
    purge is a :class:`TypeError` here) and keeps count. ``peers`` rate-limits the failure lines."""

    def __init__(self, targets: Iterable[Any], peers: PeerLog) -> None:
        self.targets: list[Target] = adapt(targets)
        self.leased: list[Leased] = [t.leased for t in self.targets if t.leased is not None]
        self.peers = peers
        self.purges = 0
        #: How many purges each cause brought about.
        self.purges_by_cause: dict[PurgeCause, int] = {}
        self.last_cause: PurgeCause | None = None
        #: Target clears that raised, in purges and in retries.
        self.purge_failures = 0
        #: The targets whose last clear raised, with the error their failed ack carried.
        self.failing: dict[Target, str] = {}
        self._failed: _FailedPurge | None = None

    async def purge(self, cause: PurgeCause, scope: Scope, clear_id: str, seq: int) -> Purged:
        """Purge ``scope`` from every target, for the commands up to ``seq``: ok, or failed if any target raised."""
        dropped, purge_ms, errors, extent = await self._clear(self.targets, clear_id or None, cause, seq, scope)
        self.purges += 1
        self.purges_by_cause[cause] = self.purges_by_cause.get(cause, 0) + 1
        self.last_cause = cause
        if errors:
            self._failed = _FailedPurge(cause, clear_id, dropped, purge_ms)
            self.withdraw_leases()
            # Each target's failure had its (rate-limited) line; this one follows every purge.
            log.debug("purge failed: %d of %d targets raised; acked as failed, leases withdrawn, retrying on "
                      "the next command or heartbeat (cause: %s, seq %d)", len(errors), len(self.targets), cause, seq)
            return Purged(cause, clear_id, dropped, purge_ms, extent, _one_error(errors))
        self._failed = None
        # DEBUG: the ack and the metrics carry every purge; an INFO line each was work on the hot path (issue 14).
        log.debug("purged %d entries in %.2f ms (cause: %s, seq %d, %s)", dropped, purge_ms, cause, seq, scope)
        return Purged(cause, clear_id, dropped, purge_ms, extent)

    async def retry(self, seq: int) -> Purged | None:
        """Clear the failed targets again; once none fails, the failed purge as ok (None until then,
        and when nothing failed)."""
        failed = self._failed
        if failed is None:
            return None
        dropped, purge_ms, _, _ = await self._clear(list(self.failing), failed.clear_id or None, failed.cause, seq)
        failed.dropped += dropped
        failed.purge_ms += purge_ms
        if self.failing:
            return None
        self._failed = None
        log.info("purge retried: every target purged; acking seq %d as ok (cause: %s)", seq, failed.cause)
        # The retried targets dropped everything.
        return Purged(failed.cause, failed.clear_id, failed.dropped, failed.purge_ms, PurgeExtent.ALL)

    async def _clear(self, targets: list[Target], clear_id: str | None, cause: PurgeCause, seq: int,
                     scope: Scope = EVERYTHING) -> tuple[int, float, list[str], PurgeExtent]:
        """Purge ``scope`` from ``targets`` (everything from a failing one): entries dropped,
        milliseconds taken, the errors of those that raised, and ``all`` if any target
        dropped everything.

        A target's exception never escapes: it is counted, logged with its
        traceback (one line per target per interval) and kept in :attr:`failing`.
        """
        started = time.perf_counter()
        dropped = 0
        errors = []
        extent = PurgeExtent.ALL if scope.everything else PurgeExtent.SCOPED
        for target in targets:
            try:
                count, done = await target.purge_scope(EVERYTHING if target in self.failing else scope, clear_id, seq)
                dropped += count
                if done is PurgeExtent.ALL:
                    extent = PurgeExtent.ALL
            except Exception as exc:
                # First of all: half a purge may have been applied, so no leased target serves from now on.
                self.withdraw_leases()
                error = describe_error(exc)
                errors.append(error)
                self.failing[target] = error
                self.purge_failures += 1
                self.peers.report(target.label, Trouble.FAILED,
                                  f"purge ({cause}, seq {seq}) acked as failed, retried on every command and "
                                  f"heartbeat: {error}\n{describe_traceback(exc)}\n")
            else:
                if self.failing.pop(target, None) is not None:
                    log.info("%s purged again after failing", target.label)
        return dropped, (time.perf_counter() - started) * 1000, errors, extent

    def hold_leases(self, until: float) -> None:
        """Let the leased targets serve until ``until`` (time.monotonic()), unless a target is failing."""
        if self.failing:
            return
        for target in self.leased:
            target.hold_lease(until)

    def withdraw_leases(self) -> None:
        for target in self.leased:
            target.revoke_lease()

    def counters(self) -> dict[str, Any]:
        """The purges and failures, and the targets' counters summed, for a heartbeat's stats."""
        totals: dict[str, Any] = {"purges": self.purges, "last_purge_cause": self.last_cause,
                                  "failing": bool(self.failing), "failing_targets": len(self.failing),
                                  "purge_failures": self.purge_failures}
        for target in self.targets:
            if target.stats is not None:
                for key, value in target.stats().items():
                    if key in _SUMMED_STATS:
                        totals[key] = totals.get(key, 0) + value
        lookups = totals.get("hits", 0) + totals.get("misses", 0)
        if lookups:
            totals["hit_ratio"] = totals["hits"] / lookups
        return totals


def _one_error(errors: list[str]) -> str:
    """The error a failed ack carries: the first target's, and how many others failed."""
    if len(errors) == 1:
        return errors[0]
    more = f" (and {len(errors) - 1} more failing targets)"
    first = errors[0]
    if len(first) + len(more) > MAX_ERROR:
        first = first[:MAX_ERROR - len(more) - 1] + "…"
    return first + more

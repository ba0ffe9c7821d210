"""Latency summaries: min, median, p99 and max, in milliseconds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    count: int
    min: float
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples_ms: list[float]) -> Summary:
        ordered = sorted(samples_ms)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return cls(len(ordered), ordered[0], statistics.median(ordered), p99, ordered[-1])

    def cells(self) -> list[str]:
        return [f"{self.p50:.2f}", f"{self.p99:.2f}", f"{self.min:.2f}", f"{self.max:.2f}"]

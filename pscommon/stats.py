"""Small thread-unsafe statistics (callers hold their own lock), convertible to proto."""
from __future__ import annotations

import bisect

from shardps.pscommon.wire.v1 import ps_pb2

STALENESS_BOUNDS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
WAIT_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += 1
        self.sum += value
        self.max = max(self.max, value)

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def to_proto(self) -> ps_pb2.Histogram:
        return ps_pb2.Histogram(bounds=self.bounds, counts=self.counts, total=self.total,
                                sum=self.sum, max=self.max)


def histogram_dict(msg: ps_pb2.Histogram) -> dict:
    """JSON form of a Histogram message, with the mean."""
    return {"bounds": list(msg.bounds), "counts": list(msg.counts), "total": msg.total,
            "mean": (msg.sum / msg.total) if msg.total else 0.0, "max": msg.max}

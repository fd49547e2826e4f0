"""Prometheus collector for a worker: steps, clock and traffic from the ShardClient."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class WorkerCollector:
    def __init__(self, client):
        self.client = client

    def collect(self):
        c = self.client
        t = c.traffic
        fam = CounterMetricFamily("shardps_worker_bytes", "Tensor bytes, logical (fp32) and on the wire.",
                                  labels=["direction", "kind"])
        fam.add_metric(["sent", "logical"], t.logical_sent)
        fam.add_metric(["sent", "wire"], t.wire_sent)
        fam.add_metric(["received", "logical"], t.logical_received)
        fam.add_metric(["received", "wire"], t.wire_received)
        yield fam
        enc = CounterMetricFamily("shardps_worker_encode_seconds", "Time spent compressing pushes.")
        enc.add_metric([], c.encode_seconds())
        yield enc
        dec = CounterMetricFamily("shardps_worker_decode_seconds", "Time spent decoding pulls.")
        dec.add_metric([], t.decode_s)
        yield dec
        clock = GaugeMetricFamily("shardps_worker_clock", "Steps pushed (the worker's clock).")
        clock.add_metric([], c.clock)
        yield clock
        view = GaugeMetricFamily("shardps_worker_membership_view", "Membership view number last seen.")
        view.add_metric([], c.view)
        yield view

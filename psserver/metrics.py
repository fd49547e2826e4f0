"""Prometheus collector for one shard: reads the shard's own counters at scrape time."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shardps.pscommon.metrics import histogram_family


class ShardCollector:
    def __init__(self, shard, checkpointer=None):
        self.shard = shard
        self.checkpointer = checkpointer

    def collect(self):
        s = self.shard
        label = {"shard": str(s.shard_id)}
        with s.cond:
            pushes, pulls, dups, version = s.pushes, s.pulls, s.duplicates, s.version
            push, pull = _totals(s.push_traffic), _totals(s.pull_traffic)
            staleness = histogram_family("shardps_server_staleness", "Staleness of applied pushes, in "
                                         "shard updates (async/ssp).", s.staleness, label)
            wait = histogram_family("shardps_server_pull_wait_seconds", "Time pulls waited at the "
                                    "consistency gate (sync/ssp).", s.pull_wait, label)
            live, view = len(s.gate.live), s.view
            param_bytes, opt_bytes = s.param_bytes(), s.optimizer_bytes()
            rebases, reseeded, nonfinite = s.rebases, s.reseeded, s.nonfinite_pushes
            dropped = s.dropped_pushes
            tables = {name: store.stats() for name, store in s.tables.stores.items()}
        yield _counter("shardps_server_pushes_total", "Pushes taken (duplicates excluded).", label, pushes)
        yield _counter("shardps_server_pulls_total", "Pulls served.", label, pulls)
        yield _counter("shardps_server_duplicate_pushes_total", "Retried pushes acknowledged, not applied.",
                       label, dups)
        yield _counter("shardps_server_updates_applied_total", "Optimizer updates applied to the shard.",
                       label, version)
        for name, (logical, wire, _) in (("push", push), ("pull", pull)):
            fam = CounterMetricFamily(f"shardps_server_{name}_bytes", f"Tensor bytes {name}ed, "
                                      "logical (fp32) and on the wire.", labels=["shard", "kind"])
            fam.add_metric([label["shard"], "logical"], logical)
            fam.add_metric([label["shard"], "wire"], wire)
            yield fam
        codec = CounterMetricFamily("shardps_server_codec_seconds", "Seconds spent decoding pushes "
                                    "and encoding pulls.", labels=["shard", "direction"])
        codec.add_metric([label["shard"], "push"], push[2])
        codec.add_metric([label["shard"], "pull"], pull[2])
        yield codec
        yield staleness
        yield wait
        yield _gauge("shardps_server_live_workers", "Live workers in the shard's membership view.", label, live)
        yield _gauge("shardps_server_membership_view", "Membership view number the shard follows.", label, view)
        yield _gauge("shardps_server_parameter_bytes", "Parameter bytes held.", label, param_bytes)
        yield _gauge("shardps_server_optimizer_state_bytes", "Optimizer state bytes held.", label, opt_bytes)
        rows = GaugeMetricFamily("shardps_server_table_rows", "Rows of each embedding table held.",
                                 labels=["shard", "table"])
        held = GaugeMetricFamily("shardps_server_table_bytes", "Bytes each embedding table holds (values, "
                                 "optimizer state, bookkeeping, index).", labels=["shard", "table"])
        for name, st in sorted(tables.items()):
            rows.add_metric([label["shard"], name], st.rows)
            held.add_metric([label["shard"], name], st.bytes)
        yield rows
        yield held
        yield _counter("shardps_server_nonfinite_pushes_total", "Pushes that carried NaN or Inf "
                       "(refused, or applied without those gradients: --nonfinite).", label, nonfinite)
        yield _counter("shardps_server_step_rebases_total", "Sync: times the shard, restarted behind the "
                       "workers, took their step.", label, rebases)
        yield _counter("shardps_server_dropped_pushes_total", "Sync: staged pushes dropped because their "
                       "worker left before saying they reached every shard.", label, dropped)
        yield _gauge("shardps_server_reseeded_from_version", "The shard restarted empty and was re-seeded "
                     "from a worker's copy pulled at this version (-1: it was not).", label,
                     -1 if reseeded is None else reseeded.version)
        age = self.checkpointer.age_s() if self.checkpointer else -1.0
        yield _gauge("shardps_server_checkpoint_age_seconds", "Seconds since the last checkpoint (-1: none).",
                     label, age)
        if self.checkpointer is not None:
            yield _counter("shardps_server_checkpoints_total", "Checkpoints written (timer, request, drain).",
                           label, self.checkpointer.written)
            yield _counter("shardps_server_checkpoint_failures_total", "Checkpoints that failed to write "
                           "(disk full, EFBIG, permissions, ...); the log names each cause.", label,
                           self.checkpointer.failures)


def _totals(table) -> tuple[int, int, float]:
    return (sum(t.logical for t in table.values()), sum(t.wire for t in table.values()),
            sum(t.codec_s for t in table.values()))


def _counter(name, doc, labels, value):
    fam = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


def _gauge(name, doc, labels, value):
    fam = GaugeMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam

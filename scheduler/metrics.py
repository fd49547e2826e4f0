"""Prometheus collector for the scheduler: membership and data progress at scrape time."""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from shardps.scheduler import membership as mb


class SchedulerCollector:
    def __init__(self, core):
        self.core = core

    def collect(self):
        with self.core.cond:
            ms, data = self.core.members, self.core.data.progress()
        members = GaugeMetricFamily("shardps_scheduler_members", "Members by role and state.",
                                    labels=["role", "state"])
        for role in (mb.WORKER, mb.SERVER):
            for state in (mb.ALIVE, mb.DEAD, mb.LEFT):
                members.add_metric([role, state], sum(1 for m in ms.of_role(role) if m.state == state))
        yield members
        view = GaugeMetricFamily("shardps_scheduler_membership_view",
                                 "Membership view number (rises with every join, leave and death).")
        view.add_metric([], ms.view)
        yield view
        parts = GaugeMetricFamily("shardps_scheduler_data_partitions", "Data partitions of the current "
                                  "data epoch by state.", labels=["state"])
        for state in ("done", "assigned", "queued"):
            parts.add_metric([state], data[state])
        yield parts
        depoch = GaugeMetricFamily("shardps_scheduler_data_epoch", "Current data epoch.")
        depoch.add_metric([], data["epoch"])
        yield depoch

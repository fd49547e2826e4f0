"""How long a shard's server has been gone (issue 17): the scheduler's Status carries, per
server, the seconds since it was last heard from (registration, heartbeat or leave), and
`psctl status` shows it on the row of a shard with no live server. A fake clock, no network."""
from __future__ import annotations

from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2 as pb
from shardps.psctl import ops, upview
from shardps.scheduler.core import SchedulerCore
from shardps.scheduler.servicer import SchedulerServicer

TTL = 2.0


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _servers(core) -> dict[int, pb.ServerInfo]:
    reply = SchedulerServicer(core).Status(pb.StatusRequest(), None)
    return {s.shard: s for s in reply.servers}


def test_status_says_how_long_ago_each_server_was_heard_from():
    clock = Clock()
    core = SchedulerCore(JobSpec(num_servers=3, heartbeat_timeout_s=TTL), now=clock)
    s0 = core.register_server("127.0.0.1:7001", 0)
    s1 = core.register_server("127.0.0.1:7002", 1)
    s2 = core.register_server("127.0.0.1:7003", 2)
    clock.t += 1.5
    core.heartbeat(s0.member_id, s0.incarnation, None)
    core.heartbeat(s2.member_id, s2.incarnation, None)
    clock.t += 0.5
    core.leave(s2.member_id, s2.incarnation)     # a leave is heard from, too
    clock.t += 1.0                                # shard 1's lease (2 s from its registration) ran out
    core.reap()
    core.heartbeat(s0.member_id, s0.incarnation, None)
    clock.t += 9.0
    got = _servers(core)
    assert [got[i].state for i in range(3)] == [pb.MEMBER_STATE_ALIVE, pb.MEMBER_STATE_DEAD, pb.MEMBER_STATE_LEFT]
    assert got[0].last_seen_age_s == 9.0
    assert got[1].last_seen_age_s == 12.0 and got[1].member_id == s1.member_id   # since its registration
    assert got[2].last_seen_age_s == 10.0


def test_membership_views_and_get_job_leave_it_out():
    core = SchedulerCore(JobSpec(num_servers=1), now=Clock())
    core.register_server("127.0.0.1:7001", 0)
    job = SchedulerServicer(core).GetJob(pb.GetJobRequest(), None)
    assert not job.servers[0].HasField("last_seen_age_s")   # the same reply for the same state


def _status(**server) -> dict:
    base = {"shard": 1, "address": "127.0.0.1:7002", "member_id": 2, "incarnation": 2}
    return {"view": 5, "mode": "async", "model_fingerprint": "", "keys": 0, "uptime_s": 60.0,
            "rate_window_s": 0.0, "missing_shards": [1], "workers": [],
            "job": {"staleness": 0, "optimizer": {"kind": "sgd", "lr": 0.1}, "push_codec": "fp32",
                    "pull_codec": "fp32"},
            "data": {"partitions": 0}, "servers": [dict(base, **server)]}


def _row(status: dict) -> str:
    (row,) = [line for line in ops.render_status(status).splitlines() if line.startswith("      1 ")]
    return row


def test_status_text_shows_how_long_a_shard_has_had_no_server():
    assert _row(_status(state="dead", last_seen_age_s=12.4)) == (
        "      1 dead    127.0.0.1:7002        no server for 12 s (member 2 missed its lease; "
        "workers wait for this shard)")
    assert _row(_status(state="left", last_seen_age_s=3.0)) == (
        "      1 left    127.0.0.1:7002        no server for 3 s (member 2 left; workers wait for this shard)")
    # a scheduler too old to say: the row still names the member, without a duration
    assert _row(_status(state="dead", last_seen_age_s=None)) == (
        "      1 dead    127.0.0.1:7002        no server (member 2 missed its lease; workers wait for this shard)")


def test_the_up_view_takes_the_schedulers_word_for_how_long_a_shard_is_gone(tmp_path):
    clock = Clock()

    class Probe:
        gone_s = None

        def sample(self):
            return "async", [upview.ShardSample(0, "dead", 2, gone_s=self.gone_s)]
    probe = Probe()
    sampler = upview.Sampler(tmp_path, dict, probe, 10, clock=clock)
    sampler.sample()
    clock.t += 3.0
    assert sampler.sample().shards[0].down_s == 3.0          # unknown: since this view saw it
    probe.gone_s = 42.0
    assert sampler.sample().shards[0].down_s == 42.0


def test_status_text_of_data_progress():
    running = _status(state="dead", last_seen_age_s=1.0)
    running["data"] = {"epoch": 1, "max_epochs": 3, "partitions": 16, "done": 5, "assigned": 2, "queued": 9,
                       "finished": False}
    assert "data: epoch 1/3  partitions 5 done, 2 assigned, 9 queued" in ops.render_status(running).splitlines()
    # past the last epoch the counters are those of an epoch that never starts: not shown
    running["data"] = {"epoch": 3, "max_epochs": 3, "partitions": 16, "done": 0, "assigned": 0, "queued": 16,
                       "finished": True}
    assert "data: finished, 3 epochs of 16 partitions" in ops.render_status(running).splitlines()

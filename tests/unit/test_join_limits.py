"""scheduler.limits (the join token bucket) and membership.prune: pure functions over plain
floats for clocks, no network."""
from __future__ import annotations

import json

import pytest

from shardps.pscommon.errors import InvalidArgument, NotFound, ResourceExhausted, StaleIncarnation
from shardps.scheduler import membership as mb
from shardps.scheduler.limits import AdmissionLimiter, Bucket, MembershipLimits, full, level, take

TTL = 10.0


# -- the token bucket ------------------------------------------------------------------------
def test_a_new_host_has_the_whole_burst_then_is_refused_with_the_wait():
    bucket, admitted = None, 0
    for _ in range(5):
        bucket, wait = take(bucket, 0.0, rate=2.0, burst=5)
        assert wait == 0.0
        admitted += 1
    bucket, wait = take(bucket, 0.0, rate=2.0, burst=5)
    assert wait == pytest.approx(0.5)            # one token at 2 per second
    assert bucket.tokens == pytest.approx(0.0)


def test_a_refused_call_takes_nothing_so_retrying_at_the_rate_goes_through():
    bucket = Bucket(0.0, 0.0)
    bucket, wait = take(bucket, 0.25, rate=2.0, burst=5)   # half a token
    assert wait == pytest.approx(0.25)
    bucket, wait = take(bucket, 0.5, rate=2.0, burst=5)
    assert wait == 0.0 and bucket.tokens == pytest.approx(0.0)


def test_refill_stops_at_the_burst_and_a_clock_going_back_adds_nothing():
    assert level(Bucket(0.0, 0.0), 1000.0, rate=2.0, burst=5) == 5.0
    assert level(Bucket(1.0, 10.0), 5.0, rate=2.0, burst=5) == 1.0
    assert level(None, 0.0, rate=2.0, burst=5) == 5.0
    assert full(Bucket(3.0, 0.0), 1.0, rate=2.0, burst=5)
    assert not full(Bucket(3.0, 0.0), 0.5, rate=2.0, burst=5)


def test_sustained_calls_are_admitted_at_the_rate():
    bucket, admitted = None, 0
    for i in range(1000):                         # 100 calls a second for 10 seconds
        bucket, wait = take(bucket, i / 100, rate=5.0, burst=10)
        admitted += wait == 0.0
    assert admitted == pytest.approx(10 + 5 * 10, abs=1)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_limiter_is_per_host_and_names_the_limit():
    clock = Clock()
    lim = AdmissionLimiter(MembershipLimits(join_rate=1.0, join_burst=2), clock)
    lim.admit("10.0.0.1", "JoinWorker")
    lim.admit("10.0.0.1", "RegisterServer")       # one bucket for both
    with pytest.raises(ResourceExhausted) as exc:
        lim.admit("10.0.0.1", "JoinWorker")
    assert "JoinWorker from 10.0.0.1" in str(exc.value) and "--join-rate" in str(exc.value)
    assert exc.value.metadata["limit"] == "join_rate"
    assert float(exc.value.metadata["retry_after_s"]) == pytest.approx(1.0)
    lim.admit("10.0.0.2", "JoinWorker")           # another host has its own
    clock.t = 1.0
    lim.admit("10.0.0.1", "JoinWorker")


def test_limiter_forgets_full_buckets_so_it_stays_bounded():
    clock = Clock()
    lim = AdmissionLimiter(MembershipLimits(join_rate=10.0, join_burst=5), clock)
    for i in range(5000):
        clock.t = i / 1000                        # 1000 hosts a second, each once
        lim.admit(f"10.0.{i // 256}.{i % 256}", "JoinWorker")
    # a host's bucket is full again 0.1 s after its call: about 100 are not
    assert lim.hosts() < AdmissionLimiter.MIN_SWEEP


def test_rate_zero_is_no_limit():
    lim = AdmissionLimiter(MembershipLimits(join_rate=0, join_burst=1), Clock())
    for _ in range(100):
        lim.admit("10.0.0.1", "JoinWorker")
    assert lim.hosts() == 0


@pytest.mark.parametrize("kw", [dict(join_rate=-1.0), dict(join_rate=float("inf")), dict(join_burst=0),
                                dict(dead_retention_s=-1.0), dict(dead_retention_s=float("nan")),
                                dict(max_dead_workers=-1)])
def test_limits_are_validated(kw):
    with pytest.raises(InvalidArgument):
        MembershipLimits(**kw)


# -- pruning ---------------------------------------------------------------------------------
def _cycle(ms: mb.Membership, now: float) -> tuple[mb.Membership, mb.Member]:
    """One worker joins and leaves."""
    ms, m = mb.join_worker(ms, now, TTL, name="churn")
    return mb.leave(ms, m.member_id, m.incarnation), m


def test_membership_stays_bounded_under_join_leave_churn():
    """Without pruning every join/leave cycle adds a member (and every later join copies it);
    with it the members are the live ones plus at most `max_dead` departed ones."""
    ms, keep = mb.join_worker(mb.Membership(), 0.0, TTL, name="honest")
    unpruned = ms
    for i in range(2000):
        now = i * 0.01
        ms, _ = _cycle(ms, now)
        ms = mb.renew(ms, keep.member_id, keep.incarnation, now, TTL)
        ms = mb.prune(ms, now, retention_s=600.0, max_dead=50)
        unpruned, _ = _cycle(unpruned, now)
    assert len(unpruned.members) == 2001
    assert len(ms.members) == 1 + 50
    assert ms.members[keep.member_id].alive
    assert ms.next_id == 2002                     # ids kept counting


def test_prune_forgets_workers_last_heard_from_before_the_retention_only():
    ms, a = mb.join_worker(mb.Membership(), 0.0, TTL)
    ms, b = mb.join_worker(ms, 0.0, TTL)
    ms, c = mb.join_worker(ms, 0.0, TTL)
    ms = mb.leave(ms, a.member_id, a.incarnation)
    ms = mb.renew(ms, b.member_id, b.incarnation, 50.0, TTL)
    ms = mb.expire(ms, 100.0)                    # b (last seen at 50) and c (at 0) die
    view = ms.view
    assert mb.prune(ms, 99.0, retention_s=100.0, max_dead=10) is ms
    pruned = mb.prune(ms, 100.0, retention_s=100.0, max_dead=10)
    assert sorted(pruned.members) == [b.member_id]
    assert pruned.view == view                   # the live set did not change
    assert sorted(mb.prune(ms, 150.0, retention_s=100.0, max_dead=10).members) == []


def test_prune_keeps_live_members_and_servers():
    ms, s = mb.register_server(mb.Membership(), 0.0, TTL, "127.0.0.1:1", 0, 1)
    ms, w = mb.join_worker(ms, 0.0, TTL)
    ms = mb.expire(ms, 100.0)                    # both dead
    ms, live = mb.join_worker(ms, 100.0, TTL)
    pruned = mb.prune(ms, 10_000.0, retention_s=0.0, max_dead=0)
    assert sorted(pruned.members) == [s.member_id, live.member_id]


def test_a_pruned_id_stays_stale_may_rejoin_and_is_never_reissued():
    ms, m = _cycle(mb.Membership(), 0.0)
    ms = mb.prune(ms, 1.0, retention_s=0.0, max_dead=10)
    assert m.member_id not in ms.members and mb.forgotten(ms, m.member_id)
    with pytest.raises(StaleIncarnation):
        mb.renew(ms, m.member_id, m.incarnation, 2.0, TTL)
    with pytest.raises(StaleIncarnation):
        mb.leave(ms, m.member_id, m.incarnation)
    with pytest.raises(NotFound):                # never issued: not stale, unknown
        mb.renew(ms, ms.next_id, 1, 2.0, TTL)
    ms2, fresh = mb.join_worker(ms, 2.0, TTL)
    assert fresh.member_id > m.member_id
    ms3, back = mb.join_worker(ms2, 2.0, TTL, rejoin_id=m.member_id)
    assert back.member_id == m.member_id and back.incarnation > fresh.incarnation
    with pytest.raises(StaleIncarnation):
        mb.renew(ms3, m.member_id, m.incarnation, 3.0, TTL)
    with pytest.raises(NotFound):
        mb.join_worker(ms2, 2.0, TTL, rejoin_id=ms2.next_id)


def test_pruned_membership_survives_the_state_file():
    ms = mb.Membership()
    for i in range(10):
        ms, _ = _cycle(ms, float(i))
    ms = mb.prune(ms, 20.0, retention_s=15.5, max_dead=100)
    assert sorted(ms.members) == [6, 7, 8, 9, 10]   # ids 1..5, heard from at 0..4, are forgotten
    back = mb.from_json(json.loads(json.dumps(mb.to_json(ms, 20.0))), 20.0)
    assert back == ms
    with pytest.raises(StaleIncarnation):
        mb.renew(back, 1, 1, 21.0, TTL)


# -- the scheduler core: pruning and partition assignments -----------------------------------
class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_core_prunes_on_reap_and_a_dying_worker_still_gives_its_partitions_back(tmp_path):
    from shardps.pscommon.config import JobSpec
    from shardps.scheduler.core import SchedulerCore

    clock = _Clock()
    core = SchedulerCore(JobSpec(heartbeat_timeout_s=TTL), str(tmp_path), now=clock,
                         limits=MembershipLimits(dead_retention_s=60.0, max_dead_workers=3))
    holder = core.join_worker("holder", None)
    _, _, partition = core.acquire_partition(holder.member_id, holder.incarnation, 4, 1)
    for _ in range(10):                           # churn: the dead pile up, then are pruned
        m = core.join_worker("churn", None)
        core.leave(m.member_id, m.incarnation)
    core.reap()
    workers = [m for m in core.members.members.values() if m.role == mb.WORKER]
    assert len(workers) == 1 + 3 and core.members.members[holder.member_id].alive
    assert partition in core.data.assigned        # pruning never touches a live holder
    clock.t += TTL                                # the holder misses its lease
    core.reap()
    assert partition not in core.data.assigned and core.data.queued[0] == partition
    # a restart from the state file: pruned ids stay refused, counting goes on
    again = SchedulerCore(JobSpec(heartbeat_timeout_s=TTL), str(tmp_path), now=clock)
    assert again.members == core.members
    with pytest.raises(StaleIncarnation):
        again.heartbeat(2, 2, None)               # the first churn worker, pruned
    assert again.join_worker("new", None).member_id == core.members.next_id


def test_a_state_file_with_a_dead_holder_gives_the_partition_back_at_load(tmp_path):
    from shardps.pscommon.config import JobSpec
    from shardps.scheduler.core import STATE_FILE, SchedulerCore

    clock = _Clock()
    core = SchedulerCore(JobSpec(heartbeat_timeout_s=TTL), str(tmp_path), now=clock)
    holder = core.join_worker("holder", None)
    _, _, partition = core.acquire_partition(holder.member_id, holder.incarnation, 4, 1)
    # as an older scheduler could leave it: the holder dead, its partition still assigned
    state = json.loads((tmp_path / STATE_FILE).read_text())
    for m in state["membership"]["members"]:
        m["state"] = mb.DEAD
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    again = SchedulerCore(JobSpec(heartbeat_timeout_s=TTL), str(tmp_path), now=clock)
    assert partition not in again.data.assigned and partition in again.data.queued

"""scheduler.membership: pure transitions driven by an injected clock (plain floats)."""
from __future__ import annotations

import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, NotFound, ShardHeld
from shardps.pscommon.wire.v1 import scheduler_pb2
from shardps.psserver.daemon import successor
from shardps.scheduler import membership as mb
from shardps.scheduler.membership import Membership

TTL = 10.0


def _joined(n: int, now: float = 0.0) -> tuple[Membership, list[mb.Member]]:
    ms, out = Membership(), []
    for i in range(n):
        ms, m = mb.join_worker(ms, now, TTL, name=f"w{i}")
        out.append(m)
    return ms, out


def test_join_gives_id_incarnation_and_lease():
    ms, (a, b) = _joined(2, now=5.0)
    assert (a.member_id, b.member_id) == (1, 2)  # ids start at 1: 0 on the wire means "new"
    assert b.incarnation > a.incarnation >= 1
    assert a.lease_expires == 15.0 and a.last_seen == 5.0
    assert a.alive and ms.view == 2


def test_renew_extends_lease_and_records_clock_without_a_view_change():
    ms, (a,) = _joined(1)
    ms2 = mb.renew(ms, a.member_id, a.incarnation, now=7.0, ttl=TTL, clock=4)
    m = ms2.members[a.member_id]
    assert (m.lease_expires, m.last_seen, m.clock) == (17.0, 7.0, 4)
    assert ms2.view == ms.view


def test_renew_never_moves_a_clock_backwards():
    ms, (a,) = _joined(1)
    ms = mb.renew(ms, a.member_id, a.incarnation, 1.0, TTL, clock=9)
    ms = mb.renew(ms, a.member_id, a.incarnation, 2.0, TTL, clock=3)
    assert ms.members[a.member_id].clock == 9


def test_expire_marks_every_lapsed_member_dead_with_one_view_bump():
    ms, (a, b, c) = _joined(3)
    ms = mb.renew(ms, c.member_id, c.incarnation, now=5.0, ttl=TTL)
    after = mb.expire(ms, now=10.0)
    assert [after.members[m.member_id].state for m in (a, b, c)] == [mb.DEAD, mb.DEAD, mb.ALIVE]
    assert after.view == ms.view + 1


def test_expire_without_lapsed_leases_changes_nothing():
    ms, _ = _joined(2)
    assert mb.expire(ms, now=9.99) is ms
    dead = mb.expire(ms, now=10.0)
    assert mb.expire(dead, now=50.0) is dead


def test_leave_is_immediate_and_bumps_the_view():
    ms, (a, b) = _joined(2)
    after = mb.leave(ms, a.member_id, a.incarnation)
    assert after.members[a.member_id].state == mb.LEFT
    assert [m.member_id for m in after.live(mb.WORKER)] == [b.member_id]
    assert after.view == ms.view + 1


def test_rejoin_keeps_the_id_with_a_strictly_larger_incarnation():
    ms, (a, b) = _joined(2)
    ms = mb.expire(ms, now=100.0)
    ms, again = mb.join_worker(ms, 100.0, TTL, rejoin_id=a.member_id)
    assert again.member_id == a.member_id
    assert again.incarnation > max(a.incarnation, b.incarnation)
    assert ms.next_id == 3  # two joins from id 1; the rejoin took no new id


def test_rejoin_of_unknown_worker_is_not_found():
    ms, _ = _joined(1)
    with pytest.raises(NotFound, match="7"):
        mb.join_worker(ms, 0.0, TTL, rejoin_id=7)


def test_stale_incarnation_renew_and_leave_are_failed_precondition():
    ms, (a,) = _joined(1)
    ms, _ = mb.join_worker(ms, 1.0, TTL, rejoin_id=a.member_id)
    with pytest.raises(FailedPrecondition, match="stale"):
        mb.renew(ms, a.member_id, a.incarnation, 2.0, TTL)
    with pytest.raises(FailedPrecondition, match="stale"):
        mb.leave(ms, a.member_id, a.incarnation)


def test_renew_of_a_dead_member_is_failed_precondition():
    ms, (a,) = _joined(1)
    ms = mb.expire(ms, now=TTL)
    with pytest.raises(FailedPrecondition, match="dead"):
        mb.renew(ms, a.member_id, a.incarnation, TTL + 1, TTL)


def test_leave_twice_is_failed_precondition():
    ms, (a,) = _joined(1)
    ms = mb.leave(ms, a.member_id, a.incarnation)
    with pytest.raises(FailedPrecondition, match="left"):
        mb.leave(ms, a.member_id, a.incarnation)


def test_unknown_member_is_not_found():
    ms, _ = _joined(1)
    with pytest.raises(NotFound):
        mb.renew(ms, 42, 1, 0.0, TTL)
    with pytest.raises(NotFound):
        mb.leave(ms, 42, 1)


def test_joiner_starts_at_the_slowest_live_workers_clock():
    ms, (a, b, c) = _joined(3)
    for m, clock in ((a, 7), (b, 4), (c, 2)):
        ms = mb.renew(ms, m.member_id, m.incarnation, 1.0, TTL, clock=clock)
    ms = mb.leave(ms, c.member_id, c.incarnation)  # the slowest is gone: it must not count
    assert mb.start_clock(ms) == 4
    ms, d = mb.join_worker(ms, 2.0, TTL)
    assert d.clock == 4


def test_first_worker_starts_at_clock_zero():
    assert mb.start_clock(Membership()) == 0


def _servers(n_shards: int, registered: int):
    ms = Membership()
    out = []
    for i in range(registered):
        ms, m = mb.register_server(ms, 0.0, TTL, f"10.0.0.{i}:5000", -1, n_shards)
        out.append(m)
    return ms, out


def test_register_server_takes_the_lowest_free_shard():
    ms, servers = _servers(3, 2)
    assert [s.shard for s in servers] == [0, 1]
    ms = mb.leave(ms, servers[0].member_id, servers[0].incarnation)
    ms, s = mb.register_server(ms, 1.0, TTL, "h:1", -1, 3)
    assert s.shard == 0


def test_register_server_for_a_shard_with_a_live_lease_is_shard_held():
    ms, (old, _) = _servers(2, 2)          # leases run to TTL
    with pytest.raises(ShardHeld) as info:
        mb.register_server(ms, 3.0, TTL, "127.0.0.99:6000", 0, 2)
    exc = info.value
    assert isinstance(exc, FailedPrecondition) and exc.reason == "SHARD_HELD"
    for fact in (f"member {old.member_id}", f"incarnation {old.incarnation}", old.address, "7.0 s"):
        assert fact in str(exc), (fact, str(exc))
    assert exc.metadata == {"shard": "0", "member": str(old.member_id), "incarnation": str(old.incarnation),
                            "address": old.address, "retry_after_s": "7.000"}
    # its own address is no pass: anyone can read it from Status
    with pytest.raises(ShardHeld):
        mb.register_server(ms, 3.0, TTL, old.address, 0, 2)


def test_a_renewed_lease_keeps_the_shard_held():
    ms, (old, _) = _servers(2, 2)
    ms = mb.renew(ms, old.member_id, old.incarnation, now=9.0, ttl=TTL)
    with pytest.raises(ShardHeld, match=r"lapses in 5\.0 s"):
        mb.register_server(ms, 14.0, TTL, "127.0.0.99:6000", 0, 2)


@pytest.mark.parametrize("reaped", [False, True])
def test_register_server_after_the_holders_lease_lapsed_replaces_it(reaped):
    """A crashed server's replacement: admitted once the lease has run out, whether or not the
    reaper has marked the holder dead yet."""
    ms, (old, _) = _servers(2, 2)
    if reaped:
        ms = mb.expire(ms, TTL)
    ms, new = mb.register_server(ms, TTL, TTL, "127.0.0.99:6000", 0, 2)
    assert new.member_id == old.member_id and new.incarnation > old.incarnation
    assert ms.server_for(0) == new and new.lease_expires == 2 * TTL
    assert len(ms.of_role(mb.SERVER)) == 2
    with pytest.raises(FailedPrecondition, match="stale"):
        mb.renew(ms, old.member_id, old.incarnation, TTL + 1, TTL)


def test_register_server_for_a_shard_whose_server_left_takes_it_at_once():
    ms, (old, _) = _servers(2, 2)
    ms = mb.leave(ms, old.member_id, old.incarnation)
    ms, new = mb.register_server(ms, 1.0, TTL, "127.0.0.99:6000", 0, 2)
    assert (new.member_id, new.shard) == (old.member_id, 0)


def test_register_any_shard_takes_one_whose_lease_lapsed():
    ms, (a, b) = _servers(3, 2)
    ms, c = mb.register_server(ms, 1.0, TTL, "h:3", -1, 3)
    assert c.shard == 2
    ms = mb.renew(ms, a.member_id, a.incarnation, 5.0, TTL)   # shard 0 held to 15, shard 1 to 10
    with pytest.raises(FailedPrecondition, match="all 3 shards"):
        mb.register_server(ms, 9.9, TTL, "h:4", -1, 3)
    ms, d = mb.register_server(ms, 10.0, TTL, "h:4", -1, 3)
    assert (d.shard, d.member_id) == (1, b.member_id)


def test_register_server_when_every_shard_is_held_is_failed_precondition():
    ms, _ = _servers(2, 2)
    with pytest.raises(FailedPrecondition, match="all 2 shards"):
        mb.register_server(ms, 1.0, TTL, "h:1", -1, 2)


@pytest.mark.parametrize("shard", [2, 99])
def test_register_server_refuses_out_of_range_shard(shard):
    with pytest.raises(InvalidArgument, match=f"shard {shard}"):
        mb.register_server(Membership(), 0.0, TTL, "h:1", shard, 2)


@pytest.mark.parametrize("address", ["", "localhost"])
def test_register_server_refuses_an_address_without_port(address):
    with pytest.raises(InvalidArgument, match="host:port"):
        mb.register_server(Membership(), 0.0, TTL, address, 0, 1)


@pytest.mark.parametrize("address", ["\x1b[2Jh:1", "h:1\n", "h :1", "h\x00:1", "h" * 300 + ":1"])
def test_register_server_refuses_an_unprintable_or_long_address(address):
    with pytest.raises(InvalidArgument, match="server address"):
        mb.register_server(Membership(), 0.0, TTL, address, 0, 1)


def test_an_invalid_registration_is_refused_before_the_holder_is_considered():
    ms, _ = _servers(1, 1)
    with pytest.raises(InvalidArgument):
        mb.register_server(ms, 1.0, TTL, "no-port", 0, 1)


def _mixed() -> Membership:
    ms, (a, b) = _joined(2, now=1.5)
    ms = mb.renew(ms, a.member_id, a.incarnation, 3.0, TTL, clock=6)
    ms, _ = mb.register_server(ms, 2.0, TTL, "127.0.0.98:7000", -1, 2)
    return mb.leave(ms, b.member_id, b.incarnation)


def test_json_round_trip_at_the_same_time_is_identity():
    ms = _mixed()
    data = json.loads(json.dumps(mb.to_json(ms, now=4.0)))
    assert mb.from_json(data, now=4.0) == ms


def test_json_keeps_leases_relative_to_the_clock():
    ms = _mixed()
    later = mb.from_json(mb.to_json(ms, now=4.0), now=104.0)
    for m in ms.members.values():
        assert later.members[m.member_id].lease_expires == m.lease_expires + 100.0
        assert later.members[m.member_id].last_seen == m.last_seen + 100.0
    assert (later.view, later.next_id, later.next_incarnation) == (ms.view, ms.next_id, ms.next_incarnation)


def test_grace_gives_live_members_a_fresh_lease_after_restart():
    restored = mb.grace(_mixed(), now=1000.0, ttl=TTL)  # leases ran out while it was down
    assert mb.expire(restored, now=1000.0 + TTL - 0.5) is restored
    assert not mb.expire(restored, now=1000.0 + TTL).live(mb.WORKER)
    assert restored.view == _mixed().view


def test_grace_does_not_revive_departed_members():
    ms = mb.grace(_mixed(), now=1000.0, ttl=TTL)
    assert [m.state for m in ms.of_role(mb.WORKER)] == [mb.ALIVE, mb.LEFT]


def _view(ms: Membership):
    return frozenset((m.member_id, m.incarnation, m.state) for m in ms.members.values())


class MembershipMachine(RuleBasedStateMachine):
    """Random sequences of transitions: the view rises by exactly one for every change of
    who is alive (under which incarnation), and stays put otherwise."""

    def __init__(self):
        super().__init__()
        self.ms = Membership()
        self.now = 0.0
        self.max_incarnation = 0

    def _step(self, fn, *args, **kw):
        before = self.ms
        try:
            result = fn(before, *args, **kw)
        except (FailedPrecondition, NotFound):
            return
        after = result[0] if isinstance(result, tuple) else result
        changed = _view(after) != _view(before)
        assert after.view == before.view + (1 if changed else 0)
        self.ms = after

    def _pick(self, data, role=None):
        members = sorted(m.member_id for m in self.ms.members.values() if role in (None, m.role))
        return data.draw(st.sampled_from(members)) if members else 0

    @rule(dt=st.floats(0, 6))
    def tick(self, dt):
        self.now += dt

    @rule()
    def join(self):
        self._step(mb.join_worker, self.now, TTL)

    @rule(data=st.data())
    def rejoin(self, data):
        self._step(mb.join_worker, self.now, TTL, rejoin_id=self._pick(data, mb.WORKER))

    @rule(shard=st.integers(-1, 2))
    def register(self, shard):
        held = {s: mb.holder(self.ms, s, self.now) for s in range(3)}
        self._step(mb.register_server, self.now, TTL, "h:1", shard, 3)
        for s, m in held.items():   # a live lease is never taken over
            assert m is None or self.ms.server_for(s) == m

    @rule(data=st.data(), clock=st.integers(0, 20), stale=st.booleans())
    def renew(self, data, clock, stale):
        mid = self._pick(data)
        m = self.ms.members.get(mid)
        inc = (m.incarnation - stale) if m else 1
        self._step(mb.renew, mid, inc, self.now, TTL, clock=clock)

    @rule(data=st.data())
    def leave(self, data):
        mid = self._pick(data)
        m = self.ms.members.get(mid)
        self._step(mb.leave, mid, m.incarnation if m else 1)

    @rule()
    def expire(self):
        self._step(mb.expire, self.now)

    @precondition(lambda self: self.ms.members)
    @rule()
    def restart(self):
        self.ms = mb.grace(mb.from_json(mb.to_json(self.ms, self.now), self.now), self.now, TTL)

    @invariant()
    def incarnations_are_unique_and_below_the_counter(self):
        incs = [m.incarnation for m in self.ms.members.values()]
        assert len(incs) == len(set(incs))
        assert all(i < self.ms.next_incarnation for i in incs)

    @invariant()
    def one_live_server_per_shard(self):
        shards = [m.shard for m in self.ms.live(mb.SERVER)]
        assert len(shards) == len(set(shards))


MembershipMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_membership_transitions = MembershipMachine.TestCase


# -- a server that finds its lease refused: register again, or step down? --------------------
def _server(shard, incarnation, state):
    return scheduler_pb2.ServerInfo(shard=shard, address=f"10.0.0.{incarnation}:1", incarnation=incarnation,
                          state=getattr(scheduler_pb2, f"MEMBER_STATE_{state}"))


def test_successor_is_a_newer_live_server_for_the_same_shard():
    new = _server(0, 7, "ALIVE")
    assert successor([_server(1, 9, "ALIVE"), new], shard=0, incarnation=3) == new


def test_no_successor_when_we_were_only_declared_dead():
    assert successor([_server(0, 3, "DEAD"), _server(1, 9, "ALIVE")], shard=0, incarnation=3) is None
    assert successor([], shard=0, incarnation=3) is None            # scheduler lost us
    assert successor([_server(0, 7, "DEAD")], shard=0, incarnation=3) is None   # the successor died too
    assert successor([_server(0, 2, "ALIVE")], shard=0, incarnation=3) is None  # an older one: not ours to yield to

"""Membership as pure state transitions: join, renew, expire, leave, prune.

Every function takes a Membership and returns a new one (plus what the caller needs); none
reads a clock or does I/O, so each transition is tested without a network. The view number
rises by one with every change of the live set; incarnations come from one counter that never
goes back, so a member that returns is told apart from its old self.

Dead and departed workers are pruned after a retention period (`prune`), so membership does
not grow with every join. Ids come from one rising counter too, so an id below `next_id`
that is no longer a member is a pruned worker's (`forgotten`): its old incarnations are
still refused as stale, it may rejoin under that id, and no one else is ever given it.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, NotFound, ShardHeld, StaleIncarnation

WORKER, SERVER = "worker", "server"
ALIVE, DEAD, LEFT = "alive", "dead", "left"


@dataclasses.dataclass(frozen=True)
class Member:
    member_id: int
    role: str
    incarnation: int
    state: str
    lease_expires: float
    last_seen: float
    clock: int = 0          # workers: steps pushed (reported by heartbeats)
    name: str = ""
    address: str = ""       # servers: where workers reach them
    shard: int = -1         # servers: which shard they hold

    @property
    def alive(self) -> bool:
        return self.state == ALIVE


@dataclasses.dataclass(frozen=True)
class Membership:
    view: int = 0             # rises with every change of the live set (watchers follow it)
    members: Mapping[int, Member] = dataclasses.field(default_factory=dict)
    next_id: int = 1          # ids start at 1: 0 on the wire means "no id yet"
    next_incarnation: int = 1

    def live(self, role: str) -> list[Member]:
        return [m for m in self.members.values() if m.role == role and m.alive]

    def of_role(self, role: str) -> list[Member]:
        return sorted((m for m in self.members.values() if m.role == role), key=lambda m: m.member_id)

    def server_for(self, shard: int) -> Member | None:
        for m in self.members.values():
            if m.role == SERVER and m.shard == shard and m.alive:
                return m
        return None


def _with(ms: Membership, member: Member, *, bump: bool, **changes) -> Membership:
    members = dict(ms.members)
    members[member.member_id] = member
    return dataclasses.replace(ms, members=members, view=ms.view + (1 if bump else 0), **changes)


def start_clock(ms: Membership) -> int:
    """Where a joining worker's clock starts: the slowest live worker's clock."""
    clocks = [m.clock for m in ms.live(WORKER)]
    return min(clocks) if clocks else 0


def forgotten(ms: Membership, member_id: int) -> bool:
    """Whether `member_id` was issued and has since been pruned. Only workers are pruned
    (a server keeps its shard's member id), so such an id was a worker's."""
    return 1 <= member_id < ms.next_id and member_id not in ms.members


def join_worker(ms: Membership, now: float, ttl: float, name: str = "",
                rejoin_id: int | None = None) -> tuple[Membership, Member]:
    """A new worker, or a returning one (rejoin_id) under a new incarnation; a worker that
    was pruned while away rejoins like one that was only declared dead."""
    if rejoin_id is not None:
        old = ms.members.get(rejoin_id)
        if (old is None or old.role != WORKER) and not forgotten(ms, rejoin_id):
            raise NotFound(f"no worker {rejoin_id} to rejoin as")
        member_id, next_id = rejoin_id, ms.next_id
    else:
        member_id, next_id = ms.next_id, ms.next_id + 1
    member = Member(member_id, WORKER, ms.next_incarnation, ALIVE, now + ttl, now,
                    clock=start_clock(ms), name=name)
    return _with(ms, member, bump=True, next_id=next_id,
                 next_incarnation=ms.next_incarnation + 1), member


MAX_ADDRESS = 255   # a DNS name is at most 253 characters, plus ":port"


def check_address(address: str) -> None:
    """A server's advertised address is shown to operators and dialled by workers: host:port,
    printable, no whitespace, bounded."""
    if len(address) > MAX_ADDRESS:
        raise InvalidArgument(f"server address of {len(address)} characters; at most {MAX_ADDRESS}")
    if not address.isprintable() or any(c.isspace() for c in address):
        raise InvalidArgument(f"server address {address!r} has control or space characters")
    if ":" not in address:
        raise InvalidArgument(f"server address {address!r} is not host:port")


def holder(ms: Membership, shard: int, now: float) -> Member | None:
    """The server holding `shard` at `now`: alive with a lease that has not run out. A lease
    past its expiry counts as lapsed even before the reaper marks the member dead."""
    m = ms.server_for(shard)
    return m if m is not None and m.lease_expires > now else None


def register_server(ms: Membership, now: float, ttl: float, address: str, shard: int,
                    num_shards: int) -> tuple[Membership, Member]:
    """A server for `shard` (-1: the lowest shard with no holder). A shard whose server holds
    a live lease is refused (ShardHeld): registration is unauthenticated beyond the job's
    token, and replacing a heartbeating server would hand its workers to whoever asked. Once
    the holder's lease has lapsed (a crash, a pause, a partition) a registration replaces it
    under the same member id and a new incarnation."""
    if shard >= num_shards:
        raise InvalidArgument(f"shard {shard} out of range: the job has {num_shards} shards")
    check_address(address)
    if shard < 0:
        free = [s for s in range(num_shards) if holder(ms, s, now) is None]
        if not free:
            raise FailedPrecondition(f"all {num_shards} shards have a live server")
        shard = free[0]
    held = holder(ms, shard, now)
    if held is not None:
        left = held.lease_expires - now
        raise ShardHeld(
            f"shard {shard} is held by member {held.member_id} incarnation {held.incarnation} at "
            f"{held.address} (lease lapses in {left:.1f} s)",
            shard=shard, member=held.member_id, incarnation=held.incarnation, address=held.address,
            retry_after_s=f"{left:.3f}")
    previous = [m for m in ms.members.values() if m.role == SERVER and m.shard == shard]
    if previous:
        member_id, next_id = previous[0].member_id, ms.next_id
    else:
        member_id, next_id = ms.next_id, ms.next_id + 1
    member = Member(member_id, SERVER, ms.next_incarnation, ALIVE, now + ttl, now,
                    name=f"shard-{shard}", address=address, shard=shard)
    return _with(ms, member, bump=True, next_id=next_id,
                 next_incarnation=ms.next_incarnation + 1), member


def _current(ms: Membership, member_id: int, incarnation: int) -> Member:
    m = ms.members.get(member_id)
    if m is None:
        if forgotten(ms, member_id):
            raise StaleIncarnation(
                f"member {member_id} incarnation {incarnation} died or left long ago and was pruned; rejoin",
                member=member_id, incarnation=incarnation, state="pruned")
        raise NotFound(f"no member {member_id}")
    if incarnation != m.incarnation:
        raise StaleIncarnation(
            f"member {member_id} incarnation {incarnation} is stale (current {m.incarnation}); rejoin",
            member=member_id, incarnation=incarnation, current=m.incarnation)
    if not m.alive:
        raise StaleIncarnation(f"member {member_id} incarnation {incarnation} is {m.state}; rejoin",
                               member=member_id, incarnation=incarnation, state=m.state)
    return m


def renew(ms: Membership, member_id: int, incarnation: int, now: float, ttl: float,
          clock: int | None = None) -> Membership:
    """A heartbeat: extend the lease (and record the worker's clock). No view change."""
    m = _current(ms, member_id, incarnation)
    changes = {"lease_expires": now + ttl, "last_seen": now}
    if clock is not None and m.role == WORKER:
        changes["clock"] = max(m.clock, clock)
    return _with(ms, dataclasses.replace(m, **changes), bump=False)


def leave(ms: Membership, member_id: int, incarnation: int, clock: int | None = None,
          now: float | None = None) -> Membership:
    """An explicit leave: immediate, bumps the view. With `now`, the leave is when the member
    was last heard from (status shows how long a departed server has been gone)."""
    m = _current(ms, member_id, incarnation)
    final_clock = max(m.clock, clock) if clock is not None and m.role == WORKER else m.clock
    seen = {"last_seen": now} if now is not None else {}
    return _with(ms, dataclasses.replace(m, state=LEFT, clock=final_clock, **seen), bump=True)


def expired(ms: Membership, now: float) -> list[Member]:
    """Live members whose lease has run out (a pure predicate over the state)."""
    return [m for m in ms.members.values() if m.alive and m.lease_expires <= now]


def expire(ms: Membership, now: float) -> Membership:
    """Mark every member whose lease ran out dead; one view bump per call that changes anything."""
    gone = expired(ms, now)
    if not gone:
        return ms
    members = dict(ms.members)
    for m in gone:
        members[m.member_id] = dataclasses.replace(m, state=DEAD)
    return dataclasses.replace(ms, members=members, view=ms.view + 1)


def prune(ms: Membership, now: float, retention_s: float, max_dead: int) -> Membership:
    """Forget dead and departed workers last heard from `retention_s` ago or earlier, and the
    oldest beyond `max_dead` of those left. Live members and servers (one member per shard,
    bounded by the job) are kept. No view change: the live set is the same."""
    dead = [m for m in ms.members.values() if m.role == WORKER and not m.alive]
    if not dead:
        return ms
    drop = {m.member_id for m in dead if now - m.last_seen >= retention_s}
    kept = [m for m in dead if m.member_id not in drop]
    if len(kept) > max_dead:
        kept.sort(key=lambda m: (m.last_seen, m.member_id))
        drop.update(m.member_id for m in kept[:len(kept) - max_dead])
    if not drop:
        return ms
    return dataclasses.replace(ms, members={i: m for i, m in ms.members.items() if i not in drop})


def grace(ms: Membership, now: float, ttl: float) -> Membership:
    """After a scheduler restart: give every live member a fresh lease to re-attach."""
    members = {i: dataclasses.replace(m, lease_expires=now + ttl, last_seen=now) if m.alive else m
               for i, m in ms.members.items()}
    return dataclasses.replace(ms, members=members)


def to_json(ms: Membership, now: float) -> dict:
    return {"view": ms.view, "next_id": ms.next_id, "next_incarnation": ms.next_incarnation,
            "members": [dict(dataclasses.asdict(m), lease_left=m.lease_expires - now,
                             seen_ago=now - m.last_seen) for m in ms.members.values()]}


def from_json(data: dict, now: float) -> Membership:
    members = {}
    for raw in data["members"]:
        raw = dict(raw)
        raw["lease_expires"] = now + raw.pop("lease_left")
        raw["last_seen"] = now - raw.pop("seen_ago")
        m = Member(**raw)
        members[m.member_id] = m
    # "epoch": the key before the view was named apart from data epochs
    view = int(data.get("view", data.get("epoch", 0)))
    return Membership(view, members, int(data["next_id"]), int(data["next_incarnation"]))

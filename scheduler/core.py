"""The scheduler's state and its executor: membership transitions under a lock, the shard
map, persistence, and a condition that membership watchers wait on."""
from __future__ import annotations

import logging
import pathlib
import threading
import time
from typing import Callable

from google.protobuf import json_format

from shardps.pscommon import credentials, sharding
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, StaleIncarnation
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.wire.v1 import job_pb2, scheduler_pb2
from shardps.scheduler import assignments, bounds
from shardps.scheduler import membership as mb
from shardps.scheduler.limits import MembershipLimits
from shardps.pscommon.files import write_atomic
from shardps.scheduler.persist import read_json, write_json_atomic

log = logging.getLogger(__name__)
STATE_FILE = "scheduler-state.json"
KEY_FILE = "member.key"


def _member_key(state_dir: pathlib.Path | None) -> bytes:
    """The job key that member credentials are made with. Kept beside the state (owner-only),
    so a restarted scheduler honours the credentials it issued; without a state dir, a new
    one per process (the members it knew are gone with it anyway)."""
    if state_dir is None:
        return credentials.new_key()
    path = state_dir / KEY_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = credentials.new_key()
        write_atomic(path, key, mode=0o600)
        return key
    key = path.read_bytes()
    if len(key) != credentials.KEY_BYTES:
        raise FailedPrecondition(f"{path} holds {len(key)} bytes, a member key has {credentials.KEY_BYTES}: "
                                 "remove it to start a new key (every member must join again)")
    return key


class SchedulerCore:
    def __init__(self, job: JobSpec, state_dir: str | None = None,
                 now: Callable[[], float] = time.monotonic, limits: MembershipLimits = MembershipLimits()):
        self.job = job
        self.now = now
        self.limits = limits
        self.cond = threading.Condition()
        self.members = mb.Membership()
        self.shard_map: sharding.ShardMap | None = None
        self.data = assignments.DataState()
        self.started = now()
        self.member_key = _member_key(pathlib.Path(state_dir) if state_dir else None)
        self.state_path = pathlib.Path(state_dir) / STATE_FILE if state_dir else None
        if self.state_path:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            self._load()

    @property
    def ttl(self) -> float:
        return self.job.heartbeat_timeout_s

    # -- persistence -------------------------------------------------------------------
    def _load(self) -> None:
        data = read_json(self.state_path)
        if data is None:
            return
        saved = JobSpec.from_proto(_job_from_json(data["job"]))
        if saved != self.job:
            log.warning("job spec in %s differs from the flags; keeping the saved one", self.state_path)
        self.job = saved
        now = self.now()
        self.members = mb.grace(mb.from_json(data["membership"], now), now, self.ttl)
        if data.get("shard_map"):
            self.shard_map = _shard_map_from_json(data["shard_map"])
        if data.get("data"):
            self.data = assignments.from_json(data["data"])
            # a worker that is not alive holds no partitions (commits give them back as
            # workers die; this covers a state file written before that was so)
            alive = {m.member_id for m in self.members.live(mb.WORKER)}
            for holder in {w for w, _ in self.data.assigned.values()} - alive:
                self.data = assignments.release(self.data, holder)
        log.info("resumed scheduler state: membership view %d, %d members", self.members.view,
                 len(self.members.members))

    def _save(self) -> None:
        if not self.state_path:
            return
        write_json_atomic(self.state_path, {
            "job": _job_to_json(self.job),
            "membership": mb.to_json(self.members, self.now()),
            "shard_map": _shard_map_to_json(self.shard_map) if self.shard_map else None,
            "data": assignments.to_json(self.data),
        })

    def _commit(self, members: mb.Membership) -> None:
        """Adopt a new membership; persist and wake watchers when the view moved. Workers
        that stopped being alive in this change give their partition assignments back (one
        that was not alive before gave them back then, so a join does not cost a release per
        dead worker)."""
        previous, self.members = self.members, members
        if members.view != previous.view:
            for m in previous.members.values():
                if m.role == mb.WORKER and m.alive:
                    after = members.members.get(m.member_id)
                    if after is None or not after.alive:
                        self.data = assignments.release(self.data, m.member_id)
            self._save()
            self.cond.notify_all()

    # -- transitions -------------------------------------------------------------------
    def register_server(self, address: str, shard: int) -> mb.Member:
        with self.cond:
            ms, member = mb.register_server(self.members, self.now(), self.ttl, address, shard,
                                            self.job.num_servers)
            before = self.members.members.get(member.member_id)
            self._commit(ms)
            if before is None:
                log.info("%s registered at %s: incarnation %d, view %d", who(member), _shown(address),
                         member.incarnation, ms.view)
            elif before.state == mb.LEFT:
                log.info("%s registered again at %s: incarnation %d (incarnation %d had left), view %d",
                         who(member), _shown(address), member.incarnation, before.incarnation, ms.view)
            else:  # the shard's member id stays; a dead or lapsed incarnation is replaced
                log.warning("%s taken over at %s: incarnation %d replaces incarnation %d (%s, at %s), view %d",
                            who(member), _shown(address), member.incarnation, before.incarnation,
                            "its lease lapsed" if before.alive else "dead", _shown(before.address), ms.view)
            return member

    def join_worker(self, name: str, rejoin_id: int | None) -> mb.Member:
        with self.cond:
            ms, member = mb.join_worker(self.members, self.now(), self.ttl, name, rejoin_id)
            if rejoin_id is not None:  # the old incarnation's unfinished partitions are orphans
                self.data = assignments.release(self.data, rejoin_id)
            self._commit(ms)
            log.info("%s %s: incarnation %d, view %d", who(member), "rejoined" if rejoin_id is not None else "joined",
                     member.incarnation, ms.view)
            return member

    def heartbeat(self, member_id: int, incarnation: int, clock: int | None) -> int:
        with self.cond:
            self._commit(mb.renew(self.members, member_id, incarnation, self.now(), self.ttl, clock))
            return self.members.view

    def leave(self, member_id: int, incarnation: int, clock: int | None = None) -> int:
        with self.cond:
            self._commit(mb.leave(self.members, member_id, incarnation, clock, now=self.now()))
            m = self.members.members[member_id]
            log.info("%s left: incarnation %d%s, view %d", who(m), m.incarnation,
                     f", clock {m.clock}" if m.role == mb.WORKER else "", self.members.view)
            return self.members.view

    def reap(self) -> list[mb.Member]:
        """Expire members whose lease ran out (returns them), and prune workers dead or gone
        for longer than the retention period."""
        with self.cond:
            gone = mb.expired(self.members, self.now())
            if gone:
                self._commit(mb.expire(self.members, self.now()))
                for m in gone:
                    log.warning("%s missed its lease: dead, incarnation %d, view %d", who(m), m.incarnation,
                                self.members.view)
            self.prune()
            return gone

    def prune(self) -> int:
        """Forget dead and departed workers past the retention period; returns how many. The
        view does not move (the live set is the same); the state file is rewritten."""
        with self.cond:
            before = len(self.members.members)
            pruned = mb.prune(self.members, self.now(), self.limits.dead_retention_s, self.limits.max_dead_workers)
            if pruned is self.members:
                return 0
            self.members = pruned
            self._save()
            count = before - len(pruned.members)
            log.debug("pruned %d dead or departed workers (kept %d members)", count, len(pruned.members))
            return count

    def declare_model(self, params: list[sharding.Param], tables: list[TableSpec] = ()) -> sharding.ShardMap:
        """Fix the model (parameters and embedding tables) once; the same model again is a
        no-op, another is refused."""
        proposed = bounds.check_shard_map(
            sharding.build(params, self.job.num_servers, self.job.slice_bytes, tables))
        with self.cond:
            if self.shard_map is None:
                self.shard_map = proposed
                self._save()
            elif self.shard_map.fingerprint != proposed.fingerprint:
                raise FailedPrecondition(model_mismatch(self.shard_map, proposed))
            return self.shard_map

    def _check_worker(self, worker: int, incarnation: int) -> None:
        m = self.members.members.get(worker)
        if m is None and mb.forgotten(self.members, worker):
            raise StaleIncarnation(f"worker {worker} incarnation {incarnation} was pruned; rejoin",
                                   member=worker, incarnation=incarnation, state="pruned")
        if m is None or m.role != mb.WORKER:
            raise FailedPrecondition(f"no worker {worker}; join first")
        if m.incarnation != incarnation or not m.alive:
            raise StaleIncarnation(f"worker {worker} incarnation {incarnation} is not current; rejoin",
                                   member=worker, incarnation=incarnation)

    def acquire_partition(self, worker: int, incarnation: int, num_partitions: int,
                          max_epochs: int) -> tuple[str, int, int]:
        """(status, data epoch, partition) for a worker asking for data."""
        with self.cond:
            self._check_worker(worker, incarnation)
            state = assignments.configure(self.data, num_partitions, max_epochs)
            state, status, partition = assignments.acquire(state, worker, incarnation)
            if state != self.data:
                self.data = state
                self._save()
            return status, state.epoch, partition

    def complete_partition(self, worker: int, incarnation: int, epoch: int, partition: int) -> assignments.DataState:
        with self.cond:
            self._check_worker(worker, incarnation)
            self.data = assignments.complete(self.data, worker, incarnation, epoch, partition)
            self._save()
            return self.data

    def wait_view(self, after: int, timeout_s: float) -> bool:
        """Wait until the membership view passes `after`; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.members.view > after, timeout=timeout_s)


def _param(p: sharding.Param) -> str:
    return f"{_shown(p.name)} {list(p.shape)}"   # every declared parameter is float32 (sharding.build)


def _some(items: list[str], most: int = 3) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _size(smap: sharding.ShardMap) -> str:
    return f"{len(smap.params)} parameters" + (f", {len(smap.tables)} tables" if smap.tables else "")


def _table(t: TableSpec) -> str:
    return f"table {_shown(t.name)} (dim {t.dim}, {t.initializer} {t.scale:g}, seed {t.seed})"


def _differences(mine: dict, theirs: dict, show, changed) -> list[str]:
    """How the declared set `theirs` differs from the job's `mine` (both by name): what it
    has, what it lacks, what it has otherwise (`changed(theirs, mine)` says how)."""
    out = []
    if [n for n in theirs if n not in mine]:
        out.append("it has " + _some([show(x) for n, x in theirs.items() if n not in mine])
                   + ", which the job's has not")
    if [n for n in mine if n not in theirs]:
        out.append("it lacks " + _some([show(x) for n, x in mine.items() if n not in theirs]))
    different = [n for n in mine if n in theirs and mine[n] != theirs[n]]
    if different:
        out.append(_some([changed(theirs[n], mine[n]) for n in different], 2))
    return out


def model_mismatch(job: sharding.ShardMap, declared: sharding.ShardMap) -> str:
    """Why a declared model is refused, for the person who started it: a job trains one
    model; how this one differs from it; and how to train another."""
    differs = _differences({p.name: p for p in job.params}, {p.name: p for p in declared.params}, _param,
                           lambda theirs, mine: f"{_param(theirs)} where the job's is {list(mine.shape)}")
    differs += _differences({t.name: t for t in job.tables}, {t.name: t for t in declared.tables}, _table,
                            lambda theirs, mine: f"{_table(theirs)} where the job's is {_table(mine)}")
    if not differs:
        differs.append("the same parameters in another order")
    return (f"this job trains one model, {job.fingerprint} ({_size(job)}), and the model "
            f"declared is another, {declared.fingerprint} ({_size(declared)}): "
            f"{'; '.join(differs)}. To train it, start a new job: a scheduler of its own (another port, "
            "not this job's --state-dir) and its own servers")


def _shown(text: str) -> str:
    """A caller's string in a log line: as is when printable, else repr-escaped (state files
    written by older versions may hold names that were not checked)."""
    return text if text.isprintable() else repr(text)


def who(m: mb.Member) -> str:
    """A member as the logs name it: by role and shard, or by role, id and name."""
    if m.role == mb.SERVER:
        return f"server for shard {m.shard} (member {m.member_id})"
    return f"worker {m.member_id}" + (f" (name {_shown(m.name)})" if m.name else "")


def _job_to_json(job: JobSpec) -> dict:
    return json_format.MessageToDict(job.to_proto())


def _job_from_json(data: dict):
    return json_format.ParseDict(data, job_pb2.JobSpec())


def _shard_map_to_json(smap: sharding.ShardMap) -> dict:
    return json_format.MessageToDict(smap.to_proto())


def _shard_map_from_json(data: dict) -> sharding.ShardMap:
    try:
        return sharding.ShardMap.from_proto(json_format.ParseDict(data, scheduler_pb2.ShardMap()))
    except json_format.ParseError as exc:
        raise InvalidArgument(f"saved shard map is malformed: {exc}") from None

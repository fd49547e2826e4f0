"""The Scheduler gRPC servicer: a thin layer that applies membership transitions."""
from __future__ import annotations

from shardps.pscommon import credentials
from shardps.pscommon.errors import servicer_errors
from shardps.pscommon.interceptors import peer_host
from shardps.pscommon.wire.v1 import scheduler_pb2 as pb
from shardps.pscommon.wire.v1 import scheduler_pb2_grpc
from shardps.scheduler import assignments, bounds
from shardps.scheduler import membership as mb
from shardps.scheduler.core import SchedulerCore
from shardps.scheduler.limits import AdmissionLimiter

_STATE = {mb.ALIVE: pb.MEMBER_STATE_ALIVE, mb.DEAD: pb.MEMBER_STATE_DEAD, mb.LEFT: pb.MEMBER_STATE_LEFT}
WATCH_REFRESH_S = 2.0   # a watch stream re-sends the view this often (carries fresh clocks)


def _lease(m: mb.Member, ttl: float, key: bytes) -> pb.Lease:
    return pb.Lease(member_id=m.member_id, incarnation=m.incarnation, ttl_s=ttl,
                    credential=credentials.issue(key, m.role, m.member_id, m.incarnation))


_ROLE = {pb.ROLE_WORKER: mb.WORKER, pb.ROLE_SERVER: mb.SERVER}


def server_infos(ms: mb.Membership, now: float | None = None) -> list[pb.ServerInfo]:
    """Every shard's server. With `now` (Status), how long ago each was last heard from:
    left out of membership views and GetJob, which would otherwise differ at every call."""
    return [pb.ServerInfo(shard=m.shard, address=m.address, member_id=m.member_id,
                          incarnation=m.incarnation, state=_STATE[m.state],
                          last_seen_age_s=max(0.0, now - m.last_seen) if now is not None else None)
            for m in sorted(ms.of_role(mb.SERVER), key=lambda m: m.shard)]


def membership_view(ms: mb.Membership) -> pb.MembershipView:
    return pb.MembershipView(
        view=ms.view, servers=server_infos(ms),
        workers=[pb.WorkerView(worker_id=m.member_id, incarnation=m.incarnation,
                               state=_STATE[m.state], clock=m.clock) for m in ms.of_role(mb.WORKER)])


_ASSIGNMENT = {assignments.ASSIGNED: pb.ASSIGNMENT_STATUS_ASSIGNED, assignments.WAIT: pb.ASSIGNMENT_STATUS_WAIT,
               assignments.DONE: pb.ASSIGNMENT_STATUS_DONE}


def data_progress(state: assignments.DataState) -> pb.DataProgress:
    p = state.progress()
    return pb.DataProgress(
        epoch=p["epoch"], max_epochs=p["max_epochs"], partitions=p["partitions"], done=p["done"],
        assigned=p["assigned"], queued=p["queued"], finished=p["finished"],
        history=[pb.EpochRecord(epoch=e, completed_by=dict(c)) for e, c in sorted(state.history.items())])


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, core: SchedulerCore, admission: AdmissionLimiter | None = None):
        self.core = core
        self.admission = admission or AdmissionLimiter(core.limits, core.now)

    def _admit(self, context, method: str) -> None:
        """Joins and registrations are rate-limited per caller host (not port: a new
        connection is no new budget), before the request is even checked."""
        self.admission.admit(peer_host(context.peer()), method)

    def _check(self, role: int | str, member_id: int, incarnation: int, credential: bytes) -> None:
        """A call made as a member must carry that member's credential (BadCredential, and
        nothing changes, otherwise); checked before the membership transition, so a stale
        incarnation with its own credential still learns it is stale."""
        credentials.check(self.core.member_key, _ROLE.get(role, role) if isinstance(role, str) else _ROLE.get(role, f"role {role}"),
                          member_id, incarnation, credential)

    def _job_info(self) -> pb.JobInfo:
        core = self.core
        with core.cond:
            return pb.JobInfo(job=core.job.to_proto(), servers=server_infos(core.members),
                              shard_map=core.shard_map.to_proto() if core.shard_map else None,
                              view=core.members.view)

    @servicer_errors
    def RegisterServer(self, request, context):
        self._admit(context, "RegisterServer")
        m = self.core.register_server(request.address, request.shard)
        return pb.RegisterServerReply(lease=_lease(m, self.core.ttl, self.core.member_key), shard=m.shard,
                                      job=self.core.job.to_proto(), view=self.core.members.view,
                                      member_key=self.core.member_key)

    @servicer_errors
    def JoinWorker(self, request, context):
        self._admit(context, "JoinWorker")
        name = bounds.check_worker_name(request.name)
        rejoin = bounds.rejoin_id(request.worker_id)
        with self.core.cond:
            ms = self.core.members
            held = ms.members.get(rejoin) if rejoin is not None else None
            # an id once issued to a worker (alive, dead, or pruned since): a rejoin takes it
            # over, so only that worker may; a server's id or one never issued is refused below
            worker_id_issued = rejoin is not None and rejoin < ms.next_id and (held is None or held.role == mb.WORKER)
        if worker_id_issued:
            self._check(mb.WORKER, rejoin, request.incarnation, request.credential)
        m = self.core.join_worker(name, rejoin)
        return pb.JoinWorkerReply(lease=_lease(m, self.core.ttl, self.core.member_key), job=self.core.job.to_proto(),
                                  view=self.core.members.view, start_clock=m.clock)

    @servicer_errors
    def Heartbeat(self, request, context):
        bounds.check_clock(request.clock, "heartbeat")
        self._check(request.role, request.member_id, request.incarnation, request.credential)
        clock = request.clock if request.role == pb.ROLE_WORKER else None
        view = self.core.heartbeat(request.member_id, request.incarnation, clock)
        return pb.HeartbeatReply(view=view)

    @servicer_errors
    def Leave(self, request, context):
        bounds.check_clock(request.clock, "leave")
        self._check(request.role, request.member_id, request.incarnation, request.credential)
        clock = request.clock if request.role == pb.ROLE_WORKER else None
        return pb.LeaveReply(view=self.core.leave(request.member_id, request.incarnation, clock))

    @servicer_errors
    def GetJob(self, request, context):
        return self._job_info()

    @servicer_errors
    def DeclareModel(self, request, context):
        self.core.declare_model(bounds.declared_params(request.params, self.core.job.slice_bytes),
                                bounds.declared_tables(request.tables))
        return self._job_info()

    @servicer_errors
    def WatchMembership(self, request, context):
        last = None
        while context.is_active():
            with self.core.cond:
                ms = self.core.members
            if last is None or ms.view > request.after_view:
                yield membership_view(ms)
            last = ms.view
            self.core.wait_view(last, WATCH_REFRESH_S)

    @servicer_errors
    def Status(self, request, context):
        core = self.core
        with core.cond:
            ms, now = core.members, core.now()
            workers = [pb.WorkerStatus(worker_id=m.member_id, incarnation=m.incarnation,
                                       state=_STATE[m.state], clock=m.clock,
                                       lease_age_s=now - m.last_seen, name=m.name)
                       for m in ms.of_role(mb.WORKER)]
            smap = core.shard_map
            return pb.StatusReply(job=core.job.to_proto(), view=ms.view, workers=workers,
                                  servers=server_infos(ms, now),
                                  model_fingerprint=smap.fingerprint if smap else "",
                                  keys=len(smap.keys) if smap else 0, uptime_s=now - core.started,
                                  data=data_progress(core.data))

    @servicer_errors
    def AcquirePartition(self, request, context):
        self._check(mb.WORKER, request.worker_id, request.incarnation, request.credential)
        status, epoch, partition = self.core.acquire_partition(
            request.worker_id, request.incarnation, request.num_partitions, request.max_epochs)
        return pb.AcquirePartitionReply(status=_ASSIGNMENT[status], epoch=epoch, partition=max(partition, 0),
                                        num_partitions=self.core.data.num_partitions)

    @servicer_errors
    def CompletePartition(self, request, context):
        self._check(mb.WORKER, request.worker_id, request.incarnation, request.credential)
        state = self.core.complete_partition(request.worker_id, request.incarnation, request.epoch,
                                             request.partition)
        return pb.CompletePartitionReply(data=data_progress(state))

from shardps.pscommon.wire.v1 import job_pb2 as _job_pb2
from shardps.pscommon.wire.v1 import tensor_pb2 as _tensor_pb2
from shardps.pscommon.wire.v1 import ps_pb2 as _ps_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_WORKER: _ClassVar[Role]
    ROLE_SERVER: _ClassVar[Role]

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_STATE_UNSPECIFIED: _ClassVar[MemberState]
    MEMBER_STATE_ALIVE: _ClassVar[MemberState]
    MEMBER_STATE_DEAD: _ClassVar[MemberState]
    MEMBER_STATE_LEFT: _ClassVar[MemberState]

class AssignmentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASSIGNMENT_STATUS_UNSPECIFIED: _ClassVar[AssignmentStatus]
    ASSIGNMENT_STATUS_ASSIGNED: _ClassVar[AssignmentStatus]
    ASSIGNMENT_STATUS_WAIT: _ClassVar[AssignmentStatus]
    ASSIGNMENT_STATUS_DONE: _ClassVar[AssignmentStatus]
ROLE_UNSPECIFIED: Role
ROLE_WORKER: Role
ROLE_SERVER: Role
MEMBER_STATE_UNSPECIFIED: MemberState
MEMBER_STATE_ALIVE: MemberState
MEMBER_STATE_DEAD: MemberState
MEMBER_STATE_LEFT: MemberState
ASSIGNMENT_STATUS_UNSPECIFIED: AssignmentStatus
ASSIGNMENT_STATUS_ASSIGNED: AssignmentStatus
ASSIGNMENT_STATUS_WAIT: AssignmentStatus
ASSIGNMENT_STATUS_DONE: AssignmentStatus

class Lease(_message.Message):
    __slots__ = ("member_id", "incarnation", "ttl_s", "credential")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    member_id: int
    incarnation: int
    ttl_s: float
    credential: bytes
    def __init__(self, member_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., ttl_s: _Optional[float] = ..., credential: _Optional[bytes] = ...) -> None: ...

class RegisterServerRequest(_message.Message):
    __slots__ = ("address", "shard")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    address: str
    shard: int
    def __init__(self, address: _Optional[str] = ..., shard: _Optional[int] = ...) -> None: ...

class RegisterServerReply(_message.Message):
    __slots__ = ("lease", "shard", "job", "view", "member_key")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    MEMBER_KEY_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    shard: int
    job: _job_pb2.JobSpec
    view: int
    member_key: bytes
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., shard: _Optional[int] = ..., job: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., view: _Optional[int] = ..., member_key: _Optional[bytes] = ...) -> None: ...

class JoinWorkerRequest(_message.Message):
    __slots__ = ("name", "worker_id", "incarnation", "credential")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    worker_id: int
    incarnation: int
    credential: bytes
    def __init__(self, name: _Optional[str] = ..., worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., credential: _Optional[bytes] = ...) -> None: ...

class JoinWorkerReply(_message.Message):
    __slots__ = ("lease", "job", "view", "start_clock")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    START_CLOCK_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    job: _job_pb2.JobSpec
    view: int
    start_clock: int
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., job: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., view: _Optional[int] = ..., start_clock: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("role", "member_id", "incarnation", "clock", "credential")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    role: Role
    member_id: int
    incarnation: int
    clock: int
    credential: bytes
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., member_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ..., credential: _Optional[bytes] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: int
    def __init__(self, view: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("role", "member_id", "incarnation", "clock", "credential")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    role: Role
    member_id: int
    incarnation: int
    clock: int
    credential: bytes
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., member_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ..., credential: _Optional[bytes] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: int
    def __init__(self, view: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("shard", "address", "member_id", "incarnation", "state", "last_seen_age_s")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    shard: int
    address: str
    member_id: int
    incarnation: int
    state: MemberState
    last_seen_age_s: float
    def __init__(self, shard: _Optional[int] = ..., address: _Optional[str] = ..., member_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., last_seen_age_s: _Optional[float] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("fingerprint", "keys", "params", "tables")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    keys: _containers.RepeatedCompositeFieldContainer[_ps_pb2.KeySpec]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    tables: _containers.RepeatedCompositeFieldContainer[_ps_pb2.TableSpec]
    def __init__(self, fingerprint: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[_ps_pb2.KeySpec, _Mapping]]] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., tables: _Optional[_Iterable[_Union[_ps_pb2.TableSpec, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job", "servers", "shard_map", "view")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.JobSpec
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    shard_map: ShardMap
    view: int
    def __init__(self, job: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ..., shard_map: _Optional[_Union[ShardMap, _Mapping]] = ..., view: _Optional[int] = ...) -> None: ...

class DeclareModelRequest(_message.Message):
    __slots__ = ("params", "tables")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    tables: _containers.RepeatedCompositeFieldContainer[_ps_pb2.TableSpec]
    def __init__(self, params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., tables: _Optional[_Iterable[_Union[_ps_pb2.TableSpec, _Mapping]]] = ...) -> None: ...

class WatchMembershipRequest(_message.Message):
    __slots__ = ("after_view",)
    AFTER_VIEW_FIELD_NUMBER: _ClassVar[int]
    after_view: int
    def __init__(self, after_view: _Optional[int] = ...) -> None: ...

class WorkerView(_message.Message):
    __slots__ = ("worker_id", "incarnation", "state", "clock")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    state: MemberState
    clock: int
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., clock: _Optional[int] = ...) -> None: ...

class MembershipView(_message.Message):
    __slots__ = ("view", "workers", "servers")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    view: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerView]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    def __init__(self, view: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerView, _Mapping]]] = ..., servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "incarnation", "state", "clock", "lease_age_s", "name")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    LEASE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    state: MemberState
    clock: int
    lease_age_s: float
    name: str
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., clock: _Optional[int] = ..., lease_age_s: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("job", "view", "workers", "servers", "model_fingerprint", "keys", "uptime_s", "data")
    JOB_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.JobSpec
    view: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    model_fingerprint: str
    keys: int
    uptime_s: float
    data: DataProgress
    def __init__(self, job: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., view: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ..., keys: _Optional[int] = ..., uptime_s: _Optional[float] = ..., data: _Optional[_Union[DataProgress, _Mapping]] = ...) -> None: ...

class DataProgress(_message.Message):
    __slots__ = ("epoch", "max_epochs", "partitions", "done", "assigned", "queued", "finished", "history")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    max_epochs: int
    partitions: int
    done: int
    assigned: int
    queued: int
    finished: bool
    history: _containers.RepeatedCompositeFieldContainer[EpochRecord]
    def __init__(self, epoch: _Optional[int] = ..., max_epochs: _Optional[int] = ..., partitions: _Optional[int] = ..., done: _Optional[int] = ..., assigned: _Optional[int] = ..., queued: _Optional[int] = ..., finished: _Optional[bool] = ..., history: _Optional[_Iterable[_Union[EpochRecord, _Mapping]]] = ...) -> None: ...

class EpochRecord(_message.Message):
    __slots__ = ("epoch", "completed_by")
    class CompletedByEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_BY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    completed_by: _containers.ScalarMap[int, int]
    def __init__(self, epoch: _Optional[int] = ..., completed_by: _Optional[_Mapping[int, int]] = ...) -> None: ...

class AcquirePartitionRequest(_message.Message):
    __slots__ = ("worker_id", "incarnation", "num_partitions", "max_epochs", "credential")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    num_partitions: int
    max_epochs: int
    credential: bytes
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., num_partitions: _Optional[int] = ..., max_epochs: _Optional[int] = ..., credential: _Optional[bytes] = ...) -> None: ...

class AcquirePartitionReply(_message.Message):
    __slots__ = ("status", "epoch", "partition", "num_partitions")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    status: AssignmentStatus
    epoch: int
    partition: int
    num_partitions: int
    def __init__(self, status: _Optional[_Union[AssignmentStatus, str]] = ..., epoch: _Optional[int] = ..., partition: _Optional[int] = ..., num_partitions: _Optional[int] = ...) -> None: ...

class CompletePartitionRequest(_message.Message):
    __slots__ = ("worker_id", "incarnation", "epoch", "partition", "credential")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    epoch: int
    partition: int
    credential: bytes
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., epoch: _Optional[int] = ..., partition: _Optional[int] = ..., credential: _Optional[bytes] = ...) -> None: ...

class CompletePartitionReply(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: DataProgress
    def __init__(self, data: _Optional[_Union[DataProgress, _Mapping]] = ...) -> None: ...

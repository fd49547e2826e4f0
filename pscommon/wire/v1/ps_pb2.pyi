from shardps.pscommon.wire.v1 import tensor_pb2 as _tensor_pb2
from shardps.pscommon.wire.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TableSpec(_message.Message):
    __slots__ = ("name", "dim", "initializer", "scale", "seed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    initializer: str
    scale: float
    seed: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., initializer: _Optional[str] = ..., scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class RowBlock(_message.Message):
    __slots__ = ("table", "ids", "values", "dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    values: bytes
    dtype: _tensor_pb2.DType
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., values: _Optional[bytes] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class TableStatus(_message.Message):
    __slots__ = ("name", "dim", "rows", "bytes", "admitted", "evicted_idle", "evicted_lru", "dropped_gradients", "unadmitted_lookups", "rows_served", "rows_updated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_IDLE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_LRU_FIELD_NUMBER: _ClassVar[int]
    DROPPED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    UNADMITTED_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    rows: int
    bytes: int
    admitted: int
    evicted_idle: int
    evicted_lru: int
    dropped_gradients: int
    unadmitted_lookups: int
    rows_served: int
    rows_updated: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., admitted: _Optional[int] = ..., evicted_idle: _Optional[int] = ..., evicted_lru: _Optional[int] = ..., dropped_gradients: _Optional[int] = ..., unadmitted_lookups: _Optional[int] = ..., rows_served: _Optional[int] = ..., rows_updated: _Optional[int] = ...) -> None: ...

class PullRowsRequest(_message.Message):
    __slots__ = ("caller", "shard", "step", "model_fingerprint", "rows", "dtype")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    shard: int
    step: int
    model_fingerprint: str
    rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    dtype: _tensor_pb2.DType
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., shard: _Optional[int] = ..., step: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class ScanRowsRequest(_message.Message):
    __slots__ = ("table", "model_fingerprint")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    table: str
    model_fingerprint: str
    def __init__(self, table: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class PullRowsReply(_message.Message):
    __slots__ = ("header", "rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    rows: RowBlock
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., rows: _Optional[_Union[RowBlock, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("at_step", "hold_s", "release")
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    HOLD_S_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    at_step: int
    hold_s: float
    release: bool
    def __init__(self, at_step: _Optional[int] = ..., hold_s: _Optional[float] = ..., release: _Optional[bool] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("shard", "path", "shard_version", "completed_step")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEP_FIELD_NUMBER: _ClassVar[int]
    shard: int
    path: str
    shard_version: int
    completed_step: int
    def __init__(self, shard: _Optional[int] = ..., path: _Optional[str] = ..., shard_version: _Optional[int] = ..., completed_step: _Optional[int] = ...) -> None: ...

class KeySpec(_message.Message):
    __slots__ = ("key", "param", "dtype", "param_shape", "offset", "length", "shard")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAM_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    key: str
    param: str
    dtype: _tensor_pb2.DType
    param_shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    shard: int
    def __init__(self, key: _Optional[str] = ..., param: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., param_shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., shard: _Optional[int] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("worker_id", "incarnation", "observer", "credential", "settled")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    observer: bool
    credential: bytes
    settled: StepOutcome
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., observer: _Optional[bool] = ..., credential: _Optional[bytes] = ..., settled: _Optional[_Union[StepOutcome, _Mapping]] = ...) -> None: ...

class StepOutcome(_message.Message):
    __slots__ = ("step", "contributors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    contributors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., contributors: _Optional[_Iterable[int]] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("caller", "shard", "step", "model_fingerprint", "wait")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    shard: int
    step: int
    model_fingerprint: str
    wait: bool
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., shard: _Optional[int] = ..., step: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., wait: _Optional[bool] = ...) -> None: ...

class SettleReply(_message.Message):
    __slots__ = ("settled", "next_step", "wait_s")
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    settled: StepOutcome
    next_step: int
    wait_s: float
    def __init__(self, settled: _Optional[_Union[StepOutcome, _Mapping]] = ..., next_step: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...

class DeclareHeader(_message.Message):
    __slots__ = ("model_fingerprint", "shard", "keys", "job", "seed", "tables")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    shard: int
    keys: _containers.RepeatedCompositeFieldContainer[KeySpec]
    job: _job_pb2.JobSpec
    seed: SeedOffer
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    def __init__(self, model_fingerprint: _Optional[str] = ..., shard: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[KeySpec, _Mapping]]] = ..., job: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., seed: _Optional[_Union[SeedOffer, _Mapping]] = ..., tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ...) -> None: ...

class SeedOffer(_message.Message):
    __slots__ = ("caller", "version")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    version: int
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class Reseed(_message.Message):
    __slots__ = ("worker_id", "version", "offers", "uptime_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    version: int
    offers: int
    uptime_s: float
    def __init__(self, worker_id: _Optional[int] = ..., version: _Optional[int] = ..., offers: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class DeclareRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DeclareHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[DeclareHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class DeclareReply(_message.Message):
    __slots__ = ("created", "existing", "reseeded")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    RESEEDED_FIELD_NUMBER: _ClassVar[int]
    created: int
    existing: int
    reseeded: Reseed
    def __init__(self, created: _Optional[int] = ..., existing: _Optional[int] = ..., reseeded: _Optional[_Union[Reseed, _Mapping]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("caller", "shard", "step", "keys", "codec", "model_fingerprint")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    shard: int
    step: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    codec: _job_pb2.CodecSpec
    model_fingerprint: str
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., shard: _Optional[int] = ..., step: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ..., codec: _Optional[_Union[_job_pb2.CodecSpec, _Mapping]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("shard_version", "wait_s", "next_step")
    SHARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    shard_version: int
    wait_s: float
    next_step: int
    def __init__(self, shard_version: _Optional[int] = ..., wait_s: _Optional[float] = ..., next_step: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("caller", "shard", "step", "base_version", "model_fingerprint")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    shard: int
    step: int
    base_version: int
    model_fingerprint: str
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., shard: _Optional[int] = ..., step: _Optional[int] = ..., base_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk", "rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: _tensor_pb2.TensorChunk
    rows: RowBlock
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., rows: _Optional[_Union[RowBlock, _Mapping]] = ...) -> None: ...

class PullBatchReply(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ...) -> None: ...

class PushBatchRequest(_message.Message):
    __slots__ = ("header", "chunks", "rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ...) -> None: ...

class PushPullRequest(_message.Message):
    __slots__ = ("header", "chunks", "rows", "pull_keys", "pull_codec", "pull_rows", "pull_rows_dtype")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PULL_KEYS_FIELD_NUMBER: _ClassVar[int]
    PULL_CODEC_FIELD_NUMBER: _ClassVar[int]
    PULL_ROWS_FIELD_NUMBER: _ClassVar[int]
    PULL_ROWS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    pull_keys: _containers.RepeatedScalarFieldContainer[str]
    pull_codec: _job_pb2.CodecSpec
    pull_rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    pull_rows_dtype: _tensor_pb2.DType
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ..., pull_keys: _Optional[_Iterable[str]] = ..., pull_codec: _Optional[_Union[_job_pb2.CodecSpec, _Mapping]] = ..., pull_rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ..., pull_rows_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class PushPullReply(_message.Message):
    __slots__ = ("header", "chunks", "push", "rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    push: PushReply
    rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ..., push: _Optional[_Union[PushReply, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ...) -> None: ...

class PullRowsBatchReply(_message.Message):
    __slots__ = ("header", "rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("shard_version", "duplicate", "staleness")
    SHARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    shard_version: int
    duplicate: bool
    staleness: int
    def __init__(self, shard_version: _Optional[int] = ..., duplicate: _Optional[bool] = ..., staleness: _Optional[int] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("keys", "sample")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    sample: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., sample: _Optional[int] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("spec", "version", "norm", "sample")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    spec: KeySpec
    version: int
    norm: float
    sample: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, spec: _Optional[_Union[KeySpec, _Mapping]] = ..., version: _Optional[int] = ..., norm: _Optional[float] = ..., sample: _Optional[_Iterable[float]] = ...) -> None: ...

class InspectReply(_message.Message):
    __slots__ = ("shard", "keys", "tables")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, shard: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("status", "hottest_ids", "hottest_touches")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HOTTEST_IDS_FIELD_NUMBER: _ClassVar[int]
    HOTTEST_TOUCHES_FIELD_NUMBER: _ClassVar[int]
    status: TableStatus
    hottest_ids: _containers.RepeatedScalarFieldContainer[int]
    hottest_touches: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, status: _Optional[_Union[TableStatus, _Mapping]] = ..., hottest_ids: _Optional[_Iterable[int]] = ..., hottest_touches: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "total", "sum", "max")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    total: int
    sum: float
    max: float
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., total: _Optional[int] = ..., sum: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class TensorTraffic(_message.Message):
    __slots__ = ("key", "logical_bytes", "wire_bytes", "codec_seconds")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CODEC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    logical_bytes: int
    wire_bytes: int
    codec_seconds: float
    def __init__(self, key: _Optional[str] = ..., logical_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., codec_seconds: _Optional[float] = ...) -> None: ...

class ShardStatusReply(_message.Message):
    __slots__ = ("shard", "keys", "bytes", "optimizer_bytes", "shard_version", "pushes", "pulls", "duplicates", "uptime_s", "staleness", "pull_wait_s", "push_traffic", "pull_traffic", "clocks", "completed_step", "membership_view", "mode", "checkpoint_age_s", "checkpoint_version", "reseeded", "rebases", "nonfinite_pushes", "tables", "dropped_pushes")
    class ClocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    PULL_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    PULL_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEP_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_VIEW_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESEEDED_FIELD_NUMBER: _ClassVar[int]
    REBASES_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_PUSHES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PUSHES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    keys: int
    bytes: int
    optimizer_bytes: int
    shard_version: int
    pushes: int
    pulls: int
    duplicates: int
    uptime_s: float
    staleness: Histogram
    pull_wait_s: Histogram
    push_traffic: _containers.RepeatedCompositeFieldContainer[TensorTraffic]
    pull_traffic: _containers.RepeatedCompositeFieldContainer[TensorTraffic]
    clocks: _containers.ScalarMap[int, int]
    completed_step: int
    membership_view: int
    mode: _job_pb2.Mode
    checkpoint_age_s: float
    checkpoint_version: int
    reseeded: Reseed
    rebases: int
    nonfinite_pushes: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStatus]
    dropped_pushes: int
    def __init__(self, shard: _Optional[int] = ..., keys: _Optional[int] = ..., bytes: _Optional[int] = ..., optimizer_bytes: _Optional[int] = ..., shard_version: _Optional[int] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., duplicates: _Optional[int] = ..., uptime_s: _Optional[float] = ..., staleness: _Optional[_Union[Histogram, _Mapping]] = ..., pull_wait_s: _Optional[_Union[Histogram, _Mapping]] = ..., push_traffic: _Optional[_Iterable[_Union[TensorTraffic, _Mapping]]] = ..., pull_traffic: _Optional[_Iterable[_Union[TensorTraffic, _Mapping]]] = ..., clocks: _Optional[_Mapping[int, int]] = ..., completed_step: _Optional[int] = ..., membership_view: _Optional[int] = ..., mode: _Optional[_Union[_job_pb2.Mode, str]] = ..., checkpoint_age_s: _Optional[float] = ..., checkpoint_version: _Optional[int] = ..., reseeded: _Optional[_Union[Reseed, _Mapping]] = ..., rebases: _Optional[int] = ..., nonfinite_pushes: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStatus, _Mapping]]] = ..., dropped_pushes: _Optional[int] = ...) -> None: ...

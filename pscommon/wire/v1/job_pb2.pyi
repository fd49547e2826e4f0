from shardps.pscommon.wire.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_ASYNC: _ClassVar[Mode]
    MODE_SYNC: _ClassVar[Mode]
    MODE_SSP: _ClassVar[Mode]

class OptimizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[OptimizerKind]
    OPTIMIZER_SGD: _ClassVar[OptimizerKind]
    OPTIMIZER_MOMENTUM: _ClassVar[OptimizerKind]
    OPTIMIZER_ADAM: _ClassVar[OptimizerKind]
    OPTIMIZER_ADAGRAD: _ClassVar[OptimizerKind]
MODE_UNSPECIFIED: Mode
MODE_ASYNC: Mode
MODE_SYNC: Mode
MODE_SSP: Mode
OPTIMIZER_UNSPECIFIED: OptimizerKind
OPTIMIZER_SGD: OptimizerKind
OPTIMIZER_MOMENTUM: OptimizerKind
OPTIMIZER_ADAM: OptimizerKind
OPTIMIZER_ADAGRAD: OptimizerKind

class OptimizerSpec(_message.Message):
    __slots__ = ("kind", "lr", "weight_decay", "momentum", "dampening", "nesterov", "beta1", "beta2", "eps", "lr_decay", "initial_accumulator_value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: OptimizerKind
    lr: float
    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    lr_decay: float
    initial_accumulator_value: float
    def __init__(self, kind: _Optional[_Union[OptimizerKind, str]] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., lr_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ...) -> None: ...

class CodecSpec(_message.Message):
    __slots__ = ("codec", "topk_density", "int8_block_size", "error_feedback")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOPK_DENSITY_FIELD_NUMBER: _ClassVar[int]
    INT8_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    codec: _tensor_pb2.Codec
    topk_density: float
    int8_block_size: int
    error_feedback: bool
    def __init__(self, codec: _Optional[_Union[_tensor_pb2.Codec, str]] = ..., topk_density: _Optional[float] = ..., int8_block_size: _Optional[int] = ..., error_feedback: _Optional[bool] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("mode", "staleness", "optimizer", "push_codec", "pull_codec", "lossless", "heartbeat_timeout_s", "num_servers", "slice_bytes", "small_tensor_bytes", "version")
    MODE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PUSH_CODEC_FIELD_NUMBER: _ClassVar[int]
    PULL_CODEC_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    SLICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SMALL_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    staleness: int
    optimizer: OptimizerSpec
    push_codec: CodecSpec
    pull_codec: CodecSpec
    lossless: _tensor_pb2.Lossless
    heartbeat_timeout_s: float
    num_servers: int
    slice_bytes: int
    small_tensor_bytes: int
    version: int
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., staleness: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., push_codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., pull_codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., lossless: _Optional[_Union[_tensor_pb2.Lossless, str]] = ..., heartbeat_timeout_s: _Optional[float] = ..., num_servers: _Optional[int] = ..., slice_bytes: _Optional[int] = ..., small_tensor_bytes: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

"""Job configuration as frozen, validated dataclasses, and their proto forms.

Flags and environment are read once, in psctl; everything below receives these objects.
Validation errors are `InvalidArgument` with a message that names the bad value.
"""
from __future__ import annotations

import dataclasses
import difflib
import math

from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import job_pb2, tensor_pb2

MODES = {"async": job_pb2.MODE_ASYNC, "sync": job_pb2.MODE_SYNC, "ssp": job_pb2.MODE_SSP}
# sync: the shard that settles each step (which pushes count in it; SettleStep), so every
# shard applies the same pushes
SETTLING_SHARD = 0
OPTIMIZERS = {
    "sgd": job_pb2.OPTIMIZER_SGD,
    "momentum": job_pb2.OPTIMIZER_MOMENTUM,
    "adam": job_pb2.OPTIMIZER_ADAM,
    "adagrad": job_pb2.OPTIMIZER_ADAGRAD,
}
CODECS = {
    "fp32": tensor_pb2.CODEC_RAW,
    "raw": tensor_pb2.CODEC_RAW,
    "fp16": tensor_pb2.CODEC_FP16,
    "bf16": tensor_pb2.CODEC_BF16,
    "int8": tensor_pb2.CODEC_INT8,
    "topk": tensor_pb2.CODEC_TOPK,
}
PULL_CODECS = {"fp32", "raw", "fp16", "bf16"}
LOSSLESS = {
    "off": tensor_pb2.LOSSLESS_NONE,
    "auto": tensor_pb2.LOSSLESS_UNSPECIFIED,  # per tensor: zstd where it shrinks >= 10%
    "zstd": tensor_pb2.LOSSLESS_ZSTD,
    "lz4": tensor_pb2.LOSSLESS_LZ4,
}


def _unknown(what: str, name: str, known, given: str | None = None) -> str:
    """`what` NAME is not one of ...; with the closest valid name when there is one."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{what} {given or name!r} is not one of {sorted(known)}{hint}"


def _name_of(table: dict, value: int) -> str:
    for name, v in table.items():
        if v == value:
            return name
    raise InvalidArgument(f"unknown enum value {value}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    kind: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def __post_init__(self):
        if self.kind not in OPTIMIZERS:
            raise InvalidArgument(f"optimizer {self.kind!r} is not one of {sorted(OPTIMIZERS)}")
        if self.kind == "momentum" and self.momentum == 0.0:
            # "momentum" is SGD with momentum: a zero would make it plain SGD, so it means the
            # usual 0.9, set here so that status and checks see the value that is applied
            object.__setattr__(self, "momentum", 0.9)
        _finite_nonneg("lr", self.lr, positive=True)
        for field in ("weight_decay", "momentum", "dampening", "eps", "lr_decay",
                      "initial_accumulator_value"):
            _finite_nonneg(field, getattr(self, field))
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise InvalidArgument(f"{field}={value} must be in [0, 1)")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise InvalidArgument("nesterov needs momentum > 0 and dampening = 0")

    def to_proto(self) -> job_pb2.OptimizerSpec:
        fields = dataclasses.asdict(self)
        fields["kind"] = OPTIMIZERS[self.kind]
        return job_pb2.OptimizerSpec(**fields)

    @classmethod
    def from_proto(cls, msg: job_pb2.OptimizerSpec) -> "OptimizerConfig":
        fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)}
        fields["kind"] = _name_of(OPTIMIZERS, msg.kind)
        return cls(**fields)


INT8_BLOCK_SIZE = 256  # elements per int8 scale unless the codec text says otherwise


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """A codec choice such as `fp32`, `bf16`, `int8`, `topk:0.01`."""

    name: str = "fp32"
    topk_density: float = 0.01
    int8_block_size: int = INT8_BLOCK_SIZE
    error_feedback: bool = True

    def __post_init__(self):
        if self.name not in CODECS:
            raise InvalidArgument(_unknown("codec", self.name, CODECS))
        if not 0.0 < self.topk_density <= 1.0:
            raise InvalidArgument(f"topk density {self.topk_density} must be in (0, 1]")
        if not 1 <= self.int8_block_size <= 1 << 20:
            raise InvalidArgument(f"int8 block size {self.int8_block_size} must be in [1, 2**20]")

    @classmethod
    def parse(cls, text: str, *, error_feedback: bool = True) -> "CodecConfig":
        """`fp32`, `fp16`, `bf16`, `int8[:BLOCK]`, `topk[:DENSITY]`."""
        name, _, arg = text.strip().lower().partition(":")
        if name not in CODECS:  # the name first: a misspelt topk:0.01 is not "takes no parameter"
            raise InvalidArgument(_unknown("codec", name, CODECS, given=text))
        if name == "topk" and arg:
            try:
                density = float(arg)
            except ValueError:
                raise InvalidArgument(f"codec {text!r}: density {arg!r} is not a number") from None
            return cls(name="topk", topk_density=density, error_feedback=error_feedback)
        if name == "int8" and arg:
            if not arg.isdigit():
                raise InvalidArgument(f"codec {text!r}: block size {arg!r} is not an integer")
            return cls(name="int8", int8_block_size=int(arg), error_feedback=error_feedback)
        if arg:
            raise InvalidArgument(f"codec {text!r}: {name} takes no parameter (only topk:DENSITY and int8:BLOCK do)")
        return cls(name=name, error_feedback=error_feedback)

    @property
    def codec(self) -> int:
        return CODECS[self.name]

    def __str__(self) -> str:
        # the text parse() reads back to this codec: `psctl up` hands it on to the daemons
        if self.name == "topk":
            return f"topk:{self.topk_density!r}"
        if self.name == "int8" and self.int8_block_size != INT8_BLOCK_SIZE:
            return f"int8:{self.int8_block_size}"
        return self.name

    def to_proto(self) -> job_pb2.CodecSpec:
        return job_pb2.CodecSpec(codec=self.codec, topk_density=self.topk_density,
                                 int8_block_size=self.int8_block_size,
                                 error_feedback=self.error_feedback)

    @classmethod
    def from_proto(cls, msg: job_pb2.CodecSpec) -> "CodecConfig":
        if msg.codec == tensor_pb2.CODEC_UNSPECIFIED:
            return cls()
        name = "fp32" if msg.codec == tensor_pb2.CODEC_RAW else _name_of(CODECS, msg.codec)
        return cls(name=name, topk_density=msg.topk_density or 0.01,
                   int8_block_size=msg.int8_block_size or INT8_BLOCK_SIZE,
                   error_feedback=msg.error_feedback)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    mode: str = "async"
    staleness: int = 0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    push_codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    pull_codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    lossless: str = "off"
    heartbeat_timeout_s: float = 10.0
    num_servers: int = 1
    slice_bytes: int = 4 << 20
    small_tensor_bytes: int = 4096
    version: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidArgument(f"mode {self.mode!r} is not one of {sorted(MODES)}")
        if self.staleness < 0:
            raise InvalidArgument(f"staleness {self.staleness} must be >= 0")
        if self.mode == "ssp" and self.staleness < 1:
            raise InvalidArgument("mode ssp needs --staleness >= 1")
        if self.pull_codec.name not in PULL_CODECS:
            raise InvalidArgument(f"pull codec {self.pull_codec} is not one of {sorted(PULL_CODECS)}")
        if self.lossless not in LOSSLESS:
            raise InvalidArgument(f"lossless {self.lossless!r} is not one of {sorted(LOSSLESS)}")
        _finite_nonneg("heartbeat_timeout_s", self.heartbeat_timeout_s, positive=True)
        if not 1 <= self.num_servers <= 1024:
            raise InvalidArgument(f"num_servers {self.num_servers} must be in [1, 1024]")
        if self.slice_bytes < 1024:
            raise InvalidArgument(f"slice_bytes {self.slice_bytes} must be >= 1024")
        if self.small_tensor_bytes < 0:
            raise InvalidArgument(f"small_tensor_bytes {self.small_tensor_bytes} must be >= 0")

    def to_proto(self) -> job_pb2.JobSpec:
        return job_pb2.JobSpec(
            mode=MODES[self.mode], staleness=self.staleness, optimizer=self.optimizer.to_proto(),
            push_codec=self.push_codec.to_proto(), pull_codec=self.pull_codec.to_proto(),
            lossless=LOSSLESS[self.lossless], heartbeat_timeout_s=self.heartbeat_timeout_s,
            num_servers=self.num_servers, slice_bytes=self.slice_bytes,
            small_tensor_bytes=self.small_tensor_bytes, version=self.version)

    @classmethod
    def from_proto(cls, msg: job_pb2.JobSpec) -> "JobSpec":
        return cls(
            mode=_name_of(MODES, msg.mode), staleness=msg.staleness,
            optimizer=OptimizerConfig.from_proto(msg.optimizer),
            push_codec=CodecConfig.from_proto(msg.push_codec),
            pull_codec=CodecConfig.from_proto(msg.pull_codec),
            lossless=_name_of(LOSSLESS, msg.lossless), heartbeat_timeout_s=msg.heartbeat_timeout_s,
            num_servers=msg.num_servers, slice_bytes=msg.slice_bytes,
            small_tensor_bytes=msg.small_tensor_bytes, version=msg.version)

    def describe(self) -> dict:
        """A JSON-friendly summary for status output."""
        return {
            "mode": self.mode, "staleness": self.staleness, "optimizer": dataclasses.asdict(self.optimizer),
            "push_codec": str(self.push_codec), "pull_codec": str(self.pull_codec),
            "lossless": self.lossless, "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "num_servers": self.num_servers, "version": self.version,
        }


def _finite_nonneg(name: str, value: float, positive: bool = False) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
            positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise InvalidArgument(f"{name}={value!r} must be a finite number {bound}")


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """Limits on a daemon's gRPC calls that hold a thread (pscommon.interceptors.StreamGuard).

    A sync gRPC server runs every call on a thread of a fixed pool, and a stream holds its
    thread for as long as it is open, sending or not. These keep a few idle callers from
    taking every thread:
    - `max_streams_per_connection`: concurrent streaming calls (either direction) on one
      connection (a caller's host and port); more are refused with RESOURCE_EXHAUSTED. 0: no cap.
    - `idle_timeout_s`: a request stream (Push, Declare, reflection) whose handler has waited
      this long for its next message is ended with DEADLINE_EXCEEDED. 0: never.
    - `control_threads`: the health and reflection services run on a pool of their own of
      this many threads, so busy or idle data-plane streams cannot starve a health probe; at
      most half of them may hold streams (Health.Watch, reflection), the rest answer checks.
    """

    max_streams_per_connection: int = 8
    idle_timeout_s: float = 30.0
    control_threads: int = 4

    def __post_init__(self):
        if not isinstance(self.max_streams_per_connection, int) or self.max_streams_per_connection < 0:
            raise InvalidArgument(f"max_streams_per_connection={self.max_streams_per_connection!r} must be an "
                                  "integer >= 0 (0: no cap)")
        _finite_nonneg("idle_timeout_s", self.idle_timeout_s)
        if not isinstance(self.control_threads, int) or not 2 <= self.control_threads <= 64:
            raise InvalidArgument(f"control_threads={self.control_threads!r} must be an integer in [2, 64]")

    @property
    def max_control_streams(self) -> int:
        """Health.Watch and reflection streams served at once, server-wide."""
        return self.control_threads // 2

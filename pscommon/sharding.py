"""Keys and shards: cut large parameters into slices and spread them, byte-balanced.

Pure and deterministic: the scheduler computes the map once from the declared parameter
set, and every worker and server gets the same map.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq

from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.tensors import check_shape, numel, numpy_dtype
from shardps.pscommon.wire.v1 import ps_pb2, scheduler_pb2, tensor_pb2

MAX_PARAMS = 100_000
MAX_NAME = 512
MAX_TABLES = 1024


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    dtype: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * numpy_dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Key:
    """One slice of a flattened parameter, owned by one shard."""

    key: str
    param: str
    dtype: int
    param_shape: tuple[int, ...]
    offset: int
    length: int
    shard: int

    @property
    def nbytes(self) -> int:
        return self.length * numpy_dtype(self.dtype).itemsize

    @property
    def whole(self) -> bool:
        return self.offset == 0 and self.length == numel(self.param_shape)

    def to_proto(self) -> ps_pb2.KeySpec:
        return ps_pb2.KeySpec(key=self.key, param=self.param, dtype=self.dtype,
                              param_shape=self.param_shape, offset=self.offset,
                              length=self.length, shard=self.shard)

    @classmethod
    def from_proto(cls, msg: ps_pb2.KeySpec) -> "Key":
        return cls(msg.key, msg.param, msg.dtype, tuple(msg.param_shape), msg.offset,
                   msg.length, msg.shard)


def validate_params(params: list[Param]) -> None:
    if len(params) > MAX_PARAMS:
        raise InvalidArgument(f"{len(params)} parameters, at most {MAX_PARAMS}")
    seen = set()
    for p in params:
        if not p.name or len(p.name) > MAX_NAME or "#" in p.name:
            raise InvalidArgument(f"parameter name {p.name!r} must be 1-{MAX_NAME} characters without '#'")
        if p.name in seen:
            raise InvalidArgument(f"parameter {p.name!r} declared twice")
        seen.add(p.name)
        if p.dtype != tensor_pb2.DTYPE_FLOAT32:
            raise InvalidArgument(
                f"parameter {p.name!r}: dtype {tensor_pb2.DType.Name(p.dtype)}; servers keep "
                "float32 master weights, declare parameters as float32")
        check_shape(p.name, p.shape)


def slice_params(params: list[Param], slice_bytes: int) -> list[tuple[str, Param, int, int]]:
    """(key, param, offset, length) for every slice; a parameter above slice_bytes is cut."""
    out = []
    for p in params:
        itemsize = numpy_dtype(p.dtype).itemsize
        per_slice = max(1, slice_bytes // itemsize)
        n = p.numel
        if n <= per_slice:
            out.append((p.name, p, 0, n))
            continue
        for i, offset in enumerate(range(0, n, per_slice)):
            out.append((f"{p.name}#{i}", p, offset, min(per_slice, n - offset)))
    return out


def assign(sizes: dict[str, int], num_shards: int) -> dict[str, int]:
    """Key -> shard, greedy largest-first onto the lightest shard (ties: lowest shard index).

    Deterministic for a given input; within 4/3 of the optimal maximum load (LPT).
    """
    if num_shards < 1:
        raise InvalidArgument(f"num_shards {num_shards} must be >= 1")
    heap = [(0, s) for s in range(num_shards)]
    out = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        load, shard = heapq.heappop(heap)
        out[key] = shard
        heapq.heappush(heap, (load + sizes[key], shard))
    return out


def validate_tables(tables: list[TableSpec], params: list[Param]) -> None:
    """A model is dense parameters, embedding tables or both, never nothing; a table's name
    is its own (rows and dense keys meet in one checkpoint and one push)."""
    if not params and not tables:
        raise InvalidArgument("the model declares no parameters and no embedding tables")
    if len(tables) > MAX_TABLES:
        raise InvalidArgument(f"{len(tables)} embedding tables, at most {MAX_TABLES}")
    names = {p.name for p in params}
    for t in tables:
        if t.name in names:
            raise InvalidArgument(f"table {t.name!r} is declared twice, or is also a parameter's name")
        names.add(t.name)


@dataclasses.dataclass(frozen=True)
class ShardMap:
    params: tuple[Param, ...]
    keys: tuple[Key, ...]
    fingerprint: str
    tables: tuple[TableSpec, ...] = ()

    def keys_of(self, shard: int) -> list[Key]:
        return [k for k in self.keys if k.shard == shard]

    def keys_of_param(self, name: str) -> list[Key]:
        return [k for k in self.keys if k.param == name]

    def shard_bytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for k in self.keys:
            out[k.shard] = out.get(k.shard, 0) + k.nbytes
        return out

    def to_proto(self) -> scheduler_pb2.ShardMap:
        return scheduler_pb2.ShardMap(
            fingerprint=self.fingerprint, keys=[k.to_proto() for k in self.keys],
            params=[scheduler_pb2.ParamSpec(name=p.name, dtype=p.dtype, shape=p.shape)
                    for p in self.params],
            tables=[t.to_proto() for t in self.tables])

    @classmethod
    def from_proto(cls, msg: scheduler_pb2.ShardMap) -> "ShardMap":
        return cls(tuple(Param(p.name, p.dtype, tuple(p.shape)) for p in msg.params),
                   tuple(Key.from_proto(k) for k in msg.keys), msg.fingerprint,
                   tuple(TableSpec.from_proto(t) for t in msg.tables))


def model_fingerprint(params: list[Param], tables: list[TableSpec] = ()) -> str:
    """Identifies a model: its parameters' names, dtypes and shapes in declaration order, and
    its tables' specs (a table's initializer and seed decide its rows as much as its dim). A
    model without tables keeps the fingerprint it had before tables were part of it."""
    h = hashlib.sha256()
    for p in params:
        h.update(f"{p.name}\0{p.dtype}\0{','.join(map(str, p.shape))}\n".encode())
    for t in tables:
        h.update(f"table\0{t.name}\0{t.dim}\0{t.initializer}\0{t.scale!r}\0{t.seed}\n".encode())
    return h.hexdigest()[:16]


def build(params: list[Param], num_shards: int, slice_bytes: int, tables: list[TableSpec] = ()) -> ShardMap:
    validate_params(params)
    validate_tables(list(tables), params)
    slices = slice_params(params, slice_bytes)
    sizes = {key: length * numpy_dtype(p.dtype).itemsize for key, p, _, length in slices}
    shard_of = assign(sizes, num_shards)
    keys = tuple(Key(key, p.name, p.dtype, p.shape, offset, length, shard_of[key])
                 for key, p, offset, length in slices)
    fp = model_fingerprint(params, tables) + f"-s{num_shards}-b{slice_bytes}"
    return ShardMap(tuple(params), keys, fp, tuple(tables))

"""Bounds on the values a caller controls, checked at the scheduler's boundary before any
state changes: pure functions that return the value to use or raise InvalidArgument naming
the field and the value.

The limits and why:
- clocks at most 2**53 - 1 (pscommon/bounds.py, shared with the servers);
- worker names printable (`str.isprintable`: no control characters, escapes, NUL or line
  breaks) and at most 128 characters: they are shown to operators in `psctl status`;
- a declared model: known dtypes, at most `MAX_PARAMS` parameters, no dimension above
  `MAX_ELEMENTS`, at most `MAX_MODEL_BYTES` in all and `MAX_KEYS` slices, so that a single
  request can neither make the scheduler slice without end nor fix a shard map no reply can
  carry (the shard map is fixed for the job's life once declared).
"""
from __future__ import annotations

from typing import Iterable

from shardps.pscommon import grpcutil, sharding
from shardps.pscommon.bounds import MAX_CLOCK, check_clock  # noqa: F401 - the scheduler's checks, in one place
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.tensors import MAX_DIMS, numpy_dtype
from shardps.pscommon.wire.v1 import tensor_pb2

MAX_WORKER_NAME = 128
MAX_PARAMS = sharding.MAX_PARAMS          # 100,000 parameters
MAX_MODEL_BYTES = 1 << 40                 # 1 TiB of parameters (float32: 2**38 elements)
MAX_ELEMENTS = MAX_MODEL_BYTES // 4       # per dimension and per parameter
MAX_KEYS = 100_000                        # slices in the shard map (a server's per-call cap)

_DTYPES = frozenset(tensor_pb2.DType.values())


def check_worker_name(name: str) -> str:
    if len(name) > MAX_WORKER_NAME:
        raise InvalidArgument(f"worker name of {len(name)} characters; at most {MAX_WORKER_NAME}")
    if not name.isprintable():
        raise InvalidArgument(f"worker name {name!r} has control characters: names must be printable")
    return name


def rejoin_id(worker_id: int) -> int | None:
    """JoinWorker's worker_id: 0 and -1 ask for a new member, a positive id rejoins as it."""
    if worker_id < -1:
        raise InvalidArgument(f"worker_id {worker_id}: 0 or -1 for a new worker, else an id from 1")
    return worker_id if worker_id > 0 else None


def declared_params(specs: Iterable, slice_bytes: int) -> list[sharding.Param]:
    """The parameters of a DeclareModel request (ParamSpec messages), checked against the
    caps before the scheduler slices them; sharding.validate_params checks the rest."""
    specs = list(specs)
    if len(specs) > MAX_PARAMS:
        raise InvalidArgument(f"{len(specs)} parameters declared; at most {MAX_PARAMS}")
    params, total_bytes, keys = [], 0, 0
    for spec in specs:
        name = spec.name
        if not name.isprintable():
            raise InvalidArgument(f"parameter name {name!r} has control characters: names must be printable")
        if spec.dtype not in _DTYPES:
            raise InvalidArgument(f"parameter {name!r}: dtype {spec.dtype} is not a known DType value")
        shape = tuple(spec.shape)
        if len(shape) > MAX_DIMS:
            raise InvalidArgument(f"parameter {name!r}: {len(shape)} dimensions, at most {MAX_DIMS}")
        for i, d in enumerate(shape):
            if not 0 <= d <= MAX_ELEMENTS:
                raise InvalidArgument(f"parameter {name!r}: dimension {i} is {d}; each must be in "
                                      f"[0, {MAX_ELEMENTS}]")
        p = sharding.Param(name, spec.dtype, shape)
        itemsize = numpy_dtype(p.dtype).itemsize
        if p.numel > MAX_ELEMENTS:
            raise InvalidArgument(f"parameter {name!r}: shape {list(shape)} is {p.numel} elements; "
                                  f"at most {MAX_ELEMENTS}")
        total_bytes += p.numel * itemsize
        if total_bytes > MAX_MODEL_BYTES:
            raise InvalidArgument(f"parameter {name!r} brings the model to {total_bytes} bytes; "
                                  f"at most {MAX_MODEL_BYTES} bytes")
        per_slice = max(1, slice_bytes // itemsize)   # as sharding.slice_params cuts
        keys += max(1, -(-p.numel // per_slice))
        if keys > MAX_KEYS:
            raise InvalidArgument(f"parameter {name!r} brings the shard map to {keys} slices of "
                                  f"{slice_bytes} bytes; at most {MAX_KEYS}")
        params.append(p)
    return params


def declared_tables(specs: Iterable) -> list[TableSpec]:
    """The embedding tables of a DeclareModel request (TableSpec messages): TableSpec checks
    each field (a printable name, dim, initializer and its scale, seed)."""
    specs = list(specs)
    if len(specs) > sharding.MAX_TABLES:
        raise InvalidArgument(f"{len(specs)} embedding tables declared; at most {sharding.MAX_TABLES}")
    return [TableSpec.from_proto(spec) for spec in specs]


MAX_SHARD_MAP_BYTES = grpcutil.MAX_MESSAGE_BYTES - (1 << 20)   # GetJob carries it, with room to spare


def check_shard_map(smap: sharding.ShardMap) -> sharding.ShardMap:
    """Every worker reads the shard map in one GetJob reply, capped like any message: a map
    that does not fit would be fixed for the job and readable by nobody."""
    size = smap.to_proto().ByteSize()
    if size > MAX_SHARD_MAP_BYTES:
        raise InvalidArgument(f"the declared model's shard map is {size} bytes ({len(smap.keys)} slices); "
                              f"a reply carries at most {MAX_SHARD_MAP_BYTES}: declare fewer or larger slices")
    return smap

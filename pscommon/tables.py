"""Embedding tables: the table spec, the id-to-shard hash, and a row's initial value.

An embedding table is not declared row by row like a dense tensor. Its rows are keyed by
arbitrary 64-bit ids (a hashed feature, a user id, a scrambled field index), nobody knows
the id set in advance, and a row is created on a shard the first time an id touches it.
So nothing here is a map: both the shard of an id and its row's first value are pure
functions of the id, computed the same way by every worker and server.

Why a mixing hash for the shard. Ids come in shapes that break the cheap schemes in
opposite ways: sequential ids (0, 1, 2, ...) differ only in their low bits, so a split by high
bits puts them all on shard 0; scrambled ids (idx * odd constant + field constant, as the
emb-loop benchmark makes them) spread over all 64 bits, and ids with structure in their low
bits (multiples of 2**k, a type tag in the low byte) put a split by low bits (id % n) at the
mercy of the caller's id layout. The splitmix64 finalizer is a bijection of 64-bit words in
which every input bit moves every output bit, so all of these come out uniform; Lemire's
multiply-shift then maps the hash's high bits to [0, num_shards) without a division.

Why counter-based initial values. A row is created on first touch, possibly re-created after
eviction, possibly on another shard after a resharding, and admission answers the
initializer's value for an id that has no stored row. Drawing from a stateful generator would
make that value depend on the order ids arrived in. Instead each element is splitmix64 of
(seed, id, column): the same id gets the same row in any batch, order or process. Zeros and
uniform are bit-exact everywhere (only exact IEEE operations); normal goes through log, sqrt,
cos and sin, whose last double bit can differ between math libraries, which the float32
rounding hides almost always.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from shardps.pscommon.codecs.bf16 import from_bf16_bits, to_bf16_bits
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2

INITIALIZERS = ("zeros", "constant", "normal", "uniform")
MAX_NAME = 128
MAX_DIM = 4096
MAX_SEED = 2**63 - 1
MAX_SHARDS = 2**32 - 1  # Lemire's reduction below splits the product at 32 bits

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2**64 / golden ratio, odd
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
# Separates the init streams from the shard hash. Its top bit is set, so no seed (< 2**63)
# equals it and the per-seed key below is never 0: rows never key off mix64(id) itself.
_INIT_DOMAIN = 0xD1B54A32D192ED03
_LOW32 = np.uint64(0xFFFFFFFF)
_BLOCK_ELEMENTS = 1 << 20  # bounds the uint64/float64 temporaries of initial_rows (~8 MiB each)


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table: rows of `dim` float32, created on first touch by `initializer`.

    `scale` is the standard deviation for "normal", the bound a of U(-a, a) for "uniform",
    every element's value for "constant" (any finite number), and must be 0 for "zeros". `seed` picks the initial values (see `initial_rows`).
    """

    name: str
    dim: int
    initializer: str
    scale: float
    seed: int

    def __post_init__(self):
        _check_name(self.name)
        _check_int("dim", self.dim, 1, MAX_DIM)
        _check_initializer(self.initializer)
        _check_scale(self.initializer, self.scale)
        # an int scale (json writes 0.0 back as 0.0, a hand-written file may say 0) compares
        # and serializes as the float it means
        object.__setattr__(self, "scale", float(self.scale))
        _check_int("seed", self.seed, 0, MAX_SEED)

    def to_json(self) -> dict:
        """A plain dict of the fields, for checkpoint metadata."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> "TableSpec":
        """The spec `to_json` wrote; InvalidArgument for a missing, unknown or mistyped field."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"table spec must be a JSON object, not {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(fields - data.keys()), sorted(map(str, data.keys() - fields))
        if missing or unknown:
            raise InvalidArgument(f"table spec fields: missing {missing}, unknown {unknown}")
        return cls(**data)  # __post_init__ checks every field's type

    def to_proto(self) -> ps_pb2.TableSpec:
        return ps_pb2.TableSpec(name=self.name, dim=self.dim, initializer=self.initializer, scale=self.scale,
                                seed=self.seed)

    @classmethod
    def from_proto(cls, msg: ps_pb2.TableSpec) -> "TableSpec":
        return cls(msg.name, msg.dim, msg.initializer, msg.scale, msg.seed)


# -- rows on the wire (ps.proto RowBlock) ---------------------------------------------------
ROW_ITEMSIZE = {tensor_pb2.DTYPE_FLOAT32: 4, tensor_pb2.DTYPE_FLOAT16: 2, tensor_pb2.DTYPE_BFLOAT16: 2}
# one RowBlock's ids and values: half the message cap, so a block and its envelope always fit
ROW_BLOCK_BYTES = 4 << 20
_WIRE_U64, _WIRE_F32 = np.dtype("<u8"), np.dtype("<f4")   # built once: a dtype from a string costs a parse


def ids_to_bytes(ids: np.ndarray) -> bytes:
    return _as_uint64(ids).astype("<u8", copy=False).tobytes()


def ids_from_bytes(data: bytes, what: str) -> np.ndarray:
    """uint64 ids from a RowBlock's `ids`; InvalidArgument unless whole 8-byte ids."""
    if len(data) % 8:
        raise InvalidArgument(f"{what}: {len(data)} id bytes is not a whole number of 8-byte ids")
    ids = np.frombuffer(data, _WIRE_U64)
    return ids if ids.dtype == np.uint64 else ids.astype(np.uint64)   # a view on little-endian hosts


def row_dtype(dtype: int, what: str) -> int:
    """The dtype of row values on the wire; unset means FLOAT32."""
    dtype = dtype or tensor_pb2.DTYPE_FLOAT32
    if dtype not in ROW_ITEMSIZE:
        raise InvalidArgument(f"{what}: rows travel as FLOAT32, FLOAT16 or BFLOAT16, not "
                              f"{tensor_pb2.DType.Name(dtype) if dtype in tensor_pb2.DType.values() else dtype}")
    return dtype


def encode_rows(values: np.ndarray, dtype: int) -> bytes:
    """float32 rows as `dtype` bytes (bf16 rounds to nearest even, as the bf16 codec)."""
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        return to_bf16_bits(values).astype("<u2", copy=False).tobytes()
    if dtype == tensor_pb2.DTYPE_FLOAT16:
        return values.astype("<f2").tobytes()
    return values.astype("<f4", copy=False).tobytes()


def decode_rows(data: bytes, dtype: int, n: int, dim: int, what: str) -> np.ndarray:
    """float32 [n, dim] from a RowBlock's `values`; InvalidArgument when the size is not n x dim."""
    itemsize = ROW_ITEMSIZE[dtype]
    if len(data) != n * dim * itemsize:
        raise InvalidArgument(f"{what}: {len(data)} value bytes for {n} ids of dim {dim} "
                              f"(expected {n * dim * itemsize})")
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        flat = from_bf16_bits(np.frombuffer(data, "<u2").astype(np.uint16, copy=False))
    elif dtype == tensor_pb2.DTYPE_FLOAT16:
        flat = np.frombuffer(data, "<f2").astype(np.float32)
    else:
        flat = np.frombuffer(data, _WIRE_F32)
        flat = flat if flat.dtype == np.float32 else flat.astype(np.float32)
    return flat.reshape(n, dim)


def row_blocks(table: str, ids: np.ndarray, values: np.ndarray | None, dtype: int,
               max_bytes: int = ROW_BLOCK_BYTES, ids_bytes: bytes | None = None) -> list[ps_pb2.RowBlock]:
    """RowBlocks of at most `max_bytes` each for `ids` (and their rows, if given); at least
    one block, so that an empty id list still names its table. `ids_bytes`: the ids already
    as wire bytes (a request's, or encoded once for a pull and its push), used when one block
    holds them all."""
    dim = 0 if values is None else values.shape[1]
    per_row = 8 + dim * ROW_ITEMSIZE[dtype]
    step = max(1, max_bytes // per_row)
    if len(ids) <= step:  # the common case: one block, no slicing
        return [ps_pb2.RowBlock(table=table, ids=ids_to_bytes(ids) if ids_bytes is None else ids_bytes, dtype=dtype,
                                values=b"" if values is None else encode_rows(values, dtype))]
    blocks = []
    for start in range(0, max(len(ids), 1), step):
        part = slice(start, start + step)
        blocks.append(ps_pb2.RowBlock(
            table=table, ids=ids_to_bytes(ids[part]), dtype=dtype,
            values=b"" if values is None else encode_rows(values[part], dtype)))
    return blocks


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise InvalidArgument(f"table name {name!r} must be a string")
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidArgument(f"table name {name!r} must be 1 to {MAX_NAME} characters")
    if not name.isprintable() or name != name.strip():
        raise InvalidArgument(
            f"table name {name!r} must be printable, without whitespace at either end")


def _check_int(field: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass, and True as a dim or a seed is a mistake, not a 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"{field}={value!r} must be an integer in [{low}, {high}]")


def _check_initializer(initializer: object) -> None:
    if initializer not in INITIALIZERS:
        raise InvalidArgument(f"initializer {initializer!r} is not one of {list(INITIALIZERS)}")


def _check_scale(initializer: str, scale: object) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InvalidArgument(f"scale={scale!r} must be a finite number")
    if initializer != "constant" and scale < 0:
        raise InvalidArgument(f"scale={scale!r} must be >= 0 for the {initializer} initializer")
    if initializer == "zeros" and scale != 0:
        raise InvalidArgument(f"scale={scale!r} must be 0 for the zeros initializer")


def _as_uint64(ids: object) -> np.ndarray:
    """The ids' 64-bit patterns: a negative int64 id is the uint64 with the same bits."""
    if not isinstance(ids, np.ndarray):
        raise InvalidArgument(f"ids must be a numpy array, not {type(ids).__name__}")
    if ids.dtype.kind not in "iu":  # bool is kind "b": refused with floats and objects
        raise InvalidArgument(f"ids must be an integer array, not {ids.dtype}")
    if ids.ndim != 1:
        raise InvalidArgument(f"ids must be one-dimensional, not of shape {ids.shape}")
    # signed ids are widened by value first, so an int32 -1 and an int64 -1 are the same id
    wide = ids.astype(np.int64 if ids.dtype.kind == "i" else np.uint64, copy=False)
    return wide.view(np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Stafford's variant 13): a bijection with full avalanche."""
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        z = x >> np.uint64(30)
        z ^= x
        z *= _MUL1
        z ^= z >> np.uint64(27)
        z *= _MUL2
        z ^= z >> np.uint64(31)
    return z


def _mulhi(h: np.ndarray, n: int) -> np.ndarray:
    """floor(h * n / 2**64), exactly, for n < 2**32, without 128-bit integers:
    h * n = hi * n * 2**32 + lo * n, and neither hi * n nor their sum's top part overflows."""
    n64 = np.uint64(n)
    hi, lo = h >> np.uint64(32), h & _LOW32
    return (hi * n64 + ((lo * n64) >> np.uint64(32))) >> np.uint64(32)


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard in [0, num_shards) of each 64-bit id (int64 or uint64; int64 by bits), int64."""
    if (not isinstance(num_shards, (int, np.integer)) or isinstance(num_shards, bool)
            or not 1 <= num_shards <= MAX_SHARDS):
        raise InvalidArgument(f"num_shards={num_shards!r} must be an integer in [1, {MAX_SHARDS}]")
    ids = _as_uint64(ids)
    if num_shards == 1:  # every id lives on shard 0: no hash to compute
        return np.zeros(len(ids), np.int64)
    return _mulhi(mix64(ids), int(num_shards)).astype(np.int64)


def is_sorted_unique(ids: np.ndarray) -> bool:
    """Whether `ids` is strictly increasing in its own dtype (for uint64 ids: exactly what
    np.unique returns for them), checked in one vectorized pass."""
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())


def is_unique(ids: np.ndarray) -> bool:
    """Whether `ids` (1-D; uint64, or any integer dtype read by value) is strictly increasing,
    for uint64 as uint64 or as int64 (the same 64-bit ids in int64 order): a
    proof, in one or two vectorized passes, that no id repeats. np.unique's output passes
    (sorted, in either reading of the bits); an unsorted array without repeats may not."""
    if is_sorted_unique(ids):
        return True
    if ids.dtype != np.uint64:
        return False
    signed = ids.view(np.int64)
    return bool((signed[1:] > signed[:-1]).all())


def initial_rows(spec: TableSpec, ids: np.ndarray) -> np.ndarray:
    """The value each id's row has when it is created: float32 of shape (len(ids), spec.dim),
    a pure function of (spec.seed, id, column)."""
    return initial_values(spec.initializer, spec.scale, spec.seed, _as_uint64(ids), spec.dim)


def initial_values(initializer: str, scale: float, seed: int, ids: np.ndarray, dim: int) -> np.ndarray:
    """`initial_rows` for checked arguments (ids uint64, any 64-bit seed): the one place a
    row's first value is computed, for the table spec and the row store alike."""
    keys = _row_keys(seed, ids)
    out = np.zeros((len(keys), dim), dtype=np.float32)
    if initializer == "constant":
        out.fill(scale)
        return out
    if initializer == "zeros" or scale == 0:
        return out
    per_block = max(1, _BLOCK_ELEMENTS // dim)
    for start in range(0, len(keys), per_block):  # blocks of rows, to bound the temporaries
        block = keys[start:start + per_block]
        out[start:start + len(block)] = _fill(initializer, scale, dim, block)
    return out


def _row_keys(seed: int, ids: np.ndarray) -> np.ndarray:
    """Each row's stream key. For one seed it is a bijection of the id, so distinct ids never
    share a stream; xor-ing a seed-derived word before mixing keeps it apart from shard_of."""
    seed_key = mix64(np.array([seed ^ _INIT_DOMAIN], dtype=np.uint64))[0]
    return mix64(ids ^ seed_key)


def _uniform01(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) doubles in [0, 1): element c of row r is splitmix64's output c of a
    generator whose state starts at keys[r], i.e. mix64(key + (c + 1) * gamma)."""
    with np.errstate(over="ignore"):
        steps = np.arange(1, n + 1, dtype=np.uint64) * _GAMMA
        bits = mix64(keys[:, None] + steps[None, :])
    # the top 53 bits: every double k / 2**53, each equally likely
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _fill(initializer: str, scale: float, dim: int, keys: np.ndarray) -> np.ndarray:
    if initializer == "uniform":
        return _uniform(scale, _uniform01(keys, dim))
    return _normal(scale, _uniform01(keys, 2 * ((dim + 1) // 2)))[:, :dim]


def _uniform(a: float, u: np.ndarray) -> np.ndarray:
    values = (a * (2.0 * u - 1.0)).astype(np.float32)
    # a double just under a can round up to float32(a): keep the interval half-open
    return np.minimum(values, np.nextafter(np.float32(a), np.float32(0)))


def _normal(std: float, u: np.ndarray) -> np.ndarray:
    """Box-Muller on column pairs: counters 2j and 2j+1 give columns 2j (cos) and 2j+1 (sin),
    so a column's value does not depend on the table's dim."""
    radius = np.sqrt(-2.0 * np.log(1.0 - u[:, 0::2]))  # 1 - u is in (0, 1]: log is finite
    angle = (2.0 * np.pi) * u[:, 1::2]
    out = np.empty(u.shape, dtype=np.float64)
    out[:, 0::2] = radius * np.cos(angle)
    out[:, 1::2] = radius * np.sin(angle)
    return (std * out).astype(np.float32)


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique ids, their summed gradients); the input itself, in its order, when no id repeats.
    Sort-based: a stable argsort, then np.add.reduceat over the runs. On emb-loop's raw batches
    (bench/rowstore.py, "dedupe") 6.0 / 3.0 M rows/s (small / large) against 3.6 / 2.0 for
    np.unique + np.add.at and 3.3 / 1.6 for pandas.factorize + np.add.at."""
    if is_unique(ids):  # already unique (a worker sends np.unique's sorted ids): nothing to sum
        return ids, grads
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    starts_new = s[1:] != s[:-1]
    if starts_new.all():
        return ids, grads
    starts = np.flatnonzero(np.concatenate(([True], starts_new)))
    return s[starts], np.add.reduceat(grads[order], starts, axis=0)

"""psserver.checkpoint: shard checkpoints written to and read from real files in tmp_path,
through a real psserver.shard.Shard (no network). Corruption is made by editing the files
the way a crash or a bad disk would."""
from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import struct
import threading

import numpy as np
import pytest
from google.protobuf import json_format
from safetensors.numpy import load_file, save_file

from shardps.pscommon import sharding
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import FailedPrecondition, Internal, Superseded
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.psserver import checkpoint
from shardps.psserver.checkpoint import KEEP, Checkpointer, CheckpointStore
from shardps.psserver.metrics import ShardCollector
from shardps.pscommon.tables import TableSpec
from shardps.psserver.embeddings import RowGrad, TableKey
from shardps.psserver.shard import Shard, WorkerView

F32 = tensor_pb2.DTYPE_FLOAT32
SHAPES = {"layer.weight": (40, 25), "layer.bias": (25,), "head.weight": (25, 3)}
WORKERS = (1, 2)
INCARNATION = 4


def _job(mode: str = "async") -> JobSpec:
    # slice_bytes at its minimum, so layer.weight (4000 bytes) is cut into several keys
    return JobSpec(mode=mode, optimizer=OptimizerConfig(kind="adam", lr=0.01), slice_bytes=1024)


def _job_json(job: JobSpec) -> dict:
    data = json_format.MessageToDict(job.to_proto())
    data.pop("version", None)
    return data


def _smap(job: JobSpec) -> sharding.ShardMap:
    return sharding.build([sharding.Param(n, F32, s) for n, s in SHAPES.items()], 1, job.slice_bytes)


def _fresh(job: JobSpec) -> Shard:
    shard = Shard(0, job)
    shard.set_view(1, [WorkerView(w, INCARNATION, True, 0) for w in WORKERS])
    return shard


def _declared(job: JobSpec) -> tuple[Shard, sharding.ShardMap]:
    smap = _smap(job)
    assert len(smap.keys_of_param("layer.weight")) > 1
    rng = np.random.default_rng(0)
    shard = _fresh(job)
    shard.declare(smap.fingerprint, smap.keys_of(0),
                  {k.key: rng.standard_normal(k.length).astype(np.float32) for k in smap.keys_of(0)})
    return shard, smap


def _grads(smap: sharding.ShardMap, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k.key: rng.standard_normal(k.length).astype(np.float32) for k in smap.keys_of(0)}


def _train(shard: Shard, smap: sharding.ShardMap, steps: range) -> None:
    """Every worker pushes each step (sync completes one step per round; async applies each)."""
    for step in steps:
        for w in WORKERS:
            _, dup, _ = shard.push(w, INCARNATION, step, shard.version, _grads(smap, step * 10 + w))
            assert not dup
            if shard.mode.name == "sync":   # the push reached every shard (this one): it counts
                shard.settle(w, INCARNATION, step + 1, timeout_s=1.0, wait=False)


def _state(shard: Shard) -> dict:
    """Everything a checkpoint must bring back, in comparable form."""
    return {
        "fingerprint": shard.fingerprint,
        "specs": {k: e.spec for k, e in shard.entries.items()},
        "values": {k: e.value.tobytes() for k, e in shard.entries.items()},
        "optimizer": {k: {n: a.tobytes() for n, a in e.state.items()} for k, e in shard.entries.items()},
        "versions": {k: e.version for k, e in shard.entries.items()},
        "shard_version": shard.version,
        "ledger": dict(shard.ledger),
        "completed_step": shard.gate.completed_step,
        "clocks": dict(shard.gate.clocks),
    }


def _store_and_writer(tmp_path, shard: Shard, job: JobSpec, now=None):
    store = CheckpointStore(tmp_path, 0)
    kwargs = {"now": now} if now else {}
    return store, Checkpointer(shard, store, _job_json(job), **kwargs)


# -- the round trip --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_write_latest_restore_round_trip(tmp_path, mode):
    job = _job(mode)
    shard, smap = _declared(job)
    _train(shard, smap, range(3))
    before = _state(shard)
    assert before["shard_version"] == (3 if mode == "sync" else 6)
    assert any(np.any(a != 0) for e in shard.entries.values() for a in e.state.values())  # adam moved
    if mode == "sync":
        assert before["completed_step"] == 3

    clock = [100.0]
    store, writer = _store_and_writer(tmp_path, shard, job, now=lambda: clock[0])
    assert writer.age_s() == -1.0 and writer.due()
    path = writer.write()
    assert path.name == "ckpt-00000001.json" and path.exists()
    assert writer.last_version == shard.version and not writer.due()
    clock[0] += 5.0
    assert writer.age_s() == 5.0

    snap = store.latest()
    assert snap is not None and snap.shard == 0 and snap.job == _job_json(job)
    restored = _fresh(job)
    restored.restore(snap)
    assert _state(restored) == before

    # the ledger came back: a retried push of the last step is a duplicate, not applied again
    version, dup, _ = restored.push(1, INCARNATION, 2, restored.version, _grads(smap, 999))
    assert dup and version == before["shard_version"] and _state(restored)["values"] == before["values"]
    # ... and an older incarnation of a known worker is refused
    with pytest.raises(FailedPrecondition):
        restored.push(1, INCARNATION - 1, 3, restored.version, _grads(smap, 999))

    # the restored shard continues exactly as the original would (same adam state and steps)
    _train(shard, smap, range(3, 5))
    _train(restored, smap, range(3, 5))
    assert _state(restored) == _state(shard)
    assert writer.due()


def test_a_newer_claim_fences_out_the_earlier_writer(tmp_path):
    """The successor's claim on the directory stops its predecessor's writes (a server cut off
    from the scheduler cannot hear it was replaced); the successor writes on, and a writer that
    never claimed (its claim failed) is unfenced, as it was before the fence."""
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(1))
    store, first = _store_and_writer(tmp_path, shard, job)
    first.claim(2)
    assert first.write().name == "ckpt-00000001.json"
    second = Checkpointer(_fresh(job), CheckpointStore(tmp_path, 0), _job_json(job))
    second.shard.restore(store.latest())
    second.claim(4)
    _train(shard, smap, range(1, 2))
    with pytest.raises(Superseded, match=r"claimed by a newer server \(incarnation 4"):
        first.write(final=True)
    assert first.superseded == 1 and first.failures == 0 and first.last_version != shard.version
    assert sorted(p.name for p in store.dir.glob("ckpt-*")) == ["ckpt-00000001.json", "ckpt-00000001.safetensors"]
    assert second.write().name == "ckpt-00000002.json"
    assert store.latest().shard_version == second.shard.version
    unfenced = Checkpointer(shard, store, _job_json(job))
    assert unfenced.write().name == "ckpt-00000003.json"


def test_restore_refuses_another_shards_checkpoint(tmp_path):
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(1))
    store, writer = _store_and_writer(tmp_path, shard, job)
    writer.write()
    other = Shard(1, job)
    with pytest.raises(FailedPrecondition, match="shard 0"):
        other.restore(store.latest())
    # the files of shard 0 are not even visible to shard 1's store
    assert CheckpointStore(tmp_path, 1).latest() is None


def test_sync_checkpoint_in_the_middle_of_a_step_keeps_the_pending_pushes(tmp_path):
    job = _job("sync")
    shard, smap = _declared(job)
    _train(shard, smap, range(2))
    shard.push(1, INCARNATION, 2, shard.version, _grads(smap, 21))   # worker 2 has not pushed yet
    store, writer = _store_and_writer(tmp_path, shard, job)
    writer.write()
    restored = _fresh(job)
    restored.restore(store.latest())
    # worker 1 retries (its reply was lost): acknowledged as a duplicate
    assert restored.push(1, INCARNATION, 2, restored.version, _grads(smap, 21))[1]
    # worker 2 pushes: step 2 completes with both contributions, as on the original shard
    shard.push(2, INCARNATION, 2, shard.version, _grads(smap, 22))
    restored.push(2, INCARNATION, 2, restored.version, _grads(smap, 22))
    assert restored.gate.completed_step == shard.gate.completed_step == 3
    assert _state(restored) == _state(shard)


# -- corruption ------------------------------------------------------------------------------
def _two_checkpoints(tmp_path):
    """Checkpoint 1 at one version, checkpoint 2 at a later one; returns (store, v1, state1)."""
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(2))
    store, writer = _store_and_writer(tmp_path, shard, job)
    writer.write()
    first = _state(shard)
    _train(shard, smap, range(2, 4))
    writer.write()
    assert store.load(2).shard_version == shard.version > first["shard_version"]
    return store, job, first


def _meta(store, seq):
    return json.loads((store.dir / f"ckpt-{seq:08d}.json").read_text())


def _set_meta(store, seq, meta):
    (store.dir / f"ckpt-{seq:08d}.json").write_text(json.dumps(meta))


def _truncate(store):
    p = store.dir / "ckpt-00000002.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(store):
    p = store.dir / "ckpt-00000002.safetensors"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x01                       # one bit of one parameter value
    p.write_bytes(bytes(data))


def _delete_tensors(store):
    (store.dir / "ckpt-00000002.safetensors").unlink()


def _garbage_json(store):
    (store.dir / "ckpt-00000002.json").write_bytes(b"\x00\x13{not json at all")


def _truncated_json(store):
    p = store.dir / "ckpt-00000002.json"
    p.write_text(p.read_text()[:-40])


def _wrong_format(store):
    _set_meta(store, 2, {**_meta(store, 2), "format": "someone-elses-checkpoint/9"})


def _wrong_shard(store):
    _set_meta(store, 2, {**_meta(store, 2), "shard": 3})


def _missing_field(store):
    meta = _meta(store, 2)
    del meta["ledger"]
    _set_meta(store, 2, meta)


def _not_safetensors(store):
    # a tensors file whose hash matches the sidecar but whose content is not safetensors
    p = store.dir / "ckpt-00000002.safetensors"
    p.write_bytes(b"\xff" * 64)
    _set_meta(store, 2, {**_meta(store, 2), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})


CORRUPTIONS = [
    (_truncate, r"ckpt-00000002\.safetensors is corrupt \(sha256 mismatch\)"),
    (_flip_byte, r"ckpt-00000002\.safetensors is corrupt \(sha256 mismatch\)"),
    (_delete_tensors, r"tensors file ckpt-00000002\.safetensors is missing"),
    (_garbage_json, r"ckpt-00000002\.json: unreadable"),
    (_truncated_json, r"ckpt-00000002\.json: unreadable"),
    (_wrong_format, r"unknown format 'someone-elses-checkpoint/9'"),
    (_wrong_shard, r"is of shard 3, not 0"),
    (_missing_field, r"ckpt-00000002\.json: missing field 'ledger'"),
    (_not_safetensors, r"ckpt-00000002\.safetensors cannot be parsed"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[c.__name__.strip("_") for c, _ in CORRUPTIONS])
def test_a_corrupt_newest_checkpoint_is_refused_and_the_previous_one_used(tmp_path, corrupt, message, caplog):
    store, job, first = _two_checkpoints(tmp_path)
    corrupt(store)
    with pytest.raises(FailedPrecondition, match=message):
        store.load(2)
    snap = store.latest()
    assert snap is not None and snap.shard_version == first["shard_version"]
    restored = _fresh(job)
    restored.restore(snap)
    assert _state(restored) == first
    assert any("ckpt-00000002" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.parametrize("body", ["[1, 2, 3]", "42"])
def test_a_sidecar_that_is_json_but_not_an_object_is_refused(tmp_path, body):
    store, _, first = _two_checkpoints(tmp_path)
    (store.dir / "ckpt-00000002.json").write_text(body)
    with pytest.raises(FailedPrecondition):
        store.load(2)
    assert store.latest().shard_version == first["shard_version"]


def test_when_every_checkpoint_is_corrupt_latest_is_none(tmp_path):
    store, _, _ = _two_checkpoints(tmp_path)
    _truncate(store)
    (store.dir / "ckpt-00000001.json").write_text("{")
    assert store.latest() is None


def test_writing_after_a_corrupt_checkpoint_moves_on(tmp_path):
    store, job, _ = _two_checkpoints(tmp_path)
    _flip_byte(store)
    shard, smap = _declared(job)
    _train(shard, smap, range(5))
    path = Checkpointer(shard, store, _job_json(job)).write()
    assert path.name == "ckpt-00000003.json"
    assert store.latest().shard_version == shard.version


def test_leftovers_of_a_crash_mid_write_are_never_loaded(tmp_path):
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(1))
    store, writer = _store_and_writer(tmp_path, shard, job)
    writer.write()
    good = _state(shard)
    good_tensors = (store.dir / "ckpt-00000001.safetensors").read_bytes()
    # a crash while writing checkpoint 9's tensors: only the temporary file exists
    (store.dir / ".ckpt-00000009.safetensors.tmp").write_bytes(good_tensors[:100])
    # a crash after the tensors were renamed but before the JSON was: no commit marker
    (store.dir / "ckpt-00000008.safetensors").write_bytes(good_tensors)
    # a crash while writing checkpoint 10's JSON
    (store.dir / ".ckpt-00000010.json.tmp").write_text(json.dumps(_meta(store, 1))[:50])
    snap = store.latest()
    assert snap is not None and snap.shard_version == good["shard_version"]
    restored = _fresh(job)
    restored.restore(snap)
    assert _state(restored) == good
    # the next checkpoint is numbered after the last committed one
    _train(shard, smap, range(1, 2))
    assert writer.write().name == "ckpt-00000002.json"
    assert store.latest().shard_version == shard.version


def test_only_keep_checkpoints_are_kept(tmp_path):
    job = _job()
    shard, smap = _declared(job)
    store, writer = _store_and_writer(tmp_path, shard, job)
    versions = []
    for step in range(KEEP + 3):
        _train(shard, smap, range(step, step + 1))
        writer.write()
        versions.append(shard.version)
    newest = list(range(4, KEEP + 4))
    assert sorted(p.name for p in store.dir.glob("ckpt-*.json")) == [f"ckpt-{s:08d}.json" for s in newest]
    assert sorted(p.name for p in store.dir.glob("ckpt-*.safetensors")) == \
        [f"ckpt-{s:08d}.safetensors" for s in newest]
    assert [store.load(s).shard_version for s in newest] == versions[-KEEP:]
    assert store.latest().shard_version == versions[-1]


def test_the_tensors_file_is_plain_safetensors_without_pickle(tmp_path):
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(2))
    store, writer = _store_and_writer(tmp_path, shard, job)
    json_path = writer.write()
    meta = json.loads(json_path.read_text())
    assert meta["format"] == checkpoint.FORMAT
    tensors_path = store.dir / meta["tensors_file"]
    raw = tensors_path.read_bytes()
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()

    # safetensors layout: u64 header length, a JSON header, then nothing but raw tensor bytes
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    header.pop("__metadata__", None)
    assert all(h["dtype"] == "F32" for h in header.values())
    data_bytes = sum(h["data_offsets"][1] - h["data_offsets"][0] for h in header.values())
    assert len(raw) == 8 + header_len + data_bytes
    assert b"\x80\x04\x95" not in raw[:8 + header_len] and b"numpy.core" not in raw

    loaded = load_file(str(tensors_path))
    expected = {}
    for key, e in shard.entries.items():
        expected[key] = e.value
        for name, arr in e.state.items():
            expected[f"{key}{checkpoint.STATE_SEP}{name}"] = arr
    assert set(loaded) == set(expected)
    assert {n.split(checkpoint.STATE_SEP)[1] for n in loaded if checkpoint.STATE_SEP in n} == \
        {"exp_avg", "exp_avg_sq"}
    for name, arr in expected.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], arr)


# -- the shard's lock is held for a copy, not for the write ------------------------------------
PROBE_TIMEOUT_S = 20.0   # only reached when the lock is (wrongly) held through the write


def test_the_shard_lock_is_free_while_the_tensors_file_is_written(tmp_path, monkeypatch):
    """A push started while the tensors file is being written finishes before the write does,
    and the checkpoint holds the state of the moment the copy was taken, not a torn mix."""
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(2))
    before = _state(shard)
    store, writer = _store_and_writer(tmp_path, shard, job)
    real_save = checkpoint.save_tensors
    seen = {}

    def probing_save(tensors, path):
        pushed = threading.Event()

        def push():
            shard.push(1, INCARNATION, 2, shard.version, _grads(smap, 77))
            pushed.set()
        threading.Thread(target=push, daemon=True).start()
        seen["push finished during the write"] = pushed.wait(PROBE_TIMEOUT_S)
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_tensors", probing_save)
    writer.write()
    assert seen == {"push finished during the write": True}
    assert shard.version == before["shard_version"] + 1
    snap = store.latest()
    assert snap.shard_version == before["shard_version"] == writer.last_version
    restored = _fresh(job)
    restored.restore(snap)
    assert _state(restored) == before
    assert writer.due()                     # the push that came during the write is not in it yet


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_snapshot_is_a_copy_that_later_pushes_do_not_change(mode):
    job = _job(mode)
    shard, smap = _declared(job)
    _train(shard, smap, range(2))
    shard.push(1, INCARNATION, 2, shard.version, _grads(smap, 21))   # sync: a step in progress
    before = _state(shard)
    snap = shard.snapshot({"mode": mode})
    frozen = {name: arr.copy() for name, arr in snap.tensors.items()}
    pending = [n for n in snap.tensors if n.endswith(checkpoint.STATE_SEP + checkpoint.PENDING)]
    assert bool(pending) == (mode == "sync")
    shard.push(2, INCARNATION, 2, shard.version, _grads(smap, 22))
    _train(shard, smap, range(3, 5))
    assert shard.version > before["shard_version"] == snap.shard_version
    for name, arr in snap.tensors.items():
        np.testing.assert_array_equal(arr, frozen[name])
        assert not any(np.shares_memory(arr, e.value) for e in shard.entries.values())
    for key, e in shard.entries.items():
        assert snap.tensors[key].tobytes() == before["values"][key]


# -- the sidecar's schema ------------------------------------------------------------------------
def _edit_meta(edit):
    def corrupt(store):
        meta = _meta(store, 2)
        edit(meta)
        _set_meta(store, 2, meta)
    corrupt.__name__ = edit.__name__
    return corrupt


def _edit_tensors(edit):
    """Rewrite checkpoint 2's tensors file (a real safetensors file) and its recorded hash,
    so only the consistency between the two can refuse it."""
    def corrupt(store):
        p = store.dir / "ckpt-00000002.safetensors"
        tensors = load_file(str(p))
        edit(tensors, _meta(store, 2))
        save_file(tensors, str(p))
        _set_meta(store, 2, {**_meta(store, 2), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    corrupt.__name__ = edit.__name__
    return corrupt


def _first_key(meta):
    return meta["keys"][0]["key"]


def _extra_field(m): m["written_by"] = "someone else"
def _extra_gate_field(m): m["gate"]["surprise"] = 1
def _extra_key_field(m): m["keys"][0]["color"] = "red"
def _string_int(m): m["shard_version"] = str(m["shard_version"])
def _bool_int(m): m["shard_version"] = True
def _float_seq(m): m["seq"] = 2.0
def _negative_version(m): m["versions"][_first_key(m)] = -1
def _version_of_unknown_key(m): m["versions"]["ghost"] = 1
def _key_without_version(m): del m["versions"][_first_key(m)]
def _version_above_shard(m): m["versions"][_first_key(m)] = m["shard_version"] + 1
def _short_ledger_entry(m): m["ledger"] = {"1": [INCARNATION]}
def _ledger_worker_not_a_number(m): m["ledger"] = {"w1": [INCARNATION, 1]}
def _clocks_not_an_object(m): m["gate"]["clocks"] = [1, 2]
def _keys_not_a_list(m): m["keys"] = {"a": 1}
def _tensors_file_elsewhere(m): m["tensors_file"] = "../shard-1/ckpt-00000002.safetensors"
def _seq_of_another_file(m): m["seq"] = 7
def _sha_not_hex(m): m["sha256"] = "not a hash"
def _key_length_not_the_tensors(m): m["keys"][0]["length"] -= 1
def _key_of_another_shard(m): m["keys"][0]["shard"] = 1
def _key_twice(m): m["keys"].append(dict(m["keys"][0]))
def _slice_past_its_param(m): m["keys"][0]["offset"] = 10 ** 6
def _job_not_an_object(m): m["job"] = "async"


def _values_missing(t, m): del t[_first_key(m)]
def _tensor_of_no_key(t, m): t["ghost"] = np.zeros(3, np.float32)
def _state_of_wrong_size(t, m): t[_first_key(m) + "::exp_avg"] = np.zeros(2, np.float32)
def _values_float64(t, m): t[_first_key(m)] = t[_first_key(m)].astype(np.float64)
def _state_missing_for_one_key(t, m): del t[_first_key(m) + "::exp_avg"]
def _values_two_dimensional(t, m): t[_first_key(m)] = t[_first_key(m)].reshape(1, -1)
def _pending_without_a_step(t, m): t[_first_key(m) + "::__pending"] = np.zeros_like(t[_first_key(m)])


SCHEMA_VIOLATIONS = [
    (_edit_meta(_extra_field), r"unknown field 'written_by'"),
    (_edit_meta(_extra_gate_field), r"unknown field 'gate\.surprise'"),
    (_edit_meta(_extra_key_field), r"unknown field 'keys\[0\]\.color'"),
    (_edit_meta(_string_int), r"'shard_version' must be an integer"),
    (_edit_meta(_bool_int), r"'shard_version' must be an integer"),
    (_edit_meta(_float_seq), r"'seq' must be an integer"),
    (_edit_meta(_negative_version), r"'versions\.[^']+' must be an integer >= 0"),
    (_edit_meta(_version_of_unknown_key), r"versions of keys it does not list: \['ghost'\]"),
    (_edit_meta(_key_without_version), r"no version for keys \["),
    (_edit_meta(_version_above_shard), r"above the shard version"),
    (_edit_meta(_short_ledger_entry), r"'ledger\.1' must be \[incarnation, last step\]"),
    (_edit_meta(_ledger_worker_not_a_number), r"'ledger' has a key 'w1' that is not a worker id"),
    (_edit_meta(_clocks_not_an_object), r"'gate\.clocks' must be an object"),
    (_edit_meta(_keys_not_a_list), r"'keys' must be a list"),
    (_edit_meta(_tensors_file_elsewhere), r"'tensors_file' must be 'ckpt-00000002\.safetensors'"),
    (_edit_meta(_seq_of_another_file), r"'seq' is 7 in ckpt-00000002\.json"),
    (_edit_meta(_sha_not_hex), r"'sha256' must be 64 hex digits"),
    (_edit_meta(_key_length_not_the_tensors), r"tensor '[^']+' has \d+ elements, its key spec says \d+"),
    (_edit_meta(_key_of_another_shard), r"belongs to shard 1"),
    (_edit_meta(_key_twice), r"listed twice"),
    (_edit_meta(_slice_past_its_param), r"runs past the end of its parameter"),
    (_edit_meta(_job_not_an_object), r"'job' must be an object"),
    (_edit_tensors(_values_missing), r"no tensor for key"),
    (_edit_tensors(_tensor_of_no_key), r"tensor 'ghost' belongs to no key"),
    (_edit_tensors(_state_of_wrong_size), r"tensor '[^']+::exp_avg' has 2 elements"),
    (_edit_tensors(_values_float64), r"is float64, not float32"),
    (_edit_tensors(_state_missing_for_one_key), r"optimizer state differs between keys"),
    (_edit_tensors(_values_two_dimensional), r"shape \(1, \d+\), not flat"),
    (_edit_tensors(_pending_without_a_step), r"pending sums but no step in progress"),
]


@pytest.mark.parametrize("corrupt, message", SCHEMA_VIOLATIONS, ids=[c.__name__.strip("_") for c, _ in SCHEMA_VIOLATIONS])
def test_a_sidecar_that_breaks_the_schema_is_refused_and_the_previous_one_used(tmp_path, corrupt, message):
    store, job, first = _two_checkpoints(tmp_path)
    corrupt(store)
    with pytest.raises(FailedPrecondition, match=message) as err:
        store.load(2)
    assert "ckpt-00000002" in str(err.value) and "\n" not in str(err.value)
    snap, refused = store.newest()
    assert snap.shard_version == first["shard_version"] and snap.path.endswith("ckpt-00000001.json")
    assert [(pathlib.Path(r.path).name, bool(re.search(message, r.why))) for r in refused] == \
        [("ckpt-00000002.json", True)]
    restored = _fresh(job)
    restored.restore(snap)
    assert _state(restored) == first


def test_an_untouched_checkpoint_passes_the_schema(tmp_path):
    store, _, _ = _two_checkpoints(tmp_path)
    snap, refused = store.newest()
    assert refused == [] and snap.path == str(store.dir / "ckpt-00000002.json")


# -- nothing readable: say so, file by file --------------------------------------------------
def test_when_every_checkpoint_is_unreadable_each_file_and_why_is_named(tmp_path):
    store, job, _ = _two_checkpoints(tmp_path)
    _truncate(store)
    (store.dir / "ckpt-00000001.json").write_text("{")
    snap, refused = store.newest()
    assert snap is None
    assert [pathlib.Path(r.path).name for r in refused] == ["ckpt-00000002.json", "ckpt-00000001.json"]
    assert "sha256 mismatch" in refused[0].why and "unreadable" in refused[1].why
    with pytest.raises(FailedPrecondition) as err:
        checkpoint.choose_restore(snap, refused, _job_json(job), start_empty_if_unreadable=False,
                                  where=store.dir)
    message = str(err.value)
    assert "\n" not in message
    assert re.search(r"ckpt-00000002\.json: .*sha256 mismatch.*ckpt-00000001\.json: .*unreadable", message)
    assert "--start-empty-if-unreadable" in message and str(store.dir) in message
    # the operator's explicit choice: start empty
    assert checkpoint.choose_restore(snap, refused, _job_json(job), start_empty_if_unreadable=True,
                                     where=store.dir) is None


def test_an_empty_directory_is_a_fresh_start_without_any_flag(tmp_path):
    store = CheckpointStore(tmp_path, 0)
    assert store.newest() == (None, [])
    assert checkpoint.choose_restore(None, [], {}, start_empty_if_unreadable=False, where=store.dir) is None


# -- another job's checkpoint: name every differing field ----------------------------------------
def test_job_differences_name_each_field_with_both_values():
    saved = {"mode": "MODE_SYNC", "numServers": 2, "optimizer": {"kind": "OPTIMIZER_KIND_ADAM", "lr": 0.01},
             "sliceBytes": "1024"}
    current = {"mode": "MODE_ASYNC", "numServers": 2, "optimizer": {"kind": "OPTIMIZER_KIND_ADAM", "lr": 0.5,
                                                                     "weightDecay": 0.1}, "sliceBytes": "1024"}
    assert checkpoint.job_differences(saved, current) == [
        ("mode", "MODE_SYNC", "MODE_ASYNC"),
        ("optimizer.lr", 0.01, 0.5),
        ("optimizer.weightDecay", checkpoint.UNSET, 0.1),
    ]
    assert checkpoint.job_differences(saved, saved) == []


def test_a_checkpoint_of_another_job_is_refused_naming_the_file_and_each_field(tmp_path):
    store, job, _ = _two_checkpoints(tmp_path)
    snap, refused = store.newest()
    other = _job_json(JobSpec(mode="sync", optimizer=OptimizerConfig(kind="adam", lr=0.5), slice_bytes=1024))
    with pytest.raises(FailedPrecondition) as err:
        checkpoint.choose_restore(snap, refused, other, start_empty_if_unreadable=True, where=store.dir)
    message = str(err.value)
    assert "ckpt-00000002.json" in message and "another job spec" in message and "\n" not in message
    assert "mode: checkpoint 'MODE_ASYNC', job 'MODE_SYNC'" in message
    assert "optimizer.lr: checkpoint 0.01, job 0.5" in message
    assert checkpoint.choose_restore(snap, refused, _job_json(job), start_empty_if_unreadable=False,
                                     where=store.dir) is snap


# -- a failed write: counted, typed, named, and the next one works -------------------------------
def _metric(collector, name):
    for family in collector.collect():
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def test_a_failed_write_is_counted_named_and_the_next_one_succeeds(tmp_path):
    job = _job()
    shard, smap = _declared(job)
    _train(shard, smap, range(2))
    store, writer = _store_and_writer(tmp_path, shard, job)
    writer.write()
    collector = ShardCollector(shard, writer)
    _train(shard, smap, range(2, 3))
    # the directory is gone and a file stands in its place: every write fails with ENOTDIR
    shutil.rmtree(store.dir)
    store.dir.write_text("not a directory")
    for attempt in (1, 2):
        with pytest.raises(Internal, match=r"Not a directory \[ENOTDIR\]") as err:
            writer.write()
        assert str(store.dir) in str(err.value)
        assert isinstance(err.value.__cause__, NotADirectoryError)
        assert writer.failures == attempt and writer.due()
    assert _metric(collector, "shardps_server_checkpoint_failures_total") == 2
    assert _metric(collector, "shardps_server_checkpoints_total") == 1
    store.dir.unlink()
    store.dir.mkdir()
    writer.write()
    assert not writer.due() and store.latest().shard_version == shard.version
    assert _metric(collector, "shardps_server_checkpoints_total") == 2
    assert _metric(collector, "shardps_server_checkpoint_failures_total") == 2


# -- embedding tables ------------------------------------------------------------------------
EMB = TableSpec("emb", 3, "normal", 0.1, 5)


def _with_rows(job: JobSpec) -> tuple[Shard, sharding.ShardMap]:
    """A declared shard with a table whose rows (and adam state) moved."""
    smap = _smap(job)
    shard = _fresh(job)
    shard.declare(smap.fingerprint, smap.keys_of(0), {k.key: np.zeros(k.length, np.float32) for k in smap.keys_of(0)},
                  [EMB])
    rng = np.random.default_rng(1)
    for step in range(3):
        ids = rng.integers(-50, 50, 20).astype(np.uint64)
        rows = {TableKey("emb"): RowGrad.of(ids, rng.standard_normal((20, 3)).astype(np.float32))}
        shard.push(1, INCARNATION, step, shard.version, {**_grads(smap, step), **rows})
    return shard, smap


def _rows(shard: Shard) -> dict:
    snap = shard.tables.stores["emb"].snapshot()
    order = np.argsort(snap.arrays["ids"])
    return {k: v[order].tolist() for k, v in snap.arrays.items()} | {"step": snap.meta["step"]}


def test_tables_round_trip_through_a_checkpoint(tmp_path):
    job = _job()
    shard, smap = _with_rows(job)
    store, writer = _store_and_writer(tmp_path, shard, job)
    path = writer.write()
    assert (path.parent / "ckpt-00000001.tables.safetensors").exists()
    restored = _fresh(job)
    restored.restore(store.latest())
    assert restored.tables.specs == {"emb": EMB} and _rows(restored) == _rows(shard)
    # the restored table continues exactly as the original (same rows, adam moments, step)
    ids = np.array([3, 7, 3], np.uint64)
    g = {TableKey("emb"): RowGrad.of(ids, np.ones((3, 3), np.float32))}
    for s in (shard, restored):
        s.push(1, INCARNATION, 3, s.version, {**_grads(smap, 3), **g})
    assert _rows(restored) == _rows(shard)


def test_a_corrupt_tables_file_refuses_its_checkpoint(tmp_path):
    job = _job()
    shard, _ = _with_rows(job)
    store, writer = _store_and_writer(tmp_path, shard, job)
    writer.write()
    writer.write()
    tables_file = store.dir / "ckpt-00000002.tables.safetensors"
    data = bytearray(tables_file.read_bytes())
    data[-1] ^= 0xFF
    tables_file.write_bytes(bytes(data))
    found, refused = store.newest()
    assert found.path.endswith("ckpt-00000001.json")
    assert "tables file ckpt-00000002.tables.safetensors is corrupt (sha256 mismatch)" in refused[0].why

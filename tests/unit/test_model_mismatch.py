"""A second model declared in a job is refused with a message a person can act on (issue 17):
one job trains one model, how the declared one differs, and how to start another job."""
from __future__ import annotations

import pytest

from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import FailedPrecondition, InvalidArgument
from shardps.pscommon.sharding import Param
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.scheduler.core import SchedulerCore

F32 = tensor_pb2.DTYPE_FLOAT32
MLP = [Param("0.weight", F32, (128, 64)), Param("0.bias", F32, (128,)),
       Param("2.weight", F32, (10, 128)), Param("2.bias", F32, (10,))]


def _refusal(declared: list[Param]) -> str:
    core = SchedulerCore(JobSpec(num_servers=2))
    first = core.declare_model(MLP)
    assert core.declare_model(list(MLP)) is first          # the same model again: fine
    with pytest.raises(FailedPrecondition) as err:
        core.declare_model(declared)
    assert core.shard_map is first                          # the job keeps its model
    return str(err.value)


def test_another_model_is_refused_saying_one_job_trains_one_model_and_how_to_start_another():
    cnn = [Param("0.weight", F32, (16, 1, 3, 3)), Param("0.bias", F32, (16,)),
           Param("4.weight", F32, (10, 256)), Param("4.bias", F32, (10,))]
    text = _refusal(cnn)
    assert text.startswith("this job trains one model, ") and " (4 parameters), and the model declared is another, " in text
    assert ("it has 4.weight [10, 256], 4.bias [10], which the job's has not; it lacks 2.weight [10, 128], "
            "2.bias [10]; 0.weight [16, 1, 3, 3] where the job's is [128, 64], 0.bias [16] where the job's is "
            "[128]. To train it, start a new job: a scheduler of its own (another port, not this job's "
            "--state-dir) and its own servers") in text


def test_the_same_parameters_in_another_order_are_another_model():
    assert ": the same parameters in another order. " in _refusal(list(reversed(MLP)))


def test_a_model_whose_tables_differ_is_another_model_and_the_refusal_names_the_tables():
    core = SchedulerCore(JobSpec(num_servers=2))
    ctr = TableSpec("ctr", 16, "normal", 0.01, 0)
    first = core.declare_model(MLP, [ctr])
    assert core.declare_model(list(MLP), [ctr]) is first
    with pytest.raises(FailedPrecondition) as err:
        core.declare_model(MLP, [TableSpec("ctr", 32, "normal", 0.01, 0), TableSpec("user", 8, "zeros", 0.0, 0)])
    text = str(err.value)
    assert " (4 parameters, 1 tables), and the model declared is another, " in text
    assert ("it has table user (dim 8, zeros 0, seed 0), which the job's has not; table ctr (dim 32, normal 0.01, "
            "seed 0) where the job's is table ctr (dim 16, normal 0.01, seed 0). To train it") in text
    with pytest.raises(FailedPrecondition, match="it lacks table ctr"):
        core.declare_model(MLP)   # the dense part alone is another model too
    assert core.shard_map is first


def test_a_job_of_tables_only_is_declared_and_nothing_at_all_is_refused():
    core = SchedulerCore(JobSpec(num_servers=2))
    with pytest.raises(InvalidArgument, match="no parameters and no embedding tables"):
        core.declare_model([])
    assert core.shard_map is None
    smap = core.declare_model([], [TableSpec("ctr", 16, "zeros", 0.0, 0)])
    assert smap.keys == () and [t.name for t in smap.tables] == ["ctr"]


def test_the_tables_survive_a_scheduler_restart_from_its_state_dir(tmp_path):
    tables = [TableSpec("ctr", 16, "normal", 0.01, 3), TableSpec("user", 8, "constant", -0.5, 0)]
    first = SchedulerCore(JobSpec(num_servers=2), str(tmp_path)).declare_model(MLP, tables)
    again = SchedulerCore(JobSpec(num_servers=2), str(tmp_path))
    assert again.shard_map == first and again.shard_map.tables == tuple(tables)
    assert again.declare_model(MLP, tables) is again.shard_map

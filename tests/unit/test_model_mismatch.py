"""A second model declared in a job is refused with a message a person can act on (issue 17):
one job trains one model, how the declared one differs, and how to start another job."""
from __future__ import annotations

import pytest

from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import FailedPrecondition
from shardps.pscommon.sharding import Param
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

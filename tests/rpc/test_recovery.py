"""A worker declared dead comes back by the error's type, never by its wording.

Every stale-incarnation refusal (the scheduler's heartbeat and data-lease checks, the shard's
caller check, the exactly-once ledger) raises StaleIncarnation. These tests rewrite every such
message to text that names nothing, evict a training worker, and check that PSClient still
rejoins and trains on, in every mode.
"""
import itertools

import grpc
import pytest
import torch

from shardps import PSClient
from shardps.pscommon import errors, grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2, scheduler_pb2_grpc
from shardps.worker import data, models

from .helpers import TIMEOUT_S, poll


@pytest.fixture
def renamed_messages(monkeypatch):
    """Every StaleIncarnation raised in this process says only 'message N'."""
    seen = []
    counter = itertools.count()
    original = errors.StaleIncarnation.__init__

    def renamed(self, message="", **metadata):
        text = f"message {next(counter)}"
        seen.append(message)
        original(self, text, **metadata)
    monkeypatch.setattr(errors.StaleIncarnation, "__init__", renamed)
    return seen


def train_step(model, ps, split, gen) -> bool:
    ps.pull()
    idx = torch.randint(len(split.x_train), (32,), generator=gen)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
    return ps.push()


def evict(address: str, me) -> None:
    """Leave on the worker's behalf (with its credential, as only it could): to the job it is
    now a departed member."""
    stub = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(address))
    stub.Leave(scheduler_pb2.LeaveRequest(role=scheduler_pb2.ROLE_WORKER, member_id=me.worker_id,
                                          incarnation=me.incarnation, credential=me.credential), timeout=TIMEOUT_S)


def evicted_and_known(c, ps) -> int:
    """Evict `ps`'s worker and wait until both shards refuse its incarnation."""
    first = ps.client.incarnation
    evict(c.address, ps.client.identity)
    poll(lambda: all(first <= srv.shard.dead.get(ps.worker_id, -1) for srv in c.servers),
         what="both shards to learn of the eviction")
    return first


@pytest.mark.parametrize("mode", ["async", "sync", "ssp"])
def test_an_evicted_worker_rejoins_whatever_the_messages_say(cluster, renamed_messages, mode):
    c = cluster(JobSpec(num_servers=2, mode=mode, staleness=2))
    split = data.digits()
    gen = torch.Generator().manual_seed(0)
    model = models.build("digits-mlp", seed=0)
    # without fusion: a fused push brings the next pull's values, so the eviction would be
    # met at the push, never at the pull this test walks through
    with PSClient.connect(c.address, model, name="evicted", fuse=False) as ps:
        for _ in range(3):
            assert train_step(model, ps, split, gen)
        # refused at the pull: rejoin, pull again, the step counts
        first = evicted_and_known(c, ps)
        assert train_step(model, ps, split, gen)
        second = ps.client.incarnation
        assert second > first
        # refused at the push (gradients computed, then evicted): rejoin, the step is skipped
        ps.pull()
        idx = torch.randint(len(split.x_train), (32,), generator=gen)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
        evicted_and_known(c, ps)
        assert ps.push() is False
        assert ps.client.incarnation > second
        assert all(train_step(model, ps, split, gen) for _ in range(2))
    assert len(renamed_messages) >= 2, "StaleIncarnation was not raised on both paths"
    assert sum(srv.shard.version for srv in c.servers) == 2 * (3 + 1 + 2)


def test_a_stale_refusal_reaches_the_client_as_its_type_with_the_member_named(cluster, renamed_messages):
    c = cluster(JobSpec(num_servers=1))
    model = models.build("digits-mlp", seed=0)
    with PSClient.connect(c.address, model, name="w") as ps:
        me = ps.client.identity
        evict(c.address, me)
        stub = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(c.address))
        req = scheduler_pb2.HeartbeatRequest(role=scheduler_pb2.ROLE_WORKER, member_id=me.worker_id,
                                             incarnation=me.incarnation, credential=me.credential)
        with pytest.raises(errors.StaleIncarnation) as exc:
            grpcutil.call(stub.Heartbeat, req, TIMEOUT_S)
        assert exc.value.metadata["member"] == str(me.worker_id)
        assert "rejoin" not in str(exc.value) and str(exc.value).startswith("message ")
        assert exc.value.__class__.code == grpc.StatusCode.FAILED_PRECONDITION

"""ssp(2) over real RPCs: randomized schedules of three workers' pulls and pushes, checked
against the clocks recorded at each pull's admission."""
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.psserver.shard import WorkerView

from .helpers import Background, LocalShard, declare, members, pull, push, shard_map, values

N = 2          # the staleness bound
WORKERS = 3
LR = 0.5
JOB = JobSpec(mode="ssp", staleness=N, optimizer=OptimizerConfig(kind="sgd", lr=LR))
SMAP = shard_map({"p": (3,)})
INIT = {"p": np.zeros(3, np.float32)}
GRADS = {k: {"p": np.array([1.0, 2.0, 4.0], np.float32) * (10 ** k)} for k in range(WORKERS)}


def prefix_values(log):
    """The parameters after each prefix of the push log (async apply, float32 like the shard)."""
    p = INIT["p"].copy()
    out = [p.copy()]
    for k in log:
        p -= np.float32(LR) * GRADS[k]["p"]
        out.append(p.copy())
    return out


class Driver:
    """Plays a schedule against one shard; a worker with a pull in flight does nothing else."""

    def __init__(self, srv):
        self.srv = srv
        self.clock = [0] * WORKERS
        self.log: list[int] = []           # worker of the i-th applied push
        self.pending: dict[int, tuple[int, Background]] = {}
        self.started = self.admitted = self.blocked = 0

    def admissible(self, step):
        return step - min(self.clock) <= N

    def do_push(self, k):
        reply = push(self.srv.stub, SMAP.fingerprint, GRADS[k], worker=k, step=self.clock[k])
        assert not reply.duplicate and reply.shard_version == len(self.log) + 1
        self.log.append(k)
        self.clock[k] += 1
        self.settle()

    def do_pull(self, k):
        step = self.clock[k]
        self.started += 1
        self.blocked += not self.admissible(step)
        self.pending[k] = (step, Background(pull, self.srv.stub, SMAP.fingerprint, worker=k, step=step))
        self.settle()

    def settle(self):
        """Every pending pull within the bound must proceed (deadline: the join timeout)."""
        for k, (step, bg) in list(self.pending.items()):
            if self.admissible(step):
                self.check(k, step, bg.join(timeout=30))
                del self.pending[k]

    def check(self, k, step, result):
        header, got, _ = result
        v = header.shard_version
        assert header.next_step == step
        assert v <= len(self.log)
        # the clocks when the shard admitted the pull: the first v pushes had been applied
        at_admission = [self.log[:v].count(w) for w in range(WORKERS)]
        assert step - min(at_admission) <= N, (
            f"worker {k} pulled step {step} with clocks {at_admission} (bound {N})")
        # the values read are those of some prefix at or after the admission
        prefixes = prefix_values(self.log)
        assert any(got["p"].tobytes() == prefixes[i].tobytes() for i in range(v, len(self.log) + 1))
        self.admitted += 1

    def finish(self):
        """Let the slowest worker push until every blocked pull has been admitted."""
        while self.pending:
            slowest = min((w for w in range(WORKERS) if w not in self.pending), key=lambda w: self.clock[w])
            self.do_push(slowest)


# one action: a worker pushes 0-4 steps in a row, then maybe pulls (bursts make workers drift apart)
actions = st.lists(st.tuples(st.integers(0, WORKERS - 1), st.integers(0, 4), st.booleans()),
                   min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=actions)
def test_ssp_pulls_never_exceed_the_bound_and_proceed_within_it(schedule):
    with LocalShard(JOB) as srv:
        declare(srv.stub, SMAP, INIT)
        srv.shard.set_view(1, members(range(WORKERS)))
        d = Driver(srv)
        for k, pushes, pulls in schedule:
            if k in d.pending:
                continue  # blocked on its pull
            for _ in range(pushes):
                d.do_push(k)
            if pulls:
                d.do_pull(k)
        d.finish()
        assert d.admitted == d.started
        event(f"blocked pulls: {min(d.blocked, 3)}{'+' if d.blocked >= 3 else ''}")
        final = values(srv.stub, SMAP.fingerprint)["p"]
        assert final.tobytes() == prefix_values(d.log)[-1].tobytes()


def test_a_fast_worker_blocks_beyond_the_bound(shard_server):
    srv = shard_server(JOB)
    declare(srv.stub, SMAP, INIT)
    srv.shard.set_view(1, members(range(WORKERS)))
    for step in range(N + 1):
        push(srv.stub, SMAP.fingerprint, GRADS[0], worker=0, step=step)
    # worker 0 at clock 3, the others at 0: 3 - 0 > 2
    with pytest.raises(grpc.RpcError) as err:
        pull(srv.stub, SMAP.fingerprint, worker=0, step=N + 1, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # within the bound it proceeds at once
    assert pull(srv.stub, SMAP.fingerprint, worker=0, step=N)[0].shard_version == N + 1


@pytest.mark.parametrize("how", ["dead", "absent"])
def test_slowest_worker_leaving_releases_a_blocked_pull(shard_server, how):
    srv = shard_server(JOB)
    fp = SMAP.fingerprint
    declare(srv.stub, SMAP, INIT)
    srv.shard.set_view(1, members(range(WORKERS)))
    for step in range(4):
        push(srv.stub, fp, GRADS[0], worker=0, step=step)
        push(srv.stub, fp, GRADS[1], worker=1, step=step)
    push(srv.stub, fp, GRADS[2], worker=2, step=0)
    # worker 0 at clock 4, the slowest (2) at 1: 4 - 1 > 2
    waiting = Background(pull, srv.stub, fp, worker=0, step=4)
    assert not waiting.done.wait(0.3), "pull beyond the staleness bound returned"
    gone = [WorkerView(2, 1, False, 1)] if how == "dead" else []
    srv.shard.set_view(2, members([0, 1]) + gone)
    header, _, _ = waiting.join()
    assert header.shard_version == 9 and header.next_step == 4

    # a joiner that starts at the slowest live clock does not hold the others back
    srv.shard.set_view(3, members([0, 1]) + gone + [WorkerView(3, 4, True, 3)])
    assert pull(srv.stub, fp, worker=0, step=5)[0].next_step == 5
    with pytest.raises(grpc.RpcError) as err:
        pull(srv.stub, fp, worker=0, step=6, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

"""sync (BSP) mode over real RPCs: a step's pushes are averaged and applied once; pulls for
the next step wait for it; membership changes release the barrier; late pushes are ABORTED."""
import grpc
import numpy as np
import pytest

from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.psserver.shard import WorkerView

from .helpers import Background, declare, members, poll, pull, push, shard_map, status, values

LR = 0.1
SHAPES = {"w": (2, 3), "b": (3,)}
STEPS = 20
WORKERS = 3


def const(worker):
    """A worker-specific constant in its gradient: workers really disagree."""
    return {"w": np.linspace(-1, 1, 6) * (worker + 1), "b": np.array([0.5, -0.25, 1.0]) * (worker - 1)}


def grad(worker, params):
    """A deterministic gradient that depends on the parameters it was computed on."""
    c = const(worker)
    return {k: (params[k].astype(np.float64) * 0.1 + c[k]).astype(np.float32) for k in params}


def reference_step(params, workers):
    """One BSP step in numpy (float64): average the workers' gradients, one SGD update."""
    gs = [grad(w, params) for w in workers]
    return {k: params[k].astype(np.float64) - LR * np.mean([g[k].astype(np.float64) for g in gs], axis=0)
            for k in params}


@pytest.fixture
def sync_shard(shard_server):
    srv = shard_server(JobSpec(mode="sync", optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    srv.smap = shard_map(SHAPES)
    srv.init = {"w": np.arange(6, dtype=np.float32) / 4 - 0.5, "b": np.array([1.0, -2.0, 0.5], np.float32)}
    declare(srv.stub, srv.smap, srv.init)
    srv.shard.set_view(1, members(range(WORKERS)))
    return srv


def test_three_workers_match_single_process_reference(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    ref = [dict(srv.init)]
    for _ in range(STEPS):
        ref.append(reference_step(ref[-1], range(WORKERS)))

    def worker(k):
        seen = []
        for t in range(STEPS):
            header, params, _ = pull(srv.stub, fp, worker=k, step=t)
            seen.append((header.shard_version, header.next_step, params))
            reply = push(srv.stub, fp, grad(k, params), worker=k, step=t, base_version=header.shard_version)
            assert not reply.duplicate
        return seen

    runs = [Background(worker, k) for k in range(WORKERS)]
    results = [r.join(timeout=120) for r in runs]
    for k, seen in enumerate(results):
        for t, (version, next_step, params) in enumerate(seen):
            # a pull for step t returns exactly the parameters after t complete steps
            assert (version, next_step) == (t, t), (k, t)
            for key in params:
                np.testing.assert_allclose(params[key], ref[t][key], rtol=1e-6, atol=1e-6,
                                           err_msg=f"worker {k} step {t} {key}")
    final = values(srv.stub, fp)
    for key in final:
        np.testing.assert_allclose(final[key], ref[STEPS][key], rtol=1e-6, atol=1e-6)
    st = status(srv.stub)
    assert (st.completed_step, st.shard_version, st.pushes, st.duplicates) == (STEPS, STEPS, STEPS * 3, 0)
    assert dict(st.clocks) == {k: STEPS for k in range(WORKERS)}
    assert {k: e.version for k, e in srv.shard.entries.items()} == {"w": STEPS, "b": STEPS}


def _push_step0(srv, workers):
    fp = srv.smap.fingerprint
    for k in workers:
        reply = push(srv.stub, fp, grad(k, srv.init), worker=k, step=0)
        assert not reply.duplicate


def test_pull_for_next_step_waits_until_the_step_completes(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    _push_step0(srv, [0, 1])
    waiting = Background(pull, srv.stub, fp, worker=0, step=1)
    assert not waiting.done.wait(0.5), "pull for step 1 returned while step 0 lacked a push"
    assert values(srv.stub, fp)["w"].tobytes() == srv.init["w"].tobytes()  # nothing applied yet
    _push_step0(srv, [2])
    header, params, _ = waiting.join()
    assert (header.shard_version, header.next_step) == (1, 1)
    ref = reference_step(srv.init, range(3))
    for key in params:
        np.testing.assert_allclose(params[key], ref[key], rtol=1e-6, atol=1e-6)
    assert status(srv.stub).completed_step == 1


def test_pull_that_cannot_proceed_gets_deadline_exceeded(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    _push_step0(srv, [0, 1])
    pulls = status(srv.stub).pulls
    with pytest.raises(grpc.RpcError) as err:
        pull(srv.stub, fp, worker=0, step=1, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    st = status(srv.stub)
    assert (st.completed_step, st.pulls) == (0, pulls)
    # the step still completes normally afterwards
    _push_step0(srv, [2])
    assert pull(srv.stub, fp, worker=0, step=1)[0].shard_version == 1


def test_worker_removed_mid_step_releases_the_barrier(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    _push_step0(srv, [0, 1])
    waiting = Background(pull, srv.stub, fp, worker=0, step=1)
    assert not waiting.done.wait(0.3)
    # worker 2's lease expired: the scheduler's next view marks it dead
    srv.shard.set_view(2, members([0, 1]) + [WorkerView(2, 1, False, 0)])
    header, params, _ = waiting.join()
    assert header.shard_version == 1
    ref = reference_step(srv.init, [0, 1])  # the average of the two that pushed
    for key in params:
        np.testing.assert_allclose(params[key], ref[key], rtol=1e-6, atol=1e-6)
    # the dead incarnation is refused; step 1 needs only the live workers
    with pytest.raises(grpc.RpcError) as err:
        push(srv.stub, fp, grad(2, srv.init), worker=2, incarnation=1, step=0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for k in (0, 1):
        push(srv.stub, fp, grad(k, params), worker=k, step=1, base_version=1)
    assert pull(srv.stub, fp, worker=1, step=2)[0].shard_version == 2


def test_late_push_after_step_completed_is_aborted(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    _push_step0(srv, [0, 1])
    srv.shard.set_view(2, members([0, 1]) + [WorkerView(2, 1, False, 0)])  # step 0 completes without 2
    # worker 2 comes back under a new incarnation and sends the step-0 gradient it computed
    srv.shard.set_view(3, members([0, 1]) + [WorkerView(2, 2, True, 1)])
    before = values(srv.stub, fp)
    with pytest.raises(grpc.RpcError) as err:
        push(srv.stub, fp, grad(2, srv.init), worker=2, incarnation=2, step=0)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "pull again" in err.value.details()
    after = values(srv.stub, fp)
    assert all(after[k].tobytes() == before[k].tobytes() for k in before)
    st = status(srv.stub)
    assert (st.completed_step, st.shard_version, st.pushes) == (1, 1, 2)

    # it pulls again, learns the step in progress, and takes part in it
    header, params, _ = pull(srv.stub, fp, worker=2, incarnation=2, step=0)
    assert header.next_step == 1
    for k in (0, 1):
        push(srv.stub, fp, grad(k, params), worker=k, step=1, base_version=1)
    assert status(srv.stub).completed_step == 1  # still waiting for the rejoined worker
    push(srv.stub, fp, grad(2, params), worker=2, incarnation=2, step=1, base_version=1)
    ref = reference_step(reference_step(srv.init, [0, 1]), [0, 1, 2])
    got = values(srv.stub, fp)
    for key in got:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-6)


def test_push_ahead_of_the_step_in_progress_is_refused(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    for w in range(WORKERS):   # step 0 completes: the shard is past its start and not behind
        push(srv.stub, fp, grad(w, srv.init), worker=w, step=0)
    with pytest.raises(grpc.RpcError) as err:
        push(srv.stub, fp, grad(0, srv.init), worker=0, step=2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    st = status(srv.stub)
    assert (st.pushes, st.completed_step, st.rebases) == (WORKERS, 1, 0)
    # the refusal left no ledger entry: step 1 from worker 0 is still taken
    assert not push(srv.stub, fp, grad(0, srv.init), worker=0, step=1).duplicate


def test_a_restarted_shard_takes_the_step_the_workers_push(sync_shard):
    # a fresh shard stands for one restored from an older checkpoint: the workers are at
    # step 5 and their pushes move the shard there, where a shard in its normal course
    # refuses them (above)
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    for w in range(WORKERS):
        assert not push(srv.stub, fp, grad(w, srv.init), worker=w, step=5).duplicate
    st = status(srv.stub)
    assert (st.completed_step, st.rebases) == (6, 1)
    ref = reference_step(srv.init, range(WORKERS))
    got = values(srv.stub, fp)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_a_drain_releases_pulls_waiting_at_the_gate_with_unavailable(sync_shard):
    # worker 0 pushed step 0 and waits to pull step 1 (workers 1 and 2 have not pushed); the
    # server starts draining: the pull gets UNAVAILABLE at once (retried at the shard's next
    # server), not CANCELLED when the drain's grace period ends
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    push(srv.stub, fp, grad(0, srv.init), worker=0, step=0)
    waiting = Background(lambda: pull(srv.stub, fp, worker=0, step=1, timeout=60))
    poll(lambda: srv.shard.waiting_pulls == 1, what="the pull to wait at the gate")
    assert not waiting.done.is_set()
    srv.shard.close_gates()
    with pytest.raises(grpc.RpcError) as err:
        waiting.join(30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    assert status(srv.stub).completed_step == 0     # nothing changed

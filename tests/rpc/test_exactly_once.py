"""Exactly once: every push is sent twice; each (worker, step) is applied once, retries are
acknowledged as duplicates, and an old incarnation is refused."""
import grpc
import numpy as np
import pytest

from shardps.pscommon.config import JobSpec, OptimizerConfig

from .helpers import Background, declare, members, pull, push, shard_map, status, values

LR = 0.05
SMAP = shard_map({"w": (8,), "b": (2,)})
INIT = {"w": np.linspace(-1, 1, 8).astype(np.float32), "b": np.array([0.3, -0.7], np.float32)}


def grad(worker, step, params):
    """Depends on the parameters (so applying twice, or out of order, shows)."""
    return {k: (params[k] * np.float32(0.5) + np.float32(worker + 1) * np.float32(0.01 * (step + 1))
                ).astype(np.float32) for k in params}


def sgd(params, g):
    return {k: params[k] - np.float32(LR) * g[k] for k in params}


@pytest.fixture
def srv(shard_server):
    s = shard_server(JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    declare(s.stub, SMAP, INIT)
    return s


def test_async_every_push_twice_is_applied_once(srv):
    fp = SMAP.fingerprint
    ref = dict(INIT)
    applied = 0
    deferred = []  # retries sent only after another worker's push came in between
    schedule = [(w, s) for s in range(6) for w in (0, 1, 2)]
    for i, (w, s) in enumerate(schedule):
        _, params, _ = pull(srv.stub, fp, worker=w, step=s)
        g = grad(w, s, params)
        first = push(srv.stub, fp, g, worker=w, step=s, base_version=applied)
        assert not first.duplicate
        applied += 1
        ref = sgd(ref, g)
        for args in deferred:
            late = push(srv.stub, fp, *args)
            assert late.duplicate and late.shard_version == applied
        deferred = []
        if i % 2:
            deferred.append((g, w, 1, s))
        else:
            retry = push(srv.stub, fp, g, worker=w, step=s)
            assert retry.duplicate and retry.shard_version == applied
    for args in deferred:
        assert push(srv.stub, fp, *args).duplicate
    got = values(srv.stub, fp)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)
    st = status(srv.stub)
    n = len(schedule)
    assert (st.pushes, st.shard_version, st.duplicates) == (n, n, n)
    assert dict(st.clocks) == {0: 6, 1: 6, 2: 6}
    assert {k: e.version for k, e in srv.shard.entries.items()} == {"w": n, "b": n}


def test_retry_of_an_older_step_is_a_duplicate(srv):
    fp = SMAP.fingerprint
    g0, g1 = grad(0, 0, INIT), grad(0, 1, INIT)
    push(srv.stub, fp, g0, worker=0, step=0)
    push(srv.stub, fp, g1, worker=0, step=1)
    push(srv.stub, fp, grad(1, 0, INIT), worker=1, step=0)
    before = values(srv.stub, fp)
    for step, g in ((0, g0), (1, g1)):
        assert push(srv.stub, fp, g, worker=0, step=step).duplicate
    assert push(srv.stub, fp, grad(1, 0, INIT), worker=1, step=0).duplicate
    after = values(srv.stub, fp)
    assert all(after[k].tobytes() == before[k].tobytes() for k in after)
    st = status(srv.stub)
    assert (st.pushes, st.duplicates, st.shard_version) == (3, 3, 3)


def test_concurrent_copies_of_one_push_apply_once(srv):
    fp = SMAP.fingerprint
    g = grad(4, 0, INIT)
    copies = [Background(push, srv.stub, fp, g, worker=4, step=0) for _ in range(6)]
    replies = [c.join() for c in copies]
    assert sorted(r.duplicate for r in replies) == [False] + [True] * 5
    assert all(r.shard_version == 1 for r in replies)
    got = values(srv.stub, fp)
    ref = sgd(INIT, g)
    for k in got:
        np.testing.assert_array_equal(got[k], ref[k])


def test_sync_every_push_twice_matches_once_only_reference(shard_server):
    srv = shard_server(JobSpec(mode="sync", optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    fp = SMAP.fingerprint
    declare(srv.stub, SMAP, INIT)
    srv.shard.set_view(1, members(range(3)))
    ref = {k: v.astype(np.float64) for k, v in INIT.items()}
    steps = 5

    def worker(k):
        for t in range(steps):
            header, params, _ = pull(srv.stub, fp, worker=k, step=t)
            g = grad(k, t, params)
            a = push(srv.stub, fp, g, worker=k, step=t, base_version=header.shard_version)
            b = push(srv.stub, fp, g, worker=k, step=t, base_version=header.shard_version)
            assert (a.duplicate, b.duplicate) == (False, True)

    runs = [Background(worker, k) for k in range(3)]
    for r in runs:
        r.join(timeout=120)
    for t in range(steps):
        p32 = {k: v.astype(np.float32) for k, v in ref.items()}
        avg = {k: np.mean([grad(w, t, p32)[k].astype(np.float64) for w in range(3)], axis=0) for k in ref}
        ref = {k: ref[k] - LR * avg[k] for k in ref}
    got = values(srv.stub, fp)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)
    st = status(srv.stub)
    assert (st.pushes, st.duplicates, st.completed_step, st.shard_version) == (15, 15, steps, steps)


def test_old_incarnation_is_failed_precondition(srv):
    fp = SMAP.fingerprint
    push(srv.stub, fp, grad(0, 0, INIT), worker=0, incarnation=1, step=0)
    # worker 0 restarted: its new incarnation starts over at step 0
    reply = push(srv.stub, fp, grad(0, 0, INIT), worker=0, incarnation=2, step=0)
    assert not reply.duplicate and reply.shard_version == 2
    before = values(srv.stub, fp)
    for step in (0, 1, 5):  # a retry, and fresh steps, from the old process
        with pytest.raises(grpc.RpcError) as err:
            push(srv.stub, fp, grad(0, step, INIT), worker=0, incarnation=1, step=step)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "incarnation 1" in err.value.details()
    after = values(srv.stub, fp)
    assert all(after[k].tobytes() == before[k].tobytes() for k in after)
    st = status(srv.stub)
    assert (st.pushes, st.duplicates, st.shard_version) == (2, 0, 2)
    # the current incarnation goes on; another worker is unaffected
    assert not push(srv.stub, fp, grad(0, 1, INIT), worker=0, incarnation=2, step=1).duplicate
    assert not push(srv.stub, fp, grad(1, 0, INIT), worker=1, incarnation=1, step=0).duplicate


def test_old_incarnation_pull_is_refused_once_the_view_moved_on(srv):
    fp = SMAP.fingerprint
    srv.shard.set_view(1, members([0], incarnation=1))
    pull(srv.stub, fp, worker=0, incarnation=1, step=0)
    srv.shard.set_view(2, members([0], incarnation=2))
    with pytest.raises(grpc.RpcError) as err:
        pull(srv.stub, fp, worker=0, incarnation=1, step=0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert pull(srv.stub, fp, worker=0, incarnation=2, step=0)[0].shard_version == 0

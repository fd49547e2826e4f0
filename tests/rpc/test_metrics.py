"""Prometheus metrics of every daemon, scraped over real HTTP from real in-process daemons
(scheduler, server, and a worker's ShardClient with the worker's collector), parsed with
prometheus_client's own text parser, and checked to move with the traffic the test makes."""
from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardps.pscommon import grpcutil
from shardps.pscommon.config import CodecConfig, JobSpec
from shardps.pscommon.lifecycle import DaemonOptions, Telemetry
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2 as pb, scheduler_pb2_grpc
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient
from shardps.worker.metrics import WorkerCollector

from .helpers import TIMEOUT_S, poll

METRICS = DaemonOptions(metrics_port=0, metrics_host="127.0.0.1")
SHAPES = {"w": (64, 48), "b": (48,)}          # w is 12 KiB: above small_tensor_bytes
ELEMENTS = sum(int(np.prod(s)) for s in SHAPES.values())


# -- scraping --------------------------------------------------------------------------------
def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, sample_name: str | None = None, **labels) -> float:
    """The one sample of `family` named `sample_name` (default: the family's own value sample)
    whose labels include `labels`."""
    fam = fams[family]
    if sample_name is None:
        sample_name = family + ("_total" if fam.type == "counter" else "")
    hits = [s.value for s in fam.samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, f"{sample_name}{labels}: {len(hits)} samples in {fam.samples}"
    return hits[0]


def hist_count(fams: dict, family: str, **labels) -> float:
    return sample(fams, family, family + "_count", **labels)


def rpc_count(fams: dict, role: str, method: str) -> float:
    fam = fams["shardps_rpc_duration_seconds"]
    return sum(s.value for s in fam.samples if s.name == "shardps_rpc_duration_seconds_count"
               and s.labels["role"] == role and s.labels["method"] == method and s.labels["code"] == "OK")


def assert_types(fams: dict, expected: dict[str, str]) -> None:
    for name, kind in expected.items():
        assert name in fams, f"missing metric family {name}; have {sorted(fams)}"
        assert fams[name].type == kind, f"{name} is a {fams[name].type}, expected a {kind}"


# -- an in-process cluster with metrics on ---------------------------------------------------
class Worker:
    """A worker's ShardClient plus the worker role's Prometheus collector (as worker.train wires
    them), on numpy parameters."""

    def __init__(self, scheduler: str, name: str, push_codec: CodecConfig | None = None):
        # one Pull stream per shard, so the server's per-RPC pull counters equal the pulls made
        self.client = ShardClient(ClientConfig(scheduler=scheduler, name=name, push_codec=push_codec,
                                               retry_deadline_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S,
                                               pull_streams=1))
        self.client.join()
        self.client.wait_for_servers()
        rng = np.random.default_rng(0)
        self.client.declare({n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()})
        self.weights = {n: np.zeros(int(np.prod(s)), np.float32) for n, s in SHAPES.items()}
        self.telemetry = Telemetry(METRICS, "worker")
        self.telemetry.start(WorkerCollector(self.client))
        self.pulls = self.pushes = 0
        self.left = False

    def pull(self):
        self.client.pull(self.weights)
        self.pulls += 1

    def push(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.client.push({n: rng.standard_normal(a.size).astype(np.float32) * 0.01
                          for n, a in self.weights.items()})
        self.pushes += 1

    def leave(self):
        if not self.left:
            self.left = True
            self.client.leave()

    def close(self):
        self.leave()
        self.telemetry.stop()


class Metered:
    def __init__(self, job: JobSpec, tmp_path):
        self.job = job
        self.scheduler = SchedulerProcess(SchedulerConfig(job=job, options=METRICS))
        self.scheduler.start()
        self.address = self.scheduler.address
        self.servers: list[ServerProcess] = []
        self.workers: list[Worker] = []
        for shard in range(job.num_servers):
            srv = ServerProcess(ServerConfig(scheduler=self.address, shard_id=shard, options=METRICS,
                                             checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=3600))
            srv.start()
            self.servers.append(srv)
        self.channels = [grpcutil.channel(s.address) for s in self.servers]
        self.stubs = [ps_pb2_grpc.ParameterServerStub(c) for c in self.channels]
        self.sched_channel = grpcutil.channel(self.address)
        self.sched_stub = scheduler_pb2_grpc.SchedulerStub(self.sched_channel)

    def worker(self, name: str, **kw) -> Worker:
        w = Worker(self.address, name, **kw)
        self.workers.append(w)
        return w

    def server_metrics(self, i: int = 0) -> dict:
        return scrape(self.servers[i].telemetry.port)

    def scheduler_metrics(self) -> dict:
        return scrape(self.scheduler.telemetry.port)

    def close(self):
        for w in self.workers:
            w.close()
        for c in self.channels + [self.sched_channel]:
            c.close()
        for s in self.servers:
            s.drain()
        self.scheduler.drain()


@pytest.fixture
def metered(tmp_path):
    made = []

    def make(job: JobSpec | None = None):
        m = Metered(job or JobSpec(), tmp_path / f"c{len(made)}")
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


SERVER_FAMILIES = {
    "shardps_server_pushes": "counter",
    "shardps_server_pulls": "counter",
    "shardps_server_duplicate_pushes": "counter",
    "shardps_server_updates_applied": "counter",
    "shardps_server_push_bytes": "counter",
    "shardps_server_pull_bytes": "counter",
    "shardps_server_codec_seconds": "counter",
    "shardps_server_staleness": "histogram",
    "shardps_server_pull_wait_seconds": "histogram",
    "shardps_server_live_workers": "gauge",
    "shardps_server_membership_view": "gauge",
    "shardps_server_parameter_bytes": "gauge",
    "shardps_server_optimizer_state_bytes": "gauge",
    "shardps_server_checkpoint_age_seconds": "gauge",
    "shardps_server_step_rebases": "counter",
    "shardps_server_reseeded_from_version": "gauge",
}
SCHEDULER_FAMILIES = {
    "shardps_scheduler_members": "gauge",
    "shardps_scheduler_membership_view": "gauge",
    "shardps_scheduler_data_partitions": "gauge",
    "shardps_scheduler_data_epoch": "gauge",
    "shardps_rpc_duration_seconds": "histogram",
}
WORKER_FAMILIES = {
    "shardps_worker_bytes": "counter",
    "shardps_worker_encode_seconds": "counter",
    "shardps_worker_decode_seconds": "counter",
    "shardps_worker_clock": "gauge",
    "shardps_worker_membership_view": "gauge",
}


# -- the server ------------------------------------------------------------------------------
def test_server_metrics_follow_an_async_run(metered):
    c = metered(JobSpec(mode="async"))
    before = c.server_metrics()
    assert_types(before, SERVER_FAMILIES)
    assert sample(before, "shardps_server_pushes", shard="0") == 0
    assert sample(before, "shardps_server_updates_applied", shard="0") == 0
    assert sample(before, "shardps_server_checkpoint_age_seconds", shard="0") == -1
    assert sample(before, "shardps_server_reseeded_from_version", shard="0") == -1
    assert sample(before, "shardps_server_step_rebases", shard="0") == 0
    assert hist_count(before, "shardps_server_staleness", shard="0") == 0
    assert sample(before, "shardps_server_codec_seconds", shard="0", direction="push") == 0

    bf16 = CodecConfig("bf16")
    a, b = c.worker("a", push_codec=bf16), c.worker("b", push_codec=bf16)
    rounds = 4
    for r in range(rounds):
        a.pull()
        b.pull()
        a.push(seed=2 * r)
        b.push(seed=2 * r + 1)      # computed on the version before a's push: staleness 1

    m = c.server_metrics()
    pushes = a.pushes + b.pushes
    assert sample(m, "shardps_server_pushes", shard="0") == pushes == 2 * rounds
    assert sample(m, "shardps_server_updates_applied", shard="0") == pushes       # async: one each
    assert sample(m, "shardps_server_duplicate_pushes", shard="0") == 0
    # staleness: one observation per applied push; a is never stale, b always by one update
    assert hist_count(m, "shardps_server_staleness", shard="0") == pushes
    assert sample(m, "shardps_server_staleness", "shardps_server_staleness_sum", shard="0") == rounds
    assert hist_count(m, "shardps_server_pull_wait_seconds", shard="0") == 0       # async: no gate

    # push bytes: logical is fp32, the wire carries bf16 (half); both match what the workers sent
    logical = sample(m, "shardps_server_push_bytes", shard="0", kind="logical")
    wire = sample(m, "shardps_server_push_bytes", shard="0", kind="wire")
    assert logical == pushes * ELEMENTS * 4
    # w goes as bf16 (2 bytes an element); b is at most small_tensor_bytes and goes raw
    assert wire == pushes * (SHAPES["w"][0] * SHAPES["w"][1] * 2 + SHAPES["b"][0] * 4)
    assert 0 < wire < logical
    # decoding those pushes and encoding the pulls took measurable time on the server
    assert sample(m, "shardps_server_codec_seconds", shard="0", direction="push") > 0
    assert sample(m, "shardps_server_codec_seconds", shard="0", direction="pull") > 0
    wa, wb = scrape(a.telemetry.port), scrape(b.telemetry.port)
    assert logical == sum(sample(x, "shardps_worker_bytes", direction="sent", kind="logical") for x in (wa, wb))
    assert wire == sum(sample(x, "shardps_worker_bytes", direction="sent", kind="wire") for x in (wa, wb))
    # pulls are fp32: wire == logical
    pulls = a.pulls + b.pulls
    assert sample(m, "shardps_server_pulls", shard="0") == pulls
    assert sample(m, "shardps_server_pull_bytes", shard="0", kind="logical") == pulls * ELEMENTS * 4
    assert sample(m, "shardps_server_pull_bytes", shard="0", kind="wire") == pulls * ELEMENTS * 4

    # RPC latency histogram: one observation per call, by method; a model this small moves in
    # one message each way (PullBatch, PushBatch), never as a stream
    assert rpc_count(m, "server", "PushBatch") == pushes and rpc_count(m, "server", "Push") == 0
    assert rpc_count(m, "server", "PullBatch") == pulls and rpc_count(m, "server", "Pull") == 0
    assert rpc_count(m, "server", "Declare") == 2
    assert sample(m, "shardps_rpc_duration_seconds", "shardps_rpc_duration_seconds_sum",
                  role="server", method="PushBatch", code="OK") > 0

    assert sample(m, "shardps_server_parameter_bytes", shard="0") == ELEMENTS * 4
    assert sample(m, "shardps_server_optimizer_state_bytes", shard="0") == 0      # plain sgd
    poll(lambda: sample(c.server_metrics(), "shardps_server_live_workers", shard="0") == 2,
         what="the shard to see both workers")
    assert sample(c.server_metrics(), "shardps_server_membership_view", shard="0") >= 3

    # the checkpoint age appears once there is a checkpoint
    assert sample(m, "shardps_server_checkpoint_age_seconds", shard="0") == -1
    reply = c.stubs[0].Checkpoint(ps_pb2.CheckpointRequest(), timeout=TIMEOUT_S)
    assert reply.shard_version == pushes
    age = sample(c.server_metrics(), "shardps_server_checkpoint_age_seconds", shard="0")
    assert 0 <= age < 3600


@pytest.mark.parametrize("mode, staleness", [("sync", 0), ("ssp", 1)])
def test_pull_wait_histogram_counts_gated_pulls(metered, mode, staleness):
    c = metered(JobSpec(mode=mode, staleness=staleness))
    w = c.worker("only")
    assert hist_count(c.server_metrics(), "shardps_server_pull_wait_seconds", shard="0") == 0
    for step in range(3):
        w.pull()
        w.push(seed=step)
    w.pull()
    m = c.server_metrics()
    assert hist_count(m, "shardps_server_pull_wait_seconds", shard="0") == w.pulls == 4
    assert sample(m, "shardps_server_updates_applied", shard="0") == 3
    # staleness is measured for pushes applied on arrival (ssp), not for sync's averaged steps
    assert hist_count(m, "shardps_server_staleness", shard="0") == (3 if mode == "ssp" else 0)
    # an observer's pull (operators) is not gated and not counted as waiting
    c.stubs[0].Pull(ps_pb2.PullRequest(caller=ps_pb2.Caller(observer=True), shard=0,
                                       model_fingerprint=w.client.shard_map.fingerprint), timeout=TIMEOUT_S)
    assert hist_count(c.server_metrics(), "shardps_server_pull_wait_seconds", shard="0") == 4


def test_two_shards_each_count_their_own_traffic(metered):
    c = metered(JobSpec(num_servers=2, slice_bytes=4096))
    w = c.worker("a")
    for step in range(2):
        w.push(seed=step)
        w.pull()
    per_shard = [c.server_metrics(i) for i in range(2)]
    assert [sample(m, "shardps_server_pushes", shard=str(i)) for i, m in enumerate(per_shard)] == [2, 2]
    logical = [sample(m, "shardps_server_push_bytes", shard=str(i), kind="logical")
               for i, m in enumerate(per_shard)]
    assert all(x > 0 for x in logical) and sum(logical) == 2 * ELEMENTS * 4
    params = [sample(m, "shardps_server_parameter_bytes", shard=str(i)) for i, m in enumerate(per_shard)]
    assert all(p > 0 for p in params) and sum(params) == ELEMENTS * 4


# -- the scheduler ---------------------------------------------------------------------------
def test_scheduler_metrics_follow_membership(metered):
    c = metered(JobSpec(heartbeat_timeout_s=5.0))
    m0 = c.scheduler_metrics()
    assert_types(m0, SCHEDULER_FAMILIES)
    assert sample(m0, "shardps_scheduler_members", role="server", state="alive") == 1
    assert sample(m0, "shardps_scheduler_members", role="worker", state="alive") == 0
    view0 = sample(m0, "shardps_scheduler_membership_view")

    a, b = c.worker("a"), c.worker("b")
    m1 = c.scheduler_metrics()
    assert sample(m1, "shardps_scheduler_members", role="worker", state="alive") == 2
    view1 = sample(m1, "shardps_scheduler_membership_view")
    assert view1 >= view0 + 2
    assert rpc_count(m1, "scheduler", "JoinWorker") == 2
    assert rpc_count(m1, "scheduler", "RegisterServer") == 1

    b.leave()
    m2 = c.scheduler_metrics()
    assert sample(m2, "shardps_scheduler_members", role="worker", state="alive") == 1
    assert sample(m2, "shardps_scheduler_members", role="worker", state="left") == 1
    assert sample(m2, "shardps_scheduler_membership_view") == view1 + 1

    # a worker that joins and never heartbeats is declared dead after the timeout
    ghost = c.sched_stub.JoinWorker(pb.JoinWorkerRequest(name="ghost", worker_id=-1), timeout=TIMEOUT_S)
    assert ghost.lease.member_id > 0
    poll(lambda: sample(c.scheduler_metrics(), "shardps_scheduler_members", role="worker", state="dead") == 1,
         timeout_s=60, what="the silent worker to be reaped")
    m3 = c.scheduler_metrics()
    assert sample(m3, "shardps_scheduler_members", role="worker", state="alive") == 1   # a still heartbeats
    assert sample(m3, "shardps_scheduler_membership_view") == view1 + 3

    # data progress: one partition assigned
    status, epoch, _ = a.client.acquire_partition(4, 1)
    assert status == pb.ASSIGNMENT_STATUS_ASSIGNED and epoch == 0
    m4 = c.scheduler_metrics()
    assert sample(m4, "shardps_scheduler_data_partitions", state="assigned") == 1
    assert sample(m4, "shardps_scheduler_data_partitions", state="queued") == 3
    assert sample(m4, "shardps_scheduler_data_epoch") == 0


# -- the worker ------------------------------------------------------------------------------
def test_worker_metrics_follow_its_steps(metered):
    c = metered()
    w = c.worker("a", push_codec=CodecConfig("bf16"))
    m0 = scrape(w.telemetry.port)
    assert_types(m0, WORKER_FAMILIES)
    assert sample(m0, "shardps_worker_clock") == 0
    assert sample(m0, "shardps_worker_bytes", direction="sent", kind="logical") == 0
    for step in range(3):
        w.pull()
        w.push(seed=step)
    m = scrape(w.telemetry.port)
    assert sample(m, "shardps_worker_clock") == 3
    sent_logical = sample(m, "shardps_worker_bytes", direction="sent", kind="logical")
    sent_wire = sample(m, "shardps_worker_bytes", direction="sent", kind="wire")
    assert sent_logical == 3 * ELEMENTS * 4 and 0 < sent_wire < sent_logical
    assert sample(m, "shardps_worker_bytes", direction="received", kind="logical") == w.pulls * ELEMENTS * 4
    assert sample(m, "shardps_worker_bytes", direction="received", kind="wire") == w.pulls * ELEMENTS * 4
    assert sample(m, "shardps_worker_encode_seconds") > 0
    assert sample(m, "shardps_worker_decode_seconds") > 0
    assert sample(m, "shardps_worker_membership_view") >= 1


# -- conventions -----------------------------------------------------------------------------
def test_metric_names_follow_prometheus_conventions(metered):
    c = metered()
    w = c.worker("a")
    w.pull()
    w.push()
    endpoints = {"server": c.server_metrics(), "scheduler": c.scheduler_metrics(),
                 "worker": scrape(w.telemetry.port)}
    for role, fams in endpoints.items():
        # prometheus_client's own *_created series (creation timestamps) are not ours to name
        ours = {n: f for n, f in fams.items() if n.startswith("shardps_")
                and not (n.endswith("_created") and n.removesuffix("_created") in fams)}
        assert ours, f"{role} exposes no shardps_ metrics"
        for name, fam in ours.items():
            assert re.fullmatch(r"shardps_[a-z][a-z0-9_]*", name), name
            assert fam.documentation, f"{name} has no help text"
            assert not name.endswith("_total"), f"{name}: only a counter's samples end in _total"
            if fam.type == "counter":
                assert fam.samples and all(s.name == name + "_total" for s in fam.samples), name
            for unit in ("seconds", "bytes"):
                if unit in name:
                    assert name.endswith("_" + unit), f"{name}: the unit goes last"
            assert not re.search(r"_(ms|milliseconds|kb|mb|kib|mib)(_|$)", name), f"{name}: use base units"
            if fam.type == "histogram" and fam.samples:   # (a worker serves no RPCs: no samples)
                assert {s.name for s in fam.samples} >= {name + "_bucket", name + "_count", name + "_sum"}
                buckets = [s for s in fam.samples if s.name == name + "_bucket"]
                assert any(s.labels["le"] == "+Inf" for s in buckets), name


def test_a_drained_daemon_releases_its_metrics_port():
    job = JobSpec()
    first = SchedulerProcess(SchedulerConfig(job=job, options=METRICS))
    first.start()
    port = first.telemetry.port
    first.drain()
    again = SchedulerProcess(SchedulerConfig(job=job, options=DaemonOptions(metrics_port=port,
                                                                          metrics_host="127.0.0.1")))
    try:
        again.start()
        assert scrape(port)["shardps_scheduler_membership_view"].type == "gauge"
    finally:
        again.drain()


def test_daemons_without_a_metrics_port_serve_no_metrics_and_still_work():
    sched = SchedulerProcess(SchedulerConfig(job=JobSpec()))
    sched.start()
    try:
        assert sched.telemetry.port is None and sched.telemetry.interceptors == ()
        with grpcutil.channel(sched.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            assert stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S).view == 0
    finally:
        sched.drain()

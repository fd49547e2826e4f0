"""Scoped roles: a token per role (worker, server, observer, admin), checked on every call by
the daemons' interceptor against the one table in pscommon/roles.py.

Before roles, one shared token let any holder do anything: a worker's token could register a
server for a free shard (and so receive the job key), ask for checkpoints, export the model.
Here a real scheduler and server run in this process on port 0, with role tokens from a
token dir; each role's token is accepted on its methods (through the real clients: a
ShardClient for the worker, the server daemon itself, psctl's status, inspect, checkpoint and
export) and refused with PERMISSION_DENIED, nothing changed, on every method of another role.
The single shared token (`--token-file`) still holds every role.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest

from shardps.pscommon import errors, grpcutil, roles
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import InvalidArgument, PermissionDenied
from shardps.pscommon.lifecycle import DaemonOptions
from shardps.pscommon.security import (TOKEN_DIR_ENV, TOKEN_ENV, RoleAuthInterceptor, RoleTokens, Security,
                                       build_security, read_token_dir, read_tokens, token_digest)
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2 as spb, scheduler_pb2_grpc
from shardps.psctl import cli, ops
from shardps.psctl import export as psexport
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient

from rpc.helpers import snapshot, tensor_chunks

from .helpers import error_info, membership, trains

TIMEOUT_S = 30.0
SHAPES = {"w": 64, "b": 8}
WIRE = Path(__file__).resolve().parents[2] / "pscommon" / "wire" / "v1"
SCHEDULER = f"/{spb.DESCRIPTOR.services_by_name['Scheduler'].full_name}/"
PS = f"/{ps_pb2.DESCRIPTOR.services_by_name['ParameterServer'].full_name}/"


def _generated_modules():
    """Every generated *_pb2 module of the wire package, found on disk (a new .proto file's
    stubs are walked too, without a change here)."""
    import importlib
    return [importlib.import_module(f"shardps.pscommon.wire.v1.{p.stem}") for p in sorted(WIRE.glob("*_pb2.py"))]


def _methods():
    """(full name, request streaming, response streaming) of every method in the stubs."""
    return [(f"/{s.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            for mod in _generated_modules() for s in mod.DESCRIPTOR.services_by_name.values() for m in s.methods]


# -- the table -------------------------------------------------------------------------------
def test_every_method_of_every_service_has_a_row():
    methods = [name for name, _, _ in _methods()]
    assert methods and set(methods) == set(roles.service_methods(_generated_modules()))
    missing = sorted(set(methods) - set(roles.METHOD_ROLES))
    assert not missing, f"methods with no row in pscommon/roles.py METHOD_ROLES: {missing}"
    stale = sorted(set(roles.METHOD_ROLES) - set(methods))
    assert not stale, f"rows for methods the stubs do not have: {stale}"
    for method, allowed in roles.METHOD_ROLES.items():
        assert roles.ADMIN in allowed and allowed <= set(roles.ROLES), method


def test_the_rows_that_matter():
    assert roles.allowed_roles(SCHEDULER + "RegisterServer") == {roles.SERVER, roles.ADMIN}
    assert roles.allowed_roles(PS + "Checkpoint") == {roles.ADMIN}
    assert roles.allowed_roles(PS + "ScanRows") == {roles.ADMIN}
    assert roles.allowed_roles(PS + "Push") == {roles.WORKER, roles.ADMIN}
    assert roles.allowed_roles("/some.Service/NotInTheTable") == {roles.ADMIN}
    # what the daemons themselves call: a server on the scheduler, a worker on both
    for method in ("RegisterServer", "Heartbeat", "Leave", "WatchMembership", "Status"):
        assert roles.may_call({roles.SERVER}, SCHEDULER + method), method
    for method in ("JoinWorker", "Heartbeat", "Leave", "GetJob", "DeclareModel", "Status", "AcquirePartition",
                   "CompletePartition"):
        assert roles.may_call({roles.WORKER}, SCHEDULER + method), method


# -- token files -----------------------------------------------------------------------------
def _write_dir(path: Path, tokens: dict[str, str], digests: tuple[str, ...] = ()) -> str:
    path.mkdir(parents=True, exist_ok=True)
    for role, token in tokens.items():
        (path / f"{role}.token").write_text(token + "\n")
    for role in digests:
        (path / f"{role}.sha256").write_text(hashlib.sha256(TOKENS[role].encode()).hexdigest() + "  -\n")
    return str(path)


TOKENS = {r: f"{r}-{secrets.token_hex(16)}" for r in roles.ROLES}
STRANGER = f"stranger-{secrets.token_hex(16)}"


def test_token_dir_reads_tokens_and_digests(tmp_path):
    d = _write_dir(tmp_path / "server", {roles.SERVER: TOKENS[roles.SERVER]},
                   digests=(roles.WORKER, roles.OBSERVER, roles.ADMIN))
    (tmp_path / "server" / "..data").mkdir()       # Kubernetes' secret volume internals: ignored
    (tmp_path / "server" / "README").write_text("not a token")
    tokens, accept = read_token_dir(d)
    assert tokens == {roles.SERVER: TOKENS[roles.SERVER]}     # only .token files can be sent
    assert accept.roles == set(roles.ROLES) and not accept.shared
    for role in roles.ROLES:
        assert accept.match(TOKENS[role].encode()) == {role}
    assert accept.match(STRANGER.encode()) == frozenset()
    assert TOKENS[roles.SERVER] not in repr(accept) and token_digest(TOKENS[roles.SERVER]).hex() not in repr(accept)
    # the server sends its own token and accepts the others' by digest
    assert read_tokens(None, d, {}, roles.SERVER) == (TOKENS[roles.SERVER], accept)
    assert read_tokens(None, d, {}, None) == (None, accept)


def test_a_client_sends_its_roles_token_or_admins(tmp_path):
    ops_dir = _write_dir(tmp_path / "ops", {roles.ADMIN: TOKENS[roles.ADMIN], roles.OBSERVER: TOKENS[roles.OBSERVER]})
    assert read_tokens(None, ops_dir, {}, roles.OBSERVER)[0] == TOKENS[roles.OBSERVER]
    assert read_tokens(None, ops_dir, {}, roles.ADMIN)[0] == TOKENS[roles.ADMIN]
    admin_only = _write_dir(tmp_path / "admin", {roles.ADMIN: TOKENS[roles.ADMIN]})
    assert read_tokens(None, admin_only, {}, roles.OBSERVER)[0] == TOKENS[roles.ADMIN]
    worker_only = _write_dir(tmp_path / "worker", {roles.WORKER: TOKENS[roles.WORKER]})
    with pytest.raises(InvalidArgument, match=r"has no admin\.token"):
        read_tokens(None, worker_only, {}, roles.ADMIN)
    with pytest.raises(InvalidArgument, match=r"no server\.token \(nor admin\.token\)"):
        read_tokens(None, worker_only, {}, roles.SERVER)


def test_flags_and_environment(tmp_path):
    d = _write_dir(tmp_path / "all", TOKENS)
    single = tmp_path / "one.token"
    single.write_text(STRANGER)
    # --token-file: one token, every role, as before roles
    sec = build_security(None, None, None, str(single), {TOKEN_DIR_ENV: d}, role=roles.WORKER)
    assert sec.token == STRANGER and sec.accept is None and sec.accepted.shared
    # SHARDPS_TOKEN_DIR when no flag is given; a flag wins over it
    assert read_tokens(None, None, {TOKEN_DIR_ENV: d}, roles.OBSERVER)[0] == TOKENS[roles.OBSERVER]
    assert read_tokens(None, None, {TOKEN_ENV: STRANGER}, roles.OBSERVER) == (STRANGER, None)
    assert read_tokens(None, None, {}, roles.OBSERVER) == (None, None)
    with pytest.raises(InvalidArgument, match="cannot be used together"):
        read_tokens(str(single), d, {}, roles.WORKER)
    with pytest.raises(InvalidArgument, match="both set"):
        read_tokens(None, None, {TOKEN_DIR_ENV: d, TOKEN_ENV: STRANGER}, roles.WORKER)
    with pytest.raises(InvalidArgument, match=f"{TOKEN_DIR_ENV} is set but empty"):
        read_tokens(None, None, {TOKEN_DIR_ENV: " "}, roles.WORKER)
    with pytest.raises(InvalidArgument, match="unknown role 'operator'"):
        read_tokens(None, d, {}, "operator")


@pytest.mark.parametrize("case", ["same token twice", "typo", "bad digest", "disagree", "empty", "missing"])
def test_bad_token_dirs_are_refused_naming_the_problem(tmp_path, case):
    d = tmp_path / "t"
    d.mkdir()
    if case == "same token twice":
        (d / "worker.token").write_text(TOKENS[roles.WORKER])
        (d / "observer.token").write_text(TOKENS[roles.WORKER])
        match = "the worker and observer tokens are the same token"
    elif case == "typo":
        (d / "wroker.token").write_text(TOKENS[roles.WORKER])
        match = "'wroker.token' names no role"
    elif case == "bad digest":
        (d / "worker.sha256").write_text("not-hex\n")
        match = "worker.sha256' does not start with a SHA-256"
    elif case == "disagree":
        (d / "worker.token").write_text(TOKENS[roles.WORKER])
        (d / "worker.sha256").write_text(hashlib.sha256(STRANGER.encode()).hexdigest())
        match = "worker.token and worker.sha256 disagree"
    elif case == "empty":
        (d / "admin.token").write_text("\n")
        match = "admin.token' is empty"
    else:
        d = tmp_path / "nowhere"
        match = "cannot be read"
    with pytest.raises(InvalidArgument, match=match) as exc:
        read_tokens(None, str(d), {}, None)
    assert TOKENS[roles.WORKER] not in str(exc.value) and STRANGER not in str(exc.value)


def test_role_tokens_validate_their_values():
    with pytest.raises(InvalidArgument, match="unknown role 'root'"):
        RoleTokens(((token_digest(STRANGER), frozenset({"root"})),))
    with pytest.raises(InvalidArgument, match="the worker role has two tokens"):
        RoleTokens(((token_digest(STRANGER), frozenset({roles.WORKER})),
                    (token_digest(TOKENS[roles.WORKER]), frozenset({roles.WORKER}))))
    with pytest.raises(InvalidArgument, match="got 5 bytes"):
        RoleTokens(((b"short", frozenset({roles.WORKER})),))
    with pytest.raises(InvalidArgument, match="at least one token"):
        RoleTokens(())
    with pytest.raises(InvalidArgument, match="RoleTokens"):
        RoleAuthInterceptor("a-token")


# -- a job with role tokens ------------------------------------------------------------------
class Job:
    """A scheduler and one server in this process (port 0), each with its own token dir as a
    pod would have it: the scheduler only digests, the server its own token and digests."""

    def __init__(self, tmp: Path, scheduler_security: Security, server_security: Security):
        self.checkpoints = tmp / "checkpoints"
        self.scheduler = SchedulerProcess(SchedulerConfig(job=JobSpec(num_servers=1, slice_bytes=1 << 30),
                                                          options=DaemonOptions(security=scheduler_security)))
        self.scheduler.start()
        self.address = self.scheduler.address
        self.server = ServerProcess(ServerConfig(scheduler=self.address, shard_id=0,
                                                 checkpoint_dir=str(self.checkpoints), checkpoint_every_s=3600,
                                                 options=DaemonOptions(security=server_security)))
        self.server.start()
        self.channels: list[grpc.Channel] = []
        self.clients: list[ShardClient] = []
        self.reader_token = TOKENS[roles.ADMIN]   # what the tests read the job's state with

    def channel(self, address: str, token: str | None) -> grpc.Channel:
        ch = grpcutil.channel(address, Security(token=token))
        self.channels.append(ch)
        return ch

    def sched(self, token: str | None):
        return scheduler_pb2_grpc.SchedulerStub(self.channel(self.address, token))

    def ps(self, token: str | None):
        return ps_pb2_grpc.ParameterServerStub(self.channel(self.server.address, token))

    def worker(self, token: str, name: str = "honest") -> ShardClient:
        client = ShardClient(ClientConfig(scheduler=self.address, name=name, security=Security(token=token)))
        self.clients.append(client)
        client.join()
        client.wait_for_servers()
        return client

    def checkpoint_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.checkpoints)) for p in self.checkpoints.rglob("*")
                      if p.is_file() and p.name != "owner.json")

    def close(self):
        for c in self.clients:
            c.leave()
        for ch in self.channels:
            ch.close()
        self.server.drain()
        self.scheduler.drain()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Token dirs as deploy/k8s mounts them: each pod its own token, daemons the digests of the
    roles that call them; operators observer.token and admin.token."""
    base = tmp_path_factory.mktemp("tokens")
    return {
        "scheduler": _write_dir(base / "scheduler", {}, digests=roles.ROLES),
        "server": _write_dir(base / "server", {roles.SERVER: TOKENS[roles.SERVER]},
                             digests=(roles.WORKER, roles.OBSERVER, roles.ADMIN)),
        "worker": _write_dir(base / "worker", {roles.WORKER: TOKENS[roles.WORKER]}),
        "ops": _write_dir(base / "ops", {r: TOKENS[r] for r in (roles.OBSERVER, roles.ADMIN)}),
        "observer": _write_dir(base / "observer", {roles.OBSERVER: TOKENS[roles.OBSERVER]}),
    }


@pytest.fixture(scope="module")
def job(tmp_path_factory, dirs):
    """A running job in role mode with a worker that declared the model and trained a step."""
    j = Job(tmp_path_factory.mktemp("job"),
            build_security(None, None, None, None, {}, token_dir=dirs["scheduler"], role=None),
            build_security(None, None, None, None, {}, token_dir=dirs["server"], role=roles.SERVER))
    try:
        w = j.worker(build_security(None, None, None, None, {}, token_dir=dirs["worker"], role=roles.WORKER).token)
        w.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        _train(j, w)
        j.honest = w
        yield j
    finally:
        j.close()


def _train(job: "Job", client: ShardClient) -> None:
    """One more step goes through: a push moves the served values, a pull sees it."""
    trains(client, SHAPES)


def _state(job: Job) -> tuple:
    """Everything a refused call must leave as it was, read with the admin token: membership
    (but the workers' clocks, which their own heartbeats move at their own pace), the shard's
    keys, values, versions, counters and push clocks, and the checkpoints written."""
    m = membership(job.sched(job.reader_token))
    m["workers"] = [(w_id, incarnation, state, name) for w_id, incarnation, state, _clock, name in m["workers"]]
    return m, snapshot(job.ps(job.reader_token), job.honest.shard_map.fingerprint), job.checkpoint_files()


def _call(ch: grpc.Channel, method: str, request_streaming: bool, response_streaming: bool):
    """`method` with an empty request (refused calls never parse it), whatever its kind."""
    if request_streaming:
        fn = ch.stream_stream(method) if response_streaming else ch.stream_unary(method)
        result = fn(iter([b""]), timeout=TIMEOUT_S)
    else:
        fn = ch.unary_stream(method) if response_streaming else ch.unary_unary(method)
        result = fn(b"", timeout=TIMEOUT_S)
    return list(result) if response_streaming else result


def _permission_denied(err: grpc.RpcError, role: str, method: str) -> None:
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (role, method, err)
    assert err.details().startswith(f"the {role} token may not call {method};"), err.details()
    info = error_info(err)
    assert info is not None and info.reason == "PERMISSION_DENIED"
    assert dict(info.metadata) == {"role": role, "method": method}
    typed = errors.from_rpc_error(err)
    assert type(typed) is PermissionDenied and typed.metadata["role"] == role
    assert TOKENS[role] not in err.details()


@pytest.mark.parametrize("role", roles.ROLES)
def test_each_token_is_refused_on_every_method_outside_its_role(job, role):
    """The whole table, for real: every method of both services that the role's row lacks is
    PERMISSION_DENIED from the interceptor, before any handler runs, and nothing changes."""
    before = _state(job)
    refused = 0
    for method, req_stream, resp_stream in _methods():
        if roles.may_call({role}, method):
            continue
        address = job.address if method.startswith(SCHEDULER) else job.server.address
        with pytest.raises(grpc.RpcError) as err:
            _call(job.channel(address, TOKENS[role]), method, req_stream, resp_stream)
        _permission_denied(err.value, role, method)
        refused += 1
    assert refused == (0 if role == roles.ADMIN else len(_methods()) - len(roles.methods_of(role)))
    assert _state(job) == before
    _train(job, job.honest)


def test_unknown_or_missing_token_is_unauthenticated(job):
    before = _state(job)
    for token in (None, STRANGER):
        for stub, call in ((job.sched(token), lambda s: s.Status(spb.StatusRequest(), timeout=TIMEOUT_S)),
                           (job.ps(token), lambda s: s.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=TIMEOUT_S)),
                           (job.sched(token), lambda s: s.RegisterServer(spb.RegisterServerRequest(
                               address="127.0.0.1:1", shard=0), timeout=TIMEOUT_S))):
            with pytest.raises(grpc.RpcError) as err:
                call(stub)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == "missing or invalid bearer token"
    assert _state(job) == before


def test_a_worker_token_cannot_register_a_server_or_get_the_job_key(job):
    before = _state(job)
    stub = job.sched(TOKENS[roles.WORKER])
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterServer(spb.RegisterServerRequest(address="127.0.0.1:1", shard=-1), timeout=TIMEOUT_S)
    _permission_denied(err.value, roles.WORKER, SCHEDULER + "RegisterServer")
    assert job.scheduler.core.member_key not in (err.value.details() or "").encode()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchMembership(spb.WatchMembershipRequest(), timeout=TIMEOUT_S))
    _permission_denied(err.value, roles.WORKER, SCHEDULER + "WatchMembership")
    assert _state(job) == before


@pytest.mark.parametrize("role", [roles.SERVER, roles.OBSERVER])
def test_a_real_push_with_a_members_credential_needs_the_worker_token(job, role):
    """The honest worker's own identity and credential do not make up for the wrong token: the
    push is refused before it is read, its step stays free in the ledger."""
    me = job.honest.identity
    fp = job.honest.shard_map.fingerprint
    before = _state(job)
    msgs = [ps_pb2.PushRequest(header=ps_pb2.PushHeader(
        caller=ps_pb2.Caller(worker_id=me.worker_id, incarnation=me.incarnation, credential=me.credential),
        shard=0, step=me.clock, base_version=0, model_fingerprint=fp))]
    msgs += [ps_pb2.PushRequest(chunk=ch) for k in job.honest.shard_map.keys_of(0)
             for ch in tensor_chunks(k.key, np.full(k.length, 100.0, np.float32))]
    with pytest.raises(grpc.RpcError) as err:
        job.ps(TOKENS[role]).Push(iter(msgs), timeout=TIMEOUT_S)
    _permission_denied(err.value, role, PS + "Push")
    assert _state(job) == before
    _train(job, job.honest)     # the refused push's step was not taken


def test_the_worker_token_trains(job):
    """Join, heartbeat, the job and status, declare, partitions, pull and push: all through the
    real client with the worker's token alone (the module's worker already pulled and pushed)."""
    w = job.worker(TOKENS[roles.WORKER], name="second")
    w.wait_for_workers(2)                           # Status
    # idempotent for the same model: DeclareModel, then GetJob's shard map and Declare on the shard
    w.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    status, epoch, partition = w.acquire_partition(4, 1)
    assert status == spb.ASSIGNMENT_STATUS_ASSIGNED
    w.complete_partition(epoch, partition)
    _train(job, w)
    w.leave()
    job.clients.remove(w)


def test_the_server_token_is_what_the_server_daemon_uses(job):
    """The server daemon registered, watches membership and heartbeats with its token alone;
    its calls to the scheduler's reads work; and it cannot push into a shard or join as a worker."""
    assert job.server.lease is not None and job.server.lease.credential
    stub = job.sched(TOKENS[roles.SERVER])
    assert stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).servers[0].address == job.server.address
    lease = job.server.lease
    stub.Heartbeat(spb.HeartbeatRequest(role=spb.ROLE_SERVER, member_id=lease.member_id,
                                        incarnation=lease.incarnation, credential=lease.credential),
                   timeout=TIMEOUT_S)
    assert job.server._replaced(lease.incarnation) is False   # its successor check: Status
    before = _state(job)
    with pytest.raises(grpc.RpcError) as err:
        stub.JoinWorker(spb.JoinWorkerRequest(name="server-as-worker"), timeout=TIMEOUT_S)
    _permission_denied(err.value, roles.SERVER, SCHEDULER + "JoinWorker")
    assert _state(job) == before


def test_observer_reads_status_and_inspect_but_cannot_checkpoint(job, dirs, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_DIR_ENV, raising=False)
    observer = build_security(None, None, None, None, {}, token_dir=dirs["ops"], role=roles.OBSERVER)
    assert observer.token == TOKENS[roles.OBSERVER]
    st = ops.collect_status(job.address, TIMEOUT_S, observer, rate_window_s=0)
    assert st is not None
    inspected = ops.collect_inspect(job.address, TIMEOUT_S, None, 2, observer)
    assert inspected is not None
    # psctl picks the observer token for status and inspect from the same dir
    assert cli.main(["status", "--scheduler", job.address, "--token-dir", dirs["ops"], "--rate-window", "0"]) == 0
    assert cli.main(["inspect", "--scheduler", job.address, "--token-dir", dirs["ops"]]) == 0
    capsys.readouterr()

    before = _state(job)
    # psctl checkpoint with only the observer token: refused on the shard, nothing written
    assert cli.main(["checkpoint", "--scheduler", job.address, "--token-dir", dirs["observer"]]) == 2
    assert "has no admin.token" in capsys.readouterr().err
    observer_file = Path(dirs["observer"]) / "observer.token"
    assert cli.main(["checkpoint", "--scheduler", job.address, "--token-file", str(observer_file)]) == 1
    out = capsys.readouterr().out
    assert f"the observer token may not call {PS}Checkpoint" in out
    # nor export the model (Pull, ScanRows), nor remove a member
    with pytest.raises(PermissionDenied, match=f"the observer token may not call {PS}Pull"):
        psexport.gather(job.address, 5.0, Security(token=TOKENS[roles.OBSERVER]))
    lease = job.server.lease
    with pytest.raises(grpc.RpcError) as err:
        job.sched(TOKENS[roles.OBSERVER]).Leave(spb.LeaveRequest(
            role=spb.ROLE_SERVER, member_id=lease.member_id, incarnation=lease.incarnation,
            credential=lease.credential), timeout=TIMEOUT_S)
    _permission_denied(err.value, roles.OBSERVER, SCHEDULER + "Leave")
    assert _state(job) == before


def test_admin_checkpoints_and_exports(job, dirs, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_DIR_ENV, raising=False)
    before = job.checkpoint_files()
    assert cli.main(["checkpoint", "--scheduler", job.address, "--token-dir", dirs["ops"]]) == 0
    assert "shard 0:" in capsys.readouterr().out
    assert job.checkpoint_files() != before
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", "--scheduler", job.address, "--token-dir", dirs["ops"], "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    # admin may call what the other roles call too
    assert job.sched(TOKENS[roles.ADMIN]).Status(spb.StatusRequest(), timeout=TIMEOUT_S).servers


def test_daemons_say_which_roles_they_accept(dirs):
    sched = build_security(None, None, None, None, {}, token_dir=dirs["scheduler"], role=None)
    assert sched.token is None and sched.describe() == "no TLS, role tokens: worker, server, observer, admin"
    partial = build_security(None, None, None, None, {}, token_dir=dirs["worker"], role=roles.WORKER)
    assert "no token: server, observer, admin" in partial.describe()
    assert TOKENS[roles.WORKER] not in repr(partial) and TOKENS[roles.WORKER] not in partial.describe()


# -- one token, every role (--token-file) ------------------------------------------------------
def test_single_token_mode_still_holds_every_role(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_DIR_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(STRANGER + "\n")
    sec = {r: build_security(None, None, None, str(token_file), os.environ, role=r) for r in (None, *roles.ROLES)}
    assert {s.token for r, s in sec.items() if r} == {STRANGER} and all(s.accept is None for s in sec.values())
    j = Job(tmp_path, sec[None], sec[roles.SERVER])      # the server registered with the one token
    j.reader_token = STRANGER
    try:
        w = j.worker(STRANGER)
        w.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        j.honest = w
        _train(j, w)
        assert cli.main(["status", "--scheduler", j.address, "--token-file", str(token_file),
                         "--rate-window", "0"]) == 0
        assert cli.main(["checkpoint", "--scheduler", j.address, "--token-file", str(token_file)]) == 0
        assert "shard 0:" in capsys.readouterr().out and j.checkpoint_files()
        # any other token is still refused outright
        with pytest.raises(grpc.RpcError) as err:
            j.sched(TOKENS[roles.ADMIN]).Status(spb.StatusRequest(), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        j.close()

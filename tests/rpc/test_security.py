"""Mutual TLS and the bearer token on a real ParameterServer shard (in-process, port 0).

Certificates are made here with `cryptography`: a CA, a server certificate for
127.0.0.1/localhost, a client certificate from that CA, and an unrelated CA with its own
client certificate (a stranger). EC keys keep generation instant on slow CI.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.pscommon import codecs, framing, grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.security import (Security, TLSConfig, TOKEN_METADATA_KEY, TokenAuthInterceptor,
                               add_port, build_security, read_token, secure_channel,
                               server_interceptors)
from shardps.pscommon.sharding import Key
from shardps.pscommon.tensors import chunk_payload
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, tensor_pb2
from shardps.psserver.servicer import ParameterServerServicer
from shardps.psserver.shard import Shard

TOKEN = "s3cret-token_0123456789"
WRONG = "s3cret-token_9876543210"
FINGERPRINT = "fp-security-test"
KEY = Key("w", "w", tensor_pb2.DTYPE_FLOAT32, (8,), 0, 8, 0)
CALL_TIMEOUT_S = 20.0


# -- certificates ---------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert: x509.Certificate) -> tuple[str, str]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def _ca(path: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, _ = _write(path, key, cert)
    return key, cert, cert_path


def _leaf(path: Path, cn: str, ca_key, ca_cert, usage, sans=()) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return _write(path, key, builder.sign(ca_key, hashes.SHA256()))


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: str
    server: TLSConfig
    client: TLSConfig
    stranger: TLSConfig     # client cert from another CA, trusting the right CA
    other_ca: str


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = _ca(d / "ca", "shardps test CA")
    other_key, other_cert, other_path = _ca(d / "other-ca", "unrelated CA")
    server = _leaf(d / "server", "shardps-server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _leaf(d / "client", "worker-0", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _leaf(d / "stranger", "worker-0", other_key, other_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certs(ca=ca_path, server=TLSConfig(*server, ca_path), client=TLSConfig(*client, ca_path),
                 stranger=TLSConfig(*stranger, ca_path), other_ca=other_path)


# -- a shard server assembled with the security helpers ----------------------------------------
class SecureShard:
    def __init__(self, security: Security):
        self.shard = Shard(0, JobSpec())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpc"),
                                  interceptors=server_interceptors(security),
                                  options=grpcutil.SERVER_OPTIONS)
        framing.add_parameter_server(ParameterServerServicer(self.shard), self.server)
        grpcutil.set_serving(grpcutil.add_health(self.server), "shardps.pscommon.wire.v1.ParameterServer", True)
        self.address = f"127.0.0.1:{add_port(self.server, '127.0.0.1:0', security)}"
        self.server.start()
        self.channels: list[grpc.Channel] = []

    def stub(self, security: Security) -> ps_pb2_grpc.ParameterServerStub:
        return ps_pb2_grpc.ParameterServerStub(self.connect(security))

    def connect(self, security: Security) -> grpc.Channel:
        ch = secure_channel(self.address, security, grpcutil.CHANNEL_OPTIONS)
        self.channels.append(ch)
        return ch

    def close(self):
        for ch in self.channels:
            ch.close()
        self.server.stop(0).wait()


@pytest.fixture
def secure_shard():
    made = []

    def make(security: Security) -> SecureShard:
        s = SecureShard(security)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def declare_requests(value: np.ndarray, fingerprint: str = FINGERPRINT):
    yield ps_pb2.DeclareRequest(header=ps_pb2.DeclareHeader(
        model_fingerprint=fingerprint, shard=0, keys=[KEY.to_proto()]))
    meta, payload = codecs.encode(KEY.key, value.astype(np.float32), tensor_pb2.DTYPE_FLOAT32)
    for chunk in chunk_payload(meta, payload):
        yield ps_pb2.DeclareRequest(chunk=chunk)


def push_requests(grad: np.ndarray, step: int, worker: int = 0):
    yield ps_pb2.PushRequest(header=ps_pb2.PushHeader(
        caller=ps_pb2.Caller(worker_id=worker, incarnation=1), shard=0, step=step,
        model_fingerprint=FINGERPRINT))
    meta, payload = codecs.encode(KEY.key, grad.astype(np.float32), tensor_pb2.DTYPE_FLOAT32)
    for chunk in chunk_payload(meta, payload):
        yield ps_pb2.PushRequest(chunk=chunk)


def snapshot(stub) -> tuple:
    """What a refused call must not change: counters, keys and the values themselves."""
    st = stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S)
    info = stub.Inspect(ps_pb2.InspectRequest(sample=64), timeout=CALL_TIMEOUT_S)
    return (st.keys, st.shard_version, st.pushes, st.duplicates, st.bytes,
            [(k.spec.key, k.version, tuple(k.sample)) for k in info.keys])


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc_info:
        fn()
    return exc_info.value


# -- TLSConfig / read_token / Security ---------------------------------------------------------
def test_tls_config_names_a_missing_or_bad_file(certs, tmp_path):
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(InvalidArgument, match="nope.crt"):
        TLSConfig(missing, certs.client.key, certs.ca)
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    with pytest.raises(InvalidArgument, match="junk.key"):
        TLSConfig(certs.client.cert, str(junk), certs.ca)
    assert TLSConfig(certs.client.cert, certs.client.key, certs.ca).ca == certs.ca


def test_read_token_file_wins_then_env(tmp_path):
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert read_token(str(f), {"SHARDPS_TOKEN": WRONG}) == TOKEN
    assert read_token(None, {"SHARDPS_TOKEN": f" {WRONG}\n"}) == WRONG
    assert read_token(None, {}) is None


def test_read_token_refuses_empty_or_unreadable(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(InvalidArgument, match="empty"):
        read_token(str(empty), {})
    with pytest.raises(InvalidArgument, match="missing-file"):
        read_token(str(tmp_path / "missing-file"), {})
    with pytest.raises(InvalidArgument, match="SHARDPS_TOKEN"):
        read_token(None, {"SHARDPS_TOKEN": "   "})
    with pytest.raises(InvalidArgument) as exc_info:
        read_token(None, {"SHARDPS_TOKEN": "two words"})
    assert "two words" not in str(exc_info.value)


def test_build_security_from_cli_values(certs, tmp_path):
    assert build_security(None, None, None, None, {}) == Security()
    sec = build_security(certs.client.cert, certs.client.key, certs.ca, None, {"SHARDPS_TOKEN": TOKEN})
    assert sec.tls == certs.client and sec.token == TOKEN
    with pytest.raises(InvalidArgument, match="--tls-key"):
        build_security(certs.client.cert, None, certs.ca, None, {})
    with pytest.raises(InvalidArgument, match="--tls-server-name"):
        build_security(None, None, None, None, {}, tls_server_name="ps.example")


def test_security_repr_hides_the_token():
    assert TOKEN not in repr(Security(token=TOKEN))
    assert TOKEN not in str(Security(token=TOKEN))


# -- mutual TLS ----------------------------------------------------------------------------
def test_mtls_client_with_the_right_certificate_works(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server))
    stub = s.stub(Security(tls=certs.client))
    reply = stub.Declare(declare_requests(np.arange(8)), timeout=CALL_TIMEOUT_S)
    assert reply.created == 1
    st = stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S)
    assert st.keys == 1 and st.shard == 0


def test_mtls_refuses_a_client_without_a_certificate(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server))
    # Trusts the server's CA but presents no certificate of its own.
    no_cert = grpc.ssl_channel_credentials(root_certificates=Path(certs.ca).read_bytes())
    ch = grpc.secure_channel(s.address, no_cert, options=grpcutil.CHANNEL_OPTIONS)
    s.channels.append(ch)
    err = rpc_error(lambda: ps_pb2_grpc.ParameterServerStub(ch).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert s.shard.pulls == 0 and not s.shard.entries


def test_mtls_refuses_a_client_certificate_from_another_ca(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server))
    stub = s.stub(Security(tls=certs.stranger))
    err = rpc_error(lambda: stub.Declare(declare_requests(np.arange(8)), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert not s.shard.entries


def test_mtls_client_refuses_a_server_it_does_not_trust(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server))
    distrustful = TLSConfig(certs.client.cert, certs.client.key, certs.other_ca)
    err = rpc_error(lambda: s.stub(Security(tls=distrustful)).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_name_override_is_what_the_client_verifies(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server))
    as_localhost = dataclasses.replace(certs.client, server_name="localhost")
    assert s.stub(Security(tls=as_localhost)).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S).shard == 0
    # The server certificate does not name ps.example: the client refuses the server.
    as_other = dataclasses.replace(certs.client, server_name="ps.example")
    err = rpc_error(lambda: s.stub(Security(tls=as_other)).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_refuses_plaintext(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server))
    err = rpc_error(lambda: s.stub(Security()).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


# -- bearer token --------------------------------------------------------------------------
def test_token_required_for_unary_and_streaming_calls(secure_shard):
    s = secure_shard(Security(token=TOKEN))
    for stub in (s.stub(Security()), s.stub(Security(token=WRONG))):
        calls = {
            "unary": lambda: stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S),
            "stream-unary": lambda: stub.Declare(declare_requests(np.arange(8)), timeout=CALL_TIMEOUT_S),
            "unary-stream": lambda: list(stub.Pull(ps_pb2.PullRequest(shard=0), timeout=CALL_TIMEOUT_S)),
        }
        for kind, fn in calls.items():
            err = rpc_error(fn)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, kind
            assert WRONG not in (err.details() or "") and TOKEN not in (err.details() or "")
    assert not s.shard.entries and s.shard.pulls == 0

    good = s.stub(Security(token=TOKEN))
    assert good.Declare(declare_requests(np.arange(8)), timeout=CALL_TIMEOUT_S).created == 1
    pulled = list(good.Pull(ps_pb2.PullRequest(caller=ps_pb2.Caller(observer=True), shard=0,
                                               model_fingerprint=FINGERPRINT), timeout=CALL_TIMEOUT_S))
    assert pulled[0].WhichOneof("body") == "header" and len(pulled) == 2


def test_token_refuses_unknown_methods_as_unauthenticated(secure_shard):
    s = secure_shard(Security(token=TOKEN))
    ch = s.connect(Security())
    probe = ch.unary_unary("/secret.Admin/Shutdown")
    err = rpc_error(lambda: probe(b"", timeout=CALL_TIMEOUT_S))
    # An anonymous caller learns nothing about which methods exist.
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_leaves_health_checks_open(secure_shard):
    s = secure_shard(Security(token=TOKEN))
    health = health_pb2_grpc.HealthStub(s.connect(Security()))
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_refused_declare_and_push_change_nothing(secure_shard):
    s = secure_shard(Security(token=TOKEN))
    good, bad = s.stub(Security(token=TOKEN)), s.stub(Security(token=WRONG))
    good.Declare(declare_requests(np.arange(8)), timeout=CALL_TIMEOUT_S)
    assert good.Push(push_requests(np.ones(8), step=0), timeout=CALL_TIMEOUT_S).duplicate is False
    before = snapshot(good)
    assert before[2] == 1

    assert rpc_error(lambda: bad.Push(push_requests(np.full(8, 100.0), step=1),
                                      timeout=CALL_TIMEOUT_S)).code() == grpc.StatusCode.UNAUTHENTICATED
    other = Key("v", "v", tensor_pb2.DTYPE_FLOAT32, (8,), 0, 8, 0)
    header = ps_pb2.DeclareHeader(model_fingerprint=FINGERPRINT, shard=0, keys=[other.to_proto()])
    assert rpc_error(lambda: bad.Declare(iter([ps_pb2.DeclareRequest(header=header)]),
                                         timeout=CALL_TIMEOUT_S)).code() == grpc.StatusCode.UNAUTHENTICATED

    assert snapshot(good) == before
    # The refused push's step is still free: the ledger never saw it.
    assert good.Push(push_requests(np.ones(8), step=1), timeout=CALL_TIMEOUT_S).duplicate is False


def test_a_caller_supplied_authorization_header_is_replaced(secure_shard):
    s = secure_shard(Security(token=TOKEN))
    stub = s.stub(Security(token=TOKEN))
    # The channel's own token wins over a stale one passed per call.
    st = stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S,
                          metadata=[(TOKEN_METADATA_KEY, f"Bearer {WRONG}")])
    assert st.shard == 0


def test_interceptor_requires_the_bearer_prefix(secure_shard):
    s = secure_shard(Security(token=TOKEN))
    stub = ps_pb2_grpc.ParameterServerStub(s.connect(Security()))
    err = rpc_error(lambda: stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S,
                                             metadata=[(TOKEN_METADATA_KEY, TOKEN)]))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    st = stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S,
                          metadata=[(TOKEN_METADATA_KEY, f"Bearer {TOKEN}")])
    assert st.shard == 0


def test_interceptor_refuses_an_unusable_token():
    with pytest.raises(InvalidArgument):
        TokenAuthInterceptor("")
    with pytest.raises(InvalidArgument):
        Security(token="has space")


# -- both ----------------------------------------------------------------------------------
def test_tls_and_token_together(secure_shard, certs):
    s = secure_shard(Security(tls=certs.server, token=TOKEN))
    err = rpc_error(lambda: s.stub(Security(tls=certs.client)).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(lambda: s.stub(Security(tls=certs.client, token=WRONG)).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # The right token with a client certificate from another CA does not get past the handshake.
    err = rpc_error(lambda: s.stub(Security(tls=certs.stranger, token=TOKEN)).ShardStatus(
        ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    good = s.stub(Security(tls=certs.client, token=TOKEN))
    assert good.Declare(declare_requests(np.arange(8)), timeout=CALL_TIMEOUT_S).created == 1
    assert good.Push(push_requests(np.ones(8), step=0), timeout=CALL_TIMEOUT_S).duplicate is False
    info = good.Inspect(ps_pb2.InspectRequest(sample=8), timeout=CALL_TIMEOUT_S)
    lr = JobSpec().optimizer.lr
    np.testing.assert_allclose(info.keys[0].sample, np.arange(8) - lr * np.ones(8), rtol=0, atol=1e-6)

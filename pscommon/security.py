"""Transport security: optional mutual TLS and an optional shared bearer token.

Both are off by default (loopback demos and tests). `Security` is built once in psctl from
flags and environment; the helpers here turn it into channels, server ports and server
interceptors, so no role package deals with certificates or tokens itself.

A token without TLS travels in clear text: use it alone only on loopback or a network you
trust, and pair it with TLS everywhere else.
"""
from __future__ import annotations

import collections
import dataclasses
import hmac
import ipaddress
import logging
from typing import Mapping, Sequence

import grpc

from shardps.pscommon import interceptors
from shardps.pscommon.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "authorization"
TOKEN_ENV = "SHARDPS_TOKEN"
_BEARER = "Bearer "
# gRPC metadata values must be printable ASCII; a space would make "Bearer a b" ambiguous.
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
MAX_TOKEN_CHARS = 4096

# Methods served without a token. Kubernetes gRPC probes (and grpc_health_probe) cannot send
# metadata, so the standard health service must stay open; it reveals only SERVING or
# NOT_SERVING. Reflection describes the public schema only and helps grpcurl-based debugging.
# Neither can read or change training state.
UNAUTHENTICATED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


# -- TLS ----------------------------------------------------------------------------------
def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidArgument(f"TLS {what} {path!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"TLS {what} {path!r} is not a PEM file")
    return data


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """PEM files for mutual TLS: this process's certificate and key, and the CA that signs peers.

    `server_name` overrides the name a client checks the server certificate against (for
    certificates issued to a DNS name while workers dial pod IPs); empty: the dialled host.
    """

    cert: str
    key: str
    ca: str
    server_name: str = ""

    def __post_init__(self):
        # Read once here so a bad path fails at start-up, naming the file, not at first call.
        for what in ("cert", "key", "ca"):
            path = getattr(self, what)
            if not isinstance(path, str) or not path:
                raise InvalidArgument(f"TLS {what} path must be a non-empty string, got {path!r}")
            _read_pem(path, what)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(cert, key, ca) bytes, read now (certificates rotated on disk apply to new channels)."""
        return _read_pem(self.cert, "cert"), _read_pem(self.key, "key"), _read_pem(self.ca, "ca")


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Server side of mutual TLS: a client without a certificate signed by `ca` is refused."""
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: trust only `ca`, present our own certificate."""
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# -- bearer token -------------------------------------------------------------------------
def check_token(token: str) -> str:
    """`token` if it is usable as a bearer token; InvalidArgument (not echoing it) otherwise."""
    if not isinstance(token, str) or not token:
        raise InvalidArgument("the bearer token is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters")
    if not set(token) <= _TOKEN_CHARS:
        raise InvalidArgument("the bearer token must be printable ASCII without spaces")
    return token


def read_token(token_file: str | None, env: Mapping[str, str]) -> str | None:
    """The shared token: `token_file` if given, else env[SHARDPS_TOKEN], else None (no token).

    Surrounding whitespace (a trailing newline from `echo > file`) is stripped; an empty
    result is an error rather than "no authentication", which would be a silent downgrade.
    """
    if token_file:
        try:
            with open(token_file, encoding="ascii") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InvalidArgument(f"token file {token_file!r} cannot be read: {reason}") from None
        token = text.strip()
        if not token:
            raise InvalidArgument(f"token file {token_file!r} is empty")
        try:
            return check_token(token)
        except InvalidArgument as exc:
            raise InvalidArgument(f"token file {token_file!r}: {exc}") from None
    value = env.get(TOKEN_ENV)
    if value is None:
        return None
    token = value.strip()
    if not token:
        raise InvalidArgument(f"{TOKEN_ENV} is set but empty")
    try:
        return check_token(token)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{TOKEN_ENV}: {exc}") from None


def _abort_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str):
    """A handler of the same streaming kind as `handler` that only aborts.

    No request deserializer: a refused caller's bytes are never parsed.
    """
    def refuse(request_or_iterator, context):
        context.abort(code, message)

    return interceptors.make_handler(interceptors.UNARY if handler is None else interceptors.kind_of(handler),
                                     refuse)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`.

    The comparison is constant-time (hmac.compare_digest) so response timing reveals nothing
    about how much of a guess matched. The status message never echoes what was sent.
    Health and reflection stay open (see UNAUTHENTICATED_PREFIXES).
    """

    def __init__(self, token: str):
        self._expected = (_BEARER + check_token(token)).encode("ascii")

    def _authorized(self, metadata) -> bool:
        ok = False
        for key, value in metadata or ():
            if key != TOKEN_METADATA_KEY:
                continue
            sent = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
            # Compare every authorization value (no early exit) so a wrong first header
            # takes as long as a right one.
            ok = hmac.compare_digest(sent, self._expected) or ok
        return ok

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        # Unknown methods get UNAUTHENTICATED too, so an anonymous caller cannot probe
        # which services this server runs.
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                              "missing or invalid bearer token")


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a channel.

    An interceptor rather than grpc.metadata_call_credentials because call credentials are
    refused on insecure channels, and a token on loopback without TLS is a supported setup.
    """

    def __init__(self, token: str):
        self._pair = (TOKEN_METADATA_KEY, _BEARER + check_token(token))

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        # Drop any authorization the caller set so exactly one token is sent.
        metadata = [(k, v) for k, v in (d.metadata or ()) if k != TOKEN_METADATA_KEY]
        metadata.append(self._pair)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


# -- the bundle psctl builds ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Security:
    """What a process uses on every channel and server. The default is plaintext, no token."""

    tls: TLSConfig | None = None
    # repr=False: Security objects end up in logged configs; the token must not.
    token: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.token is not None:
            check_token(self.token)

    @property
    def enabled(self) -> bool:
        return self.tls is not None or self.token is not None


NO_SECURITY = Security()


def build_security(tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
                   token_file: str | None, env: Mapping[str, str], tls_server_name: str = "") -> Security:
    """Security from the CLI's values (--tls-cert/--tls-key/--tls-ca/--token-file, SHARDPS_TOKEN).

    The three TLS paths go together: a partial set is an error, not a quiet fallback to
    plaintext.
    """
    given = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--tls-ca": tls_ca}
    if any(given.values()) and not all(given.values()):
        missing = sorted(flag for flag, value in given.items() if not value)
        raise InvalidArgument(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing {missing}")
    if tls_server_name and not tls_cert:
        raise InvalidArgument("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
    tls = TLSConfig(tls_cert, tls_key, tls_ca, tls_server_name) if tls_cert else None
    return Security(tls=tls, token=read_token(token_file, env))


def _is_loopback(address: str) -> bool:
    """True for unix sockets and loopback hosts (where a clear-text token is not exposed)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[-1] if "://" in address else address
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_channel(address: str, security: Security, options: Sequence[tuple[str, object]] = ()
                   ) -> grpc.Channel:
    """A channel to `address`: TLS if configured, the token on every call if configured."""
    opts = list(options)
    if security.tls is not None:
        if security.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", security.tls.server_name))
        ch = grpc.secure_channel(address, channel_credentials(security.tls), options=opts)
    else:
        if security.token is not None and not _is_loopback(address):
            log.warning("sending the bearer token to %s without TLS: it can be read on the network",
                        address)
        ch = grpc.insecure_channel(address, options=opts)
    if security.token is not None:
        ch = grpc.intercept_channel(ch, TokenClientInterceptor(security.token))
    return ch


def server_interceptors(security: Security) -> list[grpc.ServerInterceptor]:
    """Interceptors to pass to grpc.server(); authentication first, before any other."""
    return [TokenAuthInterceptor(security.token)] if security.token is not None else []


def add_port(server: grpc.Server, listen: str, security: Security) -> int:
    """Listen on `listen` (host:port; port 0 = any free port) with TLS if configured.

    Returns the bound port; Unavailable if the address cannot be bound.
    """
    try:
        if security.tls is not None:
            port = server.add_secure_port(listen, server_credentials(security.tls))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise Unavailable(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise Unavailable(f"cannot listen on {listen}")
    return port


__all__ = [
    "MAX_TOKEN_CHARS", "NO_SECURITY", "Security", "TLSConfig", "TOKEN_ENV", "TOKEN_METADATA_KEY",
    "TokenAuthInterceptor", "TokenClientInterceptor", "UNAUTHENTICATED_PREFIXES", "add_port",
    "build_security", "channel_credentials", "check_token", "read_token", "secure_channel", "server_credentials",
    "server_interceptors",
]

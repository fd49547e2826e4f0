"""Transport security: optional mutual TLS and optional bearer tokens, one shared or one per role.

Both are off by default (loopback demos and tests). `Security` is built once in psctl from
flags and environment; the helpers here turn it into channels, server ports and server
interceptors, so no role package deals with certificates or tokens itself.

Tokens come in two modes:

- one shared token (`--token-file FILE` or SHARDPS_TOKEN): every process sends it and every
  daemon accepts it for every role, as before roles existed;
- role tokens (`--token-dir DIR` or SHARDPS_TOKEN_DIR): DIR holds `<role>.token` files (the
  token itself: sent by a process of that role, accepted by a daemon) and `<role>.sha256`
  files (its SHA-256 in hex: enough for a daemon to accept it, useless for sending it), for
  the roles worker, server, observer and admin (pscommon/roles.py). A process sends the
  token of its own role (psctl picks it: worker, server, observer for status and inspect,
  admin for checkpoint and export), or admin.token when DIR has no token for its role; a
  daemon accepts each token for its role only.

A token without TLS travels in clear text: use it alone only on loopback or a network you
trust, and pair it with TLS everywhere else.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from typing import Mapping, Sequence

import grpc

from shardps.pscommon import interceptors
from shardps.pscommon.errors import (InvalidArgument, PermissionDenied, PSError, Unauthenticated, Unavailable,
                                      to_status)
from shardps.pscommon.roles import ADMIN, ROLES, allowed_roles, may_call

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "authorization"
TOKEN_ENV = "SHARDPS_TOKEN"
TOKEN_DIR_ENV = "SHARDPS_TOKEN_DIR"
TOKEN_SUFFIX = ".token"     # <role>.token in a token dir: the role's token
DIGEST_SUFFIX = ".sha256"   # <role>.sha256: its SHA-256 in hex, enough to accept it
_BEARER = "Bearer "
_BEARER_BYTES = _BEARER.encode("ascii")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
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


def _read_ascii(path: str, what: str) -> str:
    """The text of `path`; InvalidArgument naming `what` and the file (never its content)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise InvalidArgument(f"{what} {path!r} cannot be read: {reason}") from None


def _read_token_file(path: str, what: str = "token file") -> str:
    """The token in `path`, surrounding whitespace stripped; InvalidArgument naming the file
    (never echoing its content) when it cannot be read, is empty or is no usable token."""
    return _token_from(_read_ascii(path, what), f"{what} {path!r}")


def _token_from(text: str, where: str) -> str:
    """`text` stripped of surrounding whitespace, as a bearer token; InvalidArgument naming
    `where` (never the text) when it is empty or no usable token."""
    token = text.strip()
    if not token:
        raise InvalidArgument(f"{where} is empty")
    try:
        return check_token(token)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def read_token(token_file: str | None, env: Mapping[str, str]) -> str | None:
    """The shared token: `token_file` if given, else env[SHARDPS_TOKEN], else None (no token).

    Surrounding whitespace (a trailing newline from `echo > file`) is stripped; an empty
    result is an error rather than "no authentication", which would be a silent downgrade.
    """
    if token_file:
        return _read_token_file(token_file)
    value = env.get(TOKEN_ENV)
    if value is None:
        return None
    if not value.strip():
        raise InvalidArgument(f"{TOKEN_ENV} is set but empty")
    return _token_from(value, TOKEN_ENV)


def _read_digest_file(path: str) -> bytes:
    """A `<role>.sha256` file: 64 hex digits, first on the line (`sha256sum`'s output works)."""
    words = _read_ascii(path, "token digest file").split()
    if not words or not _HEX_DIGEST.fullmatch(words[0]):
        raise InvalidArgument(f"token digest file {path!r} does not start with a SHA-256 in hex (64 hex digits): "
                              f"make it with  printf %s \"$(cat ROLE.token)\" | sha256sum > ROLE{DIGEST_SUFFIX}")
    return bytes.fromhex(words[0])


def read_token_dir(token_dir: str) -> tuple[dict[str, str], "RoleTokens"]:
    """(role -> token, for each `<role>.token` in `token_dir`; what a daemon given the folder
    accepts: every role with a `.token` or a `.sha256`).

    Names starting with a dot (Kubernetes' `..data` links) and files of other suffixes are
    ignored; a `.token` or `.sha256` file of an unknown role is refused, so a typo cannot drop
    a role quietly. A role with both files needs them to agree."""
    try:
        names = sorted(os.listdir(token_dir))
    except OSError as exc:
        raise InvalidArgument(f"token dir {token_dir!r} cannot be read: {exc.strerror or exc}") from None
    tokens: dict[str, str] = {}
    digests: dict[str, bytes] = {}
    for name in names:
        if name.startswith("."):
            continue
        role, suffix = os.path.splitext(name)
        if suffix not in (TOKEN_SUFFIX, DIGEST_SUFFIX):
            continue
        path = os.path.join(token_dir, name)
        if role not in ROLES:
            raise InvalidArgument(f"token dir {token_dir!r}: {name!r} names no role; the files are ROLE{TOKEN_SUFFIX} "
                                  f"or ROLE{DIGEST_SUFFIX} for ROLE in {', '.join(ROLES)}")
        if suffix == TOKEN_SUFFIX:
            tokens[role] = _read_token_file(path, "token file")
            digest = token_digest(tokens[role])
        else:
            digest = _read_digest_file(path)
        if role in digests and not hmac.compare_digest(digests[role], digest):
            raise InvalidArgument(f"token dir {token_dir!r}: {role}{TOKEN_SUFFIX} and {role}{DIGEST_SUFFIX} disagree "
                                  "(the digest is not that token's)")
        digests[role] = digest
    if not digests:
        raise InvalidArgument(f"token dir {token_dir!r} holds no ROLE{TOKEN_SUFFIX} or ROLE{DIGEST_SUFFIX} file "
                              f"(ROLE: {', '.join(ROLES)})")
    try:
        accept = RoleTokens.of(digests)
    except InvalidArgument as exc:
        raise InvalidArgument(f"token dir {token_dir!r}: {exc}") from None
    return tokens, accept


def read_tokens(token_file: str | None, token_dir: str | None, env: Mapping[str, str],
                role: str | None) -> tuple[str | None, "RoleTokens | None"]:
    """(the token this process sends, the tokens its server accepts) from the CLI's values.

    `role` is the role whose token the process sends (None: it sends none, as the scheduler,
    which calls no one). `--token-file` (or SHARDPS_TOKEN) is one token for every role: sent
    as it is, accepted for every role (accept None). `--token-dir` (or SHARDPS_TOKEN_DIR) is
    role mode: the process sends `<role>.token`, or `admin.token` when the folder has none for
    its role; its server accepts each token of the folder for its role only. A flag wins over
    the environment; the two flags together, or the two variables together, are refused.
    """
    if role is not None and role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    if token_file and token_dir:
        raise InvalidArgument("--token-file (one token, every role) and --token-dir (a token per role) "
                              "cannot be used together: give one")
    if token_file:
        return read_token(token_file, env), None
    if not token_dir:
        value = env.get(TOKEN_DIR_ENV)
        if value is None:
            return read_token(None, env), None
        if not value.strip():
            raise InvalidArgument(f"{TOKEN_DIR_ENV} is set but empty")
        if env.get(TOKEN_ENV) is not None:
            raise InvalidArgument(f"{TOKEN_ENV} (one token, every role) and {TOKEN_DIR_ENV} (a token per role) "
                                  "are both set: unset one")
        token_dir = value.strip()
    tokens, accept = read_token_dir(token_dir)
    if role is None:
        return None, accept
    if role in tokens:
        return tokens[role], accept
    if ADMIN in tokens:
        log.info("token dir %s has no %s%s: sending %s%s", token_dir, role, TOKEN_SUFFIX, ADMIN, TOKEN_SUFFIX)
        return tokens[ADMIN], accept
    raise InvalidArgument(f"token dir {token_dir!r} has no {role}{TOKEN_SUFFIX} (nor {ADMIN}{TOKEN_SUFFIX}): "
                          f"this command sends the {role} token")


# -- role tokens: what a daemon accepts ------------------------------------------------------
def token_digest(token: str) -> bytes:
    """The SHA-256 of a bearer token: what a daemon needs to recognise a token (a `.sha256`
    file holds its hex), not enough to send it."""
    return hashlib.sha256(check_token(token).encode("ascii")).digest()


def _role_names(roles) -> str:
    """"worker", "worker and admin", "worker, server and admin": in the order of ROLES."""
    ordered = [r for r in ROLES if r in roles]
    if len(ordered) < 2:
        return "".join(ordered)
    return f"{', '.join(ordered[:-1])} and {ordered[-1]}"


@dataclasses.dataclass(frozen=True)
class RoleTokens:
    """The bearer tokens a daemon accepts, as SHA-256 digests, each with the roles it holds.

    Role mode (`--token-dir`): one digest per role, no two roles sharing one (a token names
    exactly one role). Single-token mode (`--token-file`, `RoleTokens.single`): one digest
    holding every role, what the one shared token always meant.
    """

    entries: tuple[tuple[bytes, frozenset[str]], ...]

    def __post_init__(self):
        if not isinstance(self.entries, tuple) or not self.entries:
            raise InvalidArgument("role tokens: at least one token is needed")
        seen: set[str] = set()
        digests: set[bytes] = set()
        for digest, roles in self.entries:
            if not isinstance(digest, bytes) or len(digest) != hashlib.sha256().digest_size:
                size = f"{len(digest)} bytes" if isinstance(digest, bytes) else type(digest).__name__
                raise InvalidArgument(f"role tokens: a token digest must be 32 bytes (SHA-256), got {size}")
            if digest in digests:
                raise InvalidArgument("role tokens: the same token is listed twice")
            digests.add(digest)
            if not isinstance(roles, frozenset) or not roles:
                raise InvalidArgument(f"role tokens: a token must hold at least one role, got {roles!r}")
            for role in roles:
                if role not in ROLES:
                    raise InvalidArgument(f"role tokens: unknown role {role!r}; the roles are {', '.join(ROLES)}")
                if role in seen:
                    raise InvalidArgument(f"role tokens: the {role} role has two tokens")
                seen.add(role)

    def __repr__(self) -> str:  # never the digests: they let anyone test guesses offline
        return f"RoleTokens({', '.join(r for r in ROLES if r in self.roles)})"

    @classmethod
    def single(cls, token: str) -> "RoleTokens":
        """One token holding every role (`--token-file`, SHARDPS_TOKEN)."""
        return cls(((token_digest(token), frozenset(ROLES)),))

    @classmethod
    def of(cls, digests: Mapping[str, bytes]) -> "RoleTokens":
        """One token per role, from role -> SHA-256 digest. Two roles with the same token are
        refused: a token would then hold both, which no reader of the files expects."""
        by_digest: dict[bytes, list[str]] = collections.defaultdict(list)
        for role, digest in digests.items():
            by_digest[digest].append(role)
        for roles in by_digest.values():
            if len(roles) > 1:
                raise InvalidArgument(f"the {_role_names(roles)} tokens are the same token; each role needs "
                                      "its own (or give one token for every role with --token-file)")
        return cls(tuple((d, frozenset(r)) for d, r in by_digest.items()))

    @property
    def roles(self) -> frozenset[str]:
        """The roles some token holds; calls in the others' roles cannot be made."""
        return frozenset().union(*(roles for _, roles in self.entries))

    @property
    def shared(self) -> bool:
        """One token, every role (single-token mode)."""
        return len(self.entries) == 1 and self.entries[0][1] == frozenset(ROLES)

    def match(self, token: bytes) -> frozenset[str]:
        """The roles `token` holds (empty: an unknown token). Compares digests with
        hmac.compare_digest against every entry, with no early exit, so the time taken says
        nothing about how much of a guess matched."""
        digest = hashlib.sha256(token).digest()
        found: frozenset[str] = frozenset()
        for expected, roles in self.entries:
            if hmac.compare_digest(digest, expected):
                found = found | roles
        return found


def _refuse(handler: grpc.RpcMethodHandler | None, error: PSError):
    """A handler of the same streaming kind as `handler` that only aborts with `error`'s
    status (typed: the client gets the same class back).

    No request deserializer: a refused caller's bytes are never parsed.
    """
    status = to_status(error)

    def refuse(request_or_iterator, context):
        context.abort_with_status(status)

    return interceptors.make_handler(interceptors.UNARY if handler is None else interceptors.kind_of(handler),
                                     refuse)


class RoleAuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call by its `authorization: Bearer <token>` metadata and lets it
    through only when the token's role may call the method (roles.METHOD_ROLES).

    No known token: UNAUTHENTICATED ("missing or invalid bearer token"). A known token whose
    role the method's row does not name: PERMISSION_DENIED naming the role and the method.
    Either way the handler never runs and the request is never parsed. Tokens are compared
    as SHA-256 digests in constant time (RoleTokens.match); no status message echoes what was
    sent. Health and reflection stay open (see UNAUTHENTICATED_PREFIXES).
    """

    def __init__(self, tokens: RoleTokens):
        if not isinstance(tokens, RoleTokens):
            raise InvalidArgument(f"RoleAuthInterceptor needs RoleTokens, got {type(tokens).__name__}")
        self.tokens = tokens

    def roles_of(self, metadata) -> frozenset[str]:
        """The roles the call's bearer token holds (empty: none, or no known token)."""
        roles: frozenset[str] = frozenset()
        for key, value in metadata or ():
            if key != TOKEN_METADATA_KEY:
                continue
            sent = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
            bearer = sent.startswith(_BEARER_BYTES)
            # Hash and compare every authorization value (no early exit, and the same work
            # without the prefix) so a wrong header takes as long as a right one.
            found = self.tokens.match(sent[len(_BEARER_BYTES):] if bearer else sent)
            if bearer:
                roles = roles | found
        return roles

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        roles = self.roles_of(handler_call_details.invocation_metadata)
        if not roles:
            # Unknown methods get UNAUTHENTICATED too, so an anonymous caller cannot probe
            # which services this server runs.
            return _refuse(handler, Unauthenticated("missing or invalid bearer token"))
        if may_call(roles, method):
            return handler   # None for a method this server lacks: UNIMPLEMENTED, as without a token
        role = _role_names(roles)
        allowed = allowed_roles(method)
        log.debug("refused %s from the %s token", method, role)
        return _refuse(handler, PermissionDenied(
            f"the {role} token may not call {method}; it is for the {_role_names(allowed)} "
            f"token{'s' if len(allowed) > 1 else ''}", role=role, method=method))


class TokenAuthInterceptor(RoleAuthInterceptor):
    """One shared token that holds every role: refuses every call whose `authorization`
    metadata is not `Bearer <token>` (the mode of `--token-file` and SHARDPS_TOKEN)."""

    def __init__(self, token: str):
        super().__init__(RoleTokens.single(token))


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
    """What a process uses on every channel and server. The default is plaintext, no token.

    `token` is the bearer token this process sends on every call. `accept` is what its own
    gRPC server accepts, each token for its roles (role mode, `--token-dir`); None with a
    token: that one token, for every role (single-token mode, `--token-file`).
    """

    tls: TLSConfig | None = None
    # repr=False: Security objects end up in logged configs; the token must not.
    token: str | None = dataclasses.field(default=None, repr=False)
    accept: RoleTokens | None = None   # its repr names the roles only

    def __post_init__(self):
        if self.token is not None:
            check_token(self.token)
        if self.accept is not None and not isinstance(self.accept, RoleTokens):
            raise InvalidArgument(f"Security.accept must be RoleTokens or None, got {type(self.accept).__name__}")

    @property
    def enabled(self) -> bool:
        return self.tls is not None or self.token is not None or self.accept is not None

    @property
    def accepted(self) -> RoleTokens | None:
        """What a server built with this Security accepts: `accept`, else the one token for
        every role, else nothing is checked (None)."""
        if self.accept is not None:
            return self.accept
        return RoleTokens.single(self.token) if self.token is not None else None

    def describe(self) -> str:
        """One line for a daemon's start-up log (names roles, never tokens)."""
        tls = "mutual TLS" if self.tls is not None else "no TLS"
        accepted = self.accepted
        if accepted is None:
            auth = "no token"
        elif accepted.shared:
            auth = "one token for every role"
        else:
            missing = [r for r in ROLES if r not in accepted.roles]
            auth = (f"role tokens: {', '.join(r for r in ROLES if r in accepted.roles)}"
                    + (f" (no token: {', '.join(missing)}; their calls are refused)" if missing else ""))
        return f"{tls}, {auth}"


NO_SECURITY = Security()


def build_security(tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
                   token_file: str | None, env: Mapping[str, str], tls_server_name: str = "",
                   token_dir: str | None = None, role: str | None = None) -> Security:
    """Security from the CLI's values (--tls-cert/--tls-key/--tls-ca, --token-file or SHARDPS_TOKEN,
    --token-dir or SHARDPS_TOKEN_DIR; `role`: whose token this process sends, see read_tokens).

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
    token, accept = read_tokens(token_file, token_dir, env, role)
    return Security(tls=tls, token=token, accept=accept)


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
    accepted = security.accepted
    return [RoleAuthInterceptor(accepted)] if accepted is not None else []


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
    "DIGEST_SUFFIX", "MAX_TOKEN_CHARS", "NO_SECURITY", "RoleAuthInterceptor", "RoleTokens", "Security", "TLSConfig",
    "TOKEN_DIR_ENV", "TOKEN_ENV", "TOKEN_METADATA_KEY", "TOKEN_SUFFIX", "TokenAuthInterceptor",
    "TokenClientInterceptor", "UNAUTHENTICATED_PREFIXES", "add_port", "build_security", "channel_credentials",
    "check_token", "read_token", "read_token_dir", "read_tokens", "secure_channel", "server_credentials",
    "server_interceptors", "token_digest",
]

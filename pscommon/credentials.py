"""Member credentials: proof that a call comes from the member it names.

The scheduler holds a job key (32 random bytes, kept in its state directory so a restarted
scheduler honours the credentials it issued). Joining or registering returns, with the lease,
a credential: an HMAC-SHA256 under the job key of (role, member id, incarnation). A member
shows it on every call made as that member; whoever holds the key checks it without a round
trip, so a caller that read a worker's id and incarnation from `psctl status` still cannot
heartbeat, leave, rejoin or push as that worker.

Pure functions: no clock, no I/O but the key's random bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from shardps.pscommon.errors import BadCredential

KEY_BYTES = 32
_CONTEXT = b"shardps-member-credential/1"


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def issue(key: bytes, role: str, member_id: int, incarnation: int) -> bytes:
    """The credential of one incarnation of one member."""
    message = b"|".join([_CONTEXT, role.encode(), str(int(member_id)).encode(), str(int(incarnation)).encode()])
    return hmac.new(key, message, hashlib.sha256).digest()


def check(key: bytes, role: str, member_id: int, incarnation: int, presented: bytes) -> None:
    """BadCredential unless `presented` is the credential of (role, member_id, incarnation).
    Constant time in the credential's bytes."""
    if not presented:
        raise BadCredential(f"{role} {member_id} incarnation {incarnation}: the call carries no member "
                            "credential; only the member itself may act as it",
                            member=member_id, incarnation=incarnation)
    if not hmac.compare_digest(issue(key, role, member_id, incarnation), bytes(presented)):
        raise BadCredential(f"{role} {member_id} incarnation {incarnation}: the member credential does not "
                            "match; only the member itself may act as it", member=member_id, incarnation=incarnation)

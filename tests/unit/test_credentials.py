"""Member credentials: only the key's holder can make one, and one names exactly one member."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardps.pscommon import credentials
from shardps.pscommon.errors import BadCredential, Unauthenticated

KEY = bytes(range(32))


def test_a_credential_checks_for_its_member_only():
    cred = credentials.issue(KEY, "worker", 3, 7)
    credentials.check(KEY, "worker", 3, 7, cred)
    for role, member, inc in (("server", 3, 7), ("worker", 4, 7), ("worker", 3, 8), ("worker", 3, 6)):
        with pytest.raises(BadCredential, match="does not match"):
            credentials.check(KEY, role, member, inc, cred)
    with pytest.raises(BadCredential):
        credentials.check(credentials.new_key(), "worker", 3, 7, cred)   # another job's key


def test_no_credential_is_refused_as_unauthenticated():
    with pytest.raises(Unauthenticated, match="worker 3 incarnation 7: the call carries no member credential"):
        credentials.check(KEY, "worker", 3, 7, b"")


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=40))
def test_forged_bytes_never_pass(member, incarnation, forged):
    if forged == credentials.issue(KEY, "worker", member, incarnation):
        return   # a 2**-256 event
    with pytest.raises(BadCredential):
        credentials.check(KEY, "worker", member, incarnation, forged)


def test_keys_are_fresh_and_long():
    a, b = credentials.new_key(), credentials.new_key()
    assert len(a) == credentials.KEY_BYTES == 32 and a != b

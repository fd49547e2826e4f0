"""push.may_fuse: which steps carry the next pull in their push's reply (PushPullBatch)."""
import itertools

import pytest

from shardps.worker.push import may_fuse


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_fuse_a_members_one_message_push(mode):
    assert may_fuse(enabled=True, mode=mode, observer=False, batched=True)


def test_sync_never_fuses():
    # its pull waits for the step to be settled (SettleStep): not something a push's reply can hold
    assert not any(may_fuse(enabled=e, mode="sync", observer=o, batched=b)
                   for e, o, b in itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("mode", ["async", "ssp"])
@pytest.mark.parametrize("enabled,observer,batched", [(False, False, True), (True, True, True), (True, False, False)])
def test_turned_off_an_observer_or_a_streamed_push_does_not_fuse(mode, enabled, observer, batched):
    assert not may_fuse(enabled=enabled, mode=mode, observer=observer, batched=batched)

"""Consistency modes, one module each, registered by the proto Mode enum."""
from __future__ import annotations

from shardps.pscommon.wire.v1 import job_pb2
from shardps.psserver.consistency.async_mode import AsyncMode
from shardps.psserver.consistency.base import ConsistencyMode, GateState, PushOutcome
from shardps.psserver.consistency.ssp import SSPMode
from shardps.psserver.consistency.sync import SyncMode

REGISTRY = {job_pb2.MODE_ASYNC: AsyncMode, job_pb2.MODE_SYNC: SyncMode, job_pb2.MODE_SSP: SSPMode}
BY_NAME = {cls.name: cls for cls in REGISTRY.values()}


def build(mode: str, staleness: int = 0) -> ConsistencyMode:
    return BY_NAME[mode](staleness)


__all__ = ["ConsistencyMode", "GateState", "PushOutcome", "REGISTRY", "build"]

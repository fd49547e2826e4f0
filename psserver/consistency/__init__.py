"""Consistency modes, one module each, registered by the proto Mode enum."""
from __future__ import annotations

from shardps.pscommon.config import MODES, SETTLING_SHARD, JobSpec
from shardps.pscommon.wire.v1 import job_pb2
from shardps.psserver.consistency.async_mode import AsyncMode
from shardps.psserver.consistency.base import (HOLD, Accumulate, ApplyNow, Commit, CompleteStep, ConsistencyMode, Excuse,
                                               GateState, Hold, LearnClock, PullDecision, PushDecision, Rebase, Refuse,
                                               SettledDecision, ViewDecision)
from shardps.psserver.consistency.ssp import SSPMode
from shardps.psserver.consistency.sync import SyncMode

REGISTRY: dict[int, type[ConsistencyMode]] = {
    job_pb2.MODE_ASYNC: AsyncMode, job_pb2.MODE_SYNC: SyncMode, job_pb2.MODE_SSP: SSPMode}


def mode_of(job: JobSpec) -> int:
    """The job's mode as the proto enum (JobSpec keeps the flag's spelling)."""
    return MODES[job.mode]


def for_job(job: JobSpec, shard: int = SETTLING_SHARD) -> ConsistencyMode:
    return REGISTRY[mode_of(job)](job.staleness, settles=shard == SETTLING_SHARD, shards=job.num_servers)


__all__ = ["HOLD", "REGISTRY", "SETTLING_SHARD", "Accumulate", "ApplyNow", "Commit", "CompleteStep", "ConsistencyMode",
           "Excuse", "GateState", "Hold", "LearnClock", "PullDecision", "PushDecision", "Rebase", "Refuse", "SettledDecision", "ViewDecision",
           "for_job", "mode_of"]

"""How long the workers of an SSP job wait for a worker that joins late.

A scheduler, two shards and two trainers run in this process (real gRPC on loopback, the
digits MLP, a fixed compute delay per step); once both trainers are past clock JOIN_AT, a third
joins. The scheduler hands a joiner the slowest clock that heartbeats reported, which lags the
true clocks by up to a heartbeat interval of steps; the shards' gates know the exact clocks.
Two arms, alternated, in one run:

- heartbeat: the joiner computes from the scheduler's clock (the shards' `next_step` left as
  it was before the gate told joiners the exact clock; restored by patching SSPMode here);
- gate: shardps as it is: the first pull moves the joiner to the slowest live clock.

For each arm: the joiner's start clock and the slowest clock of the others at that moment,
and the seconds the two original trainers spent inside pull() over the AFTER steps after the
join (the SSP wait for the joiner, plus the pull itself). Figures, not assertions.

    python bench/joiner_wait.py                 # 3 rounds
    python bench/joiner_wait.py --rounds 1 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from shardps import PSClient
from shardps.pscommon.config import JobSpec
from shardps.psserver.consistency import ConsistencyMode
from shardps.psserver.consistency.ssp import SSPMode
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker import data, models

JOIN_AT = 150
AFTER = 100
STEP_DELAY_S = 0.01
STALENESS = 2


class Trainer(threading.Thread):
    def __init__(self, address: str, seed: int, split, stop_at: threading.Event):
        super().__init__(daemon=True)
        self.address, self.seed, self.split, self.stop_at = address, seed, split, stop_at
        self.clock = 0
        self.start_clock = None
        self.pull_s_after: float = 0.0
        self.steps_after = 0
        self.joined = threading.Event()
        self.watch_from: threading.Event | None = None

    def run(self):
        model = models.build("digits-mlp", seed=0)
        gen = torch.Generator().manual_seed(self.seed)
        with PSClient.connect(self.address, model, name=f"bench-{self.seed}") as ps:
            self.start_clock = ps.clock
            self.joined.set()
            while not self.stop_at.is_set():
                t0 = time.perf_counter()
                ps.pull()
                pulled = time.perf_counter() - t0
                if self.watch_from is not None and self.watch_from.is_set() and self.steps_after < AFTER:
                    self.pull_s_after += pulled
                    self.steps_after += 1
                idx = torch.randint(len(self.split.x_train), (32,), generator=gen)
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(self.split.x_train[idx]), self.split.y_train[idx]).backward()
                time.sleep(STEP_DELAY_S)   # the compute a bigger model would take
                ps.push()
                self.clock = ps.clock


def one_round(arm: str, split) -> dict:
    original = SSPMode.next_step
    if arm == "heartbeat":
        SSPMode.next_step = ConsistencyMode.next_step
    sched = SchedulerProcess(SchedulerConfig(job=JobSpec(mode="ssp", staleness=STALENESS, num_servers=2)))
    sched.start()
    servers = [ServerProcess(ServerConfig(scheduler=sched.address, shard_id=s)) for s in range(2)]
    for s in servers:
        s.start()
    stop = threading.Event()
    joined = threading.Event()
    try:
        first = [Trainer(sched.address, seed, split, stop) for seed in (1, 2)]
        for t in first:
            t.watch_from = joined
            t.start()
        deadline = time.monotonic() + 120
        while min(t.clock for t in first) < JOIN_AT:
            if time.monotonic() > deadline:
                raise RuntimeError("the first trainers did not reach the join clock")
            time.sleep(0.01)
        joiner = Trainer(sched.address, 3, split, stop)
        joiner.start()
        joiner.joined.wait(60)
        slowest_at_join = min(t.clock for t in first)
        joined.set()
        deadline = time.monotonic() + 120
        while min(t.steps_after for t in first) < AFTER and time.monotonic() < deadline:
            time.sleep(0.05)
        first_clock_of_joiner = joiner.clock
        stop.set()
        for t in first + [joiner]:   # they leave before the servers go
            t.join(60)
        return {"arm": arm, "joiner_start_clock": joiner.start_clock, "slowest_at_join": slowest_at_join,
                "pull_s_over_after_steps": [round(t.pull_s_after, 3) for t in first],
                "after_steps": AFTER, "joiner_clock_at_end": first_clock_of_joiner}
    finally:
        stop.set()
        SSPMode.next_step = original
        for s in servers:
            s.drain()
        sched.drain()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    split = data.digits()
    results = []
    for _ in range(a.rounds):
        for arm in ("heartbeat", "gate"):
            results.append(one_round(arm, split))
    summary = {arm: {"median_pull_s": statistics.median(sum(r["pull_s_over_after_steps"]) / 2
                                                        for r in results if r["arm"] == arm),
                     "median_start_lag": statistics.median(r["slowest_at_join"] - (r["joiner_start_clock"] or 0)
                                                           for r in results if r["arm"] == arm)}
               for arm in ("heartbeat", "gate")}
    out = {"runs": results, "summary": summary, "join_at": JOIN_AT, "after_steps": AFTER,
           "step_delay_s": STEP_DELAY_S, "staleness": STALENESS}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

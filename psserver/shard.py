"""One shard's state and the executor around the pure decisions.

Everything mutable sits behind one condition variable: the gates (psserver.consistency),
the exactly-once ledger (psserver.ledger), the optimizer's apply. Pulls wait on the condition
with a deadline; pushes and membership changes notify it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np

from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import (Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                                     NotYetMember, StaleIncarnation, Unavailable)
from shardps.pscommon.sharding import Key
from shardps.pscommon.stats import STALENESS_BOUNDS, WAIT_BOUNDS_S, Histogram
from shardps.psserver import checkpoint, consistency, embeddings, ledger, optim, reseed

log = logging.getLogger("shardps.server")
T = TypeVar("T")


@dataclasses.dataclass
class KeyState:
    """One key on this shard: its value, its optimizer state, and how often it was updated."""

    spec: Key
    value: np.ndarray                  # flat float32
    state: dict[str, np.ndarray]       # optimizer state, same length
    version: int = 0                   # updates applied to this key


@dataclasses.dataclass(frozen=True)
class WorkerView:
    """A worker as the scheduler's membership view shows it to this shard."""

    worker: int
    incarnation: int
    alive: bool
    clock: int


@dataclasses.dataclass
class KeyTraffic:
    """Bytes of one key moved by pushes or by pulls."""

    logical: int = 0
    wire: int = 0
    codec_s: float = 0.0   # decoding (pushes) or encoding (pulls) on this server


class Shard:
    def __init__(self, shard_id: int, job: JobSpec, now: Callable[[], float] = time.monotonic,
                 table_policy: embeddings.TablePolicy = embeddings.TablePolicy()):
        self.shard_id = shard_id
        self.job = job
        self.now = now
        self.cond = threading.Condition()
        self.mode = consistency.for_job(job, shard_id)
        self.optimizer = optim.build(job.optimizer)
        self.gate = consistency.GateState()
        self.tables = embeddings.TableSet(shard_id, job.num_servers, job.optimizer, table_policy)
        self.ledger: dict[int, ledger.LedgerEntry] = {}
        self.dead: dict[int, int] = {}   # worker -> incarnation declared dead/left
        self.entries: dict[str, KeyState] = {}
        self.fingerprint = ""
        self.version = 0                 # pushes applied to this shard
        self.view = 0                    # the membership view number adopted last
        self.newest_incarnation = 0      # the highest worker incarnation any adopted view named
        self.started = now()
        self.pushes = self.pulls = self.duplicates = 0
        self.rebases = 0                 # sync: times this shard caught up with the workers' step
        self.nonfinite_pushes = 0        # pushes with NaN or Inf (refused, or applied without them)
        self.collecting: reseed.Collecting | None = None   # offers to re-seed it, while empty
        self.reseeded: reseed.Reseeded | None = None
        self.reseed_window_s = reseed.WINDOW_S
        self.draining = False            # set at drain: nothing waits here any more
        self.waiting_pulls = 0           # pulls inside wait_pull now
        self.held_until = 0.0            # a consistent cut holds pushes until then (see hold)
        self._cuts: dict[int, _Cut] = {}  # sync: completed step -> the cut waiting for it
        # sync, the settling shard: the last step it completed and whose pushes counted
        self.settled: tuple[int, frozenset[int]] | None = None
        self.dropped_pushes = 0          # sync: pushes dropped because they did not reach every shard
        self.staleness = Histogram(STALENESS_BOUNDS)
        self.pull_wait = Histogram(WAIT_BOUNDS_S)
        self.push_traffic: dict[str, KeyTraffic] = {}
        self.pull_traffic: dict[str, KeyTraffic] = {}

    # -- declaration -------------------------------------------------------------------
    def declare(self, fingerprint: str, keys: list[Key], values: dict[str, np.ndarray],
                tables: list = ()) -> tuple[int, int]:
        """Create missing keys with their initial values, and missing embedding tables;
        existing ones keep theirs. All checks pass before anything is created.

        The shard takes `values` over: arrays that own writable float32 data become its
        storage without a copy, so the caller must not use them afterwards.
        """
        self._check_values(keys, values)
        with self.cond:
            self._check_same_model(fingerprint, keys)
            self.tables.check_declare(list(tables))
            created = self._create(fingerprint, keys, values)
            self.tables.declare(list(tables))
            return created

    def _check_values(self, keys: list[Key], values: dict[str, np.ndarray]) -> None:
        for k in keys:
            if k.shard != self.shard_id:
                raise InvalidArgument(f"key {k.key!r} belongs to shard {k.shard}, this is shard {self.shard_id}")
            v = values.get(k.key)
            if v is None:
                raise InvalidArgument(f"key {k.key!r} declared without an initial value")
            if v.size != k.length:
                raise InvalidArgument(f"key {k.key!r}: initial value has {v.size} elements, spec says {k.length}")
        if len(values) != len(keys):
            extra = sorted(set(values) - {k.key for k in keys})
            raise InvalidArgument(f"initial values for undeclared keys {extra[:5]}")

    def _check_same_model(self, fingerprint: str, keys: list[Key]) -> None:
        if self.fingerprint and fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"model {fingerprint} differs from the model {self.fingerprint} this shard holds")
        for k in keys:
            old = self.entries.get(k.key)
            if old is not None and old.spec != k:
                raise FailedPrecondition(f"key {k.key!r} exists with a different spec")

    def _create(self, fingerprint: str, keys: list[Key], values: dict[str, np.ndarray]) -> tuple[int, int]:
        created = 0
        for k in keys:
            if k.key not in self.entries:
                # an array that owns writable float32 data is adopted, not copied again
                value = np.require(values[k.key], np.float32, ["C", "W", "O"]).reshape(-1)
                self.entries[k.key] = KeyState(k, value, self.optimizer.init_state(k.length))
                created += 1
        self.fingerprint = fingerprint
        return created, len(keys) - created

    # -- re-seeding an empty shard (psserver.reseed decides) -----------------------------
    def offer_seed(self, worker: int, incarnation: int, version: int, fingerprint: str, keys: list[Key],
                   values: dict[str, np.ndarray], timeout_s: float, tables: list = ()) -> reseed.Reseeded | None:
        """A worker's copy of this shard, offered because the shard restarted empty. Waits
        until the shard has decided which copy to take (see psserver.reseed) and returns what
        it took; None when the shard holds the model without having been re-seeded (a
        declaration got there first). The embedding tables are declared again, their rows
        starting from their initial values: a worker holds only the rows it pulled."""
        self._check_values(keys, values)
        offer = reseed.Offer(worker, version)
        deadline = self.now() + max(0.0, timeout_s)
        with self.cond:
            self._check_caller(worker, incarnation)
            self.tables.check_declare(list(tables))
            if not self.fingerprint:
                self._collect(offer, fingerprint, keys, values)
            while not self.fingerprint:
                self._check_open()
                c = self.collecting
                if reseed.decided(c.offered, self.gate.live, c.first_at, self.now(), self.reseed_window_s):
                    self._adopt_seed()
                    break
                left = deadline - self.now()
                if left <= 0:
                    raise DeadlineExceeded(f"shard {self.shard_id} did not decide which copy re-seeds it "
                                           f"within {timeout_s:.1f}s")
                self.cond.wait(min(left, 0.2))
            self._check_same_model(fingerprint, keys)
            self.tables.declare(list(tables))
            return self.reseeded

    def _collect(self, offer: reseed.Offer, fingerprint: str, keys: list[Key], values: dict[str, np.ndarray]):
        c = self.collecting
        if c is None:
            c = self.collecting = reseed.Collecting(self.now(), fingerprint, keys)
        elif fingerprint != c.fingerprint or keys != c.keys:
            raise FailedPrecondition(f"model {fingerprint} differs from the model {c.fingerprint} "
                                     f"the other workers offered to re-seed shard {self.shard_id}")
        c.offered.add(offer.worker)
        if reseed.fresher(offer, c.best):
            c.best, c.values = offer, values
        self.cond.notify_all()

    def _adopt_seed(self) -> None:
        c, self.collecting = self.collecting, None
        self._create(c.fingerprint, c.keys, c.values)
        self.version = c.best.version
        self.reseeded = reseed.Reseeded(c.best.worker, c.best.version, len(c.offered), self.now() - self.started)
        log.warning("shard %d restarted empty: re-seeded from worker %d's copy at version %d (%d copies offered); "
                    "the updates applied after that pull are lost, optimizer state starts again",
                    self.shard_id, c.best.worker, c.best.version, len(c.offered))
        self.cond.notify_all()

    # -- membership ----------------------------------------------------------------------
    def set_view(self, view: int, members: Iterable[WorkerView]) -> None:
        """Adopt the scheduler's membership view; gates re-evaluate, waiters wake up."""
        with self.cond:
            if view < self.view:
                return
            self.view = view
            live, start = {}, {}
            for m in members:
                self.newest_incarnation = max(self.newest_incarnation, m.incarnation)
                if m.alive:
                    if self.gate.live.get(m.worker) != m.incarnation:
                        self.gate.heard.discard(m.worker)   # a new incarnation starts afresh
                    live[m.worker] = m.incarnation
                    start[m.worker] = m.clock
                else:
                    self.dead[m.worker] = max(self.dead.get(m.worker, 0), m.incarnation)
            self.gate.live = live
            self.gate.start_clock = start
            self._apply(self._take(self.mode.on_view_change(self.gate)), base_version=None)
            self._take_cut()
            self.cond.notify_all()

    def _check_caller(self, worker: int, incarnation: int) -> None:
        dead = self.dead.get(worker)
        if dead is not None and incarnation <= dead:
            raise StaleIncarnation(
                f"worker {worker} incarnation {incarnation} was declared dead or left; rejoin",
                member=worker, incarnation=incarnation)
        live = self.gate.live.get(worker)
        if live is not None and incarnation < live:
            raise StaleIncarnation(
                f"worker {worker} incarnation {incarnation} is stale (current {live}); rejoin",
                member=worker, incarnation=incarnation, current=live)

    def _check_member(self, worker: int, incarnation: int) -> None:
        """Only a live member of the adopted view may push or pull at a gate. Incarnations
        come from one counter, so one newer than any in the view says the view is behind (a
        worker that just joined, before the watch stream brought it here): retry. One the view
        should name but does not is a worker that was pruned, or never joined: refuse. A shard
        that never adopted a view has no membership to check (a shard used as a library; the
        server daemon adopts a view before it serves)."""
        self._check_caller(worker, incarnation)
        if self.view == 0 or self.gate.live.get(worker) == incarnation:
            return
        if incarnation > self.newest_incarnation:
            raise NotYetMember(
                f"shard {self.shard_id} has not yet seen worker {worker} incarnation {incarnation} join "
                f"(membership view {self.view}); retry", member=worker, incarnation=incarnation, view=self.view)
        raise StaleIncarnation(
            f"worker {worker} incarnation {incarnation} is not a member of shard {self.shard_id}'s "
            f"membership view {self.view}; rejoin", member=worker, incarnation=incarnation, view=self.view)

    # -- pull ----------------------------------------------------------------------------
    def wait_pull(self, worker: int, incarnation: int, step: int, timeout_s: float,
                  observer: bool = False, settled: tuple[int, frozenset[int]] | None = None
                  ) -> tuple[int, int, float]:
        """Block until the mode lets this pull proceed. Returns (shard_version, next_step, waited).

        Observers (operators, evaluation) read the current values without a gate. `settled`:
        the settling shard's last outcome, as the caller knows it (sync).
        """
        if observer:
            with self.cond:
                return self.version, step, 0.0
        t0 = self.now()
        deadline = t0 + max(0.0, timeout_s)
        with self.cond:
            self._check_member(worker, incarnation)
            self._check_open()
            self._learn_settled(settled)
            self._learn_from_pull(worker, step)
            self.waiting_pulls += 1
            try:
                self._wait_gate(worker, incarnation, step, deadline, timeout_s)
            finally:
                self.waiting_pulls -= 1
            waited = self.now() - t0
            self.pulls += 1
            if self.mode.records_pull_wait:
                self.pull_wait.observe(waited)
            return self.version, self.mode.next_step(self.gate, worker, step), waited

    def _wait_gate(self, worker: int, incarnation: int, step: int, deadline: float, timeout_s: float) -> None:
        while not self.mode.pull_ready(self.gate, worker, step):
            self._check_open()
            left = deadline - self.now()
            if left <= 0:
                raise DeadlineExceeded(
                    f"pull for step {step} by worker {worker} not admitted by {self.mode.name} "
                    f"within {timeout_s:.1f}s (slowest live clock "
                    f"{min((self.gate.clock_of(w) for w in self.gate.live), default=None)})")
            self.cond.wait(min(left, 1.0))
            self._check_caller(worker, incarnation)

    def close_gates(self) -> None:
        """The server drains: every call waiting here (a pull at a gate, a re-seed offer) gets
        UNAVAILABLE now, which the worker retries at the shard's next server, instead of
        being cancelled when the drain's grace period ends."""
        with self.cond:
            self.draining = True
            self.cond.notify_all()

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable(f"shard {self.shard_id}'s server is draining; retry at its replacement")

    def _learn_from_pull(self, worker: int, step: int) -> None:
        """A pull for `step` says the worker pushed every step before it to every shard: after
        a restart this is how the gates learn where the workers are."""
        for _ in range(4):  # at most Rebase, Excuse or Commit, CompleteStep
            decision = self.mode.on_pull(self.gate, worker, step)
            if decision is consistency.HOLD:
                return
            self._apply(self._take(decision), base_version=None)
            self._take_cut()
            self.cond.notify_all()

    def _learn_settled(self, settled: tuple[int, frozenset[int]] | None) -> None:
        """The settling shard's outcome of a step, brought by a caller: a shard that follows
        completes that step with exactly those pushes."""
        if settled is None:
            return
        for _ in range(2):  # at most Rebase, CompleteStep
            decision = self.mode.on_settled(self.gate, *settled)
            if decision is consistency.HOLD:
                return
            self._apply(self._take(decision), base_version=None)
            self._take_cut()
            self.cond.notify_all()

    def settle(self, worker: int, incarnation: int, step: int, timeout_s: float, wait: bool = True,
               settled: tuple[int, frozenset[int]] | None = None
               ) -> tuple[tuple[int, frozenset[int]] | None, int, float]:
        """SettleStep. On the settling shard: the worker's pushes before `step` reached every
        shard; with `wait`, it returns once the steps before `step` are complete, as a pull
        would. On another shard: adopt the outcome the caller brings (`settled`), at once.
        Returns (the last step this shard settled and its contributors, next_step, waited)."""
        if self.mode.name != "sync":
            raise FailedPrecondition(f"shard {self.shard_id} serves a {self.mode.name} job: only sync steps are settled")
        t0 = self.now()
        with self.cond:
            self._check_member(worker, incarnation)
            self._check_open()
            self._learn_settled(settled)
            if self.mode.settles:
                self._learn_from_pull(worker, step)
                if wait:
                    self._wait_gate(worker, incarnation, step, t0 + max(0.0, timeout_s), timeout_s)
            return self.settled, self.mode.next_step(self.gate, worker, step), self.now() - t0

    def keys_for_pull(self, names: list[str]) -> list[str]:
        if not names:
            return sorted(self.entries)
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise NotFound(f"keys not on shard {self.shard_id}: {missing[:5]}")
        return list(names)

    def nbytes_of(self, keys: list[str]) -> int:
        return sum(self.entries[k].value.nbytes for k in keys)

    def read_many(self, keys: list[str], encode: Callable[[str, np.ndarray], object]):
        """(shard_version, [(key, encode(key, value))]) all under one lock acquisition."""
        with self.cond:
            return self.version, [(k, encode(k, self.entries[k].value)) for k in keys]

    def read(self, key: str, encode: Callable[[np.ndarray], object]):
        """Run `encode` on a key's current value under the lock (a consistent slice)."""
        with self.cond:
            entry = self.entries[key]
            return encode(entry.value)

    def count_nonfinite(self) -> None:
        with self.cond:
            self.nonfinite_pushes += 1

    # -- embedding tables ----------------------------------------------------------------
    def check_rows(self, table: str, ids: np.ndarray, dim: int | None = None) -> int:
        """The table's dim, once `ids` are found to live here (and `dim` matches, if given)."""
        with self.cond:
            spec = self.tables.spec(table)
        if dim is not None and dim != spec.dim:
            raise InvalidArgument(f"table {table!r} has dim {spec.dim}, the rows sent have {dim}")
        self.tables.check_ids(table, ids)
        return spec.dim

    def row_dim(self, table: str) -> int:
        """The dim of a declared table (NotFound otherwise). Without the lock: tables are only
        ever added to a shard's set, and a dict read is atomic."""
        return self.tables.spec(table).dim

    def first_foreign_rows(self, asks: list[tuple[str, np.ndarray]]) -> int | None:
        """The first of `asks` (table, ids) naming an id that does not live here (None: all
        do), with one hash over all of them; check_rows names the id."""
        return self.tables.first_foreign(asks)

    def scan_rows(self, table: str) -> tuple[int, np.ndarray, np.ndarray]:
        """(shard version, ids, rows) of every stored row of `table`: copies, one moment."""
        with self.cond:
            self.tables.spec(table)
            snap = self.tables.stores[table].snapshot()
            return self.version, snap.arrays["ids"], snap.arrays["values"]

    def read_rows(self, requests: list[tuple[str, np.ndarray]], observer: bool) -> list[np.ndarray]:
        """The rows of each (table, ids), under one lock acquisition: a consistent read. A
        training pull creates the rows it touches; an observer's creates nothing."""
        with self.cond:
            read = self.tables.peek if observer else self.tables.lookup
            return [read(table, ids) for table, ids in requests]

    # -- push ----------------------------------------------------------------------------
    def check_keys_exist(self, keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in self.entries]
        if missing:
            raise NotFound(f"keys {missing[:5]} are not on shard {self.shard_id}")

    def check_push_keys(self, grads: dict[str, np.ndarray]) -> None:
        for key, g in grads.items():
            if isinstance(key, embeddings.TableKey):
                continue   # the servicer checked the rows against their table (check_rows)
            entry = self.entries.get(key)
            if entry is None:
                raise NotFound(f"key {key!r} is not on shard {self.shard_id}")
            if g.size != entry.value.size:
                raise InvalidArgument(f"gradient for {key!r} has {g.size} elements, the key has {entry.value.size}")

    def push(self, worker: int, incarnation: int, step: int, base_version: int,
             grads: dict[str, np.ndarray], settled: tuple[int, frozenset[int]] | None = None
             ) -> tuple[int, bool, int]:
        """Take one push exactly once. Returns (shard_version, duplicate, staleness)."""
        self.check_push_keys(grads)
        with self.cond:
            return self._push_locked(worker, incarnation, step, base_version, grads, settled)

    def push_pull(self, worker: int, incarnation: int, step: int, base_version: int,
                  grads: dict[str, np.ndarray], read: Callable[[], T],
                  settled: tuple[int, frozenset[int]] | None = None
                  ) -> tuple[tuple[int, bool, int], tuple[int, int, T] | None]:
        """push(), then in the same lock round the pull of step + 1 when the mode admits it at
        once: ((shard_version, duplicate, staleness), (shard_version, next_step, read()) or
        None). `read` runs under the lock, so the values are those right after this push (or
        its first copy, for a duplicate); the servicer's reads the dense keys and the rows
        asked (read_rows: the lock is reentrant). Nothing after the push raises: once it is
        applied, the caller must hear so."""
        if not self.mode.fuses_pull:
            raise FailedPrecondition(f"shard {self.shard_id} serves a {self.mode.name} job: a push and a pull "
                                     "are fused only in async and ssp (sync's pull waits for the step to settle)")
        self.check_push_keys(grads)
        with self.cond:
            pushed = self._push_locked(worker, incarnation, step, base_version, grads, settled)
            if self.draining or not self.mode.pull_ready(self.gate, worker, step + 1):
                return pushed, None
            self._learn_from_pull(worker, step + 1)
            self.pulls += 1
            if self.mode.records_pull_wait:
                self.pull_wait.observe(0.0)
            return pushed, (self.version, self.mode.next_step(self.gate, worker, step + 1), read())

    def _push_locked(self, worker: int, incarnation: int, step: int, base_version: int,
                     grads: dict[str, np.ndarray], settled: tuple[int, frozenset[int]] | None
                     ) -> tuple[int, bool, int]:
        self._check_member(worker, incarnation)
        self._wait_hold()
        self._learn_settled(settled)
        if ledger.classify(self.ledger, worker, incarnation, step) is ledger.Verdict.DUPLICATE:
            self.duplicates += 1
            return self.version, True, 0
        # a refused push raises here, before the ledger or the clocks record it
        decision = self.mode.on_push(self.gate, worker, step, grads)
        if isinstance(decision, consistency.Rebase):
            self._take(decision)
            decision = self.mode.on_push(self.gate, worker, step, grads)
        apply_now = self._take(decision)
        ledger.record(self.ledger, worker, incarnation, step)
        self.gate.heard.add(worker)
        self.gate.clocks[worker] = max(self.gate.clocks.get(worker, 0), step + 1)
        self.pushes += 1
        staleness = self._apply(apply_now, base_version)
        if self.tables.stores:
            self.tables.tick(max(self.gate.clocks.values()))
        self._take_cut()
        self.cond.notify_all()
        return self.version, False, staleness

    def _take(self, decision: consistency.PushDecision | consistency.ViewDecision
              ) -> Mapping[str, np.ndarray] | None:
        """Make the gate changes a mode's decision names; returns the gradients to apply now."""
        match decision:
            case consistency.Refuse(error=error):
                raise error
            case consistency.ApplyNow(grads=grads):
                return grads
            case consistency.Accumulate(worker=worker, grads=grads):
                self._accumulate(worker, grads)
                return None
            case consistency.CompleteStep(worker=worker, grads=grads, excuse=excuse, count=count):
                if worker is not None:
                    self._accumulate(worker, grads)
                if excuse is not None:
                    self.gate.excused.add(excuse)
                return self._complete_step(count)
            case consistency.Commit(worker=worker):
                self.gate.committed.add(worker)
                return None
            case consistency.Excuse(worker=worker):
                self.gate.excused.add(worker)
                return None
            case consistency.LearnClock(worker=worker, clock=clock):
                self.gate.clocks[worker] = clock
                return None
            case consistency.Rebase(step=step):
                self._rebase(step)
                return None
            case consistency.Hold():
                return None
        raise TypeError(f"not a consistency decision: {decision!r}")

    def _accumulate(self, worker: int, grads: Mapping[str, np.ndarray]) -> None:
        # kept as pushed (decoded arrays nobody writes to) until the step is settled
        self.gate.pending[frozenset((worker,))] = dict(grads)

    def _complete_step(self, count: frozenset[int] | None) -> dict[str, np.ndarray]:
        """End the step in progress; returns the gradients of the pushes that count, summed in
        worker order (so every shard adds them alike) and averaged over their workers (the
        excused sent none here, so they do not count). The others are dropped."""
        taken = sorted((who for who in self.gate.pending if count is None or who <= count), key=min)
        dropped = sorted(w for who in self.gate.pending if who not in taken for w in who)
        if dropped:
            self.dropped_pushes += len(dropped)
            log.warning("shard %d step %d: dropped the pushes of workers %s (they did not say their push "
                        "reached every shard)", self.shard_id, self.gate.completed_step, dropped)
        contributors = frozenset(w for who in taken for w in who)
        avg = _average([self.gate.pending[who] for who in taken], len(contributors))
        if self.mode.settles:
            self.settled = (self.gate.completed_step, contributors)
        self.gate.pending, self.gate.committed, self.gate.excused = {}, set(), set()
        self.gate.completed_step += 1
        self.gate.resuming = False
        return avg

    def _rebase(self, step: int) -> None:
        """Continue at the workers' step: the pushes of the step this shard was on went to its
        previous life (before the restart) and are not coming again."""
        log.warning("shard %d resumes at step %d, the workers' step (it restarted at step %d; "
                    "%d pending contributions dropped)", self.shard_id, step, self.gate.completed_step,
                    len(self.gate.pending_from))
        self.gate.pending, self.gate.committed, self.gate.excused = {}, set(), set()
        self.gate.completed_step = step
        self.rebases += 1

    def _apply(self, grads: Mapping[str, np.ndarray] | None, base_version: int | None) -> int:
        """One optimizer update of the keys in `grads` (none: nothing); returns the staleness."""
        if not grads:
            return 0
        staleness = 0
        if base_version is not None and self.mode.measures_staleness:
            staleness = max(0, self.version - base_version)
            self.staleness.observe(staleness)
        for key, grad in grads.items():
            if isinstance(key, embeddings.TableKey):
                self.tables.apply(key.table, grad)
                continue
            entry = self.entries[key]
            entry.version += 1
            self.optimizer.apply(entry.value, grad.reshape(-1), entry.state, entry.version)
        self.version += 1
        return staleness

    # -- checkpoints ---------------------------------------------------------------------
    def _checkpoint_arrays(self) -> list[tuple[str, np.ndarray]]:
        """Every array a checkpoint holds, by its name in the tensors file (under the lock)."""
        arrays = []
        for key, e in self.entries.items():
            arrays.append((key, e.value))
            arrays.extend((f"{key}{checkpoint.STATE_SEP}{name}", arr) for name, arr in e.state.items())
        # sync: the step in progress, summed
        pending = _summed(list(self.gate.pending[who] for who in sorted(self.gate.pending, key=min)))
        arrays.extend((f"{key}{checkpoint.STATE_SEP}{checkpoint.PENDING}", arr)
                      for key, arr in pending.items() if isinstance(key, str))
        return arrays

    def snapshot(self, job_json: dict) -> checkpoint.Snapshot:
        """A consistent copy of everything a checkpoint holds. The lock is held only for the
        copy: pushes and pulls wait a memcpy, not a write to disk."""
        with self.cond:
            layout = [(name, arr.shape) for name, arr in self._checkpoint_arrays()]
        buf = _touched_buffer(sum(int(np.prod(shape)) for _, shape in layout))
        with self.cond:
            return self._snapshot_locked(job_json, buf)

    def _snapshot_locked(self, job_json: dict, buf: np.ndarray | None = None) -> checkpoint.Snapshot:
        arrays = self._checkpoint_arrays()
        if buf is None or buf.size != sum(arr.size for _, arr in arrays):
            # a declare or a sync step changed the arrays since `buf` was sized: size it again
            buf = np.empty(sum(arr.size for _, arr in arrays), np.float32)
        tensors, offset = {}, 0
        for name, arr in arrays:
            view = buf[offset:offset + arr.size].reshape(arr.shape)
            np.copyto(view, arr, casting="no")   # float32 only: anything else is a bug, not a cast
            tensors[name] = view
            offset += arr.size
        return checkpoint.Snapshot(
            shard=self.shard_id, fingerprint=self.fingerprint, job=job_json,
            keys=[dataclasses.asdict(e.spec) for e in self.entries.values()],
            versions={k: e.version for k, e in self.entries.items()}, shard_version=self.version,
            ledger=ledger.to_json(self.ledger),
            gate={"completed_step": self.gate.completed_step,
                  "clocks": {str(w): c for w, c in self.gate.clocks.items()},
                  "pending_from": sorted(self.gate.pending_from)},
            tensors=tensors, tables=self.tables.snapshot())

    # -- consistent cuts across shards (psctl checkpoint --consistent) --------------------
    def cut_at(self, step: int, job_json: dict, timeout_s: float) -> checkpoint.Snapshot:
        """sync: a copy of the state after exactly `step` completed steps. A shard at `step`
        copies now (nothing is applied until the step in progress completes); one behind
        copies at the moment it gets there, inside the completing call; one past it refuses
        with ABORTED. Every shard copied at the same step holds the same real step of the run."""
        deadline = self.now() + max(0.0, timeout_s)
        with self.cond:
            if self.gate.completed_step > step:
                raise Aborted(f"shard {self.shard_id} is past step {step} (at {self.gate.completed_step})")
            if self.gate.completed_step == step:
                return self._snapshot_locked(job_json)
            cut = self._cuts.setdefault(step, _Cut(job_json))
            try:
                while cut.snapshot is None:
                    self._check_open()
                    left = deadline - self.now()
                    if left <= 0:
                        raise DeadlineExceeded(f"shard {self.shard_id} did not reach step {step} within "
                                               f"{timeout_s:.1f}s (at {self.gate.completed_step})")
                    self.cond.wait(min(left, 1.0))
                return cut.snapshot
            finally:
                if self._cuts.get(step) is cut and cut.snapshot is None:
                    del self._cuts[step]

    def _take_cut(self) -> None:
        cut = self._cuts.pop(self.gate.completed_step, None)
        if cut is not None:
            cut.snapshot = self._snapshot_locked(cut.job_json)

    def hold(self, seconds: float) -> None:
        """async/ssp: take no push for at most `seconds` (they wait) while every shard is held,
        so that a cut of all of them differs by at most the one push each worker has in flight."""
        with self.cond:
            self.held_until = self.now() + max(0.0, seconds)

    def release(self) -> None:
        with self.cond:
            self.held_until = 0.0
            self.cond.notify_all()

    def _wait_hold(self) -> None:
        while self.held_until > self.now():
            self._check_open()
            self.cond.wait(min(self.held_until - self.now(), 0.5))

    def write_snapshot(self, path: str, job_json: dict) -> checkpoint.Snapshot:
        """Copy the state under the lock, write the tensors file at `path` outside it, and
        return the matching Snapshot (without the copy, which is freed here)."""
        snap = self.snapshot(job_json)
        checkpoint.save_tensors(snap.tensors, path)
        return dataclasses.replace(snap, tensors={})

    def restore(self, snap: checkpoint.Snapshot) -> None:
        """Adopt a checkpoint (at start-up, before serving). All or nothing: every check runs
        before the shard changes."""
        if snap.shard != self.shard_id:
            raise FailedPrecondition(f"checkpoint of shard {snap.shard} cannot restore shard {self.shard_id}")
        entries = {}
        for raw in snap.keys:
            spec = Key(**{**raw, "param_shape": tuple(raw["param_shape"])})
            value = snap.tensors.get(spec.key)
            if value is None or value.size != spec.length:
                raise FailedPrecondition(f"checkpoint lacks values for key {spec.key!r}")
            entries[spec.key] = KeyState(spec, _adopt(value), self._restored_state(spec, snap.tensors),
                                         snap.versions.get(spec.key, 0))
        suffix = f"{checkpoint.STATE_SEP}{checkpoint.PENDING}"
        pending = {name[:-len(suffix)]: np.require(arr, np.float32, ["C", "W", "O"])
                   for name, arr in snap.tensors.items() if name.endswith(suffix)}
        strays = sorted(set(pending) - set(entries))
        if strays:
            raise FailedPrecondition(f"checkpoint has pending sums of keys it does not hold: {strays[:5]}")
        tables = embeddings.TableSet(self.shard_id, self.job.num_servers, self.job.optimizer, self.tables.policy)
        tables.restore(snap.tables)
        with self.cond:
            self.tables = tables
            self.entries = entries
            self.fingerprint = snap.fingerprint
            self.version = snap.shard_version
            self.ledger = ledger.from_json(snap.ledger)
            self.gate.completed_step = int(snap.gate.get("completed_step", 0))
            self.gate.clocks = {int(w): int(c) for w, c in snap.gate.get("clocks", {}).items()}
            # one contribution of every worker in it: it counts if they all do
            pending_from = frozenset(int(w) for w in snap.gate.get("pending_from", []))
            self.gate.pending = {pending_from: pending} if pending_from else {}

    def _restored_state(self, spec: Key, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A key's optimizer state from a checkpoint: exactly this optimizer's arrays. A missing
        one is refused, not zeroed: zeros would restart the optimizer's history silently."""
        prefix = f"{spec.key}{checkpoint.STATE_SEP}"
        saved = {name[len(prefix):] for name in tensors
                 if name.startswith(prefix) and not name.endswith(checkpoint.PENDING)}
        expected = set(self.optimizer.state_names)
        if saved != expected:
            raise FailedPrecondition(f"checkpoint holds optimizer state {sorted(saved)} for key {spec.key!r}, "
                                     f"the {self.job.optimizer.kind} optimizer keeps {sorted(expected)}")
        state = {}
        for name in expected:
            arr = tensors[prefix + name]
            if arr.size != spec.length:
                raise FailedPrecondition(f"checkpoint's {name!r} state of key {spec.key!r} has {arr.size} "
                                         f"elements, the key {spec.length}")
            state[name] = _adopt(arr)
        return state

    # -- accounting ----------------------------------------------------------------------
    def count_traffic(self, table: dict[str, KeyTraffic], key: str, logical: int, wire: int,
                      codec_s: float = 0.0) -> None:
        with self.cond:
            t = table.setdefault(key, KeyTraffic())
            t.logical += logical
            t.wire += wire
            t.codec_s += codec_s

    def param_bytes(self) -> int:
        return sum(e.value.nbytes for e in self.entries.values())

    def optimizer_bytes(self) -> int:
        return sum(a.nbytes for e in self.entries.values() for a in e.state.values())


@dataclasses.dataclass
class _Cut:
    job_json: dict
    snapshot: checkpoint.Snapshot | None = None


def _touched_buffer(n: int) -> np.ndarray:
    """n float32 whose pages are already mapped: taken before the lock, so the copy under it
    does not also pay a page fault per 4 KiB (measured: 10x the memcpy on a fresh mapping)."""
    buf = np.empty(n, np.float32)
    buf[::1024] = 0
    return buf


def _summed(pushes: list[Mapping]) -> dict:
    """The keys' gradients summed over `pushes`, in their order (dense keys: float32 arrays;
    table keys: every push's rows, concatenated)."""
    total: dict = {}
    for grads in pushes:
        for key, g in grads.items():
            if isinstance(key, embeddings.TableKey):
                total[key] = embeddings.accumulate(total.get(key), g)
            elif key in total:
                total[key] += g
            else:
                total[key] = np.array(g, dtype=np.float32, copy=True)
    return total


def _average(pushes: list[Mapping], n: int) -> dict:
    return {k: embeddings.average(v, n) if isinstance(k, embeddings.TableKey) else v / np.float32(n)
            for k, v in _summed(pushes).items()} if n else {}


def _adopt(arr: np.ndarray) -> np.ndarray:
    """A loaded array as flat float32 shard storage; copied only if it is not already its own."""
    return np.require(arr, np.float32, ["C", "W", "O"]).reshape(-1)

"""`psctl worker`: the built-in training loop over PSClient, with metrics as JSON lines."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import torch

from shardps.pscommon import tables
from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, PSError, Unavailable
from shardps.pscommon.lifecycle import DaemonOptions, Telemetry
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import scheduler_pb2 as pb
from shardps.worker import data, loading, models
from shardps.worker.api import PSClient
from shardps.worker.client import ClientConfig, ShardClient
from shardps.worker.embedding import EmbeddingClient, sharded_embeddings
from shardps.worker.metrics import WorkerCollector
from shardps.worker.push import FUSED_MODES
from shardps.worker.session import Stopped

log = logging.getLogger("shardps.worker")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    scheduler: str
    model: str = "digits-mlp"       # built-in name or module:function
    data: str | None = None         # module:function for a custom model's data
    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    metrics_out: str | None = None
    append_metrics: bool = False    # append to metrics_out instead of starting a new file
    push_codec: str | None = None   # overrides the job's push codec
    error_feedback: bool = True     # with push_codec
    step_delay_s: float = 0.0
    progress: bool | None = None    # None: a bar when stderr is a terminal
    name: str = ""
    epochs: int = 0                 # > 0: train on assigned data partitions for this many epochs
    partitions: int = 16
    options: DaemonOptions = DaemonOptions()
    overlap: bool = False           # stream gradients from autograd hooks, prefetch pulls
    min_workers: int = 0            # wait until this many workers have joined before step 0
    connect_timeout_s: float = 120.0  # waiting for the scheduler and every server at start
    device_compression: bool | None = None   # None: fp16/bf16/topk pushes encoded on CUDA devices
    fuse: bool = True               # a push's reply carries the next pull where it may (push.may_fuse)
    eval_every: int = 0             # > 0: held-out metrics every this many of our steps (a curve to plot)

    def __post_init__(self):
        if self.model not in models.BUILTIN and ":" not in self.model:
            raise InvalidArgument(f"model {self.model!r} is not one of {sorted(models.BUILTIN)} "
                                  "nor module:function")
        if self.steps < 1:
            raise InvalidArgument(f"steps {self.steps} must be >= 1")
        if not 1 <= self.batch_size <= 65536:
            raise InvalidArgument(f"batch size {self.batch_size} must be in [1, 65536]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"device {self.device!r} is not one of auto, cpu, cuda")
        if self.step_delay_s < 0:
            raise InvalidArgument(f"step delay {self.step_delay_s} must be >= 0")
        if self.epochs < 0 or not 1 <= self.partitions <= 100_000:
            raise InvalidArgument(f"epochs {self.epochs} must be >= 0 and partitions {self.partitions} "
                                  "in [1, 100000]")
        if self.eval_every < 0:
            raise InvalidArgument(f"eval every {self.eval_every} steps: must be >= 0 (0: only at the end)")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda: no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class MetricsWriter:
    """JSON lines: one record per step, one at the end. A new file (an existing one is
    truncated) unless `append`: then a run follows the runs already in it."""

    def __init__(self, path: str | None, append: bool = False):
        try:
            self.f = open(path, "a" if append else "w", buffering=1) if path else None
        except OSError as exc:  # a path given on the command line: a usage error, named
            raise InvalidArgument(f"cannot write --metrics-out {path}: {exc.strerror or exc}") from None
        self.t0 = time.time()

    @contextlib.contextmanager
    def paused(self):
        """The records' clock stands still meanwhile: a worker's periodic evaluations are left
        out of the times its step records carry, so its loss against time is training time."""
        began = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - began

    def write(self, **record) -> None:
        if self.f:
            record.setdefault("time", round(time.time() - self.t0, 4))
            self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()


def _progress(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="step", dynamic_ncols=True)


def _logs_above(bar):
    """While a progress bar is shown, log lines (the wait notices among them) are written
    above it instead of through it."""
    if bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm()


def wait_notice(record: logging.LogRecord) -> tuple[int, str, float] | None:
    """(shard, what is missing, seconds waited so far) from the transport's wait notice
    ("waiting for shard %d at %s: %s (%.0f s so far, ...)", Transport.call); None for any
    other record."""
    args = record.args
    if not (isinstance(record.msg, str) and record.msg.startswith("waiting for shard %d")
            and isinstance(args, tuple) and len(args) >= 4):
        return None
    shard, _, exc, waited = args[:4]
    try:
        return int(shard), "no server" if isinstance(exc, Unavailable) else "no answer", float(waited)
    except (TypeError, ValueError):
        return None


def wait_text(waits: dict[int, tuple[float, str]], now: float) -> str:
    """The progress bar's description while a step waits for shards, e.g. `waiting for shard 1
    (no server for 12 s)`; "" when nothing waits. `waits`: shard -> (since, what is missing)."""
    parts = [f"shard {shard} ({what} for {max(0.0, now - since):.0f} s)"
             for shard, (since, what) in sorted(waits.items())]
    return "waiting for " + ", ".join(parts) if parts else ""


class BarWaits(logging.Handler):
    """Puts the transport's wait notices on the progress bar: `waiting for shard 1 (no server
    for 12 s)`, its seconds counted up by `tick` (once a second, from `start`'s thread) until
    the step goes on (`clear`). Attached to the worker's logger while the bar is shown."""

    def __init__(self, bar, logger: logging.Logger = log, clock=time.monotonic):
        super().__init__(logging.WARNING)
        self.bar, self.logger, self.clock = bar, logger, clock
        self._waits: dict[int, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        logger.addHandler(self)

    def start(self, every_s: float = 1.0) -> "BarWaits":
        def run():
            while not self._stop.wait(every_s):
                self.tick()
        self._thread = threading.Thread(target=run, name="progress-waits", daemon=True)
        self._thread.start()
        return self

    def emit(self, record: logging.LogRecord) -> None:
        notice = wait_notice(record)
        if notice is None:
            return
        shard, what, waited = notice
        with self._lock:
            since = self._waits.get(shard, (self.clock() - waited, what))[0]
            self._waits[shard] = (since, what)
        self.tick()

    def tick(self) -> None:
        with self._lock:
            text = wait_text(self._waits, self.clock()) if self._waits else None
        if text is not None:
            self.bar.set_description_str(text)

    def clear(self) -> None:
        """The step went on: whatever it waited for answered."""
        with self._lock:
            if not self._waits:
                return
            self._waits.clear()
        self.bar.set_description_str("")

    def close(self) -> None:
        self._stop.set()
        self.logger.removeHandler(self)
        super().close()


class Loop:
    """One worker's training: steps on random batches, or epochs of assigned partitions.

    What a step computes comes from the model's task (data.Classification,
    ctr_sparse.ClickPrediction): the batch's inputs and targets, the loss. A model with
    sharded embedding tables names the ids each of them reads (`model.row_ids(*inputs)`); the
    loop fetches those rows before the forward and pushes their gradients with the dense
    ones; in async and ssp the push also asks for the next batch's rows where it is fused
    (one call a shard and step), or with `overlap` a prefetch pulls them once the push is
    acknowledged."""

    def __init__(self, cfg: TrainConfig, ps: PSClient, model, device, split,
                 metrics: MetricsWriter, stop: threading.Event, task=None):
        self.cfg, self.ps, self.model, self.device = cfg, ps, model, device
        self.split, self.metrics, self.stop = split, metrics, stop
        self.task = task or models.entry(cfg.model, cfg.data).task
        modules = sharded_embeddings(model)
        self.rows = EmbeddingClient(ps.client, modules) if modules else None
        # the next batch's rows come with this step's push where it is fused (one call a shard
        # and step); else, with overlap, a prefetch pulls them once the push is acknowledged
        self.fuse_rows = bool(self.rows and cfg.fuse and ps.client.job.mode in FUSED_MODES)
        self.prefetch_rows = bool(self.rows and cfg.overlap and self.rows.prefetch_enabled and not self.fuse_rows)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + ps.worker_id)
        self.bar = _progress(cfg.steps if not cfg.epochs else None, cfg.progress)
        self.waits = BarWaits(self.bar).start() if self.bar else None   # "waiting for shard 1 (...)"
        self.done = self.skipped = 0
        self.idle_steps = 0         # steps sat out without data (run_epochs, sync and ssp)
        self.sitting_out = False    # the last thing we did was sit out a step
        self.loss = float("nan")
        self.upcoming: torch.Tensor | None = None   # the next batch, when known
        self.evals, self.eval_s = 0, 0.0   # periodic evaluations (eval_every) and their seconds
        self.observer: ObservedRows | None = None   # reads the test ids' rows, kept between evaluations

    def step(self, idx: torch.Tensor) -> bool:
        """pull, forward/backward on the batch `idx`, push. False: sync skipped the step.
        With rows, the batch after this one is `self.upcoming` (run_* set it): its rows come with
        this push (fused) or a prefetch after it (overlap)."""
        ps, model = self.ps, self.model
        inputs, y = self.task.batch(self.split, idx, self.device)
        ps.pull()
        if self.waits:
            self.waits.clear()
        if self.rows:
            self.rows.fetch(model.row_ids(*inputs))
        model.zero_grad(set_to_none=True)
        loss_t = self.task.loss(model(*inputs), y)
        loss_t.backward()
        self.loss = float(loss_t.detach())
        if self.cfg.step_delay_s:
            time.sleep(self.cfg.step_delay_s)  # a deliberate straggler (benchmarks)
        next_rows = None
        if self.fuse_rows and self.upcoming is not None:
            next_rows = self.rows.asks(model.row_ids(*self.task.batch(self.split, self.upcoming, self.device)[0]))
        pushed = ps.push(row_grads=self.rows.row_grads() if self.rows else None, next_rows=next_rows)
        if self.waits:
            self.waits.clear()
        if not pushed:
            self.skipped += 1
            return False
        if self.prefetch_rows and self.upcoming is not None:
            # after the acknowledgement: the prefetched rows include this push
            self.rows.prefetch(model.row_ids(*self.task.batch(self.split, self.upcoming, self.device)[0]))
        self.done += 1
        self.metrics.write(step=self.done, clock=ps.clock, loss=round(self.loss, 5), worker=ps.worker_id)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss:.3f}")
        if eval_due(self.done, self.cfg):
            self.evaluate_now()
        return True

    def evaluate_now(self) -> None:
        """A periodic record of the held-out metrics of the model as this worker holds it. Its
        seconds go to `eval_s`, not to the training time: the records' clock stops meanwhile
        and train() leaves them out of wall_s, hence out of the steps/s reported. A failure
        (a server gone) costs the point, not the training."""
        if self.stop.is_set():
            return   # stopping: the servers may be gone, and the final record follows
        began = time.monotonic()
        try:
            with self.metrics.paused():
                held_out = self._held_out()
        except PSError as exc:
            log.warning("held-out evaluation at step %d failed: %s", self.done, exc)
            return
        finally:
            self.eval_s += time.monotonic() - began
        self.evals += 1
        self.metrics.write(step=self.done, **periodic_record(held_out), worker=self.ps.worker_id)

    def _held_out(self) -> dict:
        modules = sharded_embeddings(self.model)
        if modules and self.observer is None:   # one observer for every evaluation: one attach
            self.observer = ObservedRows(self.cfg.scheduler, modules, self.cfg.options.security)
        return evaluate(self.task, self.model, self.split, self.cfg.scheduler, self.cfg.options.security,
                        self.observer)

    def run_steps(self) -> None:
        n = self.task.size(self.split)

        def draw() -> torch.Tensor:
            return torch.randint(n, (self.cfg.batch_size,), generator=self.gen)
        # one batch drawn ahead, for the prefetch: the same batches in the same order (none
        # is prefetched after the last step)
        idx = draw()
        while self.done < self.cfg.steps and not self.stop.is_set():
            upcoming = draw()
            self.upcoming = upcoming if self.done + 1 < self.cfg.steps else None
            self.step(idx)
            idx = upcoming

    def run_epochs(self) -> None:
        """Take partition assignments until the scheduler says every epoch is done."""
        client = self.ps.client
        n = self.task.size(self.split)
        while not self.stop.is_set():
            status, epoch, partition = client.acquire_partition(self.cfg.partitions, self.cfg.epochs)
            if status == pb.ASSIGNMENT_STATUS_DONE:
                return
            if status == pb.ASSIGNMENT_STATUS_WAIT:
                # others hold the last assignments of this epoch
                if client.job.mode in ("sync", "ssp"):
                    self.sit_out()    # their steps wait for ours: take part without data
                else:
                    self.stop.wait(0.05)
                continue
            self.sitting_out = False
            assigned_as = client.incarnation
            batches = partition_batches(n, self.cfg.partitions, epoch, partition, self.cfg.batch_size, self.cfg.seed)
            for i, idx in enumerate(batches):
                if self.stop.is_set():
                    return
                if client.incarnation != assigned_as:
                    break
                self.upcoming = batches[i + 1] if i + 1 < len(batches) else None
                while not self.step(idx) and not self.stop.is_set():
                    pass  # sync skipped the step: the same batch on the current parameters
            if client.incarnation != assigned_as:
                # declared dead and rejoined mid-partition: the scheduler gave the partition
                # back to the queue, so someone else trains the rest of it, not us as well
                log.warning("partition %d of epoch %d dropped: its assignment lapsed when we rejoined",
                            partition, epoch)
                continue
            try:
                client.complete_partition(epoch, partition)
            except FailedPrecondition as exc:
                # our assignment lapsed (we were declared dead and rejoined): the partition went
                # back to the queue and is someone else's now
                log.warning("partition %d of epoch %d not recorded: %s", partition, epoch, exc)
                continue
            self.metrics.write(event="partition_done", epoch=epoch, partition=partition,
                               worker=self.ps.worker_id)

    def sit_out(self) -> None:
        """One step without data, while the others train the epoch's last partitions: in sync
        and ssp their steps wait for ours, so a worker with nothing to train keeps taking part
        in the steps, without a gradient, rather than hold the gate (docs/design.md, "Partition
        assignments"). sync: we pull the step after ours without pushing ours, and the shards
        count us in it without a gradient (not in its average). ssp: we pull (the gate paces
        us: never more than the staleness bound ahead of the slowest) and push a step in
        which no parameter has a gradient, so our clock moves and nothing is applied. Then
        the loop asks for data again."""
        ps = self.ps
        if ps.client.job.mode == "sync":
            if not self.sitting_out:
                ps.pull()   # our last push counts once a pull of the next step says it arrived
            ps.client.skip_step()
            ps.pull()
        else:
            self.model.zero_grad(set_to_none=True)
            ps.pull()
            ps.push()
        if self.waits:
            self.waits.clear()
        self.sitting_out = True
        self.idle_steps += 1

    def close(self) -> None:
        if self.waits:
            self.waits.close()
        if self.rows:
            self.rows.close()
        if self.observer:
            with contextlib.suppress(PSError, Stopped):   # leaving: nothing depends on it
                self.observer.close()
            self.observer = None


def eval_due(done: int, cfg: TrainConfig) -> bool:
    """A periodic evaluation after our `done`-th step? Not after the last of --steps: the final
    record evaluates the same model."""
    return bool(cfg.eval_every) and done % cfg.eval_every == 0 and (cfg.epochs > 0 or done < cfg.steps)


PERIODIC_FIELDS = {"eval_accuracy": "accuracy", "eval_auc": "auc", "eval_logloss": "logloss",
                   "teacher_auc": "teacher_auc"}


def periodic_record(held_out: dict) -> dict:
    """A periodic evaluation's fields as psctl plot reads them (`accuracy`, or `auc` and
    `logloss` with the teacher's AUC): the final record's `eval_` names are its end marker."""
    return {PERIODIC_FIELDS[k]: v for k, v in held_out.items() if k in PERIODIC_FIELDS}


def partition_batches(n: int, partitions: int, epoch: int, partition: int, batch_size: int, seed: int):
    """The batches of one partition: a per-epoch permutation of the samples, cut into
    `partitions` contiguous parts, each cut into batches. Every worker computes the same."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    part = torch.tensor_split(perm, partitions)[partition]
    return list(torch.split(part, batch_size))


def check_fits(model, split, device, cfg: TrainConfig, task=data.CLASSIFICATION) -> None:
    """One forward and loss on two samples: a model that cannot train on the data is a
    usage error, reported in one line before anything joins the job. Sharded embedding
    modules get their rows' initial values here, since no server is asked yet."""
    was_training = model.training
    model.eval()
    try:
        inputs, y = task.batch(split, torch.arange(min(2, task.size(split))), device)
        if sharded_embeddings(model):
            if not callable(getattr(model, "row_ids", None)):
                raise InvalidArgument("a model with sharded embedding tables must define row_ids(*inputs) -> "
                                      "{module: ids}: the rows to fetch before each forward")
            initial_rows(model.row_ids(*inputs))
        with torch.no_grad():
            task.loss(model(*inputs), y)
    except Exception as exc:  # noqa: BLE001 - user model/data: one line, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidArgument(f"--model {cfg.model!r} cannot train on "
                              f"{'--data ' + repr(cfg.data) if cfg.data else 'its data'}: "
                              f"{type(exc).__name__}: {first}") from None
    finally:
        model.train(was_training)
        for m in sharded_embeddings(model):
            m.clear()


def _unique_ids(ids) -> np.ndarray:
    """Sorted unique int64 ids of a tensor or array (uint64 ids by their bits)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().to("cpu").numpy()
    flat = np.asarray(ids).reshape(-1)
    return np.unique(flat.view(np.int64) if flat.dtype == np.uint64 else flat.astype(np.int64, copy=False))


def initial_rows(ids_by_module: dict) -> None:
    """Load each module's rows at their initial values (no server): what a table holds
    before anyone trained."""
    for m, ids in ids_by_module.items():
        unique = _unique_ids(ids)
        m.load(unique, tables.initial_rows(m.spec, unique))


class ObservedRows:
    """Rows of a model's sharded tables read as an observer, for evaluation: no gate, no
    clock, and nothing created (rows no one trained read as their initial value, as the
    shard answers an observer), so a held-out set's ids leave no rows behind. Only the ids
    asked for move: the worker holds the test set's rows, never the table."""

    def __init__(self, scheduler: str, modules, security: Security = NO_SECURITY):
        self.client = ShardClient(ClientConfig(scheduler=scheduler, name="evaluation", security=security))
        try:
            # the specs come from the model: the scheduler keeps none
            self.client.attach(embedding_tables=tuple(m.spec for m in modules))
        except BaseException:
            self.client.leave()
            raise

    def fetch(self, ids_by_module: dict) -> None:
        asks = {m: _unique_ids(ids) for m, ids in ids_by_module.items()}
        got = self.client.pull_rows({m.name: unique for m, unique in asks.items()})
        for m, unique in asks.items():
            m.load(unique, got[m.name])

    def close(self) -> None:
        self.client.leave()

    def __enter__(self) -> "ObservedRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate(task, model, split, scheduler: str, security: Security = NO_SECURITY,
             observer: ObservedRows | None = None) -> dict:
    """The task's held-out metrics of `model` as it is (its dense parameters already pulled),
    the rows of its sharded tables, if any, read from the servers as an observer (`observer`,
    or one for this call)."""
    modules = sharded_embeddings(model)
    if not modules:
        return task.evaluate(model, split)
    with contextlib.nullcontext(observer) if observer else ObservedRows(scheduler, modules, security) as rows:
        try:
            return task.evaluate(model, split, rows.fetch)
        finally:
            for m in modules:
                m.clear()


def evaluate_served(scheduler: str, model_name: str, data_spec: str | None = None,
                    security: Security = NO_SECURITY) -> dict:
    """Held-out metrics of the parameters the servers hold now, read as an observer, by the
    model's task: {"eval_accuracy": ...} for the classifiers; {"eval_auc", "eval_logloss",
    "teacher_auc", "teacher_logloss"} for ctr-sparse. (`psctl up`'s final evaluation.)"""
    entry = models.entry(model_name, data_spec)
    model = models.build(model_name, 0, data_spec)
    load_served(model, scheduler, security)
    return evaluate(entry.task, model, entry.dataset(), scheduler, security)


def load_served(model: torch.nn.Module, scheduler: str, security: Security = NO_SECURITY) -> None:
    """Copy the dense parameters the servers hold now into `model`, read as an observer (a
    model's embedding tables stay on the servers: its task reads the rows it needs)."""
    client = ShardClient(ClientConfig(scheduler=scheduler, name="evaluation", security=security))
    try:
        client.attach()
        flat = {n: np.empty(p.numel(), np.float32) for n, p in model.named_parameters()}
        client.pull(flat)
    finally:
        client.leave()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(flat[n]).view(p.shape))


def train(cfg: TrainConfig, stop: threading.Event | None = None) -> dict:
    """Train until `cfg.steps` steps are pushed (or `stop` is set); returns a summary."""
    stop = stop or threading.Event()
    torch.set_num_threads(1)  # every process on the host shares its cores
    device = pick_device(cfg.device)
    entry = models.entry(cfg.model, cfg.data)
    model = models.build(cfg.model, cfg.seed, cfg.data).to(device)
    split = entry.dataset()
    loading.check_split(split, entry.task, cfg.model, cfg.data)
    check_fits(model, split, device, cfg, entry.task)  # before joining: a mismatch must not fix the job's model
    metrics = MetricsWriter(cfg.metrics_out, append=cfg.append_metrics)
    name = cfg.name or f"{os.uname().nodename}:{os.getpid()}"
    telemetry = Telemetry(cfg.options, "worker", serves_rpc=False)
    try:
        # `stop` ends every wait of the connection (the scheduler, the servers, a shard, a
        # gate, a retry's pause) with Stopped
        ps = PSClient.connect(cfg.scheduler, model, name=name, push_codec=cfg.push_codec,
                              error_feedback=cfg.error_feedback,
                              overlap=cfg.overlap, device_compression=cfg.device_compression,
                              security=cfg.options.security, stop=stop, connect_timeout_s=cfg.connect_timeout_s,
                              fuse=cfg.fuse)
    except Stopped:
        summary = dict(worker=None, steps=0, skipped=0, stopped=True)
        metrics.write(**summary)
        metrics.close()
        return summary
    with ps:
        telemetry.start(WorkerCollector(ps.client))
        loop = Loop(cfg, ps, model, device, split, metrics, stop, entry.task)
        t0 = time.time()
        try:
            with _logs_above(loop.bar):
                if cfg.min_workers > 1:
                    ps.client.wait_for_workers(cfg.min_workers)
                    ps.pull()  # the others may have declared first: start from the common weights
                if cfg.epochs:
                    loop.run_epochs()
                else:
                    loop.run_steps()
        except Stopped as exc:
            log.info("stopped while waiting: %s", exc)   # what was trained stays; we leave below
        finally:
            loop.close()
        if loop.bar:
            loop.bar.close()
        if not stop.is_set():  # when stopping, the servers may be gone: evaluate what we have
            ps.pull()
        wall_s = time.time() - t0 - loop.eval_s   # training time: steps/s leaves the evaluations out
        held_out = _final_evaluation(entry.task, model, split, cfg, stopped=stop.is_set())
        done, skipped, loss = loop.done, loop.skipped, loop.loss
        summary = dict(worker=ps.worker_id, steps=done, skipped=skipped, idle_steps=loop.idle_steps,
                       final_loss=round(loss, 5),
                       **held_out, wall_s=round(wall_s, 3), evals=loop.evals, eval_s=round(loop.eval_s, 3),
                       bytes_sent=ps.bytes_sent, bytes_received=ps.bytes_received,
                       logical_sent=ps.client.traffic.logical_sent,
                       logical_received=ps.client.traffic.logical_received,
                       grad_host_bytes=ps.grad_host_bytes, weight_host_bytes=ps.weight_host_bytes,
                       encode_s=round(ps.client.encode_seconds(), 4),
                       decode_s=round(ps.client.traffic.decode_s, 4),
                       device_encoded=sorted(ps.encoded_params),
                       stopped=stop.is_set(),
                       compression={k: {"codec": v.codec, "logical_bytes": v.total_logical_bytes,
                                        "wire_bytes": v.total_wire_bytes + v.total_header_bytes,
                                        "encode_s": round(v.total_encode_s, 4)}
                                    for k, v in ps.client.compression_stats().items()})
        if loop.rows:
            summary.update(row_pulls=loop.rows.pulls, row_prefetch_hits=loop.rows.prefetch_hits,
                           row_fused_hits=loop.rows.fused_hits)
        metrics.write(**summary)
    metrics.close()
    telemetry.stop()
    log.debug("worker summary: %s", summary)  # the whole record is in --metrics-out too
    return summary


def _final_evaluation(task, model, split, cfg: TrainConfig, stopped: bool) -> dict:
    """The worker's held-out metrics. A model with sharded tables reads the test ids' rows
    from the servers; when stopping they may be gone, so it reports none rather than wait."""
    if not sharded_embeddings(model):
        return task.evaluate(model, split)
    if stopped:
        return {"eval_auc": None, "eval_logloss": None, **getattr(split, "teacher", {})}
    try:
        return evaluate(task, model, split, cfg.scheduler, cfg.options.security)
    except PSError as exc:
        log.warning("held-out evaluation failed: %s", exc)
        return {"eval_auc": None, "eval_logloss": None, **getattr(split, "teacher", {})}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _held_out(summary: dict) -> list[str]:
    """The held-out metrics for the summary line: accuracy, or AUC (the teacher's beside it)
    and log loss."""
    if "eval_auc" not in summary:
        return [f"accuracy {summary['eval_accuracy']:.3f}"]
    if summary["eval_auc"] is None:
        return ["auc not evaluated"]
    return [f"auc {summary['eval_auc']:.4f} (teacher {summary['teacher_auc']:.4f})",
            f"log loss {summary['eval_logloss']:.4f}"]


def summary_line(summary: dict, cfg: TrainConfig) -> str:
    """The one line `psctl worker` ends with, from train()'s summary, e.g.
    `worker 2 finished: 300 steps, loss 0.084, accuracy 0.962, 41.3 steps/s, pushed 12.1 MB, pulled 24.0 MB`
    (ctr-sparse: `..., loss 0.519, auc 0.8105 (teacher 0.8323), log loss 0.5218, ...`)
    or `worker 2 stopped after 57 of 300 steps (interrupted)`."""
    worker, steps = summary["worker"], summary["steps"]
    if worker is None:  # stopped before it had joined and found its servers
        return "worker stopped before training (interrupted)"
    if summary.get("stopped") and (cfg.epochs or steps < cfg.steps):  # a signal after the last step: finished
        counted = _plural(steps, "step") if cfg.epochs else f"{steps} of {_plural(cfg.steps, 'step')}"
        return f"worker {worker} stopped after {counted} (interrupted)"
    done = _plural(steps, "step") + (f" ({_plural(cfg.epochs, 'epoch')})" if cfg.epochs else "")
    parts = [done, f"loss {summary['final_loss']:.3f}", *_held_out(summary)]
    if summary.get("wall_s", 0) > 0:
        parts.append(f"{steps / summary['wall_s']:.1f} steps/s")
    parts += [f"pushed {_megabytes(summary['bytes_sent'])}", f"pulled {_megabytes(summary['bytes_received'])}"]
    return f"worker {worker} finished: {', '.join(parts)}"

"""`psctl worker`: the built-in training loop over PSClient, with metrics as JSON lines."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time

import torch
import torch.nn.functional as F

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument
from shardps.pscommon.lifecycle import DaemonOptions, Telemetry
from shardps.pscommon.wire.v1 import scheduler_pb2 as pb
from shardps.worker import data, models
from shardps.worker.api import PSClient
from shardps.worker.metrics import WorkerCollector

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
    min_workers: int = 0            # wait until this many workers are alive before step 0
    device_compression: bool | None = None   # None: fp16/bf16/topk pushes encoded on CUDA devices

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


class Loop:
    """One worker's training: steps on random batches, or epochs of assigned partitions."""

    def __init__(self, cfg: TrainConfig, ps: PSClient, model, device, split: data.Split,
                 metrics: MetricsWriter, stop: threading.Event):
        self.cfg, self.ps, self.model, self.device = cfg, ps, model, device
        self.split, self.metrics, self.stop = split, metrics, stop
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + ps.worker_id)
        self.bar = _progress(cfg.steps if not cfg.epochs else None, cfg.progress)
        self.done = self.skipped = 0
        self.loss = float("nan")

    def step(self, idx: torch.Tensor) -> bool:
        """pull, forward/backward on the batch `idx`, push. False: sync skipped the step."""
        ps, model = self.ps, self.model
        ps.pull()
        model.zero_grad(set_to_none=True)
        out = model(self.split.x_train[idx].to(self.device))
        loss_t = F.cross_entropy(out, self.split.y_train[idx].to(self.device))
        loss_t.backward()
        self.loss = float(loss_t.detach())
        if self.cfg.step_delay_s:
            time.sleep(self.cfg.step_delay_s)  # a deliberate straggler (benchmarks)
        if not ps.push():
            self.skipped += 1
            return False
        self.done += 1
        self.metrics.write(step=self.done, clock=ps.clock, loss=round(self.loss, 5), worker=ps.worker_id)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss:.3f}")
        return True

    def run_steps(self) -> None:
        n = len(self.split.x_train)
        while self.done < self.cfg.steps and not self.stop.is_set():
            self.step(torch.randint(n, (self.cfg.batch_size,), generator=self.gen))

    def run_epochs(self) -> None:
        """Take partition assignments until the scheduler says every epoch is done."""
        client = self.ps.client
        while not self.stop.is_set():
            status, epoch, partition = client.acquire_partition(self.cfg.partitions, self.cfg.epochs)
            if status == pb.ASSIGNMENT_STATUS_DONE:
                return
            if status == pb.ASSIGNMENT_STATUS_WAIT:
                self.stop.wait(0.05)  # others hold the last assignments of this epoch
                continue
            assigned_as = client.incarnation
            for idx in partition_batches(len(self.split.x_train), self.cfg.partitions, epoch, partition,
                                         self.cfg.batch_size, self.cfg.seed):
                if self.stop.is_set():
                    return
                if client.incarnation != assigned_as:
                    break
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


def partition_batches(n: int, partitions: int, epoch: int, partition: int, batch_size: int, seed: int):
    """The batches of one partition: a per-epoch permutation of the samples, cut into
    `partitions` contiguous parts, each cut into batches. Every worker computes the same."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    part = torch.tensor_split(perm, partitions)[partition]
    return list(torch.split(part, batch_size))


def check_fits(model, split: data.Split, device, cfg: TrainConfig) -> None:
    """One forward and loss on two samples: a model that cannot train on the data is a
    usage error, reported in one line before anything joins the job."""
    idx = torch.arange(min(2, len(split.x_train)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            F.cross_entropy(model(split.x_train[idx].to(device)), split.y_train[idx].to(device))
    except Exception as exc:  # noqa: BLE001 - user model/data: one line, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidArgument(f"--model {cfg.model!r} cannot train on "
                              f"{'--data ' + repr(cfg.data) if cfg.data else 'its data'}: "
                              f"{type(exc).__name__}: {first}") from None
    finally:
        model.train(was_training)


def train(cfg: TrainConfig, stop: threading.Event | None = None) -> dict:
    """Train until `cfg.steps` steps are pushed (or `stop` is set); returns a summary."""
    stop = stop or threading.Event()
    torch.set_num_threads(1)  # every process on the host shares its cores
    device = pick_device(cfg.device)
    entry = models.entry(cfg.model, cfg.data)
    model = models.build(cfg.model, cfg.seed, cfg.data).to(device)
    split = entry.dataset()
    check_fits(model, split, device, cfg)  # before joining: a mismatch must not fix the job's model
    metrics = MetricsWriter(cfg.metrics_out, append=cfg.append_metrics)
    name = cfg.name or f"{os.uname().nodename}:{os.getpid()}"
    telemetry = Telemetry(cfg.options, "worker", serves_rpc=False)
    with PSClient.connect(cfg.scheduler, model, name=name, push_codec=cfg.push_codec,
                          error_feedback=cfg.error_feedback,
                          overlap=cfg.overlap, device_compression=cfg.device_compression,
                          security=cfg.options.security) as ps:
        telemetry.start(WorkerCollector(ps.client))
        if cfg.min_workers > 1:
            ps.client.wait_for_workers(cfg.min_workers)
            ps.pull()  # the others may have declared first: start from the common weights
        loop = Loop(cfg, ps, model, device, split, metrics, stop)
        t0 = time.time()
        if cfg.epochs:
            loop.run_epochs()
        else:
            loop.run_steps()
        if loop.bar:
            loop.bar.close()
        if not stop.is_set():  # when stopping, the servers may be gone: evaluate what we have
            ps.pull()
        acc = data.accuracy(model, split.x_test, split.y_test)
        done, skipped, loss = loop.done, loop.skipped, loop.loss
        summary = dict(worker=ps.worker_id, steps=done, skipped=skipped, final_loss=round(loss, 5),
                       eval_accuracy=round(acc, 4), wall_s=round(time.time() - t0, 3),
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
        metrics.write(**summary)
    metrics.close()
    telemetry.stop()
    log.debug("worker summary: %s", summary)  # the whole record is in --metrics-out too
    return summary


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_line(summary: dict, cfg: TrainConfig) -> str:
    """The one line `psctl worker` ends with, from train()'s summary, e.g.
    `worker 2 finished: 300 steps, loss 0.084, accuracy 0.962, 41.3 steps/s, pushed 12.1 MB, pulled 24.0 MB`
    or `worker 2 stopped after 57 of 300 steps (interrupted)`."""
    worker, steps = summary["worker"], summary["steps"]
    if summary.get("stopped") and (cfg.epochs or steps < cfg.steps):  # a signal after the last step: finished
        counted = _plural(steps, "step") if cfg.epochs else f"{steps} of {_plural(cfg.steps, 'step')}"
        return f"worker {worker} stopped after {counted} (interrupted)"
    done = _plural(steps, "step") + (f" ({_plural(cfg.epochs, 'epoch')})" if cfg.epochs else "")
    parts = [done, f"loss {summary['final_loss']:.3f}", f"accuracy {summary['eval_accuracy']:.3f}"]
    if summary.get("wall_s", 0) > 0:
        parts.append(f"{steps / summary['wall_s']:.1f} steps/s")
    parts += [f"pushed {_megabytes(summary['bytes_sent'])}", f"pulled {_megabytes(summary['bytes_received'])}"]
    return f"worker {worker} finished: {', '.join(parts)}"

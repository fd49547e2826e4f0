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

from pscommon.errors import InvalidArgument
from worker import data, models
from worker.api import PSClient

log = logging.getLogger("shardps.worker")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    scheduler: str
    model: str = "digits-mlp"
    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    metrics_out: str | None = None
    push_codec: str | None = None
    step_delay_s: float = 0.0
    progress: bool | None = None    # None: a bar when stderr is a terminal
    name: str = ""

    def __post_init__(self):
        if self.model not in models.BUILTIN:
            raise InvalidArgument(f"model {self.model!r} is not one of {sorted(models.BUILTIN)}")
        if self.steps < 1:
            raise InvalidArgument(f"steps {self.steps} must be >= 1")
        if not 1 <= self.batch_size <= 65536:
            raise InvalidArgument(f"batch size {self.batch_size} must be in [1, 65536]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"device {self.device!r} is not one of auto, cpu, cuda")
        if self.step_delay_s < 0:
            raise InvalidArgument(f"step delay {self.step_delay_s} must be >= 0")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda: no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class MetricsWriter:
    """JSON lines: one record per step, one at the end."""

    def __init__(self, path: str | None):
        self.f = open(path, "a", buffering=1) if path else None
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


def train(cfg: TrainConfig, stop: threading.Event | None = None) -> dict:
    """Train until `cfg.steps` steps are pushed (or `stop` is set); returns a summary."""
    stop = stop or threading.Event()
    torch.set_num_threads(1)  # every process on the host shares its cores
    device = pick_device(cfg.device)
    entry = models.BUILTIN[cfg.model]
    model = models.build(cfg.model, cfg.seed).to(device)
    split = entry.dataset()
    metrics = MetricsWriter(cfg.metrics_out)
    name = cfg.name or f"{os.uname().nodename}:{os.getpid()}"
    with PSClient.connect(cfg.scheduler, model, name=name, push_codec=cfg.push_codec) as ps:
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + ps.worker_id)
        bar = _progress(cfg.steps, cfg.progress)
        x_tr, y_tr = split.x_train, split.y_train
        t0, done, skipped, loss = time.time(), 0, 0, float("nan")
        while done < cfg.steps and not stop.is_set():
            ps.pull()
            idx = torch.randint(len(x_tr), (cfg.batch_size,), generator=gen)
            model.zero_grad(set_to_none=True)
            out = model(x_tr[idx].to(device))
            loss_t = F.cross_entropy(out, y_tr[idx].to(device))
            loss_t.backward()
            loss = float(loss_t)
            if cfg.step_delay_s:
                time.sleep(cfg.step_delay_s)  # a deliberate straggler (benchmarks)
            if ps.push():
                done += 1
                metrics.write(step=done, clock=ps.clock, loss=round(loss, 5), worker=ps.worker_id)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
            else:
                skipped += 1
        if bar:
            bar.close()
        ps.pull()
        acc = data.accuracy(model, split.x_test, split.y_test)
        summary = dict(worker=ps.worker_id, steps=done, skipped=skipped, final_loss=round(loss, 5),
                       eval_accuracy=round(acc, 4), wall_s=round(time.time() - t0, 3),
                       bytes_sent=ps.bytes_sent, bytes_received=ps.bytes_received,
                       logical_sent=ps.client.traffic.logical_sent,
                       logical_received=ps.client.traffic.logical_received,
                       stopped=stop.is_set())
        metrics.write(**summary)
    metrics.close()
    log.info("worker done: %s", summary)
    return summary

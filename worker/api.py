"""PSClient: put shardps under a torch training loop.

    with PSClient.connect("127.0.0.1:7000", model) as ps:
        for x, y in batches:
            ps.pull()
            loss_fn(model(x), y).backward()
            ps.push()
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pscommon.config import CodecConfig
from pscommon.errors import Aborted, FailedPrecondition
from worker.client import ClientConfig, ShardClient

log = logging.getLogger("shardps.worker")


class PSClient:
    def __init__(self, client: ShardClient, model: nn.Module):
        self.client = client
        self.model = model
        self.params = dict(model.named_parameters())
        self._flat = {name: np.empty(p.numel(), np.float32) for name, p in self.params.items()}

    @classmethod
    def connect(cls, scheduler: str, model: nn.Module, *, name: str = "",
                push_codec: str | None = None, **client_options) -> "PSClient":
        """Join the job, wait for its servers, declare the model (idempotent) and pull."""
        cfg = ClientConfig(scheduler=scheduler, name=name,
                           push_codec=CodecConfig.parse(push_codec) if push_codec else None,
                           **client_options)
        client = ShardClient(cfg)
        client.join()
        try:
            client.wait_for_servers()
            initial = {n: p.detach().to("cpu", torch.float32).numpy().reshape(-1).copy()
                       if p.dtype == torch.float32 else p.detach().float().cpu().numpy().reshape(-1)
                       for n, p in model.named_parameters()}
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            client.declare({n: v.reshape(shapes[n]) for n, v in initial.items()})
            ps = cls(client, model)
            ps.pull()
            return ps
        except BaseException:
            client.leave()
            raise

    # -- the loop --------------------------------------------------------------------------
    def pull(self) -> None:
        """Replace the model's parameters with the servers' current values."""
        self._ensure_member()
        self.client.pull(self._flat)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(self._flat[name]).view(p.shape), non_blocking=False)

    def push(self) -> bool:
        """Push the gradients of model.parameters(); False when sync mode skipped this step
        (it completed without us) and the next pull catches up."""
        grads = {}
        for name, p in self.params.items():
            g = p.grad
            grads[name] = (np.zeros(p.numel(), np.float32) if g is None
                           else g.detach().to("cpu", torch.float32).numpy().reshape(-1))
        try:
            self.client.push(grads)
            return True
        except Aborted as exc:
            log.info("step skipped: %s", exc)
            return False
        except FailedPrecondition as exc:
            if "rejoin" not in str(exc):
                raise
            # declared dead (a pause longer than the lease): come back as a new incarnation
            log.warning("push refused: %s", exc)
            self.client.rejoin()
            return False

    def _ensure_member(self) -> None:
        if self.client.expired:
            self.client.rejoin()

    def leave(self) -> None:
        self.client.leave()

    # -- what the loop may want to know ----------------------------------------------------
    @property
    def clock(self) -> int:
        return self.client.clock

    @property
    def epoch(self) -> int:
        return self.client.epoch

    @property
    def worker_id(self) -> int:
        return self.client.worker_id

    @property
    def bytes_sent(self) -> int:
        return self.client.traffic.wire_sent

    @property
    def bytes_received(self) -> int:
        return self.client.traffic.wire_received

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.leave()

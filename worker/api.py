"""PSClient: put shardps under a torch training loop.

    with PSClient.connect("127.0.0.1:7000", model) as ps:
        for x, y in batches:
            ps.pull()
            loss_fn(model(x), y).backward()
            ps.push()

With overlap=True, gradients stream to the shards from autograd hooks while backward is
still running, and (in async and ssp modes) the next pull is prefetched as soon as the push
is acknowledged. On CUDA, gradients and weights cross through pinned host buffers with
non-blocking copies on a side stream. Every path runs on the CPU too.
"""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import numpy as np
import torch
from torch import nn

from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import Aborted, InvalidArgument, StaleIncarnation
from shardps.worker import device_codec
from shardps.worker.client import ClientConfig, ShardClient
from shardps.worker.embedding import sharded_embeddings
from shardps.worker.push import StreamingPush

log = logging.getLogger("shardps.worker")


class HostBuffers:
    """One flat host buffer per parameter (pinned when the model is on CUDA), seen by numpy
    for the wire and by torch for device copies: float32 values by default, or the bytes of
    a device-encoded payload."""

    def __init__(self, sizes: dict[str, int], pinned: bool, dtype: torch.dtype = torch.float32):
        self.tensors = {n: torch.empty(size, dtype=dtype, pin_memory=pinned) for n, size in sizes.items()}
        self.arrays = {n: t.numpy() for n, t in self.tensors.items()}


class PSClient:
    def __init__(self, client: ShardClient, model: nn.Module, overlap: bool = False,
                 device_compression: bool | None = None):
        self.client = client
        self.model = model
        self.params = dict(model.named_parameters())
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.cuda = device.type == "cuda"
        numels = {n: p.numel() for n, p in self.params.items()}
        self.weights = HostBuffers(numels, self.cuda)    # pulls land here
        self.grads = HostBuffers(numels, self.cuda) if self.cuda else None
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.encoder, self.encoded_params = self._device_encoder(device_compression)
        self.payloads = (HostBuffers({n: device_codec.max_payload_bytes(numels[n]) for n in self.encoded_params},
                                     self.cuda, torch.uint8) if self.encoder else None)
        self.nan_flags = ({n: torch.zeros((), dtype=torch.bool, pin_memory=True) for n in self.encoded_params}
                          if self.encoder and self.cuda else {})
        self.grad_host_bytes = 0    # gradient bytes handed from the model to the push (D2H on CUDA)
        self.weight_host_bytes = 0  # weight bytes copied into the model by pulls (H2D on CUDA)
        self._model_bytes = 4 * sum(numels.values())
        self._count = threading.Lock()
        self.overlap = overlap
        self.prefetch_enabled = overlap and client.job.mode in ("async", "ssp")
        self._stream: StreamingPush | None = None
        self._prefetch: futures.Future | None = None
        self._h2d_done = None           # CUDA event: weights copied out of the host buffers
        self._handoffs: list[futures.Future] = []   # gradients on their way into this step's push
        self._pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="psclient")
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook(n))
                       for n, p in self.params.items()] if overlap else []

    def _device_encoder(self, wanted: bool | None):
        """The device-side push codec and the parameters it serves. None: on where it saves
        PCIe bytes (CUDA and an fp16, bf16 or topk push codec); True forces it (on the CPU
        too, where it runs the same torch code: that is how the tests cover it)."""
        codec = self.client.cfg.push_codec or self.client.job.push_codec
        if wanted is None:
            wanted = self.cuda and device_codec.supports(codec)
        if not wanted:
            return None, frozenset()
        # parameters with a key small enough to go raw stay on the host path, which sends
        # those keys as fp32 (the job's small_tensor_bytes rule)
        small = self.client.job.small_tensor_bytes
        smap = self.client.shard_map
        served = frozenset(n for n in self.params if all(k.nbytes > small for k in smap.keys_of_param(n)))
        keys = {n: [(k.key, k.offset, k.length) for k in smap.keys_of_param(n)] for n in served}
        return device_codec.DeviceEncoder(codec, keys), served

    @classmethod
    def connect(cls, scheduler: str, model: nn.Module, *, name: str = "", push_codec: str | None = None,
                error_feedback: bool = True, overlap: bool = False,
                device_compression: bool | None = None, fuse: bool = True, **client_options) -> "PSClient":
        """Join the job, wait for its servers, declare the model (idempotent) and pull.

        fuse: in async and ssp, each push's reply carries the next pull (one round trip a
        step; see push.may_fuse), so pull() after push() returns the values the shards held
        right after this push was applied, as a prefetch with overlap=True would."""
        if not isinstance(model, nn.Module):
            raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")
        cfg = ClientConfig(scheduler=scheduler, name=name,
                           push_codec=(CodecConfig.parse(push_codec, error_feedback=error_feedback)
                                       if push_codec else None),
                           fuse=fuse, **client_options)
        client = ShardClient(cfg)
        client.join()
        try:
            client.wait_for_servers()
            client.declare({n: p.detach().to("cpu", torch.float32).numpy()
                            for n, p in model.named_parameters()},
                           embedding_tables=tuple(m.spec for m in sharded_embeddings(model)))
            ps = cls(client, model, overlap=overlap, device_compression=device_compression)
            ps.pull()
            return ps
        except BaseException:
            client.leave()
            raise

    # -- the loop --------------------------------------------------------------------------
    def pull(self) -> None:
        """Replace the model's parameters with the servers' current values (the prefetched
        ones when a prefetch is in flight)."""
        if self._prefetch is not None:
            fut, self._prefetch = self._prefetch, None
            fut.result()
        else:
            self._fetch()
        with torch.no_grad():
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):
                    for n, p in self.params.items():
                        p.copy_(self.weights.tensors[n].view(p.shape), non_blocking=True)
                self._h2d_done = self.copy_stream.record_event()
                torch.cuda.current_stream().wait_event(self._h2d_done)
            else:
                for n, p in self.params.items():
                    p.copy_(self.weights.tensors[n].view(p.shape))
        self.weight_host_bytes += self._model_bytes

    def _fetch(self) -> None:
        refused = self.client.refused_incarnation
        if refused is not None:  # the heartbeat learned we were declared dead
            self.client.rejoin(refused)
        if self._h2d_done is not None:
            self._h2d_done.synchronize()  # the device still reads the buffers we overwrite
        incarnation = self.client.incarnation
        try:
            self.client.pull(self.weights.arrays)
        except StaleIncarnation as exc:
            # declared dead while waiting at the gate (a pause past the lease): rejoin, read again
            log.warning("pull refused: %s", exc)
            self.client.rejoin(incarnation)
            self.client.pull(self.weights.arrays)

    def push(self, row_grads: dict | None = None, next_rows: dict | None = None) -> bool:
        """Push the gradients of model.parameters(), and `row_grads` of the model's sharded
        embedding tables ({table: (ids, grads)}, as EmbeddingClient.row_grads() gives them; a
        table left out had no rows this step); False when the step did not count (sync mode
        completed it without us, or we had to rejoin) and the next pull catches up.
        `next_rows` ({table: ids}, as EmbeddingClient.asks() gives them for the next batch):
        where the push is fused, its replies bring those rows and the next fetch of exactly
        these ids makes no call for them (ShardClient.push)."""
        stream, self._stream = self._stream, None
        if stream is None:
            stream = self.client.start_push(eager=False)
            for n, p in self.params.items():
                if p.grad is not None:
                    self._add_grad(stream, n, p.grad)
        try:
            stream.ask_next_rows(self.client.plan_next_rows(next_rows))
            self._settle_handoffs()
            for table, (ids, g) in (row_grads or {}).items():
                stream.add_rows(table, ids, g)
            for table in stream.missing_tables():
                stream.add_rows(table, np.zeros(0, np.int64), np.zeros((0, self.client.tables[table].dim), np.float32))
        except BaseException:
            stream.abandon()
            raise
        for n in stream.missing():  # grad None: no part in this step's graph, or frozen
            stream.skip(n)
        incarnation = self.client.incarnation
        try:
            stream.finish()
        except Aborted as exc:
            log.info("step skipped: %s", exc)
            return False
        except StaleIncarnation as exc:
            # declared dead (a pause longer than the lease): come back as a new incarnation
            log.warning("push refused: %s", exc)
            self.client.rejoin(incarnation)
            return False
        if self.prefetch_enabled:
            # after the acknowledgement, so the prefetched weights include this push: overlap
            # then changes when bytes move, never what a step computes on
            self._prefetch = self._pool.submit(self._fetch)
        return True

    def _grad_hook(self, name: str):
        def hook(param: nn.Parameter) -> None:
            if self._stream is None:
                self._stream = self.client.start_push()
            self._add_grad(self._stream, name, param.grad)
        return hook

    def _add_grad(self, stream: StreamingPush, name: str, grad: torch.Tensor) -> None:
        if name in self.encoded_params:
            self._add_encoded(stream, name, grad)
            return
        self._count_grad_bytes(4 * grad.numel())
        if not self.cuda:
            # the grad tensor itself: nothing writes it until the next zero_grad/backward,
            # and push() returns only after every byte has been sent
            stream.add(name, grad.detach().reshape(-1).to(torch.float32).numpy())
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            self.grads.tensors[name].copy_(grad.detach().reshape(-1), non_blocking=True)
            done = self.copy_stream.record_event()
        # wait for the copy off the backward thread, then hand the host bytes over
        self._defer(lambda: (done.synchronize(), stream.add(name, self.grads.arrays[name])))

    def _add_encoded(self, stream: StreamingPush, name: str, grad: torch.Tensor) -> None:
        """Encode on the model's device; only the payload bytes cross to the host."""
        if not self.cuda:
            payload, parts, nan = self.encoder.encode(name, grad)
            self._count_grad_bytes(payload.numel())
            device_codec.refuse_nan(name, bool(nan))
            stream.add_encoded(name, parts, payload.numpy())
            return
        buf, flag = self.payloads.tensors[name], self.nan_flags[name]
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            payload, parts, nan = self.encoder.encode(name, grad)
            buf[:payload.numel()].copy_(payload, non_blocking=True)
            flag.copy_(nan, non_blocking=True)
            done = self.copy_stream.record_event()
        size = payload.numel()
        self._count_grad_bytes(size)

        def hand_off():
            done.synchronize()
            device_codec.refuse_nan(name, bool(flag))
            stream.add_encoded(name, parts, self.payloads.arrays[name][:size])
        self._defer(hand_off)

    def _count_grad_bytes(self, nbytes: int) -> None:
        with self._count:
            self.grad_host_bytes += nbytes

    def _defer(self, handoff) -> None:
        self._handoffs.append(self._pool.submit(handoff))

    def _settle_handoffs(self) -> None:
        """Wait for every deferred hand-off of this step: until then a gradient may look
        missing (and be pushed as zeros), and a hand-off's error would be lost."""
        pending, self._handoffs = self._handoffs, []
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if errors:
            raise errors[0]

    def leave(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._prefetch is not None:
            self._prefetch.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.leave()

    # -- what the loop may want to know ----------------------------------------------------
    @property
    def clock(self) -> int:
        return self.client.clock

    @property
    def view(self) -> int:
        """The membership view last seen (it changes when a worker or server joins or leaves)."""
        return self.client.view

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
        self._previous_sigterm = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            # nobody handles SIGTERM: make it unwind like Ctrl-C so __exit__ leaves at once
            # (psctl worker installs its own graceful handler and is left alone)
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self.leave()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

"""ps-loop on torch.distributed.rpc (TensorPipe), the way PyTorch's parameter-server tutorial
builds one: each server process keeps its tensors in module globals and exposes two
functions; every step a worker calls get_params on each server, then apply_grads with the
fake gradients. Calls to several servers go out together (rpc_async) and are waited for
together; with one server that is the same as rpc_sync.

    python bench/peers/torch_rpc_ps.py --preset small --servers 1 --workers 2 --tp uv --json

--tp auto: TensorPipe's choice (shared memory between processes of one host).
--tp uv:   TCP over loopback, the comparison that matches a gRPC system.
"""
import threading

import torch
import torch.distributed.rpc as rpc

import harness
from psloop_spec import GRAD_SCALE, LR, owned_by, parse_args, summarize, tensor_sizes

# Server state. rpc runs get_params/apply_grads in the server process's own copy of this module.
SHARD = []
COUNTS = {"bytes_pulled": 0, "bytes_pushed": 0}
COUNTS_LOCK = threading.Lock()  # the counters only; parameters take concurrent pushes unlocked


def get_params():
    with COUNTS_LOCK:
        COUNTS["bytes_pulled"] += sum(t.numel() for t in SHARD) * 4
    return SHARD  # TensorPipe serializes a copy for the caller


def apply_grads(grads):
    for t, g in zip(SHARD, grads):
        t.sub_(g, alpha=LR)
    with COUNTS_LOCK:
        COUNTS["bytes_pushed"] += sum(g.numel() for g in grads) * 4


def run_process(rank, a, port, q, barrier):
    harness.die_with_parent()
    harness.torch_child_setup()
    S, world = a.servers, a.servers + a.workers
    opts = harness.tensorpipe_options(port, a.tp, a.timeout)
    if rank < S:
        sizes = tensor_sizes(a.preset)
        SHARD.extend(torch.ones(sizes[i]) for i in owned_by(rank, len(sizes), S))
        rpc.init_rpc(f"ps{rank}", rank=rank, world_size=world, rpc_backend_options=opts)
        rpc.shutdown()  # returns once every worker has shut down, i.e. after its last push
        q.put(("server", rank, dict(COUNTS, rss_mb=harness.peak_rss_mb(),
                                    param_sum=sum(float(t.double().sum()) for t in SHARD))))
        return
    w = rank - S
    rpc.init_rpc(f"worker{w}", rank=rank, world_size=world, rpc_backend_options=opts)
    servers = [f"ps{s}" for s in range(S)]

    def step():
        shards = [f.wait() for f in [rpc.rpc_async(s, get_params) for s in servers]]
        acks = [rpc.rpc_async(s, apply_grads, args=([t * GRAD_SCALE for t in shard],))
                for s, shard in zip(servers, shards)]
        for f in acks:
            f.wait()

    q.put(("worker", w, harness.timed_steps(step, a.steps, barrier)))
    rpc.shutdown()


def main():
    harness.exit_on_sigterm()
    a = parse_args(lambda ap: ap.add_argument("--tp", choices=["auto", "uv"], default="auto"))
    workers, servers, lo = harness.run_torch_rpc(run_process, a, server_wait_s=30)
    harness.emit(summarize(f"torch_rpc[{a.tp}]", a, workers, servers, lo=lo, torch=torch.__version__), a.json)


if __name__ == "__main__":
    main()

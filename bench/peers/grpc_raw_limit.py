"""ps-loop on grpcio with nothing but the transport: generic unary methods whose requests and
replies are raw float32 bytes (no protobuf, identity serializers), unlimited message sizes,
each server's tensors in one contiguous array, SGD in numpy straight from the received
buffer. What a grpcio parameter server could reach at best on this machine.

    python bench/peers/grpc_raw_limit.py --preset large --servers 2 --workers 2 --json

--mode step:   per step one pull and one push call per server (the whole shard each).
--mode tensor: per step one pull and one push call per tensor, all in flight at once.
--mode both:   run both (default); the faster is the top-level record, both are under "modes".
"""
import multiprocessing as mp
import threading
from concurrent import futures

import grpc
import numpy as np

import harness
from psloop_spec import GRAD_SCALE, LR, owned_by, parse_args, summarize, tensor_sizes

UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def serve(s, a, q, stop):
    harness.die_with_parent()
    sizes = tensor_sizes(a.preset)
    mine = owned_by(s, len(sizes), a.servers)
    shard = np.ones(sum(sizes[i] for i in mine), np.float32)
    view, start = {}, 0
    for i in mine:  # each tensor is a slice of the shard, so [step] pulls it with one tobytes()
        view[i] = shard[start:start + sizes[i]]
        start += sizes[i]
    counts, lock = {"bytes_pulled": 0, "bytes_pushed": 0}, threading.Lock()

    def pull_of(arr):
        def handler(_request, _context):
            data = arr.tobytes()  # grpcio wants immutable bytes: this copy cannot be avoided
            with lock:
                counts["bytes_pulled"] += len(data)
            return data
        return handler

    def push_of(ids):
        def handler(request, _context):
            g = np.frombuffer(request, np.float32)  # a view of the message, no copy
            at = 0
            for i in ids:
                v = view[i]
                v -= LR * g[at:at + v.size]  # applied on arrival, no barrier, no lock
                at += v.size
            with lock:
                counts["bytes_pushed"] += len(request)
            return b""
        return handler

    unary = grpc.unary_unary_rpc_method_handler  # no serializers given: bytes in, bytes out
    methods = {"PullShard": unary(pull_of(shard)), "PushShard": unary(push_of(mine))}
    for i in mine:
        methods[f"Pull{i}"] = unary(pull_of(view[i]))
        methods[f"Push{i}"] = unary(push_of([i]))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=UNLIMITED,
                         handlers=[grpc.method_handlers_generic_handler("rawps", methods)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    q.put(("port", s, port))
    stop.wait()
    server.stop(0)
    q.put(("server", s, dict(counts, rss_mb=harness.peak_rss_mb(),
                             param_sum=float(shard.sum(dtype=np.float64)))))


def work(w, a, ports, mode, q, barrier):
    harness.die_with_parent()
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}", options=UNLIMITED) for p in ports]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)
    if mode == "step":
        pairs = [(ch.unary_unary("/rawps/PullShard"), ch.unary_unary("/rawps/PushShard")) for ch in channels]
    else:
        n = len(tensor_sizes(a.preset))
        pairs = [(channels[i % a.servers].unary_unary(f"/rawps/Pull{i}"),
                  channels[i % a.servers].unary_unary(f"/rawps/Push{i}")) for i in range(n)]
    limit = a.timeout  # a per-call deadline: a dead server fails the step instead of hanging it

    def step():
        pulls = [pull.future(b"", timeout=limit) for pull, _ in pairs]
        params = [np.frombuffer(f.result(), np.float32) for f in pulls]
        grads = [(p * GRAD_SCALE).tobytes() for p in params]
        for f in [push.future(g, timeout=limit) for (_, push), g in zip(pairs, grads)]:
            f.result()

    q.put(("worker", w, harness.timed_steps(step, a.steps, barrier)))


def run(a, mode):
    ctx = mp.get_context("spawn")  # fork after grpc has started threads is unsafe
    q, stop, barrier = ctx.Queue(), ctx.Event(), ctx.Barrier(a.workers)
    inbox = harness.Inbox(q)
    procs = [ctx.Process(target=serve, args=(s, a, q, stop), daemon=True) for s in range(a.servers)]
    try:
        for p in procs:
            p.start()
        ports = inbox.take("port", a.servers, a.timeout)
        lo0 = harness.loopback_tx_bytes()
        workers = [ctx.Process(target=work, args=(w, a, ports, mode, q, barrier), daemon=True)
                   for w in range(a.workers)]
        procs += workers
        for p in workers:
            p.start()
        wres = inbox.take("worker", a.workers, a.timeout)
        lo = harness.loopback_tx_bytes() - lo0
        stop.set()
        sres = inbox.take("server", a.servers, 30)
    finally:
        stop.set()
        harness.reap(procs)
    return summarize(f"grpc_raw[{mode}]", a, wres, sres, lo=lo, grpc=grpc.__version__)


def main():
    harness.exit_on_sigterm()
    a = parse_args(lambda ap: ap.add_argument("--mode", choices=["step", "tensor", "both"], default="both"))
    results = {m: run(a, m) for m in (["step", "tensor"] if a.mode == "both" else [a.mode])}
    best = max(results.values(), key=lambda r: r["MBps"])
    if len(results) > 1:
        best = dict(best, modes=results)
    harness.emit(best, a.json)


if __name__ == "__main__":
    main()

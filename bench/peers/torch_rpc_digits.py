"""The digits workload as an asynchronous parameter server on torch.distributed.rpc
(TensorPipe), in the PyTorch tutorial's style: one server process keeps the model in a module
global behind a lock, and W trainer processes call it with rpc_sync.

A trainer loops: pull (a copy of every parameter, the number of updates applied so far and the
stop flag) -> cross-entropy gradient on a batch of 32 -> push. The server applies each push on
arrival (no barrier between trainers), evaluates every 25 updates, and answers "stop" once the
stop rule holds; pushes that arrive after that are counted and dropped.

    python bench/peers/torch_rpc_digits.py --workers 2 --seed 0 --tp uv --json

--tp auto: TensorPipe's choice (shared memory between processes of one host).
--tp uv:   TCP over loopback, the comparison that matches a gRPC system.
"""
import multiprocessing as mp
import threading
import time

import torch
import torch.distributed.rpc as rpc

import harness
from digits_spec import Referee, batch_gradient, build_model, load_split, parse_args, trainer_rng

# Server state, in the server process's copy of this module.
REFEREE = None
LOCK = threading.Lock()  # one update (and its inline evaluation) at a time
LOG = {"pulls": 0, "pushes": 0, "ignored": 0, "staleness": [], "applied": {}}


def get_params():
    """(updates applied so far, stop flag, a copy of every parameter taken under the lock)."""
    with LOCK:
        LOG["pulls"] += 1
        return REFEREE.n, REFEREE.stop is not None, [p.detach().clone() for p in REFEREE.params]


def push_grads(rank, pulled_version, grads):
    """Apply one gradient unless training has stopped; True tells the trainer to stop."""
    with LOCK:
        LOG["pushes"] += 1
        if REFEREE.stop is not None:
            LOG["ignored"] += 1
            return True
        LOG["staleness"].append(REFEREE.n - pulled_version)  # updates by others since this pull
        LOG["applied"][rank] = LOG["applied"].get(rank, 0) + 1
        return REFEREE.apply(grads)


def run_process(rank, a, port, q, barrier):
    global REFEREE
    harness.die_with_parent()
    harness.torch_child_setup()
    x_tr, x_te, y_tr, y_te = load_split()
    model = build_model(a.seed)  # trainers: a replica that every pull overwrites
    opts = harness.tensorpipe_options(port, a.tp, 60)
    world = 1 + a.workers
    if rank == 0:
        REFEREE = Referee(model, x_te, y_te, a.target)
        rpc.init_rpc("ps", rank=0, world_size=world, rpc_backend_options=opts)
        rpc.shutdown()  # returns once every trainer has stopped and shut down
        st = LOG["staleness"]
        q.put(("server", 0, dict(
            REFEREE.report("", a.workers, a.seed), t0=REFEREE.t0, pulls=LOG["pulls"], pushes=LOG["pushes"],
            ignored_pushes=LOG["ignored"], applied_per_trainer=[LOG["applied"].get(r, 0) for r in range(a.workers)],
            staleness_mean=round(sum(st) / max(1, len(st)), 3), staleness_max=max(st, default=0),
            params=sum(p.numel() for p in REFEREE.params), rss_mb=harness.peak_rss_mb())))
        return
    r = rank - 1
    rpc.init_rpc(f"trainer{r}", rank=rank, world_size=world, rpc_backend_options=opts)
    rng, pulls, pushes = trainer_rng(a.seed, r), 0, 0
    barrier.wait()  # the trainers start together
    while True:
        version, stop, values = rpc.rpc_sync("ps", get_params)
        pulls += 1
        if stop:
            break
        with torch.no_grad():
            for p, v in zip(model.parameters(), values):
                p.copy_(v)
        grads = batch_gradient(model, x_tr, y_tr, rng)
        pushes += 1
        if rpc.rpc_sync("ps", push_grads, args=(r, version, grads)):
            break
    q.put(("trainer", r, {"pulls": pulls, "pushes": pushes, "rss_mb": harness.peak_rss_mb()}))
    rpc.shutdown()


def main():
    harness.exit_on_sigterm()
    a = parse_args(lambda ap: (ap.add_argument("--workers", type=int, default=1, help="trainer processes W"),
                               ap.add_argument("--tp", choices=["auto", "uv"], default="auto")))
    harness.keep_tensorpipe_on_loopback()
    ctx = mp.get_context("spawn")
    q, barrier, port = ctx.Queue(), ctx.Barrier(a.workers), harness.loopback_port()
    procs = [ctx.Process(target=run_process, args=(r, a, port, q, barrier), daemon=True)
             for r in range(1 + a.workers)]
    inbox = harness.Inbox(q)
    lo0, launched = harness.loopback_tx_bytes(), time.perf_counter()
    try:
        for p in procs:
            p.start()
        trainers = inbox.take("trainer", a.workers, a.timeout)
        server = inbox.take("server", 1, 30)[0]
        lo = harness.loopback_tx_bytes() - lo0
    finally:
        harness.reap(procs)
    pulls, pushes = sum(t["pulls"] for t in trainers), sum(t["pushes"] for t in trainers)
    curve = server.pop("curve")
    server.update(
        impl=f"torch_rpc_digits[{a.tp}]",
        startup_s=round(server.pop("t0") - launched, 4),  # launch to the first applied update
        # the server saw every pull and push the trainers made and applied all but the late pushes
        updates_ok=(server["pulls"] == pulls and server["pushes"] == pushes
                    and server["updates"] == sum(server["applied_per_trainer"]) == pushes - server["ignored_pushes"]),
        lo_bytes_per_logical=round(lo / ((pulls + pushes) * server["params"] * 4), 3),
        server_rss_mb=round(server.pop("rss_mb"), 1),
        trainer_rss_mb=round(max(t["rss_mb"] for t in trainers), 1),
        curve=curve)
    harness.emit(server, a.json)


if __name__ == "__main__":
    main()

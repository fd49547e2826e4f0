"""emb-loop on torch.distributed.rpc (TensorPipe), built like torch_rpc_ps.py: each server
process keeps, in module globals, the rows it owns (row idx of every field on server idx % S,
at local index idx // S) and their Adagrad accumulators. Per step a worker dedups each field's
batch, splits the ids by owner, makes one pull call per server (one id tensor per field) and,
once every pull is back, one push call per server (ids and gradients per field).

    python bench/peers/torch_rpc_emb.py --preset small --servers 1 --workers 2 --tp uv --json

--tp auto: TensorPipe's choice (shared memory between processes of one host).
--tp uv:   TCP over loopback, the comparison that matches a gRPC system.
"""
import threading

import numpy as np
import torch
import torch.distributed.rpc as rpc

import harness
from emb_spec import (ACC_INIT, EPS, GRAD_SCALE, LR, PRESETS, ROW_INIT, acc_growth, all_draws, parse_args,
                      rows_on_server, summarize)

# Server state, in each server process's copy of this module: per field an (owned rows, D) tensor.
TABLES, ACCS = [], []
SETUP = {"servers": 1}
COUNTS = {"rows_served": 0, "rows_updated": 0}
COUNTS_LOCK = threading.Lock()  # the counters only; rows take concurrent pushes unlocked, as ps-loop


def pull(ids):
    """ids: per field, the int64 global row ids this server owns -> a copy of those rows."""
    S = SETUP["servers"]
    rows = [t.index_select(0, i // S) for t, i in zip(TABLES, ids)]
    with COUNTS_LOCK:
        COUNTS["rows_served"] += sum(len(i) for i in ids)
    return rows


def apply_grads(ids, grads):
    """Sparse Adagrad: acc[ids] += g*g; rows[ids] -= LR * g / (sqrt(acc[ids]) + EPS). The ids of a
    field are unique, so gather -> update -> index_copy_ is that update, and faster here than
    index_add_ or indexed in-place arithmetic."""
    S = SETUP["servers"]
    for table, acc, i, g in zip(TABLES, ACCS, ids, grads):
        local = i // S
        a = acc.index_select(0, local).addcmul_(g, g)
        acc.index_copy_(0, local, a)
        step = g.div_(a.sqrt_().add_(EPS))  # g and a are this call's own tensors: reuse them
        table.index_copy_(0, local, table.index_select(0, local).sub_(step, alpha=LR))
    with COUNTS_LOCK:
        COUNTS["rows_updated"] += sum(len(i) for i in ids)


def run_process(rank, a, port, q, barrier):
    harness.die_with_parent()
    harness.torch_child_setup()
    S, p, world = a.servers, PRESETS[a.preset], a.servers + a.workers
    opts = harness.tensorpipe_options(port, a.tp, a.timeout)
    if rank < S:
        SETUP["servers"] = S
        n = rows_on_server(rank, S, a.preset)
        TABLES.extend(torch.full((n, p["dim"]), ROW_INIT) for _ in range(p["fields"]))
        ACCS.extend(torch.full((n, p["dim"]), ACC_INIT) for _ in range(p["fields"]))
        rpc.init_rpc(f"ps{rank}", rank=rank, world_size=world, rpc_backend_options=opts)
        rpc.shutdown()  # returns once every worker has shut down, i.e. after its last push
        q.put(("server", rank, dict(COUNTS, rss_mb=harness.peak_rss_mb(),
                                    acc_growth=acc_growth([x.numpy() for x in ACCS]))))
        return
    w = rank - S
    batches = iter(all_draws(w, a.preset, harness.WARMUP_STEPS + a.steps))  # before rpc: untimed
    rpc.init_rpc(f"worker{w}", rank=rank, world_size=world, rpc_backend_options=opts)
    servers, moved = [f"ps{s}" for s in range(S)], []  # moved: (rows received, rows pushed) per step

    def step():
        uniq = [np.unique(b) for b in next(batches)]  # each row pulled and pushed once a step
        split = [[torch.from_numpy(u if S == 1 else u[u % S == s]) for u in uniq] for s in range(S)]
        got = [f.wait() for f in [rpc.rpc_async(n, pull, args=(ids,)) for n, ids in zip(servers, split)]]
        moved.append((sum(len(r) for rows in got for r in rows), sum(len(i) for ids in split for i in ids)))
        acks = [rpc.rpc_async(n, apply_grads, args=(ids, [r * GRAD_SCALE for r in rows]))
                for n, ids, rows in zip(servers, split, got)]
        for f in acks:
            f.wait()

    res = harness.timed_steps(step, a.steps, barrier)
    timed = moved[harness.WARMUP_STEPS:]
    res.update(rows_pulled=sum(m[0] for m in moved), rows_pushed=sum(m[1] for m in moved),
               timed_pulled=sum(m[0] for m in timed), timed_pushed=sum(m[1] for m in timed))
    q.put(("worker", w, res))
    rpc.shutdown()


def main():
    harness.exit_on_sigterm()
    a = parse_args(lambda ap: ap.add_argument("--tp", choices=["auto", "uv"], default="auto"))
    workers, servers, lo = harness.run_torch_rpc(run_process, a, server_wait_s=60)
    harness.emit(summarize(f"torch_rpc_emb[{a.tp}]", a, workers, servers, lo=lo, torch=torch.__version__), a.json)


if __name__ == "__main__":
    main()

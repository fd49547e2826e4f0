"""Process plumbing for the peer scripts: children, deadlines, timing, output.

No workload lives here (psloop_spec.py, digits_spec.py and emb_spec.py hold those), so the
three workloads time, reap and print the same way.
"""
import argparse
import ctypes
import json
import multiprocessing as mp
import os
import queue
import resource
import signal
import socket
import sys
import time

WARMUP_STEPS = 2
MALLOC_MARKER = "MALLOC_MMAP_THRESHOLD_"  # set by the "+malloc" variants (README.md)


def die_with_parent():
    """Call first in every child: a peer that outlived a killed launcher would keep its port
    and a core busy and spoil the next run's figures."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_on_sigterm():
    """`timeout` sends SIGTERM; as SystemExit it unwinds through the `finally` that reaps children."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def deadline(seconds):
    """Single-process scripts have no launcher to give up on them; the alarm does (exit 124, as `timeout`)."""
    def expire(*_):
        print(f"deadline of {seconds:.0f} s passed", file=sys.stderr, flush=True)
        os._exit(124)
    signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds + 0.999)))


def loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_tx_bytes():
    """Bytes the loopback interface has sent since boot. Its growth over a run, against the
    logical bytes moved, tells TCP (~1) from shared memory (~0)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    return 0


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def malloc_tag():
    return "+malloc" if os.environ.get(MALLOC_MARKER) else ""


def timed_steps(step, n, barrier):
    """WARMUP_STEPS untimed steps, a barrier so every worker starts the clock together, n timed
    steps. perf_counter is CLOCK_MONOTONIC on Linux, so t0/t1 compare across processes."""
    for _ in range(WARMUP_STEPS):
        step()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return {"t0": t0, "t1": time.perf_counter(), "rss_mb": peak_rss_mb()}


class Inbox:
    """Children report as (kind, index, value) on one queue; take() waits for one kind and
    keeps any other kind that arrives early for a later take()."""

    def __init__(self, q):
        self.q, self.held = q, {}

    def take(self, kind, count, timeout):
        end = time.monotonic() + timeout
        got = self.held.setdefault(kind, {})
        while len(got) < count:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)} of {count} {kind!r} reports within {timeout:.0f} s")
            try:
                k, i, v = self.q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            self.held.setdefault(k, {})[i] = v
        return [got[i] for i in sorted(got)]


def reap(procs):
    """Join the children; kill (by pid, only ours) any still running after a grace period."""
    end = time.monotonic() + 10
    for p in procs:
        p.join(timeout=max(0.1, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def tensorpipe_options(port, tp, timeout):
    """TensorPipe agent options. tp 'uv' pins TCP (uv transport, basic channel): the like-for-like
    peer of a gRPC system; 'auto' lets TensorPipe pick, which on one host means shared memory."""
    import torch.distributed.rpc as rpc
    pin = dict(_transports=["uv"], _channels=["basic"]) if tp == "uv" else {}
    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=8,
                                           rpc_timeout=timeout, **pin)


def torch_child_setup():
    """Every torch peer process: one intra-op thread (S + W processes share few cores) and no
    deprecation chatter from the gloo group rpc creates."""
    import warnings
    import torch
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)


def keep_tensorpipe_on_loopback():
    """TensorPipe picks an interface by hostname otherwise; children inherit the variable."""
    os.environ.setdefault("TP_SOCKET_IFNAME", "lo")


def emit(record, as_json):
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        width = max(map(len, record))
        print("\n".join(f"{k:>{width}}: {v}" for k, v in record.items()), flush=True)


def parse_run_args(presets, default_steps, timeout_s, add_more=None):
    """The S,W command line every ps-loop and emb-loop peer shares; `default_steps(preset)`
    fills --steps when it is not given."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(presets), default="small")
    ap.add_argument("--servers", type=int, default=1, help="S server processes")
    ap.add_argument("--workers", type=int, default=1, help="W worker processes")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the preset's)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a listing")
    ap.add_argument("--timeout", type=float, default=timeout_s, help="give up on the whole run after this many seconds")
    if add_more:
        add_more(ap)
    a = ap.parse_args()
    if a.servers < 1 or a.workers < 1:
        ap.error("--servers and --workers must be >= 1")
    a.steps = a.steps or default_steps(a.preset)
    return a


def run_torch_rpc(run_process, a, server_wait_s):
    """Start S servers and W workers as spawned processes running run_process(rank, a, port,
    queue, barrier), and collect (worker records, server records, loopback bytes)."""
    keep_tensorpipe_on_loopback()
    ctx = mp.get_context("spawn")  # fork would copy torch's threads and locks in an unknown state
    q, barrier, port = ctx.Queue(), ctx.Barrier(a.workers), loopback_port()
    procs = [ctx.Process(target=run_process, args=(r, a, port, q, barrier), daemon=True)
             for r in range(a.servers + a.workers)]
    inbox, lo0 = Inbox(q), loopback_tx_bytes()
    try:
        for p in procs:
            p.start()
        workers = inbox.take("worker", a.workers, a.timeout)
        lo = loopback_tx_bytes() - lo0
        servers = inbox.take("server", a.servers, server_wait_s)
    finally:
        reap(procs)
    return workers, servers, lo

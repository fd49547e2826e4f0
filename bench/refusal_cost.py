"""What a daemon spends on one refused call, beside an accepted one and a bare gRPC echo.

Issue 16's soak (bench/security_overhead.py --attack) charges the forged calls' cost to
the job; this says what one of them costs. A scheduler and one server run as `psctl`
processes (security `on`: mutual TLS and role tokens, as security_overhead.py makes them;
`tokens`: role tokens without TLS; `off`: neither), and this process makes N calls of each
kind from one thread, one at a time, reading the daemon's CPU time (/proc/PID/stat, user +
system, every thread) before and after. The same run measures a bare grpcio server (one
generic unary handler returning its request, no interceptor, insecure) as the floor: what any
call costs a Python gRPC server on this machine, before shardps does anything.

    .venv/bin/python bench/refusal_cost.py                  # security on, 1000 calls a kind
    SECURITY=off N=500 .venv/bin/python bench/refusal_cost.py --json /tmp/refusal.json

Each kind's expected code is checked (a refused kind must never be answered OK); a kind
whose calls got anything else is reported and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(1, p)

from overlap import cpu_seconds  # noqa: E402  (bench/ on sys.path, above)

PS = "/shardps.pscommon.wire.v1.ParameterServer/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(call, pid: int, n: int) -> dict:
    """n calls one at a time: the daemon's CPU and the caller's round trip per call, and
    the status codes they got."""
    import grpc
    for _ in range(min(50, n)):   # connections up, handlers warm
        try:
            call()
        except grpc.RpcError:
            pass
    codes: dict[str, int] = {}
    cpu0, t0 = cpu_seconds([pid]), time.perf_counter()
    for _ in range(n):
        try:
            call()
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        codes[code] = codes.get(code, 0) + 1
    cpu1, t1 = cpu_seconds([pid]), time.perf_counter()
    return {"daemon_cpu_us": round((cpu1 - cpu0) / n * 1e6), "round_trip_us": round((t1 - t0) / n * 1e6),
            "codes": codes}


# -- the floor: a bare grpcio server in a child process -----------------------------------------
def echo_server_main() -> int:
    from concurrent import futures

    import grpc
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    return 0


def echo_floor(n: int) -> dict:
    import grpc
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/bench.Echo/Echo")
            return measure(lambda: echo(b"x" * 64, timeout=30), proc.pid, n)
    finally:
        proc.kill()
        proc.wait(10)


# -- shardps daemons ------------------------------------------------------------------------------
class Daemons:
    """A scheduler and one server as psctl processes, with `mode`'s security."""

    def __init__(self, mode: str, work: pathlib.Path):
        import security_overhead as so
        from shardps.pscommon.security import Security
        self.work = work
        sec_dir = so.make_security_dir(work / "pki")
        tokens = sec_dir / "tokens"
        flags = {"on": so.daemon_flags(str(sec_dir)), "tokens": ["--token-dir", str(tokens)], "off": []}[mode]
        if mode == "on":
            self.as_role = lambda role: so.security(str(sec_dir), role)
            self.with_token = lambda token: so.security(str(sec_dir), None, token=token)
        else:
            def as_role(role):
                if mode == "off" or role is None:
                    return Security()
                return Security(token=(tokens / f"{role}.token").read_text().strip())
            self.as_role = as_role
            self.with_token = lambda token: Security(token=token if mode != "off" else None)
        psctl = [sys.executable, "-m", "shardps.psctl"]
        self.sched_address = f"127.0.0.1:{_free_port()}"
        self.sched = subprocess.Popen([*psctl, "scheduler", "--listen", self.sched_address, "--servers", "1",
                                       *flags], stdout=open(work / "scheduler.log", "wb"), stderr=subprocess.STDOUT)
        self.server = subprocess.Popen([*psctl, "server", "--scheduler", self.sched_address, "--listen",
                                        "127.0.0.1:0", "--shard-id", "0", *flags],
                                       stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)

    def server_address(self, timeout_s: float = 60.0) -> str:
        import grpc

        from shardps.pscommon import grpcutil
        from shardps.pscommon.wire.v1 import scheduler_pb2 as spb, scheduler_pb2_grpc
        stub = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(self.sched_address, self.as_role("observer")))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in (self.sched, self.server):
                if p.poll() is not None:
                    raise RuntimeError(f"a daemon exited {p.returncode}: see {self.work}")
            try:
                st = stub.Status(spb.StatusRequest(), timeout=5)
                if st.servers and st.servers[0].address:
                    return st.servers[0].address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not register within {timeout_s}s: see {self.work}")

    def stop(self) -> None:
        for p in (self.server, self.sched):
            p.terminate()
        for p in (self.server, self.sched):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def kinds(d: Daemons, server_address: str, mode: str) -> list[tuple[str, str, object, tuple[str, ...]]]:
    """(name, daemon, call, the codes it may get): accepted calls first, then forged ones as
    bench/security_overhead.py's attacker makes them."""
    from shardps.pscommon import grpcutil
    from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2 as spb, scheduler_pb2_grpc
    rng = random.Random(0)
    sched = lambda sec: scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(d.sched_address, sec))  # noqa: E731
    shard = lambda sec: ps_pb2_grpc.ParameterServerStub(grpcutil.channel(server_address, sec))  # noqa: E731
    observer_s, observer_p = sched(d.as_role("observer")), shard(d.as_role("observer"))
    worker_s, worker_p = sched(d.as_role("worker")), shard(d.as_role("worker"))
    none_s = sched(d.as_role(None))
    stranger_p = shard(d.with_token("stranger-" + "ab" * 16))
    raw_worker = grpcutil.channel(server_address, d.as_role("worker")).unary_unary(PS + "PushBatch")
    raw_none = grpcutil.channel(server_address, d.as_role(None)).unary_unary(PS + "PushBatch")

    def push_as(stub):
        return stub.PushBatch(ps_pb2.PushBatchRequest(header=ps_pb2.PushHeader(
            caller=ps_pb2.Caller(worker_id=1, incarnation=1, credential=rng.randbytes(32)), shard=0,
            step=2**52, model_fingerprint="x")), timeout=30)
    secured = mode != "off"
    refused = ("UNAUTHENTICATED", "PERMISSION_DENIED") if secured else ("UNAUTHENTICATED", "PERMISSION_DENIED",
                                                                           "FAILED_PRECONDITION", "NOT_FOUND")
    return [
        ("accepted: Status", "scheduler", lambda: observer_s.Status(spb.StatusRequest(), timeout=30), ("OK",)),
        ("accepted: ShardStatus", "server", lambda: observer_p.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=30),
         ("OK",)),
        ("no token: Status", "scheduler", lambda: none_s.Status(spb.StatusRequest(), timeout=30),
         ("UNAUTHENTICATED",) if secured else ("OK",)),
        ("unknown token: push", "server", lambda: push_as(stranger_p), refused),
        ("worker token: RegisterServer", "scheduler", lambda: worker_s.RegisterServer(
            spb.RegisterServerRequest(shard=0, address="10.9.9.9:7100"), timeout=30),
         # without roles, the live shard's holder is named (FAILED_PRECONDITION) until the
         # per-peer rate limit on registrations refuses the rest
         ("PERMISSION_DENIED",) if secured else ("FAILED_PRECONDITION", "RESOURCE_EXHAUSTED")),
        ("worker token: Checkpoint", "server", lambda: worker_p.Checkpoint(ps_pb2.CheckpointRequest(), timeout=30),
         ("PERMISSION_DENIED",) if secured else ("OK", "FAILED_PRECONDITION")),
        ("worker token: heartbeat as a worker", "scheduler", lambda: worker_s.Heartbeat(spb.HeartbeatRequest(
            role=spb.ROLE_WORKER, member_id=1, incarnation=1, clock=1), timeout=30),
         ("UNAUTHENTICATED", "NOT_FOUND", "PERMISSION_DENIED")),
        ("worker token: push as a worker", "server", lambda: push_as(worker_p), refused),
        ("worker token: random bytes", "server",
         lambda: raw_worker(rng.randbytes(rng.randint(1, 256)), timeout=30), ("INVALID_ARGUMENT",)),
        ("no token: random bytes", "server", lambda: raw_none(rng.randbytes(rng.randint(1, 256)), timeout=30),
         ("UNAUTHENTICATED",) if secured else ("INVALID_ARGUMENT",)),
    ]


def run(mode: str, n: int) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="shardps-refusal-"))
    d = Daemons(mode, work)
    rows, bad = [], []
    try:
        address = d.server_address()
        pids = {"scheduler": d.sched.pid, "server": d.server.pid}
        for name, daemon, call, expected in kinds(d, address, mode):
            r = measure(call, pids[daemon], n)
            unexpected = {c: k for c, k in r["codes"].items() if c not in expected}
            if unexpected:
                bad.append(f"{name}: {unexpected} (expected {', '.join(expected)})")
            rows.append({"kind": name, "daemon": daemon, **r})
    finally:
        d.stop()
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "unexpected": bad}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.echo_server:
        return echo_server_main()
    mode, n = os.environ.get("SECURITY", "on"), int(os.environ.get("N", "1000"))
    if mode not in ("on", "tokens", "off") or n < 1:
        print(f"refusal_cost: SECURITY={mode!r} must be on, tokens or off and N={n} >= 1", file=sys.stderr)
        return 2
    load = [pathlib.Path("/proc/loadavg").read_text().split()[:3]]
    floor = echo_floor(n)
    result = run(mode, n)
    load.append(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    print(f"SECURITY={mode} N={n}; load average {' '.join(load[0])} at start, {' '.join(load[1])} at end")
    print("| call | daemon | daemon CPU us/call | x bare echo | round trip us |\n|---|---|---|---|---|")
    print(f"| bare grpcio echo (the floor) | echo | {floor['daemon_cpu_us']} | 1.00 | {floor['round_trip_us']} |")
    for r in result["rows"]:
        print(f"| {r['kind']} | {r['daemon']} | {r['daemon_cpu_us']} | "
              f"{r['daemon_cpu_us'] / max(1, floor['daemon_cpu_us']):.2f} | {r['round_trip_us']} |")
    refused = [r["daemon_cpu_us"] for r in result["rows"] if not r["kind"].startswith("accepted")]
    print(f"refused calls: median {statistics.median(refused):.0f} us of daemon CPU each")
    for line in result["unexpected"]:
        print(f"UNEXPECTED {line}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"security": mode, "n": n, "loadavg": load, "floor": floor,
                                                    **result}, indent=1) + "\n")
    return 1 if result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())

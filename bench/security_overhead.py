"""Throughput with security on and off: ps-loop and digits, both sides in one run on one machine.

    python bench/security_overhead.py                        # REPS=3 rounds, ps-loop small 1,1 and 2,2, digits W=3
    REPS=1 PRESETS=small python bench/security_overhead.py --attack --json-out /tmp/security.json

Each round runs every workload once per side, the sides alternated from round to round so
that the machine's drift falls on all of them alike:

- off: no TLS, no token. Member credentials (pscommon/credentials.py) have no switch: a
  daemon's server always checks them, so they are in both sides.
- on: mutual TLS and role tokens, what docs/operations.md asks for on any shared network.
  A CA made for the run (EC P-256) signs one certificate the daemons present as servers and
  as clients (SAN 127.0.0.1 and localhost) and one for the benchmark's own clients; the
  token dir holds a token for each role (worker, server, observer, admin). The daemons get
  `--tls-cert --tls-key --tls-ca --token-dir`; the benchmark's worker and trainer processes
  send the worker token over TLS; its launcher reads status and the final values with the
  admin token.
- on+attack (`--attack`): on, while an attacker process holds 200 idle streams and makes
  forged calls from 4 threads, from the time the servers are up until the run ends (at
  least the measured steps). It is an insider: a certificate from the CA and a worker token
  (without them it cannot even connect). The idle streams are those of
  tests/security/test_soak.py: on the scheduler 52 tokenless Health.Watch and 52 tokenless
  WatchMembership; over the servers 96, half Push streams that send nothing on one
  connection per server (8 of them admitted and, at the default 30 s idle timeout, held
  through the run), half tokenless Health.Watch. The forged calls: no token, an unknown token, RegisterServer and
  Checkpoint with the worker token, a heartbeat and a push as a real worker without its
  credential, random bytes with and without the token; ATTACK_RATE of them a second (default
  200, so a run of 5 s or more sees over 1,000; 0: as fast as the 4 threads go). On a
  2-core machine the attacker's own CPU is taken from the workload too, where a real one
  spends its own machine's: it runs at nice ATTACK_NICE (default 19, the lowest priority), so
  that the ratio charges the defences (the servers' work to refuse) rather than the
  attacker's CPU; ATTACK_NICE=0 charges both. The forged calls it made are in the output.

The workloads are bench/ps_loop.py and bench/digits_peer.py, unchanged: this script runs
each in a child process of its own and, for the secure sides, wraps three things there
before it starts: `psctl.up.Cluster.spawn` (the security flags after the daemon's command),
`worker.client.ClientConfig` (a default `security`) and `psctl.ops.collect_status` (its
`security`); the worker and trainer processes, which multiprocessing spawns, set their
ClientConfig the same way before they run the workload's own function.

Output: one JSON line per run into --jsonl (default $OUTDIR/security_overhead.jsonl), a
summary (medians, [min-max], on/off and attack/on ratios) into --json-out (default
$OUTDIR/security_overhead.json) and as a Markdown table on stdout. Figures, not
assertions. Env: OUTDIR (default bench/results), REPS (3), PRESETS ("small"), CONFIGS
("1,1 2,2"), SEEDS (digits seeds, "0"), DIGITS_WORKERS (3), TMO (seconds per run, 180),
STEPS (override ps-loop's N; quick checks only), ATTACK_RATE (forged calls a second, 200),
ATTACK_NICE (the attacker's niceness, 19), ATTACK_SCHED ("idle": the attacker at SCHED_IDLE;
default "other"). The attacker's report carries its own CPU time (`attacker_cpu_s`).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import importlib
import ipaddress
import json
import os
import pathlib
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# the workloads import as top-level modules, as when they run as scripts; spawned children
# inherit this sys.path
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(1, p)

ROLES = ("worker", "server", "observer", "admin")
SIDES = ("off", "on", "on+attack")


# -- the security material ------------------------------------------------------------------------
def make_security_dir(path: pathlib.Path) -> pathlib.Path:
    """ca.crt; daemon.crt/.key (server and client use, SAN 127.0.0.1 and localhost);
    client.crt/.key (client use); tokens/ROLE.token for every role."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    path.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (path / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (path / f"{stem}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def builder(cn, issuer, key):
        return (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder("shardps bench CA", name("shardps bench CA"), ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", None, ca)
    for stem, usages, sans in (
            ("daemon", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
             [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            ("client", [ExtendedKeyUsageOID.CLIENT_AUTH], [])):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(f"shardps bench {stem}", ca.subject, key)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        write(stem, key, b.sign(ca_key, hashes.SHA256()))
    tokens = path / "tokens"
    tokens.mkdir(exist_ok=True)
    for role in ROLES:
        (tokens / f"{role}.token").write_text(f"{role}-{secrets.token_hex(24)}\n")
    return path


def daemon_flags(sec_dir: str) -> list[str]:
    d = pathlib.Path(sec_dir)
    return ["--tls-cert", str(d / "daemon.crt"), "--tls-key", str(d / "daemon.key"), "--tls-ca", str(d / "ca.crt"),
            "--token-dir", str(d / "tokens")]


def security(sec_dir: str, role: str | None, token: str | None = None):
    """The Security of one of the benchmark's clients: its certificate, and `role`'s token
    (or `token`, or none)."""
    from shardps.pscommon.security import Security, TLSConfig
    d = pathlib.Path(sec_dir)
    if role is not None:
        token = (d / "tokens" / f"{role}.token").read_text().strip()
    return Security(tls=TLSConfig(str(d / "client.crt"), str(d / "client.key"), str(d / "ca.crt")), token=token)


# -- the wrappers, in a workload's processes --------------------------------------------------------
def set_client_security(sec) -> None:
    """`ShardClient(ClientConfig(...))` in the workload's code gets `sec` unless it names one."""
    import dataclasses
    from shardps.worker import client as wc
    base = getattr(wc.ClientConfig, "_bench_base", wc.ClientConfig)
    secured = dataclasses.make_dataclass("ClientConfig", [("security", type(sec), dataclasses.field(default=sec))],
                                         bases=(base,), frozen=True)
    secured._bench_base = base
    wc.ClientConfig = secured


def secure_target(module: str, function: str, *args):
    """A worker or trainer process of the workload: ClientConfig with the worker's Security,
    then the workload's own function. Its second argument is the workload's options, which
    carry `security_dir`."""
    set_client_security(security(args[1].security_dir, "worker"))
    return getattr(importlib.import_module(module), function)(*args)


ATTACK: dict = {}


def install(module, function: str, sec_dir: str, attack: bool, servers: int) -> None:
    """In a workload's launcher process: the daemons started with the security flags, its own
    clients with the admin token, its worker processes through secure_target; with `attack`,
    the attacker started once the last server is up and stopped before the cluster is."""
    from shardps.psctl import ops, up
    flags = daemon_flags(sec_dir)
    spawn, start_server, stop = up.Cluster.spawn, up.Cluster.start_server, up.Cluster.stop

    def secure_spawn(self, name, args):
        return spawn(self, name, [args[0], *flags, *args[1:]])

    up.Cluster.spawn = secure_spawn
    admin = security(sec_dir, "admin")
    set_client_security(admin)
    ops.collect_status = functools.partial(ops.collect_status, security=admin)
    setattr(module, function, functools.partial(secure_target, module.__name__, function))
    if not attack:
        return

    def start_and_attack(self, shard):
        address = start_server(self, shard)
        if shard == servers - 1:
            report = pathlib.Path(self.run_dir) / "attack.json"
            ATTACK["report"] = report
            ATTACK["proc"] = subprocess.Popen(
                [sys.executable, __file__, "--child", "attacker", "--scheduler", self.scheduler_address,
                 "--security-dir", sec_dir, "--report", str(report),
                 "--rate", os.environ.get("ATTACK_RATE", "200")],
                stdout=subprocess.DEVNULL, stderr=open(pathlib.Path(self.run_dir) / "attacker.log", "ab"),
                # an attacker elsewhere on the network spends its own CPU, not the job's; on one
                # small machine the lowest priority keeps most of it out of the ratio
                preexec_fn=functools.partial(lower_priority, int(os.environ.get("ATTACK_NICE", "19")),
                                             os.environ.get("ATTACK_SCHED", "other")))
            deadline = time.monotonic() + 60
            while not report.with_suffix(".ready").exists():   # its idle streams are open
                if ATTACK["proc"].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the attacker did not start; see {self.run_dir}/attacker.log")
                time.sleep(0.05)
        return address

    def stop_attack_first(self, *a, **kw):
        proc = ATTACK.get("proc")
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if ATTACK.get("report") is not None and ATTACK["report"].exists():
            ATTACK["result"] = json.loads(ATTACK["report"].read_text())
        return stop(self, *a, **kw)

    up.Cluster.start_server = start_and_attack
    up.Cluster.stop = stop_attack_first


def lower_priority(nice: int, policy: str) -> None:
    """In the attacker's process before it runs: `nice`, and with policy "idle" SCHED_IDLE
    (it runs only on a core nothing else wants; nice 19 still gets a share of a busy core)."""
    os.nice(nice)
    if policy == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


# -- the attacker -------------------------------------------------------------------------------------
def attacker_main(a) -> int:
    import ctypes
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: dies with its launcher
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from shardps.pscommon import grpcutil
    from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2 as spb, scheduler_pb2_grpc

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker_sec = security(a.security_dir, "worker")
    bare = security(a.security_dir, None)                                  # TLS, no token
    stranger = security(a.security_dir, None, token=f"stranger-{secrets.token_hex(16)}")
    channels = []

    def channel(address, sec):
        ch = grpcutil.channel(address, sec)
        channels.append(ch)
        return ch

    sched = scheduler_pb2_grpc.SchedulerStub(channel(a.scheduler, worker_sec))
    st = sched.Status(spb.StatusRequest(), timeout=30)
    servers = [(s.shard, s.address) for s in st.servers]

    # the idle streams
    release = threading.Event()

    def nothing():
        release.wait()
        yield from ()

    # 200 in all: 52 + 52 on the scheduler, the other 96 split over the servers, half pushes
    idle = []
    per_server = [96 // len(servers) + (i < 96 % len(servers)) for i in range(len(servers))]
    for (_, address), n in zip(servers, per_server):
        push = ps_pb2_grpc.ParameterServerStub(channel(address, worker_sec))
        idle += [("push", push.Push.future(nothing())) for _ in range(n // 2)]
    for address, n in [(addr, n - n // 2) for (_, addr), n in zip(servers, per_server)] + [(a.scheduler, 52)]:
        for k in range(n):
            if k % 8 == 0:
                health = health_pb2_grpc.HealthStub(channel(address, bare))
            idle.append(("health", health.Watch(health_pb2.HealthCheckRequest(service=""))))
    watch = scheduler_pb2_grpc.SchedulerStub(channel(a.scheduler, bare))
    idle += [("watch", watch.WatchMembership(spb.WatchMembershipRequest())) for _ in range(52)]
    pathlib.Path(a.report).with_suffix(".ready").write_text(str(len(idle)))

    # the forged calls
    none = scheduler_pb2_grpc.SchedulerStub(channel(a.scheduler, bare))
    ps_worker = [ps_pb2_grpc.ParameterServerStub(channel(addr, worker_sec)) for _, addr in servers]
    ps_stranger = [ps_pb2_grpc.ParameterServerStub(channel(addr, stranger)) for _, addr in servers]
    raw_worker = [channel(addr, worker_sec) for _, addr in servers]
    raw_bare = [channel(addr, bare) for _, addr in servers]
    victims = [(1, 1)]

    def victim(rng):
        return rng.choice(victims)

    def push_as(rng, i, stub):
        w, inc = victim(rng)
        return stub.PushBatch(ps_pb2.PushBatchRequest(header=ps_pb2.PushHeader(
            caller=ps_pb2.Caller(worker_id=w, incarnation=inc, credential=rng.randbytes(32)), shard=servers[i][0],
            step=2**52, model_fingerprint="x")), timeout=30)

    kinds = [
        ("no token: Status", lambda rng, i: none.Status(spb.StatusRequest(), timeout=30)),
        ("unknown token: push", lambda rng, i: push_as(rng, i, ps_stranger[i])),
        ("worker token: RegisterServer", lambda rng, i: sched.RegisterServer(
            spb.RegisterServerRequest(shard=0, address="10.9.9.9:7100"), timeout=30)),
        ("worker token: Checkpoint", lambda rng, i: ps_worker[i].Checkpoint(ps_pb2.CheckpointRequest(), timeout=30)),
        ("worker token: heartbeat as a worker", lambda rng, i: sched.Heartbeat(spb.HeartbeatRequest(
            role=spb.ROLE_WORKER, member_id=victim(rng)[0], incarnation=victim(rng)[1], clock=1), timeout=30)),
        ("worker token: push as a worker", lambda rng, i: push_as(rng, i, ps_worker[i])),
        ("worker token: random bytes", lambda rng, i: raw_worker[i].unary_unary(
            "/shardps.pscommon.wire.v1.ParameterServer/PushBatch")(rng.randbytes(rng.randint(1, 256)), timeout=30)),
        ("no token: random bytes", lambda rng, i: raw_bare[i].unary_unary(
            "/shardps.pscommon.wire.v1.ParameterServer/PushBatch")(rng.randbytes(rng.randint(1, 256)), timeout=30)),
    ]
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def forge(t):
        rng = random.Random(t)
        n = t
        gap = 4 / a.rate if a.rate > 0 else 0.0      # each of the 4 threads makes a quarter of the calls
        due = time.monotonic()
        while not stop.is_set():
            if gap:
                due += gap
                if stop.wait(max(0.0, due - time.monotonic())):
                    break
            name, call = kinds[n % len(kinds)]
            try:
                call(rng, n % len(servers))
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            with lock:
                counts[f"{name} -> {code}"] += 1
            n += 4
            if n % 200 < 4:   # learn the live workers' ids now and then (public: Status)
                try:
                    ws = sched.Status(spb.StatusRequest(), timeout=30).workers
                    victims[:] = [(w.worker_id, w.incarnation) for w in ws if w.state == spb.MEMBER_STATE_ALIVE] \
                        or victims
                except grpc.RpcError:
                    pass

    threads = [threading.Thread(target=forge, args=(t,), daemon=True) for t in range(4)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    stop.wait()
    for th in threads:
        th.join(30)
    seconds = time.perf_counter() - t0
    outcomes = collections.Counter()
    for kind, call in idle:
        outcomes[f"{kind}: {call.code().name if call.done() else 'open'}"] += 1
    release.set()
    report = {"forged_calls": sum(counts.values()), "seconds": round(seconds, 2), "rate_asked": a.rate,
              "attacker_cpu_s": round(time.process_time(), 2),   # its own CPU (all threads), start to end
              "accepted": sum(n for k, n in counts.items() if k.endswith("-> OK")),
              "forged_by_kind": dict(sorted(counts.items())), "idle_streams": len(idle),
              "idle_streams_at_end": dict(sorted(outcomes.items()))}
    pathlib.Path(a.report).write_text(json.dumps(report))
    for _, call in idle:
        call.cancel()
    for ch in channels:
        ch.close()
    return 0


# -- one run, in a child process -----------------------------------------------------------------------
def child_main(a) -> int:
    side = a.side
    sec_dir = a.security_dir if side != "off" else None
    if a.child == "ps-loop":
        import ps_loop as workload
        argv = ["--preset", a.preset, "--servers", str(a.servers), "--workers", str(a.workers),
                "--timeout", str(a.timeout)] + (["--steps", str(a.steps)] if a.steps else [])
        function, servers = "worker_main", a.servers
    else:
        import digits_peer as workload
        argv = ["--workers", str(a.workers), "--seed", str(a.seed), "--timeout", str(a.timeout)]
        function, servers = "trainer_main", 1
    if a.run_dir:
        argv += ["--run-dir", a.run_dir]
    opts = workload.parse(argv)
    opts.security_dir = sec_dir
    if sec_dir:
        install(workload, function, sec_dir, side == "on+attack", servers)
    r = workload.run(opts)
    r.pop("curve", None)
    r.pop("eval_versions", None)
    r.update(workload=a.child, security=side)
    if side == "on+attack":
        r["attack"] = ATTACK.get("result")
    print(json.dumps(r), flush=True)
    return 0


# -- the orchestration ------------------------------------------------------------------------------------
def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def run_child(args: list[str], timeout: float, log) -> dict | None:
    cmd = [sys.executable, __file__, "--child", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"timed out: {' '.join(args)}", file=sys.stderr)
        return None
    line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
    if out.returncode != 0 or line is None:
        print(f"failed ({out.returncode}): {' '.join(args)}; see the log", file=sys.stderr)
        return None
    return json.loads(line)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """One row per workload configuration: each side's median [min-max] and the ratios."""
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in runs:
        if r["workload"] == "ps-loop":
            key = ("ps-loop", f"{r['preset']} S={r['servers']} W={r['workers']}")
        else:
            key = ("digits", f"W={r['workers']}")
        groups[key][r["security"]].append(r)
    metrics = {"ps-loop": [("MBps", "MB/s", True)],
               "digits": [("time_to_target_s", "time to 95% s", False), ("updates_per_s", "updates/s", True)]}
    rows = []
    for (workload, config), sides in sorted(groups.items()):
        for field, label, higher in metrics[workload]:
            row = {"workload": workload, "config": config, "metric": label, "higher_is_better": higher}
            for side in SIDES:
                vals = [r.get(field) for r in sides.get(side, [])]
                vals = [v for v in vals if v is not None]
                row[side] = {"median": med(vals), "min": min(vals, default=None), "max": max(vals, default=None),
                             "n": len(vals)}
            off, on, att = (row[s]["median"] for s in SIDES)
            row["on_over_off"] = round(on / off, 3) if on and off else None
            row["attack_over_on"] = round(att / on, 3) if att and on else None
            if row["attack_over_on"] is not None:   # the soak's criterion: within 20% of undisturbed
                worse = row["attack_over_on"] if higher else 1 / row["attack_over_on"]
                row["attack_within_20pct"] = worse >= 0.8
            rows.append(row)
    checks = collections.defaultdict(list)
    for r in runs:
        ok = r.get("bytes_ok", True) and r.get("update_ok", True) and r.get("updates_ok", True)
        checks[r["security"]].append(bool(ok))
        if r.get("attack"):
            checks["attack: forged calls accepted"].append(r["attack"]["accepted"] == 0)
    return rows, {k: f"{sum(v)}/{len(v)}" for k, v in checks.items()}


def fmt(cell: dict, digits: int) -> str:
    if cell["median"] is None:
        return "-"
    m = f"{cell['median']:.{digits}f}"
    return m if cell["n"] < 2 else f"{m} [{cell['min']:.{digits}f}-{cell['max']:.{digits}f}]"


def table(rows: list[dict], attack: bool) -> str:
    sides = SIDES if attack else SIDES[:2]
    head = ["workload", "configuration", "metric", *sides, "on / off"] + (["attack / on", "within 20%"] if attack else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = 0 if r["metric"] in ("MB/s", "updates/s") else 2
        cells = [r["workload"], r["config"], r["metric"], *(fmt(r[s], d) for s in sides),
                 "-" if r["on_over_off"] is None else f"{r['on_over_off']:.2f}"]
        if attack:
            cells += ["-" if r["attack_over_on"] is None else f"{r['attack_over_on']:.2f}",
                      {True: "yes", False: "no"}.get(r.get("attack_within_20pct"), "-")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main_orchestrate(a) -> int:
    outdir = pathlib.Path(os.environ.get("OUTDIR", ROOT / "bench" / "results"))
    outdir.mkdir(parents=True, exist_ok=True)
    jsonl = pathlib.Path(a.jsonl or outdir / "security_overhead.jsonl")
    json_out = pathlib.Path(a.json_out or outdir / "security_overhead.json")
    reps = int(os.environ.get("REPS", "3"))
    presets = os.environ.get("PRESETS", "small").split()
    configs = [tuple(int(x) for x in c.split(",")) for c in os.environ.get("CONFIGS", "1,1 2,2").split()]
    seeds = os.environ.get("SEEDS", "0").split()
    dw = os.environ.get("DIGITS_WORKERS", "3")
    tmo = float(os.environ.get("TMO", "180"))
    steps = os.environ.get("STEPS", "")
    sides = list(SIDES if a.attack else SIDES[:2])
    work = tempfile.mkdtemp(prefix="shardps-security-")
    sec_dir = str(make_security_dir(pathlib.Path(work) / "pki"))
    log_path = outdir / "security_overhead.log"
    jobs = []
    if not a.no_ps_loop:
        jobs += [["ps-loop", "--preset", p, "--servers", str(s), "--workers", str(w)]
                 + (["--steps", steps] if steps else []) for p in presets for s, w in configs]
    if not a.no_digits:
        jobs += [["digits", "--workers", dw, "--seed", seed] for seed in seeds]
    load = {"start": loadavg()}
    t0 = time.monotonic()
    runs = []
    with open(log_path, "w") as log, open(jsonl, "w") as out:
        for rep in range(reps):
            order = sides if rep % 2 == 0 else sides[::-1]
            for job in jobs:
                for side in order:
                    print(f"=== round {rep + 1}/{reps} {' '.join(job)} security={side}  (load {loadavg()})",
                          file=sys.stderr, flush=True)
                    load_before = loadavg()
                    keep = []
                    if a.keep_logs:
                        keep = ["--run-dir", str(pathlib.Path(a.keep_logs).resolve()
                                                 / f"{rep + 1}-{'-'.join(job[::2] + job[1::2][1:])}-{side}")]
                    r = run_child([*job, "--side", side, "--security-dir", sec_dir, "--timeout", str(tmo - 20),
                                   *keep], tmo, log)
                    if r is not None:
                        r["round"], r["loadavg_before"] = rep + 1, load_before
                        runs.append(r)
                        out.write(json.dumps(r) + "\n")
                        out.flush()
    load["end"] = loadavg()
    rows, checks = summarize(runs)
    import grpc
    summary = {
        "command": " ".join(f"{k}={os.environ[k]}" for k in ("REPS", "PRESETS", "CONFIGS", "SEEDS", "STEPS", "ATTACK_RATE", "ATTACK_NICE",
                                                                        "ATTACK_SCHED")
                            if k in os.environ) + " python bench/security_overhead.py"
                   + (" --attack" if a.attack else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"nproc={os.cpu_count()}, Linux {platform.release()}, Python {platform.python_version()}, "
                   f"grpcio {grpc.__version__}",
        "loadavg": load, "minutes": round((time.monotonic() - t0) / 60, 1), "rounds": reps,
        "runs_ok": checks, "rows": rows,
    }
    json_out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['command']}\n{summary['machine']}; load average at start {load['start']}, at end "
          f"{load['end']}; {summary['minutes']} min; checks passed {checks}\n")
    print(table(rows, a.attack))
    print(f"\nruns: {jsonl}\nsummary: {json_out}\nlog: {log_path}")
    return 0


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attack", action="store_true", help="also run each workload with security on under attack")
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--no-ps-loop", action="store_true")
    ap.add_argument("--jsonl", default=None, help="one JSON line per run (default $OUTDIR/security_overhead.jsonl)")
    ap.add_argument("--json-out", default=None, help="the summary (default $OUTDIR/security_overhead.json)")
    ap.add_argument("--keep-logs", default=None, metavar="DIR",
                    help="keep every run's daemon logs in DIR/<round>-<workload>-<side>/ (default: removed)")
    # internal: one run in a child process, and the attacker
    ap.add_argument("--child", choices=("ps-loop", "digits", "attacker"), help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=SIDES, default="off", help=argparse.SUPPRESS)
    ap.add_argument("--security-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    ap.add_argument("--servers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=160, help=argparse.SUPPRESS)
    ap.add_argument("--scheduler", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=200.0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    if a.child == "attacker":
        return attacker_main(a)
    if a.child:
        return child_main(a)
    return main_orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())

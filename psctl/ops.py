"""Operator verbs over RPC: status and inspect (each with --json for scripts)."""
from __future__ import annotations

import json
import time
from concurrent import futures

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import Aborted, PSError, Unavailable
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.stats import histogram_dict
from shardps.pscommon.tensors import dtype_name
from shardps.pscommon.wire.v1 import job_pb2, ps_pb2, ps_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

STATE = {scheduler_pb2.MEMBER_STATE_ALIVE: "alive", scheduler_pb2.MEMBER_STATE_DEAD: "dead",
         scheduler_pb2.MEMBER_STATE_LEFT: "left", scheduler_pb2.MEMBER_STATE_UNSPECIFIED: "unknown"}


def _scheduler(address: str, security: Security):
    return scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(address, security))


def _reach(what: str, address: str, fn):
    try:
        return fn()
    except Unavailable as exc:
        raise Unavailable(f"cannot reach {what} at {address}: {exc}") from None


def _shard_calls(servers, method: str, request, timeout: float, security: Security) -> dict[int, object]:
    """Call `method` on every live server in parallel; an unreachable one maps to its error."""
    def one(s):
        stub = ps_pb2_grpc.ParameterServerStub(grpcutil.channel(s.address, security))
        try:
            return grpcutil.call(getattr(stub, method), request, timeout)
        except PSError as exc:
            return exc
    live = [s for s in servers if s.state == scheduler_pb2.MEMBER_STATE_ALIVE]
    with futures.ThreadPoolExecutor(max(1, len(live))) as pool:
        return dict(zip([s.shard for s in live], pool.map(one, live)))


def traffic_dict(entries) -> dict:
    logical = sum(t.logical_bytes for t in entries)
    wire = sum(t.wire_bytes for t in entries)
    return {"logical_bytes": logical, "wire_bytes": wire,
            "ratio": round(logical / wire, 3) if wire else None,
            "codec_s": round(sum(t.codec_seconds for t in entries), 6),
            "tensors": {t.key: {"logical_bytes": t.logical_bytes, "wire_bytes": t.wire_bytes,
                                "codec_s": round(t.codec_seconds, 6)}
                        for t in entries}}


RATE_WINDOW_S = 1.0      # psctl status: seconds between the two ShardStatus samples rates come from
MAX_RATE_WINDOW_S = 60.0


def _rates(a, b) -> dict | None:
    """Per-second rates between two ShardStatus replies of one server, over the server's own
    uptime clock; None when it restarted in between (its counters started again)."""
    dt = b.uptime_s - a.uptime_s
    if dt <= 0 or b.shard_version < a.shard_version or b.pushes < a.pushes or b.pulls < a.pulls:
        return None

    def per_s(x, y) -> float:
        return round((y - x) / dt, 2)
    wire = (lambda r, which: sum(t.wire_bytes for t in getattr(r, which)))
    return {"window_s": round(dt, 3), "updates_per_s": per_s(a.shard_version, b.shard_version),
            "pushes_per_s": per_s(a.pushes, b.pushes), "pulls_per_s": per_s(a.pulls, b.pulls),
            "push_wire_bytes_per_s": per_s(wire(a, "push_traffic"), wire(b, "push_traffic")),
            "pull_wire_bytes_per_s": per_s(wire(a, "pull_traffic"), wire(b, "pull_traffic"))}


def _step_rates(first: dict, second: dict) -> dict[int, float]:
    """Steps per second of each worker over the window, from the clocks the shards record
    (the last step each worker pushed there; the scheduler's copy moves once a heartbeat)."""
    out: dict[int, float] = {}
    for shard, b in second.items():
        a = first.get(shard)
        if not isinstance(a, ps_pb2.ShardStatusReply) or not isinstance(b, ps_pb2.ShardStatusReply):
            continue
        dt = b.uptime_s - a.uptime_s
        if dt <= 0:
            continue
        for worker, clock in b.clocks.items():
            if worker in a.clocks and clock >= a.clocks[worker]:
                out[worker] = max(out.get(worker, 0.0), round((clock - a.clocks[worker]) / dt, 2))
    return out


def collect_status(address: str, timeout: float, security: Security = NO_SECURITY,
                   rate_window_s: float = 0.0) -> dict:
    """The cluster as `psctl status --json` prints it. With rate_window_s > 0 every live
    shard is asked twice, that many seconds apart, and the rates (updates, pushes, pulls,
    wire bytes per second; each worker's steps per second) are over that window; with 0 it
    is asked once and no rate is given (a counter divided by an uptime is no rate: it stays
    high long after training stopped)."""
    st = _reach("scheduler", address, lambda: grpcutil.call(
        _scheduler(address, security).Status, scheduler_pb2.StatusRequest(), timeout))
    job = JobSpec.from_proto(st.job)
    request = ps_pb2.ShardStatusRequest()
    first = _shard_calls(st.servers, "ShardStatus", request, timeout, security)
    second: dict[int, object] = {}
    window = min(max(0.0, rate_window_s), MAX_RATE_WINDOW_S)
    if window > 0 and any(isinstance(r, ps_pb2.ShardStatusReply) for r in first.values()):
        time.sleep(window)   # the measurement window itself, bounded above
        second = _shard_calls(st.servers, "ShardStatus", request, timeout, security)
    else:
        window = 0.0
    steps_per_s = _step_rates(first, second)
    servers = []
    for s in st.servers:
        entry = {"shard": s.shard, "address": s.address, "state": STATE[s.state],
                 "member_id": s.member_id, "incarnation": s.incarnation,
                 # since the scheduler last heard from it; None from a scheduler that does not say
                 "last_seen_age_s": (round(s.last_seen_age_s, 2) if s.HasField("last_seen_age_s") else None)}
        ss = second.get(s.shard, first.get(s.shard))
        if isinstance(ss, ps_pb2.ShardStatusReply):
            earlier = first.get(s.shard)
            rates = (_rates(earlier, ss) if window and ss is not earlier
                     and isinstance(earlier, ps_pb2.ShardStatusReply) else None)
            entry.update(keys=ss.keys, bytes=ss.bytes, optimizer_bytes=ss.optimizer_bytes,
                         version=ss.shard_version, pushes=ss.pushes, pulls=ss.pulls,
                         duplicates=ss.duplicates, uptime_s=round(ss.uptime_s, 2), rates=rates,
                         completed_step=ss.completed_step, membership_view=ss.membership_view,
                         clocks={str(k): v for k, v in sorted(ss.clocks.items())},
                         staleness=histogram_dict(ss.staleness),
                         pull_wait_s=histogram_dict(ss.pull_wait_s),
                         push_traffic=traffic_dict(ss.push_traffic),
                         pull_traffic=traffic_dict(ss.pull_traffic),
                         checkpoint_age_s=round(ss.checkpoint_age_s, 2),
                         checkpoint_version=ss.checkpoint_version, rebases=ss.rebases,
                         nonfinite_pushes=ss.nonfinite_pushes, dropped_pushes=ss.dropped_pushes,
                         tables={t.name: {"dim": t.dim, "rows": t.rows, "bytes": t.bytes, "admitted": t.admitted,
                                          "evicted_idle": t.evicted_idle, "evicted_lru": t.evicted_lru,
                                          "dropped_gradients": t.dropped_gradients,
                                          "unadmitted_lookups": t.unadmitted_lookups, "rows_served": t.rows_served,
                                          "rows_updated": t.rows_updated} for t in ss.tables},
                         reseeded=({"worker": ss.reseeded.worker_id, "version": ss.reseeded.version,
                                    "offers": ss.reseeded.offers, "at_uptime_s": round(ss.reseeded.uptime_s, 2)}
                                   if ss.HasField("reseeded") else None))
        elif ss is not None:
            entry["error"] = str(ss)
        servers.append(entry)
    # one entry per shard: a shard no server ever registered for is listed as missing (a
    # shard whose server died or left keeps that member's entry, state dead or left)
    known = {s.shard for s in st.servers}
    servers += [{"shard": shard, "address": "", "state": "missing", "member_id": 0, "incarnation": 0,
                 "last_seen_age_s": None}
                for shard in range(st.job.num_servers) if shard not in known]
    servers.sort(key=lambda v: v["shard"])
    live = {s.shard for s in st.servers if s.state == scheduler_pb2.MEMBER_STATE_ALIVE}
    workers = [{"id": w.worker_id, "incarnation": w.incarnation, "state": STATE[w.state],
                "clock": w.clock, "lease_age_s": round(w.lease_age_s, 2), "name": w.name,
                "steps_per_s": steps_per_s.get(w.worker_id) if window and w.state == scheduler_pb2.MEMBER_STATE_ALIVE
                else None}
               for w in st.workers]
    d = st.data
    data = {"epoch": d.epoch, "max_epochs": d.max_epochs, "partitions": d.partitions, "done": d.done,
            "assigned": d.assigned, "queued": d.queued, "finished": d.finished,
            "history": {str(r.epoch): {str(p): w for p, w in sorted(r.completed_by.items())}
                        for r in d.history}}
    return {"view": st.view, "mode": job.mode, "job": job.describe(),
            "model_fingerprint": st.model_fingerprint, "keys": st.keys,
            "uptime_s": round(st.uptime_s, 2), "rate_window_s": window,
            "missing_shards": [shard for shard in range(st.job.num_servers) if shard not in live],
            "workers": workers, "servers": servers, "data": data}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def shown(text) -> str:
    """A stored string as the text views print it: characters a terminal would act on
    (control characters, escapes, line breaks, bidi overrides) as repr-style escapes, since
    names and addresses come from callers and from state files older versions wrote."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fmt_rate(n: float) -> str:
    return f"{n:.0f}" if n >= 100 else f"{n:.1f}"


def _server_details(v: dict, mode: str) -> str:
    """The second line of a live server: pull wait, codec seconds, checkpoint age."""
    wait = v["pull_wait_s"]
    age = v["checkpoint_age_s"]
    checkpoint = ("no checkpoint yet" if age < 0 else
                  f"checkpoint {age:.0f} s ago (version {v['checkpoint_version']})")
    pulls = (f"pull wait {wait['mean'] * 1e3:.1f} ms mean, {wait['max'] * 1e3:.1f} ms max" if wait["total"]
             else "pull wait - (async: pulls never wait)" if mode == "async" else "pull wait - (none yet)")
    return (f"{pulls}  codec {v['push_traffic']['codec_s']:.3f} s push, {v['pull_traffic']['codec_s']:.3f} s pull"
            f"  {checkpoint}")


def _no_server(v: dict, uptime_s: float) -> str:
    """Why a shard has no live server, in the words of its row."""
    if v["state"] == "missing":
        return f"no server yet (missing since the scheduler started, {uptime_s:.0f} s ago)"
    how = {"dead": "missed its lease", "left": "left"}.get(v["state"], v["state"])
    age = v.get("last_seen_age_s")
    since = f" for {age:.0f} s" if age is not None else ""   # an older scheduler does not say
    return f"no server{since} (member {v['member_id']} {how}; workers wait for this shard)"


def render_status(s: dict) -> str:
    job = s["job"]
    window = s.get("rate_window_s", 0.0)
    lines = [f"mode {shown(s['mode'])}" + (f"(staleness {job['staleness']})" if s["mode"] == "ssp" else "")
             + f"  optimizer {shown(job['optimizer']['kind'])} lr {job['optimizer']['lr']:g}"
             + f"  push {shown(job['push_codec'])}  pull {shown(job['pull_codec'])}",
             f"membership view {s['view']}  model {shown(s['model_fingerprint']) or '-'} ({s['keys']} keys)"
             f"  uptime {s['uptime_s']:.0f}s", ""]
    if window:
        lines += [f"rates over the last {window:g} s", ""]
    lines += ["workers:", f"  {'id':>3} {'inc':>4} {'state':<6} {'clock':>7}"
              + (f" {'steps/s':>7}" if window else "") + f" {'lease age':>9}  name"]
    for w in s["workers"]:
        rate = w.get("steps_per_s")
        lines.append(f"  {w['id']:>3} {w['incarnation']:>4} {w['state']:<6} {w['clock']:>7}"
                     + (f" {(_fmt_rate(rate) if rate is not None else '-'):>7}" if window else "")
                     + f" {w['lease_age_s']:>8.1f}s  {shown(w['name'])}")
    d = s["data"]
    if d["partitions"] and d["finished"]:   # past the last epoch: its counters are an unused next epoch's
        lines += ["", f"data: finished, {d['max_epochs']} epochs of {d['partitions']} partitions"]
    elif d["partitions"]:   # epochs count from 0: epoch 0/3 is the first of three
        lines += ["", f"data: epoch {d['epoch']}/{d['max_epochs']}  partitions {d['done']} done, "
                  f"{d['assigned']} assigned, {d['queued']} queued"]
    lines += ["", "servers:", f"  {'shard':>5} {'state':<7} {'address':<21} {'keys':>5} {'bytes':>10} "
              f"{'version':>8}" + (f" {'upd/s':>7}" if window else "") + f" {'stale':>6} {'wire':>6}"]
    for v in s["servers"]:
        if v["state"] != "alive":
            lines.append(f"  {v['shard']:>5} {v['state']:<7} {shown(v['address']) or '-':<21} "
                         f"{_no_server(v, s['uptime_s'])}")
            continue
        if "keys" not in v:
            lines.append(f"  {v['shard']:>5} {v['state']:<7} {shown(v['address']):<21} "
                         f"{shown(v.get('error', ''))}")
            continue
        ratio = v["push_traffic"]["ratio"]
        rates = v.get("rates")
        lines.append(f"  {v['shard']:>5} {v['state']:<7} {shown(v['address']):<21} {v['keys']:>5} "
                     f"{_fmt_bytes(v['bytes']):>10} {v['version']:>8}"
                     + (f" {(_fmt_rate(rates['updates_per_s']) if rates else '-'):>7}" if window else "")
                     + f" {v['staleness']['mean']:>6.2f} {(f'{ratio:.2f}x' if ratio else '-'):>6}")
        lines.append(f"        {_server_details(v, s['mode'])}")
        r = v.get("reseeded")
        if r:
            lines.append(f"        restarted empty; re-seeded from worker {r['worker']}'s copy at version "
                         f"{r['version']} ({r['offers']} offered, {r['at_uptime_s']:.0f}s into its uptime)")
    return "\n".join(lines)


def status(address: str, as_json: bool, timeout: float, security: Security = NO_SECURITY,
           rate_window_s: float = RATE_WINDOW_S) -> int:
    s = collect_status(address, timeout, security, rate_window_s)
    print(json.dumps(s, indent=2) if as_json else render_status(s))
    return 0


def collect_inspect(address: str, timeout: float, shard: int | None, sample: int,
                    security: Security = NO_SECURITY) -> dict:
    info = _reach("scheduler", address, lambda: grpcutil.call(
        _scheduler(address, security).GetJob, scheduler_pb2.GetJobRequest(), timeout))
    servers = [s for s in info.servers if shard is None or s.shard == shard]
    if shard is not None and not servers:
        raise Unavailable(f"no server registered for shard {shard}")
    replies = _shard_calls(servers, "Inspect", ps_pb2.InspectRequest(sample=sample), timeout, security)
    shards = []
    for s in sorted(servers, key=lambda s: s.shard):
        r = replies.get(s.shard)
        if not isinstance(r, ps_pb2.InspectReply):
            shards.append({"shard": s.shard, "address": s.address, "error": str(r), "tensors": []})
            continue
        tensors = []
        for k in r.keys:
            whole = k.spec.offset == 0 and k.spec.length == _numel(k.spec.param_shape)
            tensors.append({"name": k.spec.key, "param": k.spec.param,
                            "shape": list(k.spec.param_shape) if whole else [k.spec.length],
                            "param_shape": list(k.spec.param_shape), "offset": k.spec.offset,
                            "dtype": dtype_name(k.spec.dtype), "version": k.version,
                            "norm": round(k.norm, 6), "sample": [round(x, 6) for x in k.sample]})
        shards.append({"shard": s.shard, "address": s.address, "tensors": tensors})
    return {"model_fingerprint": info.shard_map.fingerprint, "shards": shards}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def render_inspect(d: dict) -> str:
    lines = [f"model {shown(d['model_fingerprint']) or '-'}"]
    for s in d["shards"]:
        lines.append(f"shard {s['shard']} at {shown(s['address'])}"
                     + (f": {shown(s['error'])}" if "error" in s else ""))
        for t in s["tensors"]:
            sample = ", ".join(f"{x:.4g}" for x in t["sample"])
            lines.append(f"  {shown(t['name']):<28} {str(t['shape']):<14} {t['dtype']:<8} v{t['version']:<7} "
                         f"|x|={t['norm']:<10.4g} [{sample}]")
    return "\n".join(lines)


def inspect(address: str, as_json: bool, timeout: float, shard: int | None, sample: int,
            security: Security = NO_SECURITY) -> int:
    d = collect_inspect(address, timeout, shard, sample, security)
    print(json.dumps(d, indent=2) if as_json else render_inspect(d))
    return 0


def checkpoint(address: str, as_json: bool, timeout: float, security: Security = NO_SECURITY,
               consistent: bool = False) -> int:
    """Every live shard writes a checkpoint now (consistent: a cut across shards, see
    consistent_cut); exit 1 if any could not."""
    info = _reach("scheduler", address, lambda: grpcutil.call(
        _scheduler(address, security).GetJob, scheduler_pb2.GetJobRequest(), timeout))
    cut = None
    if consistent:
        cut, replies = consistent_cut(info, timeout, security)
    else:
        replies = _shard_calls(info.servers, "Checkpoint", ps_pb2.CheckpointRequest(), timeout, security)
    out = []
    for shard, r in sorted(replies.items()):
        if isinstance(r, ps_pb2.CheckpointReply):
            out.append({"shard": shard, "path": r.path, "version": r.shard_version,
                        "completed_step": r.completed_step})
        else:
            out.append({"shard": shard, "error": str(r)})
    if as_json:
        print(json.dumps({"cut": cut, "checkpoints": out}, indent=2))
    else:
        if cut is not None:
            print(cut["what"])
        for c in out:
            print(f"shard {c['shard']}: " + (f"{c['path']} (version {c['version']})" if "path" in c
                                              else f"failed: {c['error']}"))
    return 1 if any("error" in c for c in out) or not out else 0


CUT_ATTEMPTS = 5
HOLD_S = 10.0


def consistent_cut(info, timeout: float, security: Security) -> tuple[dict, dict[int, object]]:
    """Checkpoints of every shard that belong together.

    sync: all at one completed step C, the highest any shard has reached. A shard at C copies
    its state at once (nothing changes until step C completes, which needs every shard at C),
    one at C-1 copies it the moment it gets there; a shard already past C (a step completed
    meanwhile) refuses, and the cut is tried again at the new highest step.
    async/ssp: every shard first stops taking pushes (they wait, for at most HOLD_S), then
    each writes and takes pushes again; a worker has at most one push in flight, so the
    shards' states differ by at most one push per worker.
    """
    live = {s.shard for s in info.servers if s.state == scheduler_pb2.MEMBER_STATE_ALIVE}
    missing = sorted(set(range(info.job.num_servers)) - live)
    if missing:
        raise Unavailable(f"no live server for shards {missing}: a consistent cut needs every shard")
    if info.job.mode == job_pb2.MODE_SYNC:
        for _ in range(CUT_ATTEMPTS):
            statuses = _shard_calls(info.servers, "ShardStatus", ps_pb2.ShardStatusRequest(), timeout, security)
            failed = {s: r for s, r in statuses.items() if not isinstance(r, ps_pb2.ShardStatusReply)}
            if failed:
                return {"what": "no cut: a shard did not answer"}, failed
            step = max(r.completed_step for r in statuses.values())
            replies = _shard_calls(info.servers, "Checkpoint", ps_pb2.CheckpointRequest(at_step=step), timeout,
                                   security)
            if not any(isinstance(r, Aborted) for r in replies.values()):
                return {"mode": "sync", "step": step, "what": f"consistent cut at step {step}"}, replies
        return {"what": f"no cut: the shards moved past each cut {CUT_ATTEMPTS} times"}, replies
    held = _shard_calls(info.servers, "Checkpoint", ps_pb2.CheckpointRequest(hold_s=min(HOLD_S, timeout)),
                        timeout, security)
    failed = {s: r for s, r in held.items() if not isinstance(r, ps_pb2.CheckpointReply)}
    if failed:   # the holds that took lapse on their own
        return {"what": "no cut: a shard could not be held"}, failed
    replies = _shard_calls(info.servers, "Checkpoint", ps_pb2.CheckpointRequest(release=True), timeout, security)
    return {"mode": "held", "what": "consistent cut: pushes held on every shard, at most one push per worker "
            "apart"}, replies

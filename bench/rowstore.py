"""Micro-benchmark of the embedding row store (psserver/rowstore.py) on the emb-loop workload
(bench/peers/README.md, "emb-loop": its presets, id stream and scrambled 64-bit keys), beside
the one-core peer emb_limit (dense and id64) run in the same invocation.

Sections (M rows/s unless said otherwise; best of --reps):
  index   id -> slot lookups of each step's unique ids in a table holding all N rows of one
          field, and inserting those N rows in batches of B: Python dict, sorted array +
          searchsorted (emb_limit[id64]'s index), rowstore.SortedIndex (sorted + delta),
          numpy open addressing, rowstore.HashIndex (pandas khash, when pandas is installed)
  dedupe  summing the gradients of duplicate ids of a raw batch (B ids, D dims): np.unique +
          np.add.at, argsort + np.add.reduceat (tables.sum_duplicates), pandas.factorize +
          np.add.at
  init    first values of new rows: rowstore.Initializer (counter-based, vectorized) against
          numpy's Philox keyed by (seed, id), one generator per row
  store   the RowStore per emb-loop step and field, Adagrad as the workload specifies:
          `lookup(unique ids)` (the server's pull), `apply(unique ids, rows * 1e-3)` (its push),
          with every row present beforehand ("prefilled", as the peers' dense tables) and with
          rows created on first touch ("first-touch"). `server` = 2 x rows / (lookup + apply
          time): rows pulled + pushed per second of server work, emb-loop's rows_per_s
          accounting; `step` adds the worker's np.unique and gradient, i.e. the whole of what
          emb_limit times on its one core.
  peers   bench/peers/emb_limit.py --keys dense|id64 run as subprocesses with the same steps
          (it needs numpy only, no shardps); x id64 = store server rate / emb_limit[id64].
          store and peers alternate for --rounds rounds and the best of each is kept, so a burst
          of other load on a shared machine does not land on one side only.

The process pins itself to one core, as emb_limit does (--no-pin to not).

    .venv/bin/python bench/rowstore.py --quick          # under a minute
    .venv/bin/python bench/rowstore.py --json > rowstore.json
    .venv/bin/python bench/rowstore.py --sections index,store --presets large

To run the peer by hand beside it: `python bench/peers/emb_limit.py --preset small --keys id64 --json`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

PEERS = pathlib.Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS))
from emb_spec import ACC_INIT, EPS, GRAD_SCALE, LR, PRESETS, ROW_INIT, draw, id64  # noqa: E402

from shardps.pscommon import tables  # noqa: E402
from shardps.psserver import rowstore, sparse_optim  # noqa: E402

SECTIONS = ("index", "dedupe", "init", "store", "peers")


def best(fn, reps):
    """Best wall time of `reps` calls of fn (the figure least disturbed by other load)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def mrate(rows, seconds):
    return round(rows / seconds / 1e6, 3) if seconds > 0 else None


def field_batches(preset, steps, field):
    """[step] raw idx batches of worker 0 for one field (warm-up steps included, as the peers)."""
    return [draw(0, field, s, preset) for s in range(steps)]


# ---------------------------------------------------------------- index candidates

class DictIndex:
    def __init__(self):
        self.d = {}

    def put(self, ids, slots):
        self.d.update(zip(ids.tolist(), slots.tolist()))

    def get(self, ids):
        get = self.d.get
        return np.fromiter((get(k, -1) for k in ids.tolist()), np.int64, len(ids))


class PlainSortedIndex:
    """emb_limit[id64]'s index: sorted keys, np.searchsorted, rebuilt (merged) on every insert."""

    def __init__(self):
        self.keys, self.slots = np.empty(0, np.uint64), np.empty(0, np.int64)

    def put(self, ids, slots):
        keys = np.concatenate([self.keys, ids])
        order = np.argsort(keys)
        self.keys, self.slots = keys[order], np.concatenate([self.slots, slots])[order]

    def get(self, ids):
        pos = np.searchsorted(self.keys, ids)
        pos[pos == len(self.keys)] = 0
        return np.where(self.keys[pos] == ids, self.slots[pos], -1)


class OpenAddressingIndex:
    """Linear probing in numpy arrays: one vectorized pass per probe round; doubles at half full."""

    def __init__(self, bits=10):
        self._alloc(bits)
        self.n = 0

    def _alloc(self, bits):
        self.mask = (1 << bits) - 1
        self.keys = np.zeros(1 << bits, np.uint64)
        self.vals = np.full(1 << bits, -1, np.int64)

    def _home(self, ids):
        return (rowstore.mix64(ids.copy()) & np.uint64(self.mask)).astype(np.int64)

    def get(self, ids):
        out = np.full(len(ids), -1, np.int64)
        todo, h, q = np.arange(len(ids)), self._home(ids), ids
        while len(todo):
            v = self.vals[h]
            hit = (v >= 0) & (self.keys[h] == q)
            out[todo[hit]] = v[hit]
            go = ~hit & (v != -1)
            todo, h, q = todo[go], (h[go] + 1) & self.mask, q[go]
        return out

    def put(self, ids, slots):
        if 2 * (self.n + len(ids)) > self.mask + 1:
            live = self.vals >= 0
            old_k, old_v = self.keys[live], self.vals[live]
            self._alloc(int(np.ceil(np.log2(4 * (self.n + len(ids))))))
            self.n = 0
            self._insert(old_k, old_v)
        self._insert(ids, slots)

    def _insert(self, ids, slots):
        h, q, s = self._home(ids), ids, slots.astype(np.int64)
        while len(q):
            free = self.vals[h] < 0
            hf = h[free]
            self.keys[hf] = q[free]  # several may claim one cell: the last write wins it
            won = np.zeros(len(q), bool)
            won[free] = self.keys[hf] == q[free]
            self.vals[h[won]] = s[won]
            self.n += int(won.sum())
            lost = ~won
            q, s, h = q[lost], s[lost], (h[lost] + 1) & self.mask


def index_candidates():
    out = {"dict": DictIndex, "sorted+searchsorted": PlainSortedIndex,
           "rowstore.SortedIndex": rowstore.SortedIndex, "numpy open addressing": OpenAddressingIndex}
    if rowstore.hash_index_available():
        out["rowstore.HashIndex (pandas)"] = rowstore.HashIndex
    return out


def bench_index(preset, steps, reps):
    p = PRESETS[preset]
    keys = id64(np.arange(p["rows"]), 0)
    chunks = np.array_split(keys, max(1, p["rows"] // p["batch"]))
    batches = [id64(np.unique(b), 0) for b in field_batches(preset, steps, 0)]
    rows = sum(len(b) for b in batches)
    out = {}
    for name, cls in index_candidates().items():
        def fill():
            ix, start = cls(), 0
            for c in chunks:
                ix.put(c, np.arange(start, start + len(c), dtype=np.int64))
                start += len(c)
            return ix
        t0 = time.perf_counter()
        ix = fill()
        t_fill = time.perf_counter() - t0
        if not all((ix.get(b) >= 0).all() for b in batches[:2]):
            raise RuntimeError(f"{name} lost keys")
        t = best(lambda: [ix.get(b) for b in batches], reps)
        out[name] = dict(lookup_Mrows_s=mrate(rows, t), insert_Mrows_s=mrate(len(keys), t_fill))
    return dict(table_rows=p["rows"], mean_batch=round(rows / len(batches), 1), candidates=out)


# ---------------------------------------------------------------- dedupe

def dedupe_unique_add_at(ids, grads):
    u, inv = np.unique(ids, return_inverse=True)
    out = np.zeros((len(u), grads.shape[1]), grads.dtype)
    np.add.at(out, inv, grads)
    return u, out


def dedupe_factorize(ids, grads):
    import pandas as pd
    codes, u = pd.factorize(ids.view(np.int64))
    out = np.zeros((len(u), grads.shape[1]), grads.dtype)
    np.add.at(out, codes, grads)
    return u.view(np.uint64), out


def bench_dedupe(preset, steps, reps):
    p = PRESETS[preset]
    raws = [id64(b, 0) for b in field_batches(preset, steps, 0)]
    grads = [np.random.default_rng(s).random((len(r), p["dim"]), np.float32) for s, r in enumerate(raws)]
    rows = sum(len(r) for r in raws)
    methods = {"np.unique + np.add.at": dedupe_unique_add_at,
               "argsort + np.add.reduceat": tables.sum_duplicates}
    if rowstore.hash_index_available():
        methods["pandas.factorize + np.add.at"] = dedupe_factorize
    ref = [dedupe_unique_add_at(r, g) for r, g in zip(raws, grads)]
    out = {}
    for name, fn in methods.items():
        for (u0, g0), r, g in zip(ref, raws, grads):
            u, s = fn(r, g)
            o = np.argsort(u)
            if not (np.array_equal(u[o], u0) and np.allclose(s[o], g0, rtol=1e-5, atol=1e-6)):
                raise RuntimeError(f"{name} sums differ")
        t = best(lambda: [fn(r, g) for r, g in zip(raws, grads)], reps)
        out[name] = dict(Mrows_s=mrate(rows, t), us_per_batch=round(t / len(raws) * 1e6, 1))
    return dict(batch=p["batch"], dim=p["dim"], methods=out)


# ---------------------------------------------------------------- init

def philox_rows(ids, dim, seed=0):
    return np.stack([np.random.Generator(np.random.Philox(key=[int(i), seed])).standard_normal(dim, np.float32)
                     for i in ids.tolist()])


def bench_init(dim, reps):
    ids = id64(np.arange(4096), 0)
    init = rowstore.Initializer.normal(0.01, seed=1)
    t_counter = best(lambda: init.rows(ids, dim), reps)
    few = ids[:512]
    t_philox = best(lambda: philox_rows(few, dim), reps)
    return {"rowstore.Initializer.normal": dict(Mrows_s=mrate(len(ids), t_counter)),
            "Philox per row": dict(Mrows_s=mrate(len(few), t_philox))}


# ---------------------------------------------------------------- the store

def new_store(dim, index, capacity):
    cfg = rowstore.RowStoreConfig(dim=dim, initializer=rowstore.Initializer.constant(ROW_INIT),
                                  index=index, initial_capacity=capacity)
    return rowstore.RowStore(cfg, sparse_optim.build("adagrad", lr=LR, eps=EPS, initial_accumulator_value=ACC_INIT))


def bench_store(preset, steps, fields, index, prefill):
    p = PRESETS[preset]
    stores, raws = [], []
    for f in range(fields):
        s = new_store(p["dim"], index, p["rows"] if prefill else 1024)
        if prefill:
            s.lookup(id64(np.arange(p["rows"]), f))
        stores.append(s)
        raws.append([id64(b, f) for b in field_batches(preset, steps, f)])
    t = dict(unique=0.0, lookup=0.0, grad=0.0, apply=0.0)
    rows = 0
    clock = time.perf_counter
    for step in range(steps):
        for f, store in enumerate(stores):
            t0 = clock()
            u = np.unique(raws[f][step])
            t1 = clock()
            x = store.lookup(u)
            t2 = clock()
            g = x * np.float32(GRAD_SCALE)
            t3 = clock()
            store.apply(u, g)
            t4 = clock()
            t["unique"] += t1 - t0
            t["lookup"] += t2 - t1
            t["grad"] += t3 - t2
            t["apply"] += t4 - t3
            rows += len(u)
    return dict(index=type(stores[0]._index).__name__, prefilled=prefill, fields=fields, steps=steps,
                rows_per_step_field=round(rows / steps / fields, 1),
                lookup_Mrows_s=mrate(rows, t["lookup"]), apply_Mrows_s=mrate(rows, t["apply"]),
                server_Mrows_s=mrate(2 * rows, t["lookup"] + t["apply"]),
                step_Mrows_s=mrate(2 * rows, sum(t.values())),
                rows_stored=sum(len(s) for s in stores))


# ---------------------------------------------------------------- peers

def run_emb_limit(preset, keys, steps, timeout=300):
    cmd = [sys.executable, str(PEERS / "emb_limit.py"), "--preset", preset, "--keys", keys,
           "--steps", str(steps), "--json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        return dict(error=f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    rec = json.loads(lines[-1])
    return dict(Mrows_s=mrate(rec["rows_per_s"], 1.0), steps=rec["steps"])


# ---------------------------------------------------------------- main

def plan(args):
    if args.quick:
        return dict(small=dict(steps=20, fields=2, reps=2), large=dict(steps=4, fields=2, reps=2))
    return dict(small=dict(steps=PRESETS["small"]["steps"], fields=PRESETS["small"]["fields"], reps=3),
                large=dict(steps=PRESETS["large"]["steps"], fields=args.large_fields, reps=3))


def run(args):
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    result = dict(machine=dict(cpus=os.cpu_count(), pinned=not args.no_pin, numpy=np.__version__,
                               hash_index=rowstore.hash_index_available()),
                  quick=args.quick, presets={})
    for preset in args.presets.split(","):
        cfg, out = plan(args)[preset], {}
        progress(args, f"{preset}: {cfg}")
        if "index" in sections:
            out["index"] = bench_index(preset, cfg["steps"] + 2, cfg["reps"])
        if "dedupe" in sections:
            out["dedupe"] = bench_dedupe(preset, cfg["steps"] + 2, cfg["reps"])
        if "init" in sections:
            out["init"] = bench_init(PRESETS[preset]["dim"], cfg["reps"])
        rounds = [store_and_peers(args, sections, preset, cfg) for _ in range(args.rounds)]
        out.update(best_rounds(rounds))
        limit = out.get("peers", {}).get("emb_limit[id64]", {}).get("Mrows_s")
        for rec in out.get("store", []):
            rec["x_emb_limit_id64"] = round(rec["server_Mrows_s"] / limit, 2) if limit else None
        result["presets"][preset] = out
    return result


def store_and_peers(args, sections, preset, cfg):
    """One round of the store and the peers, back to back, so that both see about the same
    load from whatever else runs on the machine."""
    out = {}
    if "store" in sections:
        out["store"] = [bench_store(preset, cfg["steps"] + 2, cfg["fields"], args.index, prefill)
                        for prefill in (True, False)]
    if "peers" in sections:
        out["peers"] = {f"emb_limit[{k}]": run_emb_limit(preset, k, cfg["steps"]) for k in ("dense", "id64")}
    return out


def best_rounds(rounds):
    """Per figure, the best round: the one least disturbed by other load."""
    out = {}
    if rounds and "store" in rounds[0]:
        out["store"] = [max(recs, key=lambda r: r["server_Mrows_s"]) for recs in zip(*(r["store"] for r in rounds))]
    if rounds and "peers" in rounds[0]:
        out["peers"] = {k: max((r["peers"][k] for r in rounds), key=lambda v: v.get("Mrows_s") or 0)
                        for k in rounds[0]["peers"]}
    for name, rec in out.get("peers", {}).items():
        rec["rounds"] = len(rounds)
    return out


def progress(args, msg):
    print(msg, file=sys.stderr, flush=True)


def render(result):
    lines = [f"machine: {result['machine']}  quick={result['quick']}"]
    for preset, out in result["presets"].items():
        lines.append(f"\n== {preset} ==")
        if "index" in out:
            ix = out["index"]
            lines.append(f"index: table of {ix['table_rows']} rows, {ix['mean_batch']} unique ids a lookup")
            lines += [f"  {k:32s} lookup {v['lookup_Mrows_s']:8.2f}  insert {v['insert_Mrows_s']:8.2f}"
                      for k, v in ix["candidates"].items()]
        if "dedupe" in out:
            lines.append(f"dedupe: batch {out['dedupe']['batch']}, dim {out['dedupe']['dim']}")
            lines += [f"  {k:32s} {v['Mrows_s']:8.2f}  ({v['us_per_batch']} us a batch)"
                      for k, v in out["dedupe"]["methods"].items()]
        if "init" in out:
            lines.append("init:")
            lines += [f"  {k:32s} {v['Mrows_s']:8.3f}" for k, v in out["init"].items()]
        for rec in out.get("store", []):
            lines.append(f"store[{rec['index']}, {'prefilled' if rec['prefilled'] else 'first-touch'}]: "
                         f"lookup {rec['lookup_Mrows_s']:.2f} apply {rec['apply_Mrows_s']:.2f} "
                         f"server {rec['server_Mrows_s']:.2f} step {rec['step_Mrows_s']:.2f} "
                         f"x emb_limit[id64] {rec.get('x_emb_limit_id64')}  "
                         f"({rec['rows_per_step_field']} rows a call, {rec['fields']} fields)")
        for k, v in out.get("peers", {}).items():
            lines.append(f"peer {k}: {v.get('Mrows_s', v.get('error'))}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, fields and repetitions: under a minute")
    ap.add_argument("--presets", default="small,large")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--index", default="auto", choices=["auto", "hash", "sorted"], help="the store's index")
    ap.add_argument("--large-fields", type=int, default=4,
                    help="fields of the large preset in the store section (26 prefilled need ~4 GB)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="store + peers rounds, interleaved, best kept (default 2; 1 with --quick)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to one core")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 2)
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = run(args)
    print(json.dumps(result) if args.json else render(result))


if __name__ == "__main__":
    main()

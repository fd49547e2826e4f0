"""`psctl up`'s live view while training: per worker its step, loss and steps/s, per shard its
version and updates/s.

Three parts, kept apart so the view is tested without processes:

- the state (`UpState`, `WorkerRow`, `ShardRow`) and the pure functions that turn it into
  text: `render_live` (a block of lines redrawn in place on a terminal, `redraw`) and
  `render_plain` (one line, no escape codes, for a pipe or a file);
- `Sampler`, which builds an `UpState` from what the cluster shows: each worker's metrics file
  in the run dir (`worker-N.jsonl`, read incrementally by `MetricsTail`, a partial last line
  kept for the next read), the worker processes' exit codes, and the scheduler's Status plus
  each live server's ShardStatus (`ClusterProbe`). Rates are over a recent window
  (`window_rate`), never a count divided by the run's age;
- `UpView`, the thin loop: a thread that samples about once a second and draws (live: every
  sample; plain: a line every few seconds), and `say`, through which `psctl up`'s own lines
  (churn events) go so that they never land inside a drawn block.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Callable, Sequence

from shardps.pscommon import grpcutil
from shardps.pscommon.errors import PSError
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import job_pb2, ps_pb2, ps_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("shardps.psctl")

VIEWS = ("auto", "live", "plain", "none")
SAMPLE_EVERY_S = 1.0     # live: a frame per sample
PLAIN_EVERY_S = 5.0      # plain: a line this often
RATE_WINDOW_S = 5.0      # rates are over the last few seconds
MIN_RATE_SPAN_S = 0.5    # no rate from samples closer together than this
PROBE_TIMEOUT_S = 2.0
MAX_READ_BYTES = 4 << 20  # one read of a metrics file at most (the rest next time)


# -- the state and its text -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkerRow:
    index: int                   # N of worker-N (its metrics file and log)
    step: int | None = None      # the last step it recorded; None: none yet
    total: int | None = None     # steps it trains; None with --epochs
    loss: float | None = None
    rate: float | None = None    # steps/s over the recent window; None: not known yet
    state: str = "starting"      # starting, training, done, killed (SIGKILL), exited N


@dataclasses.dataclass(frozen=True)
class ShardRow:
    shard: int
    state: str = "alive"         # alive; missing, dead, left: no live server
    version: int | None = None   # updates applied (ShardStatus); None: not known
    rate: float | None = None    # updates/s over the recent window
    down_s: float | None = None  # how long this view has seen it without a live server


@dataclasses.dataclass(frozen=True)
class UpState:
    elapsed_s: float
    mode: str = ""
    workers: tuple[WorkerRow, ...] = ()
    shards: tuple[ShardRow, ...] = ()
    problem: str = ""            # why the shard rows may be old (the scheduler did not answer)


def _rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}"


def _loss(loss: float | None) -> str:
    if loss is None:
        return "-"
    return f"{loss:.3f}" if math.isfinite(loss) and abs(loss) < 1e4 else f"{loss:.3g}"


def _steps(w: WorkerRow) -> str:
    if w.step is None:
        return "-"
    return f"{w.step}/{w.total}" if w.total else str(w.step)


def _worker_tail(w: WorkerRow) -> str:
    """What follows a worker's loss: its rate while training, else its state."""
    return f"{_rate(w.rate)} steps/s" if w.state == "training" else w.state


def _no_server(s: ShardRow) -> str:
    why = {"missing": "none registered yet", "dead": "missed its lease", "left": "it left"}.get(s.state, s.state)
    since = f" for {s.down_s:.0f} s" if s.down_s is not None else ""
    return f"no server{since} ({why}; workers wait for this shard)"


def render_live(state: UpState, width: int = 80) -> list[str]:
    """The block drawn on a terminal: a header, a row per worker, a row per shard; every line
    cut to `width - 1` columns (a wrapped line would throw the redraw off)."""
    head = f"training for {state.elapsed_s:.0f} s" + (f", mode {state.mode}" if state.mode else "")
    if state.problem:
        head += f"  ({state.problem})"
    names = [f"worker {w.index}" for w in state.workers] + [f"shard {s.shard}" for s in state.shards]
    name_w = max(map(len, names), default=0)
    steps = [_steps(w) for w in state.workers]
    versions = [str(s.version) if s.version is not None else "-" for s in state.shards]
    num_w = max(map(len, steps + versions), default=1)
    loss_w = max((len(_loss(w.loss)) for w in state.workers), default=1)
    rate_w = max((len(_rate(r.rate)) for r in (*state.workers, *state.shards)), default=1)
    lines = [head]
    for w, step in zip(state.workers, steps):
        tail = f"{_rate(w.rate):>{rate_w}} steps/s" if w.state == "training" else w.state
        lines.append(f"  {f'worker {w.index}':<{name_w}}  step    {step:>{num_w}}  "
                     f"loss {_loss(w.loss):>{loss_w}}  {tail}")
    for s, version in zip(state.shards, versions):
        name = f"{f'shard {s.shard}':<{name_w}}"
        if s.state != "alive":
            lines.append(f"  {name}  {_no_server(s)}")
        else:
            lines.append(f"  {name}  version {version:>{num_w}}  {' ' * (loss_w + 5)}  "
                         f"{_rate(s.rate):>{rate_w}} updates/s")
    cut = max(20, width - 1)
    return [line if len(line) <= cut else line[:cut - 1] + "~" for line in lines]


def render_plain(state: UpState) -> str:
    """One line of the same facts, no escape codes: what a pipe or a log file gets."""
    parts = []
    for w in state.workers:
        if w.step is None:
            parts.append(f"worker {w.index} {w.state}")
        else:
            parts.append(f"worker {w.index} step {_steps(w)} loss {_loss(w.loss)} {_worker_tail(w)}")
    for s in state.shards:
        parts.append(f"shard {s.shard} version {s.version if s.version is not None else '-'} "
                     f"{_rate(s.rate)} updates/s" if s.state == "alive" else f"shard {s.shard} {_no_server(s)}")
    head = f"[{state.elapsed_s:.0f} s]"
    if state.problem:
        head += f" ({state.problem})"
    return head + " " + "; ".join(parts)


CSI = "\x1b["


def redraw(lines: Sequence[str], previous: int) -> str:
    """The bytes that replace the `previous` lines drawn last (the cursor sits below them) with
    `lines`: up to the block's first line, each line then clear to its end, then clear whatever
    is left below (the block got shorter)."""
    up = f"{CSI}{previous}A\r" if previous else ""
    return up + "".join(f"{line}{CSI}K\n" for line in lines) + f"{CSI}J"


def erase(previous: int) -> str:
    """The bytes that remove the `previous` lines drawn last, leaving the cursor where they began."""
    return f"{CSI}{previous}A\r{CSI}J" if previous else ""


def choose(view: str, stream) -> str:
    """live, plain or none for `--view` (auto: live on a terminal that moves its cursor, plain
    otherwise)."""
    if view != "auto":
        return view
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "live" if tty and os.environ.get("TERM", "") not in ("", "dumb") else "plain"


# -- rates ------------------------------------------------------------------------------------------
def window_rate(samples: Sequence[tuple[float, float]], window_s: float = RATE_WINDOW_S,
                min_span_s: float = MIN_RATE_SPAN_S) -> float | None:
    """Change per second over the last `window_s` of `samples` ((time, count), oldest first):
    from the oldest sample inside the window to the newest. None when they span less than
    `min_span_s` or the count went down (it started again)."""
    if len(samples) < 2:
        return None
    t1, v1 = samples[-1]
    t0, v0 = next((t, v) for t, v in samples if t >= t1 - window_s)
    if t1 - t0 < min_span_s or v1 < v0:
        return None
    return (v1 - v0) / (t1 - t0)


class History:
    """(time, count) samples of one counter, the last few seconds of them."""

    def __init__(self, keep_s: float = RATE_WINDOW_S * 2):
        self.keep_s = keep_s
        self.samples: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, t: float, value: float) -> None:
        if self.samples and (t < self.samples[-1][0] or value < self.samples[-1][1]):
            self.samples.clear()   # the clock or the counter started again (a restarted server)
        self.samples.append((t, value))
        while self.samples and self.samples[0][0] < t - self.keep_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        return window_rate(self.samples)


# -- a worker's metrics file ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Progress:
    """What a worker's metrics file says so far."""
    step: int | None = None
    loss: float | None = None
    finished: bool = False       # its final record (the summary) is there


def fold(p: Progress, record: dict) -> Progress:
    """`p` after one more record: a step's ({"step", "loss", ...}), the final summary
    ({"steps", "final_loss", ...}) or anything else (partition events: unchanged)."""
    if isinstance(record.get("step"), int):
        loss = record.get("loss")
        return Progress(step=record["step"], loss=float(loss) if isinstance(loss, (int, float)) else p.loss)
    if isinstance(record.get("steps"), int) and "final_loss" in record:
        loss = record.get("final_loss")
        return Progress(step=record["steps"], loss=float(loss) if isinstance(loss, (int, float)) else p.loss,
                        finished=True)
    return p


def parse_lines(buffer: bytes) -> tuple[list[dict], bytes]:
    """The JSON records of the complete lines in `buffer`, and what follows its last newline
    (a line still being written). Lines that are not a JSON object are skipped."""
    *complete, rest = buffer.split(b"\n")
    records = []
    for line in complete:
        try:
            record = json.loads(line)
        except ValueError:   # UnicodeDecodeError too
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, rest


class MetricsTail:
    """Follows one JSON-lines file as it grows: each `read()` parses the lines completed since
    the last. A file that is not there yet reads as nothing; one that shrank or was replaced
    is read again from its start."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.progress = Progress()
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def read(self) -> Progress:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:
                    self._inode, self._offset, self._partial, self.progress = st.st_ino, 0, b"", Progress()
                f.seek(self._offset)
                data = f.read(MAX_READ_BYTES)
        except OSError:
            return self.progress
        self._offset += len(data)
        records, self._partial = parse_lines(self._partial + data)
        for record in records:
            self.progress = fold(self.progress, record)
        return self.progress


def exit_state(returncode: int | None, progress: Progress) -> str:
    """A worker's state from its process's exit code and its metrics."""
    if returncode is None:
        return "training" if progress.step is not None else "starting"
    if returncode == 0:
        return "done"
    if returncode < 0:
        try:
            return f"killed ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed (signal {-returncode})"
    return f"exited {returncode}"


# -- the shards, over RPC ---------------------------------------------------------------------------
_STATE = {scheduler_pb2.MEMBER_STATE_ALIVE: "alive", scheduler_pb2.MEMBER_STATE_DEAD: "dead",
          scheduler_pb2.MEMBER_STATE_LEFT: "left"}
_MODE = {job_pb2.MODE_ASYNC: "async", job_pb2.MODE_SYNC: "sync", job_pb2.MODE_SSP: "ssp"}


@dataclasses.dataclass(frozen=True)
class ShardSample:
    shard: int
    state: str                      # alive, dead, left, missing
    incarnation: int = 0
    version: int | None = None      # None: not alive, or it did not answer
    uptime_s: float | None = None
    gone_s: float | None = None     # dead or left: since the scheduler last heard from it (None: unknown)


class ClusterProbe:
    """The scheduler's Status and each live server's ShardStatus, over channels kept open
    between samples (a channel per sample would cost more than the calls)."""

    def __init__(self, scheduler: str, security: Security = NO_SECURITY, timeout_s: float = PROBE_TIMEOUT_S):
        self.timeout_s, self._security = timeout_s, security
        self._channels = {}
        self._scheduler = scheduler_pb2_grpc.SchedulerStub(self._channel(scheduler))

    def _channel(self, address: str):
        if address not in self._channels:
            self._channels[address] = grpcutil.channel(address, self._security)
        return self._channels[address]

    def sample(self) -> tuple[str, list[ShardSample]]:
        """(mode, a sample per shard); raises PSError when the scheduler does not answer."""
        st = grpcutil.call(self._scheduler.Status, scheduler_pb2.StatusRequest(), self.timeout_s)
        by_shard: dict[int, scheduler_pb2.ServerInfo] = {}
        for s in st.servers:   # the live server of each shard, else its newest
            have = by_shard.get(s.shard)
            if have is None or (s.state == scheduler_pb2.MEMBER_STATE_ALIVE) > (have.state == scheduler_pb2.MEMBER_STATE_ALIVE) \
                    or (s.state == have.state and s.incarnation > have.incarnation):
                by_shard[s.shard] = s
        out = []
        for shard in range(max(st.job.num_servers, max(by_shard, default=-1) + 1)):
            s = by_shard.get(shard)
            if s is None:
                out.append(ShardSample(shard, "missing"))
                continue
            state = _STATE.get(s.state, "unknown")
            version = uptime = None
            if state == "alive":
                stub = ps_pb2_grpc.ParameterServerStub(self._channel(s.address))
                try:
                    reply = grpcutil.call(stub.ShardStatus, ps_pb2.ShardStatusRequest(), self.timeout_s)
                    version, uptime = reply.shard_version, reply.uptime_s
                except PSError as exc:
                    log.debug("shard %d at %s: %s", shard, s.address, exc)
            gone = s.last_seen_age_s if state != "alive" and s.HasField("last_seen_age_s") else None
            out.append(ShardSample(shard, state, s.incarnation, version, uptime, gone))
        return _MODE.get(st.job.mode, ""), out

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


# -- sampling ---------------------------------------------------------------------------------------
class Sampler:
    """Builds an UpState from the run dir, the worker processes and the cluster's RPCs.

    `workers()` gives the worker processes by index (psctl up's worker-N), each with `poll()`;
    `probe.sample()` gives (mode, [ShardSample]) or raises PSError (a ClusterProbe; None: no
    shard rows); `clock` is monotonic seconds."""

    def __init__(self, run_dir: pathlib.Path, workers: Callable[[], dict[int, object]],
                 probe: ClusterProbe | None, total_steps: int | None,
                 mode: str = "", clock: Callable[[], float] = time.monotonic):
        self.run_dir, self._workers, self._probe = run_dir, workers, probe
        self.total, self.mode, self.clock = total_steps, mode, clock
        self.t0 = clock()
        self._tails: dict[int, MetricsTail] = {}
        self._steps: dict[int, History] = {}
        self._versions: dict[tuple[int, int], History] = {}   # (shard, incarnation)
        self._down_since: dict[int, float] = {}
        self._shards: tuple[ShardRow, ...] = ()

    def sample(self) -> UpState:
        now = self.clock()
        rows = []
        for index, proc in sorted(self._workers().items()):
            tail = self._tails.setdefault(index, MetricsTail(self.run_dir / f"worker-{index}.jsonl"))
            progress = tail.read()
            state = exit_state(proc.poll(), progress)
            history = self._steps.setdefault(index, History())
            if progress.step is not None:
                history.add(now, progress.step)
            rows.append(WorkerRow(index=index, step=progress.step, total=self.total, loss=progress.loss,
                                  rate=history.rate() if state == "training" else None, state=state))
        problem = ""
        if self._probe is not None:
            try:
                mode, shards = self._probe.sample()
                self.mode = mode or self.mode
                self._shards = tuple(self._shard_row(s, now) for s in shards)
            except PSError as exc:
                problem = f"scheduler: {type(exc).__name__}"
        return UpState(elapsed_s=now - self.t0, mode=self.mode, workers=tuple(rows), shards=self._shards,
                       problem=problem)

    def close(self) -> None:
        if self._probe is not None and hasattr(self._probe, "close"):
            self._probe.close()

    def _shard_row(self, s: ShardSample, now: float) -> ShardRow:
        if s.state != "alive":
            since = self._down_since.setdefault(s.shard, now)
            # the scheduler's word for how long it has been gone, else how long this view has seen it so
            return ShardRow(s.shard, s.state, down_s=s.gone_s if s.gone_s is not None else now - since)
        self._down_since.pop(s.shard, None)
        rate = None
        if s.version is not None and s.uptime_s is not None:
            history = self._versions.setdefault((s.shard, s.incarnation), History())
            history.add(s.uptime_s, s.version)   # on the server's own clock
            rate = history.rate()
        return ShardRow(s.shard, "alive", s.version, rate)


# -- the loop that draws ----------------------------------------------------------------------------
class UpView:
    """Draws `sampler.sample()` about once a second on `out` from a thread of its own: `live`
    redraws a block in place, `plain` writes a line every PLAIN_EVERY_S. `say(line)` prints a
    line of psctl up's own above the block. `stop(final=True)` draws the last state once more."""

    def __init__(self, kind: str, sampler: Sampler, out, every_s: float = SAMPLE_EVERY_S,
                 plain_every_s: float = PLAIN_EVERY_S, width: Callable[[], int] | None = None):
        assert kind in ("live", "plain"), kind
        self.kind, self.sampler, self.out = kind, sampler, out
        self.every_s, self.plain_every_s = every_s, plain_every_s
        self.width = width or (lambda: shutil.get_terminal_size((80, 24)).columns)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn: list[str] = []      # live: the block on the screen now
        self._last_plain = -math.inf
        self._thread = threading.Thread(target=self._run, name="up-view", daemon=True)

    def start(self) -> "UpView":
        self._thread.start()
        return self

    def say(self, *parts) -> None:
        line = " ".join(map(str, parts))
        with self._lock:
            if self.kind == "live" and self._drawn:
                self._write(erase(len(self._drawn)) + line + "\n" + redraw(self._drawn, 0))
            else:
                self._write(line + "\n")

    def stop(self, final: bool = True) -> None:
        """Stop drawing (nothing is drawn after this returns, but the final state when `final`)
        and close the sampler's channels."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=PROBE_TIMEOUT_S + 1.0)   # past it, the thread draws nothing more
        try:
            if final:
                self._draw(force=True)
        finally:
            self.sampler.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._draw()
            self._stop.wait(self.every_s)

    def _draw(self, force: bool = False) -> None:
        try:
            state = self.sampler.sample()
        except Exception:   # noqa: BLE001 - the view never takes psctl up down
            log.debug("live view: sampling failed", exc_info=True)
            return
        with self._lock:
            if self._stop.is_set() and not force:
                return   # stopping: psctl up's own lines come next
            if self.kind == "live":
                lines = render_live(state, self.width())
                self._write(redraw(lines, len(self._drawn)))
                self._drawn = lines
            elif force or state.elapsed_s - self._last_plain >= self.plain_every_s - self.every_s / 2:
                self._last_plain = state.elapsed_s
                self._write(render_plain(state) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):   # the terminal or pipe went away: psctl up carries on
            pass


def worker_procs(procs: dict[str, object]) -> dict[int, object]:
    """psctl up's worker processes by index, from its process table ({"worker-N": Popen})."""
    out = {}
    for name, proc in list(procs.items()):
        prefix, _, index = name.partition("-")
        if prefix == "worker" and index.isdigit():
            out[int(index)] = proc
    return out


"""psctl: start daemons (scheduler, server, worker, up) and inspect a running job.

Flags and environment are read here and nowhere else; they become frozen config objects.
A bad flag or value is one line on stderr (an unknown flag adds the subcommand's usage line
before it) and exit code 2; a failure while running (an unreachable scheduler, a refused
checkpoint) is one line and exit code 1; Ctrl-C (SIGINT) exits 130. No tracebacks.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import signal
import sys
import threading

from shardps.pscommon.config import CODECS, PULL_CODECS, CodecConfig, JobSpec, OptimizerConfig
from shardps.pscommon.errors import DeadlineExceeded, InvalidArgument, PSError, Unavailable, Unimplemented
from shardps.pscommon.lifecycle import (DaemonOptions, default_metrics_host, install_stop_handlers, setup_logging,
                                        tune_malloc)
from shardps.pscommon import roles
from shardps.pscommon.security import Security, TLSConfig, read_tokens

EXIT_FAILURE = 1       # a runtime failure: the command was well formed, running it failed
EXIT_USAGE = 2         # the command line is wrong: unknown flag, bad value, unusable file named by a flag
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); a daemon drains first. SIGTERM drains and exits 0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_INTERRUPTED = threading.Event()  # set by SIGINT in a daemon's stop handler: main() then exits 130


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit 2."""


class HelpFormatter(argparse.HelpFormatter):
    """--help with every option's default: "(default: X)" after its help, unless the help
    already says it or there is no default worth showing (None, a switch's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings or action.default is argparse.SUPPRESS
                or action.default is None or action.default is False or action.default == ""):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _format_action(self, action):
        if action.help is None and self._get_help_string(action):
            # argparse prints no help column for an option without help: give it the default alone
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def _parsers(parser: argparse.ArgumentParser):
    """`parser` and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def _closest(flag: str, options: list[str]) -> str | None:
    """The valid option a mistyped or abbreviated `flag` most likely meant, or None."""
    longs = sorted({o for o in options if o.startswith("--")})
    prefixed = [o for o in longs if o.startswith(flag)]
    if len(prefixed) == 1:  # an abbreviation of exactly one option
        return prefixed[0]
    close = difflib.get_close_matches(flag, longs or options, n=1, cutoff=0.6)
    return close[0] if close else None


class Parser(argparse.ArgumentParser):
    """No abbreviated flags, defaults in --help, and errors as UsageError (one line)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--shard 0` must not mean `--shard-id 0`
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse prints usage + message; we want one line
        bad = re.match(r"argument command: invalid choice: '([^']*)'", message)
        if bad:
            sub = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))
            close = difflib.get_close_matches(bad.group(1), list(sub.choices), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (one of {', '.join(sub.choices)})"
            raise UsageError(f"{self.short_usage()}\n{self.prog}: unknown command {bad.group(1)!r}{hint}")
        raise UsageError(f"{self.prog}: {message}")

    def short_usage(self) -> str:
        """One usage line: the required flags and arguments, the rest as [options]."""
        fmt = self._get_formatter()
        parts = [self.prog]
        if any(a.option_strings and not a.required for a in self._actions):
            parts.append("[options]")
        for a in self._actions:  # required flags, then positionals (argparse's order)
            if a.option_strings and a.required:
                parts.append(f"{max(a.option_strings, key=len)} {fmt._format_args(a, a.dest.upper())}")
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction):
                parts.append("COMMAND ...")
            elif not a.option_strings:
                parts.append(fmt._format_args(a, a.dest.upper()))
        return "usage: " + " ".join(parts)

    def parse_args(self, args=None, namespace=None):
        try:
            ns, extras = self.parse_known_args(args, namespace)
        except UsageError:
            # a missing flag, but also a misspelt one (`psctl server --shard 0`): name the
            # misspelt one first, which may well be the missing one
            unknown = self._unknown_flags(args)
            if unknown:
                raise UsageError(unknown) from None
            raise
        if extras:
            raise UsageError(self._unrecognized(ns, extras))
        return ns

    def _unknown_flags(self, args) -> str | None:
        """The unrecognized-argument message for `args` when it has an unknown flag, else None
        (parsed with no flag required, since a required one missing stops argparse first)."""
        actions = [a for parser in _parsers(self) for a in parser._actions if a.required]
        for a in actions:
            a.required = False
        try:
            ns, extras = self.parse_known_args(args)
        except UsageError:
            return None
        finally:
            for a in actions:
                a.required = True
        flags = [e for e in extras if e.startswith("-") and e != "-"]
        return self._unrecognized(ns, flags) if flags else None

    def _unrecognized(self, ns, extras: list[str]) -> str:
        """The usage line of the subcommand, then one line naming the first bad argument and
        the closest valid flag."""
        parser = self
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and getattr(ns, sub.dest, None) in sub.choices:
            parser = sub.choices[getattr(ns, sub.dest)]
        flags = [e for e in extras if e.startswith("-") and e != "-"]
        bad = _flag_name(flags[0]) if flags else extras[0]
        line = f"{parser.prog}: unrecognized argument {bad}"
        if flags:
            close = _closest(bad, list(parser._option_string_actions) + list(self._option_string_actions))
            if close:
                line += f"; did you mean {close}?"
        return f"{parser.short_usage()}\n{line}"


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


# the parameter each codec takes after a colon (CodecConfig.parse reads them)
CODEC_PARAMETERS = {"int8": "[:BLOCK]", "topk": "[:DENSITY]"}


def _rate_window(text: str) -> float:
    """--rate-window: seconds, 0 to 60 (0: no rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.0 <= value <= 60.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: 0 (no rates) to 60 seconds")
    return value


def _eval_every(text: str) -> int:
    """--eval-every: a number of steps, 0 (only the final evaluation) or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 (evaluate only at the end) or a number of steps")
    return value


def _timeout(text: str) -> float:
    """--connect-timeout: seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds above 0")
    return value


def codec_choices(pull: bool = False) -> str:
    """Every codec name the job accepts, from the registry (pscommon.config.CODECS)."""
    names = [n for n in CODECS if not pull or n in PULL_CODECS]
    first = {}
    for n in names:
        first.setdefault(CODECS[n], n)
    same = [f"{n} is {first[CODECS[n]]}" for n in names if first[CODECS[n]] != n]
    return ("|".join(n + ("" if pull else CODEC_PARAMETERS.get(n, "")) for n in names)
            + (f" ({', '.join(same)})" if same else ""))


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job spec")
    g.add_argument("--mode", choices=["async", "sync", "ssp"], default="async")
    g.add_argument("--staleness", type=int, default=None, help="ssp bound in clocks (default 2 for ssp)")
    g.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adagrad"], default="sgd")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.0, help="sgd/momentum (momentum: 0 means 0.9)")
    g.add_argument("--dampening", type=float, default=0.0, help="sgd/momentum")
    g.add_argument("--nesterov", action="store_true", help="sgd/momentum")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--lr-decay", type=float, default=0.0, help="adagrad")
    g.add_argument("--initial-accumulator", type=float, default=0.0, help="adagrad")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--eps", type=float, default=None, help="default 1e-8 (adam), 1e-10 (adagrad)")
    g.add_argument("--push-codec", default="fp32", help=f"gradients' codec: {codec_choices()}")
    g.add_argument("--pull-codec", default="fp32", help=f"weights' codec: {codec_choices(pull=True)}")
    g.add_argument("--lossless", choices=["auto", "off", "zstd", "lz4"], default="off",
                   help="lossless layer over payloads, per tensor only where it saves >= 10%%")
    g.add_argument("--no-error-feedback", action="store_true",
                   help="drop what lossy push codecs leave out (ablation; default keeps it)")
    g.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds before a silent member is dead")
    g.add_argument("--servers", type=int, default=1, dest="num_servers", help="number of shards")
    g.add_argument("--slice-bytes", type=int, default=4 << 20, help="tensors above this are sliced")


def job_from_args(a) -> JobSpec:
    staleness = a.staleness if a.staleness is not None else (2 if a.mode == "ssp" else 0)
    eps = a.eps if a.eps is not None else (1e-10 if a.optimizer == "adagrad" else 1e-8)
    opt = OptimizerConfig(kind=a.optimizer, lr=a.lr, momentum=a.momentum, dampening=a.dampening,
                          nesterov=a.nesterov, weight_decay=a.weight_decay, beta1=a.beta1, beta2=a.beta2,
                          eps=eps, lr_decay=a.lr_decay, initial_accumulator_value=a.initial_accumulator)
    return JobSpec(mode=a.mode, staleness=staleness, optimizer=opt, lossless=a.lossless,
                   push_codec=CodecConfig.parse(a.push_codec, error_feedback=not a.no_error_feedback),
                   pull_codec=CodecConfig.parse(a.pull_codec),
                   heartbeat_timeout_s=a.heartbeat_timeout, num_servers=a.num_servers,
                   slice_bytes=a.slice_bytes)


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (off by default; see docs/operations.md)")
    g.add_argument("--tls-cert", default=None, help="this process's PEM certificate (mutual TLS)")
    g.add_argument("--tls-key", default=None, help="its PEM private key")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signs every peer")
    g.add_argument("--tls-server-name", default="", help="name to check server certificates against")
    g.add_argument("--token-file", default=None,
                   help="one bearer token for every role (or env SHARDPS_TOKEN); a client may also give "
                        "just its own role's token here")
    g.add_argument("--token-dir", default=None,
                   help="a token per role (or env SHARDPS_TOKEN_DIR): ROLE.token (sent by this role, accepted "
                        "by daemons) or ROLE.sha256 (accepted only) for worker, server, observer, admin")


def _add_daemon_flags(p: argparse.ArgumentParser, reflection: bool = True) -> None:
    _add_security_flags(p)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default=None,
                   help="address /metrics binds (no authentication unless --metrics-auth): default the --listen "
                        "host, or 127.0.0.1 when that is a wildcard or there is none; 0.0.0.0 for every interface")
    p.add_argument("--metrics-auth", action="store_true",
                   help="/metrics answers only a request with the observer (or admin) bearer token of "
                        "--token-dir, or the one --token-file token (HTTP 401 without, 403 for another role)")
    if reflection:
        p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection (grpcurl)")


def security_from_args(a) -> Security:
    tls_flags = (a.tls_cert, a.tls_key, a.tls_ca)
    if any(tls_flags) and not all(tls_flags):
        raise UsageError("psctl: --tls-cert, --tls-key and --tls-ca go together")
    tls = TLSConfig(a.tls_cert, a.tls_key, a.tls_ca, a.tls_server_name) if all(tls_flags) else None
    role = ROLE_OF_COMMAND.get(a.command, roles.ADMIN)   # a verb not listed: an operator's, admin's
    token, accept = read_tokens(a.token_file, getattr(a, "token_dir", None), os.environ, role)
    return Security(tls=tls, token=token, accept=accept)


# whose token each command sends with --token-dir (pscommon/roles.py); the scheduler calls no one
ROLE_OF_COMMAND = {"scheduler": None, "server": roles.SERVER, "worker": roles.WORKER, "status": roles.OBSERVER,
                   "inspect": roles.OBSERVER, "checkpoint": roles.ADMIN, "export": roles.ADMIN}


def options_from_args(a) -> DaemonOptions:
    host = a.metrics_host if a.metrics_host is not None else default_metrics_host(getattr(a, "listen", None))
    return DaemonOptions(security=security_from_args(a), metrics_port=a.metrics_port,
                         metrics_host=host, reflection=getattr(a, "reflection", False),
                         metrics_auth=a.metrics_auth)


def build_parser() -> Parser:
    ap = Parser(prog="psctl", description="shardps: a parameter server on gRPC",
                epilog="exit codes: 0 success, 1 failure while running, 2 bad command line, "
                       "130 interrupted (Ctrl-C)")
    ap.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                    help="also accepted after the command")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("scheduler", help="run the scheduler")
    p.add_argument("--listen", type=_address, default="127.0.0.1:7000")
    p.add_argument("--state-dir", default=None, help="persist scheduler state here")
    p.add_argument("--ready-file", default=None, help="write the bound address here once serving")
    p.add_argument("--join-rate", type=float, default=20.0,
                   help="JoinWorker and RegisterServer calls per second from one host; 0: no limit")
    p.add_argument("--join-burst", type=int, default=50, help="that many at once from a host that was quiet")
    p.add_argument("--dead-retention", type=float, default=600.0,
                   help="seconds a dead or departed worker stays listed before it is pruned (its id stays refused)")
    p.add_argument("--max-dead-workers", type=int, default=1000, help="prune the oldest beyond this many sooner")
    p.add_argument("--max-streams-per-connection", type=int, default=8, help="concurrent streams; 0: no cap")
    p.add_argument("--stream-idle-timeout", type=float, default=30.0,
                   help="end a request stream silent this many seconds; 0: never")
    _add_job_flags(p)
    _add_daemon_flags(p)

    p = sub.add_parser("server", help="run one parameter-server shard")
    p.add_argument("--scheduler", type=_address, required=True)
    p.add_argument("--listen", type=_address, default="127.0.0.1:0")
    p.add_argument("--advertise", type=_address, default=None, help="address workers use (default: bound)")
    p.add_argument("--shard-id", type=int, default=-1)
    p.add_argument("--connect-timeout", type=_timeout, default=60.0, metavar="SECONDS",
                   help="keep trying this long to reach the scheduler and register (also while a crashed "
                        "predecessor's lease on the shard lapses), then exit 1")
    p.add_argument("--ready-file", default=None)
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here; restore from here at start")
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between checkpoints")
    p.add_argument("--start-empty-if-unreadable", action="store_true",
                   help="when every checkpoint in --checkpoint-dir is unusable, start this shard empty "
                        "instead of refusing to start (its trained state is lost)")
    p.add_argument("--max-streams-per-connection", type=int, default=8,
                   help="concurrent streaming calls (pushes, pulls, declares) one connection may hold; 0: no cap")
    p.add_argument("--stream-idle-timeout", type=float, default=30.0,
                   help="end a push or declare stream that sends nothing for this many seconds; 0: never")
    p.add_argument("--admit-after", type=int, default=1,
                   help="an embedding-table id gets a stored row from its N-th lookup; before, it reads the "
                        "initial value and its gradients are dropped (counted)")
    p.add_argument("--evict-idle-steps", type=int, default=0,
                   help="drop embedding-table rows no pull or push touched for this many steps; 0: never")
    p.add_argument("--max-rows", type=int, default=0,
                   help="at most this many rows per embedding table on this server, least recently used "
                        "evicted first; 0: no cap")
    p.add_argument("--nonfinite", choices=("refuse", "skip"), default="refuse",
                   help="a push with NaN or Inf gradients: refuse it whole (INVALID_ARGUMENT; the worker stops "
                        "with that error) or skip those gradients and apply the rest; counted either way")
    _add_daemon_flags(p)

    p = sub.add_parser("worker", help="run a training worker")
    p.add_argument("--scheduler", type=_address, required=True)
    p.add_argument("--model", default="digits-mlp",
                   help="digits-mlp, digits-cnn, ctr, ctr-sparse (embedding tables), or module:function")
    p.add_argument("--data", default=None, help="module:function returning the data of a custom --model")
    p.add_argument("--overlap", action="store_true", help="push gradients during backward, prefetch pulls")
    p.add_argument("--no-fuse", action="store_true", help="pull in a call of its own every step, instead of "
                   "in the reply of the previous step's push (async and ssp, shards up to 1 MiB; docs/api.md)")
    p.add_argument("--min-workers", type=int, default=0, help="wait until this many workers have joined "
                   "(alive, or already finished and left) before the first step")
    p.add_argument("--connect-timeout", type=_timeout, default=120.0, metavar="SECONDS",
                   help="keep trying this long to reach the scheduler and every server at start, then exit 1")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--device-compression", choices=["auto", "on", "off"], default="auto",
                   help="encode fp16/bf16/topk pushes on the device before the copy to the host "
                        "(auto: on CUDA with such a codec)")
    p.add_argument("--metrics-out", default=None, help="write JSON-lines metrics here (a new file: "
                   "truncates an existing one unless --append)")
    p.add_argument("--append", action="store_true", help="with --metrics-out: append to the file")
    p.add_argument("--push-codec", default=None, help=f"override the job's push codec: {codec_choices()}")
    p.add_argument("--no-error-feedback", action="store_true", help="with --push-codec: no residual")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (simulate a straggler)")
    p.add_argument("--epochs", type=int, default=0, help="train on assigned data partitions for E epochs "
                   "(instead of --steps)")
    p.add_argument("--partitions", type=int, default=16, help="data partitions per epoch (with --epochs)")
    p.add_argument("--eval-every", type=_eval_every, default=0, metavar="STEPS",
                   help="also evaluate on the held-out set every STEPS of this worker's steps, a record each "
                        "in --metrics-out (psctl plot draws the curve); 0: only at the end. Its time is left "
                        "out of the records' times and of steps/s")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", default="", help="this worker's label in psctl status and the scheduler's log "
                   "(default: HOST:PID)")
    _add_daemon_flags(p, reflection=False)

    p = sub.add_parser("up", help="a local cluster: scheduler + servers + workers as processes")
    _add_job_flags(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="logs and metrics (default: a new temp dir)")
    p.add_argument("--step-delay", type=float, default=0.0, help="straggler delay for worker 0")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--churn", default="", help="kill@SECONDS,add@SECONDS,...: SIGKILL the newest worker "
                   "or start a new one at these times, counted from when every worker has trained its first step")
    p.add_argument("--epochs", type=int, default=0, help="train on assigned data partitions instead of --steps")
    p.add_argument("--plot", default=None, help="write the training curves to this PNG at the end")
    p.add_argument("--eval-every", type=_eval_every, default=None, metavar="STEPS",
                   help="every worker's --eval-every: held-out metrics every STEPS of its steps; default: "
                        "0, or with --plot about 6 points per worker over the run")
    p.add_argument("--min-accuracy", type=float, default=0.0,
                   help="exit 1 if the served model's held-out accuracy ends below this")
    p.add_argument("--view", choices=["auto", "live", "plain", "none"], default="auto",
                   help="while training, each worker's step, loss and steps/s and each shard's version and "
                        "updates/s: live (redrawn in place), plain (a line every few seconds), none; auto: "
                        "live when stdout is a terminal, else plain (--json: none)")
    p.add_argument("--quiet", action="store_const", const="none", dest="view", help="the same as --view none")
    p.add_argument("--admit-after", type=int, default=1,
                   help="every server's --admit-after: an embedding-table id gets a stored row from its N-th lookup")

    for name, help_ in (("status", "cluster state"), ("inspect", "tensors held by each shard")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--scheduler", type=_address, required=True)
        p.add_argument("--json", action="store_true")
        p.add_argument("--timeout", type=float, default=10.0)
        _add_security_flags(p)
        if name == "status":
            p.add_argument("--rate-window", type=_rate_window, default=1.0, metavar="SECONDS",
                           help="ask every shard twice this many seconds apart and show rates over that "
                                "window (updates/s, each worker's steps/s); 0: ask once, show no rates")
        if name == "inspect":
            p.add_argument("--shard", type=int, default=None)
            p.add_argument("--sample", type=int, default=4, help="values shown per tensor")
    p = sub.add_parser("export", help="gather every shard into one safetensors file")
    p.add_argument("--scheduler", type=_address, required=True)
    p.add_argument("--out", required=True, help="path of the .safetensors file to write (a new or regular "
                   "file; never a device, FIFO or directory)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="if --out is a symlink, replace the file it points to (refused otherwise)")
    p.add_argument("--timeout", type=float, default=60.0)
    _add_security_flags(p)

    p = sub.add_parser("checkpoint", help="ask every shard to write a checkpoint now")
    p.add_argument("--scheduler", type=_address, required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--consistent", action="store_true",
                   help="a cut that belongs together: sync, every shard at one step; async/ssp, pushes "
                        "held on every shard while they write (at most one push per worker apart)")
    p.add_argument("--timeout", type=float, default=60.0)
    _add_security_flags(p)

    p = sub.add_parser("plot", help="loss and accuracy curves from worker metrics files")
    p.add_argument("metrics", nargs="+", help="JSON-lines files written by --metrics-out")
    p.add_argument("-o", "--out", required=True, help="PNG to write")

    for p in sub.choices.values():  # global options, also accepted after the command
        g = p.add_argument_group("global options")
        # SUPPRESS: absent here, the value given before the command (or its default) stays
        g.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                       help="log level (default: INFO)")
    return ap


def _run_export(a) -> int:
    from shardps.psctl import export
    return export.run(a.scheduler, a.out, a.timeout, security_from_args(a), follow_symlinks=a.follow_symlinks)


def _run_checkpoint(a) -> int:
    from shardps.psctl import ops
    return ops.checkpoint(a.scheduler, a.json, a.timeout, security_from_args(a), consistent=a.consistent)


def _run_plot(a) -> int:
    from shardps.psctl import plot
    return plot.run(a.metrics, a.out)


def _stop_event() -> threading.Event:
    """The event a daemon drains on: set by SIGTERM or SIGINT (lifecycle.install_stop_handlers);
    SIGINT also marks the run interrupted, so main() exits 130 once the daemon has drained."""
    stop = threading.Event()
    install_stop_handlers(stop)
    drain = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        _INTERRUPTED.set()
        drain(signum, frame)
    signal.signal(signal.SIGINT, on_sigint)
    return stop


def _run_scheduler(a) -> int:
    from shardps.pscommon.config import StreamLimits
    from shardps.scheduler.daemon import SchedulerConfig, run
    from shardps.scheduler.limits import MembershipLimits
    stop = _stop_event()
    limits = MembershipLimits(join_rate=a.join_rate, join_burst=a.join_burst, dead_retention_s=a.dead_retention,
                              max_dead_workers=a.max_dead_workers)
    streams = StreamLimits(max_streams_per_connection=a.max_streams_per_connection,
                           idle_timeout_s=a.stream_idle_timeout)
    return run(SchedulerConfig(job=job_from_args(a), listen=a.listen, state_dir=a.state_dir,
                               ready_file=a.ready_file, options=options_from_args(a), limits=limits,
                               streams=streams), stop)


def _run_server(a) -> int:
    from shardps.pscommon.config import StreamLimits
    from shardps.psserver.daemon import ServerConfig, run
    from shardps.psserver.embeddings import TablePolicy
    from shardps.psserver.servicer import Limits
    stop = _stop_event()
    tables = TablePolicy(admit_after=a.admit_after, evict_idle_steps=a.evict_idle_steps or None,
                         max_rows=a.max_rows or None)
    streams = StreamLimits(max_streams_per_connection=a.max_streams_per_connection,
                           idle_timeout_s=a.stream_idle_timeout)
    return run(ServerConfig(scheduler=a.scheduler, listen=a.listen, advertise=a.advertise or "",
                            shard_id=a.shard_id, ready_file=a.ready_file, checkpoint_dir=a.checkpoint_dir,
                            register_timeout_s=a.connect_timeout,
                            checkpoint_every_s=a.checkpoint_every,
                            start_empty_if_unreadable=a.start_empty_if_unreadable,
                            options=options_from_args(a), streams=streams,
                            limits=Limits(nonfinite=a.nonfinite), tables=tables), stop)


def _run_worker(a) -> int:
    from shardps.worker.train import TrainConfig, summary_line, train
    stop = _stop_event()
    cfg = TrainConfig(scheduler=a.scheduler, model=a.model, data=a.data, overlap=a.overlap, steps=a.steps,
                      batch_size=a.batch_size, seed=a.seed, device=a.device, metrics_out=a.metrics_out,
                      push_codec=a.push_codec and str(CodecConfig.parse(a.push_codec)),
                      error_feedback=not a.no_error_feedback,
                      step_delay_s=a.step_delay, progress=False if a.no_progress else None,
                      epochs=a.epochs, partitions=a.partitions, options=options_from_args(a),
                      min_workers=a.min_workers, connect_timeout_s=a.connect_timeout, name=a.name,
                      device_compression={"auto": None, "on": True, "off": False}[a.device_compression],
                      append_metrics=a.append, fuse=not a.no_fuse, eval_every=a.eval_every)
    print(summary_line(train(cfg, stop), cfg), flush=True)
    return 0


def _run_up(a) -> int:
    from shardps.psctl.up import UpConfig, parse_churn, run
    return run(UpConfig(job=job_from_args(a), workers=a.workers, model=a.model, steps=a.steps,
                        batch_size=a.batch_size, seed=a.seed, run_dir=a.run_dir,
                        straggler_delay_s=a.step_delay, timeout_s=a.timeout, as_json=a.json,
                        churn=parse_churn(a.churn), epochs=a.epochs, plot=a.plot,
                        min_accuracy=a.min_accuracy, view=a.view, admit_after=a.admit_after,
                        eval_every=a.eval_every))


def _run_status(a) -> int:
    from shardps.psctl import ops
    return ops.status(a.scheduler, a.json, a.timeout, security_from_args(a), rate_window_s=a.rate_window)


def _run_inspect(a) -> int:
    from shardps.psctl import ops
    return ops.inspect(a.scheduler, a.json, a.timeout, a.shard, a.sample, security_from_args(a))


COMMANDS = {"scheduler": _run_scheduler, "server": _run_server, "worker": _run_worker,
            "up": _run_up, "status": _run_status, "inspect": _run_inspect,
            "export": _run_export, "plot": _run_plot, "checkpoint": _run_checkpoint}


def _wrong_role(a, exc: PSError) -> str | None:
    """When a call to --scheduler found no Scheduler there, what it found instead."""
    address = getattr(a, "scheduler", None)
    if not address or not isinstance(exc, (Unimplemented, Unavailable, DeadlineExceeded)):
        return None
    from shardps.psctl import reach  # only on this error path: it imports urllib
    try:
        return reach.wrong_role(address, "--scheduler", "scheduler", security_from_args(a),
                                lacks_wanted=isinstance(exc, Unimplemented))
    except PSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Run one psctl command; the exit code: 0, EXIT_FAILURE, EXIT_USAGE or EXIT_INTERRUPTED."""
    a = None
    _INTERRUPTED.clear()
    try:
        try:
            a = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help: argparse printed it and exits 0
            return exc.code if isinstance(exc.code, int) else 0
        setup_logging(a.log_level)
        if os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0":
            tune_malloc()  # measured: large gRPC messages are much faster (docs/benchmarks.md)
        rc = COMMANDS[a.command](a)
        return EXIT_INTERRUPTED if rc == 0 and _INTERRUPTED.is_set() else rc
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except InvalidArgument as exc:  # a value the command line gave, refused before anything ran
        print(f"psctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PSError as exc:  # unreachable, refused, wrong role: the command line was fine
        print(_wrong_role(a, exc) or f"psctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `psctl status | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file it cannot write or read while running (--checkpoint-dir, ...)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"psctl: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

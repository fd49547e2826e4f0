"""psctl: start daemons (scheduler, server, worker, up) and inspect a running job.

Flags and environment are read here and nowhere else; they become frozen config objects.
A bad flag or an unreachable address is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
from shardps.pscommon.errors import DeadlineExceeded, PSError, Unavailable, Unimplemented
from shardps.pscommon.lifecycle import (DaemonOptions, default_metrics_host, install_stop_handlers, setup_logging,
                                        tune_malloc)
from shardps.pscommon.security import Security, TLSConfig, read_token

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        raise UsageError(f"{self.prog}: {message}")


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


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
    g.add_argument("--push-codec", default="fp32", help="fp32|fp16|bf16|int8[:BLOCK]|topk[:DENSITY]")
    g.add_argument("--pull-codec", default="fp32", help="fp32|fp16|bf16")
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
    g.add_argument("--token-file", default=None, help="shared bearer token (or env SHARDPS_TOKEN)")


def _add_daemon_flags(p: argparse.ArgumentParser, reflection: bool = True) -> None:
    _add_security_flags(p)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default=None,
                   help="address /metrics binds (it has no authentication): default the --listen host, "
                        "or 127.0.0.1 when that is a wildcard or there is none; 0.0.0.0 for every interface")
    if reflection:
        p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection (grpcurl)")


def security_from_args(a) -> Security:
    tls_flags = (a.tls_cert, a.tls_key, a.tls_ca)
    if any(tls_flags) and not all(tls_flags):
        raise UsageError("psctl: --tls-cert, --tls-key and --tls-ca go together")
    tls = TLSConfig(a.tls_cert, a.tls_key, a.tls_ca, a.tls_server_name) if all(tls_flags) else None
    return Security(tls=tls, token=read_token(a.token_file, os.environ))


def options_from_args(a) -> DaemonOptions:
    host = a.metrics_host if a.metrics_host is not None else default_metrics_host(getattr(a, "listen", None))
    return DaemonOptions(security=security_from_args(a), metrics_port=a.metrics_port,
                         metrics_host=host, reflection=getattr(a, "reflection", False))


def build_parser() -> Parser:
    ap = Parser(prog="psctl", description="shardps: a parameter server on gRPC")
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("scheduler", help="run the scheduler")
    p.add_argument("--listen", type=_address, default="127.0.0.1:7000")
    p.add_argument("--state-dir", default=None, help="persist scheduler state here")
    p.add_argument("--ready-file", default=None, help="write the bound address here once serving")
    _add_job_flags(p)
    _add_daemon_flags(p)

    p = sub.add_parser("server", help="run one parameter-server shard")
    p.add_argument("--scheduler", type=_address, required=True)
    p.add_argument("--listen", type=_address, default="127.0.0.1:0")
    p.add_argument("--advertise", type=_address, default=None, help="address workers use (default: bound)")
    p.add_argument("--shard-id", type=int, default=-1)
    p.add_argument("--ready-file", default=None)
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here; restore from here at start")
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between checkpoints")
    p.add_argument("--start-empty-if-unreadable", action="store_true",
                   help="when every checkpoint in --checkpoint-dir is unusable, start this shard empty "
                        "instead of refusing to start (its trained state is lost)")
    _add_daemon_flags(p)

    p = sub.add_parser("worker", help="run a training worker")
    p.add_argument("--scheduler", type=_address, required=True)
    p.add_argument("--model", default="digits-mlp", help="digits-mlp, digits-cnn, ctr, or module:function")
    p.add_argument("--data", default=None, help="module:function returning the data of a custom --model")
    p.add_argument("--overlap", action="store_true", help="push gradients during backward, prefetch pulls")
    p.add_argument("--min-workers", type=int, default=0, help="wait until this many workers are alive "
                   "before the first step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--device-compression", choices=["auto", "on", "off"], default="auto",
                   help="encode fp16/bf16/topk pushes on the device before the copy to the host "
                        "(auto: on CUDA with such a codec)")
    p.add_argument("--metrics-out", default=None, help="append JSON-lines metrics here")
    p.add_argument("--push-codec", default=None, help="override the job's push codec")
    p.add_argument("--no-error-feedback", action="store_true", help="with --push-codec: no residual")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (simulate a straggler)")
    p.add_argument("--epochs", type=int, default=0, help="train on assigned data partitions for E epochs "
                   "(instead of --steps)")
    p.add_argument("--partitions", type=int, default=16, help="data partitions per epoch (with --epochs)")
    p.add_argument("--no-progress", action="store_true")
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
                   "or start a new one at these times after the workers start")
    p.add_argument("--epochs", type=int, default=0, help="train on assigned data partitions instead of --steps")
    p.add_argument("--plot", default=None, help="write the training curves to this PNG at the end")
    p.add_argument("--min-accuracy", type=float, default=0.0,
                   help="exit 1 if the served model's held-out accuracy ends below this")

    for name, help_ in (("status", "cluster state"), ("inspect", "tensors held by each shard")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--scheduler", type=_address, required=True)
        p.add_argument("--json", action="store_true")
        p.add_argument("--timeout", type=float, default=10.0)
        _add_security_flags(p)
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
    p.add_argument("--timeout", type=float, default=60.0)
    _add_security_flags(p)

    p = sub.add_parser("plot", help="loss and accuracy curves from worker metrics files")
    p.add_argument("metrics", nargs="+", help="JSON-lines files written by --metrics-out")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    return ap


def _run_export(a) -> int:
    from shardps.psctl import export
    return export.run(a.scheduler, a.out, a.timeout, security_from_args(a), follow_symlinks=a.follow_symlinks)


def _run_checkpoint(a) -> int:
    from shardps.psctl import ops
    return ops.checkpoint(a.scheduler, a.json, a.timeout, security_from_args(a))


def _run_plot(a) -> int:
    from shardps.psctl import plot
    return plot.run(a.metrics, a.out)


def _run_scheduler(a) -> int:
    from shardps.scheduler.daemon import SchedulerConfig, run
    stop = threading.Event()
    install_stop_handlers(stop)
    return run(SchedulerConfig(job=job_from_args(a), listen=a.listen, state_dir=a.state_dir,
                               ready_file=a.ready_file, options=options_from_args(a)), stop)


def _run_server(a) -> int:
    from shardps.psserver.daemon import ServerConfig, run
    stop = threading.Event()
    install_stop_handlers(stop)
    return run(ServerConfig(scheduler=a.scheduler, listen=a.listen, advertise=a.advertise or "",
                            shard_id=a.shard_id, ready_file=a.ready_file, checkpoint_dir=a.checkpoint_dir,
                            checkpoint_every_s=a.checkpoint_every,
                            start_empty_if_unreadable=a.start_empty_if_unreadable,
                            options=options_from_args(a)), stop)


def _run_worker(a) -> int:
    from shardps.worker.train import TrainConfig, train
    stop = threading.Event()
    install_stop_handlers(stop)
    cfg = TrainConfig(scheduler=a.scheduler, model=a.model, data=a.data, overlap=a.overlap, steps=a.steps,
                      batch_size=a.batch_size, seed=a.seed, device=a.device, metrics_out=a.metrics_out,
                      push_codec=a.push_codec and str(CodecConfig.parse(a.push_codec)),
                      error_feedback=not a.no_error_feedback,
                      step_delay_s=a.step_delay, progress=False if a.no_progress else None,
                      epochs=a.epochs, partitions=a.partitions, options=options_from_args(a),
                      min_workers=a.min_workers,
                      device_compression={"auto": None, "on": True, "off": False}[a.device_compression])
    train(cfg, stop)
    return 0


def _run_up(a) -> int:
    from shardps.psctl.up import UpConfig, parse_churn, run
    return run(UpConfig(job=job_from_args(a), workers=a.workers, model=a.model, steps=a.steps,
                        batch_size=a.batch_size, seed=a.seed, run_dir=a.run_dir,
                        straggler_delay_s=a.step_delay, timeout_s=a.timeout, as_json=a.json,
                        churn=parse_churn(a.churn), epochs=a.epochs, plot=a.plot,
                        min_accuracy=a.min_accuracy))


def _run_status(a) -> int:
    from shardps.psctl import ops
    return ops.status(a.scheduler, a.json, a.timeout, security_from_args(a))


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
        return reach.wrong_role(address, "--scheduler", "scheduler", security_from_args(a))
    except PSError:
        return None


def main(argv: list[str] | None = None) -> int:
    a = None
    try:
        a = build_parser().parse_args(argv)
        setup_logging(a.log_level)
        if os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0":
            tune_malloc()  # measured: large gRPC messages are much faster (docs/benchmarks.md)
        return COMMANDS[a.command](a)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except PSError as exc:
        print(_wrong_role(a, exc) or f"psctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `psctl status | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file it cannot write or read (--metrics-out, --checkpoint-dir, ...)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"psctl: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""pscommon.config: codec strings, the job spec's validation and its proto form."""
from __future__ import annotations

import pytest

from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import job_pb2, tensor_pb2


@pytest.mark.parametrize("text, name, codec", [
    ("fp32", "fp32", tensor_pb2.CODEC_RAW),
    ("raw", "raw", tensor_pb2.CODEC_RAW),
    ("fp16", "fp16", tensor_pb2.CODEC_FP16),
    ("bf16", "bf16", tensor_pb2.CODEC_BF16),
    (" BF16 ", "bf16", tensor_pb2.CODEC_BF16),
    ("int8", "int8", tensor_pb2.CODEC_INT8),
    ("topk", "topk", tensor_pb2.CODEC_TOPK),
])
def test_parse_plain_codec_names(text, name, codec):
    cfg = CodecConfig.parse(text)
    assert (cfg.name, cfg.codec) == (name, codec)


def test_parse_int8_block_size():
    cfg = CodecConfig.parse("int8:128")
    assert (cfg.name, cfg.int8_block_size) == ("int8", 128)


def test_parse_topk_density():
    cfg = CodecConfig.parse("topk:0.01", error_feedback=False)
    assert (cfg.name, cfg.topk_density, cfg.error_feedback) == ("topk", 0.01, False)
    assert str(cfg) == "topk:0.01"


@pytest.mark.parametrize("text", ["fp32", "fp16", "bf16", "int8", "int8:64", "int8:256", "topk",
                                  "topk:0.05", "topk:0.0012345678", "topk:1"])
def test_codec_text_reads_back_to_the_same_codec(text):
    # psctl up hands str(codec) to the daemons it starts: nothing may be lost on the way
    cfg = CodecConfig.parse(text)
    assert CodecConfig.parse(str(cfg)) == cfg


@pytest.mark.parametrize("text, named", [
    ("gzip", "'gzip'"),
    ("", "''"),
    ("topk:lots", "'topk:lots'"),
    ("int8:-3", "'int8:-3'"),
    ("int8:1.5", "'int8:1.5'"),
    ("fp16:2", "'fp16:2'"),
    ("topk:0", "0.0"),
    ("topk:1.5", "1.5"),
    ("topk:nan", "nan"),
    ("int8:0", "block size 0"),
    ("int8:2000000", "2000000"),
])
def test_parse_refuses_bad_codec_text_naming_it(text, named):
    with pytest.raises(InvalidArgument) as exc:
        CodecConfig.parse(text)
    assert named in str(exc.value)


def _full_spec(**kw) -> JobSpec:
    fields = dict(
        mode="ssp", staleness=3,
        optimizer=OptimizerConfig(kind="adam", lr=3e-4, beta1=0.85, beta2=0.995, eps=1e-7,
                                  weight_decay=0.02),
        push_codec=CodecConfig.parse("topk:0.05", error_feedback=False),
        pull_codec=CodecConfig.parse("bf16"),
        lossless="zstd", heartbeat_timeout_s=2.5, num_servers=4, slice_bytes=1 << 20,
        small_tensor_bytes=512, version=7)
    fields.update(kw)
    return JobSpec(**fields)


@pytest.mark.parametrize("spec", [
    _full_spec(),
    _full_spec(mode="sync", staleness=0, push_codec=CodecConfig.parse("int8:64"), lossless="auto"),
    JobSpec(),
], ids=["ssp-topk", "sync-int8", "defaults"])
def test_job_spec_proto_round_trip(spec):
    wire = job_pb2.JobSpec.FromString(spec.to_proto().SerializeToString())
    assert JobSpec.from_proto(wire) == spec


def test_ssp_staleness_travels_in_the_proto():
    assert _full_spec(staleness=5).to_proto().staleness == 5


@pytest.mark.parametrize("fields, named", [
    (dict(mode="bsp"), "'bsp'"),
    (dict(mode="ssp", staleness=0), "staleness"),
    (dict(mode="sync", staleness=-1), "staleness -1"),
    (dict(pull_codec=CodecConfig.parse("int8")), "pull codec int8"),
    (dict(pull_codec=CodecConfig.parse("topk:0.1")), "pull codec topk"),
    (dict(heartbeat_timeout_s=0.0), "heartbeat_timeout_s"),
    (dict(heartbeat_timeout_s=-1.0), "heartbeat_timeout_s"),
    (dict(heartbeat_timeout_s=float("inf")), "heartbeat_timeout_s"),
    (dict(lossless="brotli"), "'brotli'"),
    (dict(num_servers=0), "num_servers 0"),
    (dict(slice_bytes=512), "slice_bytes 512"),
    (dict(small_tensor_bytes=-1), "small_tensor_bytes -1"),
])
def test_job_spec_validation_names_the_bad_value(fields, named):
    with pytest.raises(InvalidArgument) as exc:
        JobSpec(**fields)
    assert named in str(exc.value)


def test_job_spec_from_proto_refuses_unspecified_mode():
    with pytest.raises(InvalidArgument, match="unknown enum value 0"):
        JobSpec.from_proto(job_pb2.JobSpec())


def test_describe_shows_codecs_as_text():
    d = _full_spec().describe()
    assert (d["mode"], d["staleness"], d["push_codec"], d["pull_codec"]) == ("ssp", 3, "topk:0.05", "bf16")


# -- the scheduler's optimizer flags, parsed as psctl parses them --------------------------------
def optimizer_from_flags(*flags: str) -> OptimizerConfig:
    from shardps.psctl.cli import build_parser, job_from_args
    return job_from_args(build_parser().parse_args(["scheduler", *flags])).optimizer


def test_momentum_optimizer_means_0_9_and_takes_nesterov():
    opt = optimizer_from_flags("--optimizer", "momentum", "--nesterov")
    assert (opt.kind, opt.momentum, opt.nesterov) == ("momentum", 0.9, True)
    assert OptimizerConfig.from_proto(opt.to_proto()) == opt   # what status shows is what is applied


def test_every_optimizer_hyper_parameter_has_a_flag():
    opt = optimizer_from_flags("--optimizer", "sgd", "--momentum", "0.5", "--dampening", "0.1",
                               "--weight-decay", "0.01", "--lr-decay", "0.2", "--initial-accumulator", "0.3",
                               "--beta1", "0.8", "--beta2", "0.99", "--eps", "1e-6", "--lr", "0.05")
    assert opt == OptimizerConfig(kind="sgd", lr=0.05, momentum=0.5, dampening=0.1, weight_decay=0.01,
                                  lr_decay=0.2, initial_accumulator_value=0.3, beta1=0.8, beta2=0.99, eps=1e-6)


def test_nesterov_without_momentum_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match="nesterov"):
        optimizer_from_flags("--optimizer", "sgd", "--nesterov")


def test_up_passes_the_whole_job_to_its_scheduler():
    """psctl up starts its scheduler with job_flags(job): every field must survive the trip."""
    from shardps.psctl.cli import build_parser, job_from_args
    from shardps.psctl.up import job_flags
    job = JobSpec(mode="ssp", staleness=3, num_servers=2, lossless="zstd", heartbeat_timeout_s=4.0,
                  optimizer=OptimizerConfig(kind="adagrad", lr=0.2, weight_decay=0.01, lr_decay=0.1,
                                            initial_accumulator_value=0.5, eps=1e-9),
                  push_codec=CodecConfig.parse("topk:0.05", error_feedback=False),
                  pull_codec=CodecConfig.parse("bf16"))
    assert job_from_args(build_parser().parse_args(["scheduler", *job_flags(job)])) == job

"""The scheduler role: owns the job spec, membership, the shard map and partition assignments."""
if __name__ != "shardps.scheduler":  # the folder is mapped into the shardps namespace
    raise ImportError(f"import shardps.scheduler, not {__name__}")

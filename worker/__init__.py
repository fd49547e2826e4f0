"""The worker role: trains a torch model against the shards (see shardps.worker.api.PSClient)."""
if __name__ != "shardps.worker":  # the folder is mapped into the shardps namespace
    raise ImportError(f"import shardps.worker, not {__name__}")

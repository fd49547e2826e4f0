"""The server role: one shard of the model's parameters, its optimizer and checkpoints."""
if __name__ != "shardps.psserver":  # the folder is mapped into the shardps namespace
    raise ImportError(f"import shardps.psserver, not {__name__}")

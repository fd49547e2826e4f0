"""psctl: the command line, and the one package that imports every role."""
if __name__ != "shardps.psctl":  # the folder is mapped into the shardps namespace
    raise ImportError(f"import shardps.psctl, not {__name__}")

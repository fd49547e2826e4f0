"""What every shardps role imports: wire stubs, config, errors, sharding, tensors, codecs.

pscommon imports no role package (psserver, worker, scheduler, psctl); tests/unit/test_layering.py
checks it.
"""
if __name__ != "shardps.pscommon":  # the folder is mapped into the shardps namespace
    raise ImportError(f"import shardps.pscommon, not {__name__}")

"""What every shardps role imports: wire stubs, config, errors, sharding, tensors, codecs.

pscommon imports no role package (psserver, worker, scheduler, psctl).
"""

"""shardps: a parameter server for distributed deep-learning training, on gRPC.

The one import name of the distribution. Its roles live in subpackages (the repository keeps
them as top-level folders; pyproject.toml maps them here):

    shardps.pscommon   what every role shares: wire stubs, config, errors, codecs, sharding
    shardps.scheduler  the job spec, membership and partition assignments
    shardps.psserver   a shard of the model's parameters and its optimizer
    shardps.worker     training against the shards (PSClient)
    shardps.psctl      the command line, and the only package that imports every role

`from shardps import PSClient` is the public entry, with `ShardedEmbedding`,
`ShardedEmbeddingBag` and `EmbeddingClient` for embedding tables larger than any worker. They
are resolved lazily, so a scheduler or server process that imports `shardps.pscommon` does
not pay for importing torch.
"""

__version__ = "0.1.0"


_EMBEDDING = ("ShardedEmbedding", "ShardedEmbeddingBag", "EmbeddingClient")


def __getattr__(name):
    if name == "PSClient":
        from shardps.worker.api import PSClient
        return PSClient
    if name in _EMBEDDING:
        from shardps.worker import embedding
        return getattr(embedding, name)
    raise AttributeError(f"module 'shardps' has no attribute {name!r}")


__all__ = ["PSClient", *_EMBEDDING, "__version__"]

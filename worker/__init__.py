"""The worker role: trains a torch model against the shards (see worker.api.PSClient).

`from worker import PSClient` is resolved lazily so that numpy-only users of
worker.client (benchmarks, psctl export) do not pay for importing torch.
"""


def __getattr__(name):
    if name == "PSClient":
        from worker.api import PSClient
        return PSClient
    raise AttributeError(f"module 'worker' has no attribute {name!r}")


__all__ = ["PSClient"]

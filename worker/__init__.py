"""The worker role: trains a torch model against the shards (see worker.api.PSClient)."""
from worker.api import PSClient

__all__ = ["PSClient"]

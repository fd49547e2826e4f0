"""A synthetic click-through-rate task with a large embedding table (wide & deep).

Data comes from a fixed seed: each sample has FIELDS categorical ids, each field drawing
from its own USED ids spread over one shared table; the label is 1 when a hidden per-id
weight sum (plus noise) is positive. Held-out accuracy therefore measures how well the
embeddings learned the hidden weights (chance is 50%; a single process with SGD lr 3 reaches
about 86% in 300 steps of 256).
"""
from __future__ import annotations

import torch
from torch import nn

from shardps.worker.data import Split

FIELDS = 4
VOCAB = 100_000          # 100k x 16 float32 = 6.4 MB: sliced into keys spread over shards
DIM = 16
USED = 1_000             # ids per field that occur in the data
SAMPLES = 40_000


class CTRModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.EmbeddingBag(VOCAB, 1, mode="sum")
        self.deep = nn.EmbeddingBag(VOCAB, DIM, mode="sum")
        nn.init.zeros_(self.wide.weight)
        nn.init.normal_(self.deep.weight, 0.0, 0.01)
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.wide(ids) + self.mlp(self.deep(ids))
        return torch.cat([torch.zeros_like(z), z], dim=1)  # two-class logits for cross-entropy


def ctr_data(seed: int = 1234) -> Split:
    g = torch.Generator().manual_seed(seed)
    per_field = VOCAB // FIELDS
    ranks = torch.randint(USED, (SAMPLES, FIELDS), generator=g)
    ids = ranks * (per_field // USED) + torch.arange(FIELDS) * per_field
    hidden = torch.randn(VOCAB, generator=g)
    labels = (hidden[ids].sum(dim=1) + 0.3 * torch.randn(SAMPLES, generator=g) > 0).long()
    cut = SAMPLES * 3 // 4
    return Split(ids[:cut], labels[:cut], ids[cut:], labels[cut:])

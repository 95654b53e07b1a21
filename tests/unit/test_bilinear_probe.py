"""The bilinear which-probe: it finds an asked object that the query encodes, and reads exactly 0.5
from a query that encodes nothing."""
from __future__ import annotations

import torch

from workers.training.bilinear_probe import fit, which_auc


def _rows(n: int, seed: int) -> list[dict]:
    """Scenes of 4 objects over 12 tokens (3 tokens each, object k's tokens carry feature k + noise);
    the query encodes the asked object (`informed`) or is all zeros (`blind`)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randperm(8, generator=gen)[:4]
        visual = torch.zeros(12, 8)
        for k, obj in enumerate(ids.tolist()):
            visual[3 * k:3 * k + 3, obj] = 1.0
        visual += 0.1 * torch.randn(12, 8, generator=gen)
        asked_k = int(torch.randint(0, 4, (1,), generator=gen))
        asked = torch.zeros(12, dtype=torch.bool)
        asked[3 * asked_k:3 * asked_k + 3] = True
        informed = torch.zeros(8)
        informed[int(ids[asked_k])] = 1.0
        rows.append({"visual": visual, "asked": asked, "objects": torch.ones(12, dtype=torch.bool),
                     "informed": informed, "blind": torch.zeros(8)})
    return rows


def test_probe_reads_an_informative_query_and_not_a_blind_one():
    train, test = _rows(96, 0), _rows(32, 1)
    a, b = fit(train, "informed", rank=8, epochs=100, seed=0)
    assert which_auc(test, "informed", a, b) > 0.95
    a, b = fit(train, "blind", rank=8, epochs=5, seed=0)
    assert which_auc(test, "blind", a, b) == 0.5
    assert which_auc([], "blind", a, b) is None

"""D-Fusion / D3PO preference pairs: the higher reward is preferred, ties give no pair (hand-computed)."""

from __future__ import annotations

import torch

from b2diffurl.algos.dfusion.pairs import preference_pairs


def test_preference_pairs_hand_computed():
    a, b = torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 22, 23])
    ra, rb = torch.tensor([0.9, 0.2, 0.5, 0.1]), torch.tensor([0.3, 0.4, 0.5, 0.6])
    pref, dis, decisive = preference_pairs(a, b, ra, rb)
    assert decisive.tolist() == [True, True, False, True]
    assert pref.tolist() == [10, 21, 23]
    assert dis.tolist() == [20, 11, 13]


def test_plain_pairs_option_is_validated():
    from b2diffurl.config import DFusionConfig

    assert DFusionConfig(pairs="plain").errors() == []
    assert any("dfusion.pairs" in e for e in DFusionConfig(pairs="both").errors())

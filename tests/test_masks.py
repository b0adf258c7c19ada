"""b2kernels.integrations.masks: the object-mask rule (one item per occurrence, each thresholded, union) and the
nearest resize, against hand-built attention maps and numpy indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from b2kernels.integrations.masks import object_mask, resize_mask


def test_repeated_word_is_two_items_not_one_summed_item():
    """ "a blue circle above a green circle" on a 2×2 grid: each "circle" column attends to its own object.
    Per occurrence (the official rule) a cell is on when *one* circle's attention passes 0.1; summing the two
    columns first also switches on cell 3, where each circle gets 0.06 (a superset mask)."""
    maps = torch.tensor([[[0.30, 0.00], [0.00, 0.25], [0.02, 0.03], [0.06, 0.06]]])  # [R=1, N=4, J=2 columns]
    per_occurrence = object_mask(maps, 0.1)  # every column its own item
    assert per_occurrence.tolist() == [[True, True, False, False]]
    summed = object_mask(maps, [0.1], items=torch.ones(1, 2, 1))  # one item on the sum of both columns
    assert summed.tolist() == [[True, True, False, True]]


def test_items_thresholds_and_rules_by_hand():
    # 2 rows, 4 cells, 4 captured columns; item 0 = column 1, item 1 = columns 2+3 (one multi-token word)
    maps = torch.tensor(
        [
            [
                [0.0, 0.50, 0.10, 0.00],
                [0.0, 0.01, 0.10, 0.15],
                [0.0, 0.02, 0.01, 0.01],
                [0.0, 0.30, 0.00, 0.00],
            ],
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    items = torch.zeros(2, 4, 2)
    items[:, 1, 0] = 1
    items[:, 2, 1] = items[:, 3, 1] = 1
    thr = torch.tensor([[0.3, 0.2], [0.5, 0.5]])
    # row 0: item 0 on at cells 0 (0.5) and 3 (0.3); item 1 (0.10 + 0.15) on at cell 1 -> {0, 1, 3}
    assert object_mask(maps, thr, items=items).int().tolist() == [[1, 1, 0, 1], [0, 0, 1, 0]]
    # mean rule: item 0 mean (0.5+0.01+0.02+0.3)/4 = 0.2075 -> {0, 3}; item 1 (0.1, 0.25, 0.02, 0) mean 0.0925
    # -> {0, 1}; an +inf (padding) item never switches a cell on
    pad = torch.tensor([[0.3, float("inf")], [0.5, 0.5]])
    assert object_mask(maps, thr, items=items, rule="mean")[0].int().tolist() == [1, 1, 0, 1]
    assert object_mask(maps, pad, items=items, rule="mean")[0].int().tolist() == [1, 0, 0, 1]
    # a float or [I] threshold is shared by every row
    assert torch.equal(object_mask(maps, [0.3, 0.2], items=items)[0], object_mask(maps, thr, items=items)[0])
    assert not object_mask(maps, 0.95, items=items).any()


def test_object_mask_errors():
    with pytest.raises(ValueError, match="maps"):
        object_mask(torch.zeros(4, 2), 0.1)
    with pytest.raises(ValueError, match="rule"):
        object_mask(torch.zeros(1, 4, 2), 0.1, rule="max")
    with pytest.raises(ValueError, match="items"):
        object_mask(torch.zeros(1, 4, 2), 0.1, items=torch.ones(1, 3, 1))
    with pytest.raises(ValueError, match="thresholds"):
        object_mask(torch.zeros(1, 4, 2), [0.1, 0.2, 0.3])


@pytest.mark.parametrize("out", [2, 3, 4, 8, 16])
def test_resize_is_floor_index_nearest(out):
    src = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
    idx = np.floor(np.arange(out) * 4 / out).astype(int)
    want = src[np.ix_(idx, idx)]
    got = resize_mask(torch.from_numpy(src)[None].bool(), (out, out))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got[0].numpy(), want)
    with pytest.raises(ValueError, match=r"\[R, h, w\]"):
        resize_mask(torch.zeros(16), (4, 4))

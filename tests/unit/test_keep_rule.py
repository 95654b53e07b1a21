"""Keep-rule invariants (reference section 3.3)."""
from __future__ import annotations

import pytest
import torch

from workers.modeling.keep_rule import KeepRule, keep_mask, split_per_image, topk_mask


def logits_for(probs):
    p = torch.tensor(probs, dtype=torch.float)
    return torch.log(p / (1 - p))


def test_threshold_keeps_strictly_above():
    keep = keep_mask(logits_for([0.2, 0.51, 0.5, 0.9]), KeepRule(threshold=0.5, min_remain_num=None))
    assert keep.tolist() == [False, True, False, True]


def test_cap_replaces_with_topk_of_floor_ratio():
    probs = [0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.2, 0.3, 0.4, 0.45]
    keep = keep_mask(logits_for(probs), KeepRule(max_remain_ratio=0.3))
    assert keep.tolist() == [True, True, True] + [False] * 7  # 5/10 > 0.3 -> top int(3.0) = 3
    keep = keep_mask(logits_for(probs), KeepRule(max_remain_ratio=0.5))
    assert int(keep.sum()) == 5  # exactly at the cap: the threshold result stands


def test_cap_never_below_one_token():
    keep = keep_mask(logits_for([0.9, 0.8, 0.7]), KeepRule(max_remain_ratio=0.1))
    assert keep.tolist() == [True, False, False]


def test_floor_adds_top_tokens():
    keep = keep_mask(logits_for([0.1, 0.3, 0.2, 0.05]), KeepRule(min_remain_num=2))
    assert keep.tolist() == [False, True, True, False]
    keep = keep_mask(logits_for([0.1, 0.3, 0.2, 0.05]), KeepRule(min_remain_num=None))
    assert not keep.any()


def test_fixed_ratio_is_exact_topk_ignoring_threshold():
    probs = torch.rand(100, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(torch.logit(probs), KeepRule(fixed_remain_ratio=0.111))
    assert int(keep.sum()) == 11
    assert bool((probs[keep].min() >= probs[~keep].max()))


def test_joint_rule_over_images_and_split():
    # two images of one sample: the cap applies to the concatenation, the split reports each image
    probs = [0.9, 0.95, 0.6, 0.7] + [0.99, 0.1]
    keep = keep_mask(logits_for(probs), KeepRule(max_remain_ratio=0.5))
    assert keep.tolist() == [True, True, False, False, True, False]
    assert split_per_image(keep, [4, 2]) == [2, 1]
    with pytest.raises(ValueError):
        split_per_image(keep, [4, 3])


def test_topk_mask_clamps_k():
    scores = torch.tensor([0.1, 0.2])
    assert topk_mask(scores, 5).tolist() == [True, True]
    assert topk_mask(scores, 0).tolist() == [False, False]


def test_empty_and_invalid():
    assert keep_mask(torch.zeros(0), KeepRule()).numel() == 0
    for bad in (dict(threshold=1.0), dict(max_remain_ratio=0.0), dict(fixed_remain_ratio=1.5), dict(min_remain_num=-1)):
        with pytest.raises(ValueError):
            KeepRule(**bad)


def test_batched_keep_masks_equal_the_per_sample_rule():
    """keep_masks (one padded threshold pass, top-k only where the rule needs it) is keep_mask row by
    row, over thresholds, caps (hit and not), floors, fixed ratios, saturated ties and empty rows."""
    from workers.modeling.keep_rule import keep_masks

    gen = torch.Generator().manual_seed(0)
    rules = [KeepRule(threshold=0.5), KeepRule(threshold=0.3, max_remain_ratio=0.1), KeepRule(threshold=0.9, min_remain_num=5),
             KeepRule(fixed_remain_ratio=0.111), KeepRule(threshold=0.5, max_remain_ratio=0.5, min_remain_num=None),
             KeepRule(threshold=0.7, max_remain_ratio=0.25, min_remain_num=3)]
    for trial in range(40):
        sizes = [int(v) for v in torch.randint(0, 300, (len(rules),), generator=gen)]
        sizes[trial % len(sizes)] = 0 if trial % 7 == 0 else sizes[trial % len(sizes)]
        scale = 1.0 + 30.0 * (trial % 3 == 2)  # some trials saturate the sigmoid (ties at p = 1)
        logits = [torch.randn(n, generator=gen) * scale for n in sizes]
        order = torch.randperm(len(rules), generator=gen).tolist()
        batch_rules = [rules[k] for k in order]
        got = keep_masks(logits, batch_rules)
        for lg, rule, mask in zip(logits, batch_rules, got):
            assert torch.equal(mask, keep_mask(lg, rule)), (rule, lg.numel())
    assert keep_masks([], []) == []

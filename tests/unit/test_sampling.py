"""The sampling laws of several training datasets (``nequip_mtl.data.sampling``), pure torch.

Laws are checked against closed forms: exact per-epoch counts (largest remainder of p_i L),
p_i from sizes/weights/temperature, hypergeometric per-batch counts (chi-square), exact
balanced compositions; ranks against the one-process draw; restarts against the full epoch.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from nequip_mtl.data.sampling import (
    MultiDatasetSampler,
    check_sampling,
    largest_remainder,
)

SIZES = [30, 12, 6]
OFFSETS = [0, 30, 42]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def _dataset_of(idx):
    return torch.bucketize(idx, torch.tensor(OFFSETS[1:]), right=True)


# ----------------------------------------------------------------- mixture laws


def test_proportional_epoch_is_a_permutation_of_the_concatenation():
    s = MultiDatasetSampler(SIZES, batch_size=8, mode="proportional", seed=3)
    assert s.num_batches == math.ceil(48 / 8) == 6
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    assert sorted(e0.tolist()) == list(range(48))
    assert sorted(e1.tolist()) == list(range(48))
    assert not torch.equal(e0, e1)  # a new order each epoch


@pytest.mark.parametrize(
    "mode,extra,raw",
    [
        ("weights", {"weights": [1.0, 2.0, 5.0]}, [1.0, 2.0, 5.0]),
        ("temperature", {"temperature": 2.0}, [30**0.5, 12**0.5, 6**0.5]),
        ("temperature", {"temperature": 1.0}, [30.0, 12.0, 6.0]),
    ],
)
def test_mixture_epoch_counts_are_the_rounded_shares(mode, extra, raw):
    s = MultiDatasetSampler(SIZES, batch_size=7, mode=mode, frames_per_epoch=100, seed=1, **extra)
    L = s.num_batches * 7
    assert L == math.ceil(100 / 7) * 7 == 105
    p = [r / sum(raw) for r in raw]
    for epoch in range(3):
        counts = torch.bincount(_dataset_of(_epoch(s, epoch)), minlength=3).tolist()
        assert sum(counts) == L
        assert all(abs(c - pi * L) < 1 for c, pi in zip(counts, p)), (counts, [x * L for x in p])


def test_largest_remainder_closed_form():
    assert largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4
    assert largest_remainder([1 / 3] * 3, 10) == [4, 3, 3]
    assert sum(largest_remainder([0.123, 0.456, 0.421], 999)) == 999


def test_mixture_batch_composition_is_hypergeometric():
    """Per-batch count of dataset 0 over many epochs against hypergeometric(L, m_0, B)."""
    B = 6
    s = MultiDatasetSampler(SIZES, batch_size=B, mode="weights", weights=[1, 1, 1], seed=5)
    L, m0 = s.num_batches * B, s.counts[0]
    observed = Counter()
    for epoch in range(400):
        ds = _dataset_of(_epoch(s, epoch)).view(-1, B)
        observed.update((ds == 0).sum(1).tolist())
    total = sum(observed.values())
    law = stats.hypergeom(L, m0, B)
    # pool the tails so every expected count is >= 5
    bins = [(0, 0), (1, 1), (2, 2), (3, 3), (4, B)]
    obs = [sum(observed[k] for k in range(lo, hi + 1)) for lo, hi in bins]
    exp = [total * sum(law.pmf(k) for k in range(lo, hi + 1)) for lo, hi in bins]
    assert min(exp) >= 5
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_upsampled_dataset_shows_every_frame_before_repeating():
    """Weight 10 on the 6-frame dataset: its frames come in whole passes across epochs."""
    s = MultiDatasetSampler(SIZES, batch_size=4, mode="weights", weights=[1, 1, 10], seed=2)
    stream = torch.cat([_epoch(s, e) for e in range(3)])
    small = stream[_dataset_of(stream) == 2] - OFFSETS[2]
    m = s.counts[2]
    assert m > 6  # upsampled: more frames an epoch than the dataset has
    for q in range(len(small) // 6):
        assert sorted(small[q * 6 : (q + 1) * 6].tolist()) == list(range(6))


# ----------------------------------------------------------------- balanced


def test_balanced_every_batch_holds_the_fixed_counts():
    s = MultiDatasetSampler(SIZES, mode="balanced", frames_per_batch=[3, 2, 1], seed=4)
    assert s.batch_size == 6
    # default epoch: enough batches to show every frame of every dataset
    assert s.num_batches == max(math.ceil(30 / 3), math.ceil(12 / 2), math.ceil(6 / 1)) == 10
    for epoch in range(3):
        batches = _epoch(s, epoch).view(-1, 6)
        for b in batches:
            assert _dataset_of(b).tolist() == [0, 0, 0, 1, 1, 2]
        first = batches[:, :3].flatten()
        assert sorted(first.tolist()) == list(range(30))  # 10 batches x 3 = one pass


def test_balanced_default_epoch_shows_every_frame_of_the_largest_dataset():
    """The docstring's example: sizes 40 and 10, 3 + 1 frames a batch. 40 / 3 is not whole,
    so the default epoch is ceil(40 / 3) = 14 batches (42 draws of dataset 0): all 40 of
    its frames, and every frame of the 10-frame dataset too.

    Fails if the default epoch rounds down (``n // (b W)``: 13 batches, 39 of the 40)."""
    s = MultiDatasetSampler([40, 10], mode="balanced", frames_per_batch=[3, 1], seed=0)
    assert s.num_batches == math.ceil(40 / 3) == 14
    batches = torch.tensor(list(s)).view(14, 4)
    assert set(batches[:, :3].flatten().tolist()) == set(range(40))
    assert set(batches[:, 3].tolist()) == set(range(40, 50))


def test_balanced_refuses_a_dataset_smaller_than_its_share():
    with pytest.raises(ValueError, match="dataset 2 has 6 training frames, fewer than"):
        MultiDatasetSampler(SIZES, mode="balanced", frames_per_batch=[1, 1, 4], num_replicas=2)
    with pytest.raises(ValueError, match="batch size is 5"):
        MultiDatasetSampler(SIZES, batch_size=5, mode="balanced", frames_per_batch=[1, 1, 1])


# ----------------------------------------------------------------- ranks, determinism, resume

LAWS = [
    ("proportional", {}, {"batch_size": 4}, {"batch_size": 8}),
    ("weights", {"weights": [1, 3, 2]}, {"batch_size": 4}, {"batch_size": 8}),
    ("temperature", {"temperature": 3.0}, {"batch_size": 5}, {"batch_size": 10}),
    ("balanced", {}, {"frames_per_batch": [2, 1, 1]}, {"frames_per_batch": [4, 2, 2]}),
]


@pytest.mark.parametrize("mode,law,per_rank,single", LAWS, ids=[x[0] for x in LAWS])
def test_ranks_draw_disjoint_shares_of_the_one_process_batches(mode, law, per_rank, single):
    one = MultiDatasetSampler(SIZES, mode=mode, seed=9, **law, **single)
    ranks = [
        MultiDatasetSampler(SIZES, mode=mode, seed=9, num_replicas=2, rank=r, **law, **per_rank)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2
    assert ranks[0].num_batches == one.num_batches
    for epoch in (0, 3):
        big = _epoch(one, epoch).view(one.num_batches, -1)
        mine = [_epoch(r, epoch).view(one.num_batches, -1) for r in ranks]
        for t in range(one.num_batches):
            a, b = mine[0][t].tolist(), mine[1][t].tolist()
            assert sorted(a + b) == sorted(big[t].tolist())  # the same global batch
            if mode == "balanced" or len(set(big[t].tolist())) == len(big[t]):
                assert not set(a) & set(b)  # disjoint


@pytest.mark.parametrize("mode,law,per_rank,single", LAWS, ids=[x[0] for x in LAWS])
def test_deterministic_from_seed_and_epoch(mode, law, per_rank, single):
    a = MultiDatasetSampler(SIZES, mode=mode, seed=11, **law, **single)
    b = MultiDatasetSampler(SIZES, mode=mode, seed=11, **law, **single)
    c = MultiDatasetSampler(SIZES, mode=mode, seed=12, **law, **single)
    # b visits epochs out of order: the draw depends on (seed, epoch) only
    e2_b = _epoch(b, 2)
    for e in range(3):
        _epoch(a, e)
    assert torch.equal(_epoch(a, 2), e2_b)
    assert not torch.equal(_epoch(c, 2), e2_b)


def test_resume_skips_exactly_the_batches_done():
    s = MultiDatasetSampler(SIZES, mode="balanced", frames_per_batch=[2, 1, 1], seed=0)
    full = _epoch(s, 4).view(s.num_batches, -1)
    s.resume(epoch=4, batches_done=3)
    s.set_epoch(4)  # Lightning sets the same epoch again: the position is kept
    assert torch.equal(torch.tensor(list(s)).view(-1, 4), full[3:])
    assert torch.equal(torch.tensor(list(s)).view(-1, 4), full)  # then whole epochs again
    s.resume(epoch=4, batches_done=s.num_batches)  # a finished epoch: the next starts whole
    assert s.epoch == 5 and s.start_batch == 0
    s.resume(epoch=4, batches_done=2)
    s.set_epoch(5)  # another epoch: the saved position no longer applies
    assert torch.equal(torch.tensor(list(s)), _epoch(s, 5))


# ----------------------------------------------------------------- bad input

NAMES = ["pretrain", "new"]


@pytest.mark.parametrize(
    "sampling,match",
    [
        ({"mode": "uniform"}, r"`sampling.mode` is `uniform`; allowed: proportional, weights"),
        ({"mode": "weights", "weights": {"pretrain": 1, "new": 0}}, r"weights.new` must be a pos"),
        ({"mode": "weights", "weights": {"pretrain": -1, "new": 1}}, r"weights.pretrain` must"),
        ({"mode": "weights", "weights": {"pretrain": 1}}, r"missing \['new'\]"),
        ({"mode": "weights", "weights": {"pretrain": 1, "new": 1, "x": 1}}, r"unknown \['x'\]"),
        ({"mode": "temperature"}, r"`sampling.temperature` is required"),
        ({"mode": "temperature", "temperature": 0}, r"temperature` must be a positive number"),
        ({"mode": "balanced", "frames_per_batch": {"pretrain": 2, "new": 1.5}}, "positive int"),
        ({"mode": "balanced", "weights": {}}, r"unknown key\(s\) \['weights'\] for mode `bal"),
        ({"mode": "proportional", "batches_per_epoch": 0}, r"batches_per_epoch` must be a pos"),
        ({"mode": "proportional", "temprature": 2}, r"unknown key\(s\) \['temprature'\]"),
    ],
)
def test_bad_sampling_is_refused_naming_the_key(sampling, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(sampling, NAMES)


def test_check_sampling_orders_per_dataset_values_by_dataset():
    out = check_sampling({"mode": "weights", "weights": {"new": 3, "pretrain": 1}}, NAMES)
    assert out == {"mode": "weights", "weights": [1.0, 3.0]}

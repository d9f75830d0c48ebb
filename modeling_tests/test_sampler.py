"""BalancedConcatSampler: exact per-epoch counts, permutation streams, determinism, sharding, resume, errors.

Expected counts are worked out by hand in the comments (largest-remainder rounding of p_d * num_samples).
Distributed sharding is simulated in one process with accelerate's own `prepare_data_loader` /
`skip_first_batches`, the code `Trainer` runs on every rank.
"""

from __future__ import annotations

import random
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import ConcatDataset, DataLoader
from transformers import TrainerControl, TrainerState

from hf_instructblip.training.sampler import (
    BalancedConcatSampler,
    SamplerEpochCallback,
    largest_remainder_counts,
    mixture_weights,
)


def tagged(sizes: list[int]) -> ConcatDataset:
    """A ConcatDataset whose item k is (dataset d, local index i): ground truth for index mapping."""
    return ConcatDataset([[(d, i) for i in range(size)] for d, size in enumerate(sizes)])


def realised_counts(sampler: BalancedConcatSampler, epoch: int = 0) -> list[int]:
    sampler.set_epoch(epoch)
    per_dataset = Counter(sampler.dataset_index(i) for i in sampler)
    return [per_dataset[d] for d in range(len(sampler.sizes))]


def local_streams(data: ConcatDataset, sampler: BalancedConcatSampler, epochs: range) -> dict[int, list[int]]:
    """Per dataset, the local indices drawn over `epochs`, in order."""
    streams: dict[int, list[int]] = {d: [] for d in range(len(sampler.sizes))}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        for index in sampler:
            d, i = data[index]
            streams[d].append(i)
    return streams


# ---- exact counts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sizes", "alpha", "num_samples", "expected"),
    [
        # sqrt: weights 10, 20, 30 of 60; quotas 233.33, 466.67, 700 -> the spare sample goes to the .67
        ([100, 400, 900], 0.5, None, [233, 467, 700]),
        # proportional = plain concatenation: quotas are the sizes
        ([10, 30, 60], 1.0, None, [10, 30, 60]),
        # proportional, 50 samples: quotas 5, 15, 30
        ([10, 30, 60], 1.0, 50, [5, 15, 30]),
        # uniform: quotas 33.33 each; the tie for the spare sample goes to the lowest index
        ([5, 50, 500], 0.0, 100, [34, 33, 33]),
        # sqrt of 4, 9, 1 -> weights 2, 3, 1 of 6; 10 samples: quotas 3.33, 5, 1.67 -> 3, 5, 2
        ([4, 9, 1], 0.5, 10, [3, 5, 2]),
    ],
)
def test_per_epoch_counts_are_exact(sizes, alpha, num_samples, expected):
    sampler = BalancedConcatSampler(tagged(sizes), alpha=alpha, num_samples=num_samples, seed=5)
    assert list(sampler.counts) == expected
    assert len(sampler) == sum(expected)
    for epoch in (0, 3):
        assert realised_counts(sampler, epoch) == expected


def test_multipliers_by_name_index_and_list_agree():
    # weights sqrt(100) * 4 = 40 and sqrt(400) = 20 -> p = 2/3, 1/3; 300 samples -> 200, 100
    sizes, names = [100, 400], ["okvqa", "aokvqa"]
    by_name = BalancedConcatSampler(sizes, names=names, multipliers={"okvqa": 4.0}, num_samples=300)
    by_index = BalancedConcatSampler(sizes, names=names, multipliers={0: 4.0}, num_samples=300)
    by_list = BalancedConcatSampler(sizes, names=names, multipliers=[4.0, 1.0], num_samples=300)
    for sampler in (by_name, by_index, by_list):
        assert list(sampler.counts) == [200, 100]
        assert sampler.probabilities == pytest.approx((2 / 3, 1 / 3))
    assert list(by_name) == list(by_list)


def test_zero_multiplier_excludes_a_dataset_and_size_cap_limits_weight():
    # multiplier 0 removes dataset 1 entirely
    sampler = BalancedConcatSampler(tagged([10, 10, 10]), multipliers=[1, 0, 1], num_samples=20)
    assert realised_counts(sampler) == [10, 0, 10]
    # cap 400: sqrt(min(100, 400)) = 10, sqrt(min(10000, 400)) = 20 -> 100, 200 of 300
    assert list(BalancedConcatSampler([100, 10000], size_cap=400, num_samples=300).counts) == [100, 200]


def test_helpers_compute_the_paper_rule():
    assert mixture_weights([100, 400, 900]) == [10.0, 20.0, 30.0]
    assert mixture_weights([100, 400], alpha=1.0) == [100.0, 400.0]
    # 0.3 * 10 is 2.9999999999999996 in floats; exact arithmetic gives 3, 7
    assert largest_remainder_counts([0.3, 0.7], 10) == [3, 7]
    assert sum(largest_remainder_counts([1.0, 2.0, 3.5, 0.25], 997)) == 997


# ---- permutation streams ----------------------------------------------------------------------------------------
def test_upsampling_repeats_nothing_before_a_full_pass():
    # dataset 0 (size 7) is drawn ~5x per epoch; dataset 1 (size 64) ~0.6x
    data = tagged([7, 64])
    sampler = BalancedConcatSampler(data, alpha=0.0, num_samples=71, seed=11)
    streams = local_streams(data, sampler, range(3))
    small = streams[0]
    assert len(small) == 3 * sampler.counts[0]
    for start in range(0, len(small), 7):
        chunk = small[start : start + 7]
        assert len(set(chunk)) == len(chunk)  # no repeat inside a pass (the last one may be partial)
        if len(chunk) == 7:
            assert sorted(chunk) == list(range(7))
    passes = [tuple(small[s : s + 7]) for s in range(0, 21, 7)]
    assert len(set(passes)) == 3  # reshuffled at every pass


def test_downsampled_dataset_reaches_every_example_across_epochs():
    # dataset 1 (size 50) gets 10 samples per epoch: five epochs continue one permutation
    data = tagged([10, 50])
    sampler = BalancedConcatSampler(data, alpha=1.0, multipliers=[1.0, 0.2], num_samples=20, seed=2)
    assert list(sampler.counts) == [10, 10]
    streams = local_streams(data, sampler, range(5))
    assert sorted(streams[1]) == list(range(50))
    assert sorted(streams[0]) == sorted(list(range(10)) * 5)


def test_alpha_one_default_length_is_a_shuffled_concatenation():
    sampler = BalancedConcatSampler([13, 29, 8], alpha=1.0, seed=4)
    order = list(sampler)
    assert sorted(order) == list(range(50))
    assert order != list(range(50))


# ---- determinism ----------------------------------------------------------------------------------------------------
def test_same_seed_and_epoch_give_the_same_order_and_other_epochs_differ():
    first = BalancedConcatSampler([40, 90, 15], seed=7)
    second = BalancedConcatSampler([40, 90, 15], seed=7)
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    assert list(first) == list(first)  # iterating again does not advance anything
    second.set_epoch(3)
    assert list(first) != list(second)
    assert list(first) != list(BalancedConcatSampler([40, 90, 15], seed=8, num_samples=145))


def test_order_ignores_and_leaves_the_global_rngs_alone():
    sampler = BalancedConcatSampler([40, 90, 15], seed=7)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    reference = list(sampler)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert list(sampler) == reference
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_concat_dataset_and_list_of_sizes_are_equivalent():
    sizes = [12, 3, 30]
    assert list(BalancedConcatSampler(tagged(sizes), seed=1)) == list(BalancedConcatSampler(sizes, seed=1))


# ---- distributed (accelerate's sharding, simulated in one process) --------------------------------------------------
def rank_loaders(data, sampler_factory, num_processes: int, batch_size: int):
    """What `Trainer` builds on each rank: its own sampler copy, a DataLoader, accelerate's sharding."""
    loaders = []
    for rank in range(num_processes):
        loader = DataLoader(data, sampler=sampler_factory(), batch_size=batch_size, collate_fn=list)
        loaders.append(prepare_data_loader(loader, num_processes=num_processes, process_index=rank,
                                           put_on_device=False))
    return loaders


def test_two_ranks_cover_the_global_sequence_without_overlap():
    data = tagged([30, 70, 12])
    factory = partial(BalancedConcatSampler, data, seed=3, num_samples=96)  # 96 = 12 global batches of 2 x 4
    reference = factory()
    loaders = rank_loaders(data, factory, num_processes=2, batch_size=4)
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)  # what Trainer does; reaches each rank's sampler
        per_rank = [list(loader) for loader in loaders]
        reference.set_epoch(epoch)
        sequence = [data[i] for i in reference]
        global_batches = [sequence[k : k + 4] for k in range(0, 96, 4)]
        # accelerate hands rank r the global batches r, r + 2, ...: interleaving them rebuilds the sequence,
        # so the ranks' union is the global sequence and no position is seen twice
        assert [batch for pair in zip(*per_rank) for batch in pair] == global_batches
        assert [len(batches) for batches in per_rank] == [12, 12]
    assert not hasattr(reference, "generator")  # accelerate would re-seed and "synchronise" such an attribute


def test_resume_mid_epoch_on_two_ranks_continues_the_same_order():
    data = tagged([30, 70, 12])
    factory = partial(BalancedConcatSampler, data, seed=3, num_samples=96)
    uninterrupted = rank_loaders(data, factory, num_processes=2, batch_size=4)
    for loader in uninterrupted:
        loader.set_epoch(1)
    expected = [list(loader)[5:] for loader in uninterrupted]

    # A fresh run restored from a checkpoint at epoch 1.5 (5 of 12 batches per rank done), as Trainer does it:
    # epoch callbacks, then skip_first_batches, then set_epoch on the skipping loader.
    resumed = []
    for loader in rank_loaders(data, factory, num_processes=2, batch_size=4):
        sampler = loader.batch_sampler.batch_sampler.sampler
        SamplerEpochCallback(sampler).on_epoch_begin(None, TrainerState(epoch=1 + 5 / 12), TrainerControl())
        skipping = skip_first_batches(loader, 5)
        skipping.set_epoch(1)
        resumed.append(list(skipping))
    assert resumed == expected


@pytest.mark.parametrize(("state_epoch", "expected"), [(0.0, 0), (2.0, 2), (1.5, 1), (3 + 11 / 12, 3)])
def test_epoch_callback_uses_the_epoch_about_to_run(state_epoch, expected):
    sampler = BalancedConcatSampler([5, 5])
    SamplerEpochCallback(sampler).on_epoch_begin(None, TrainerState(epoch=state_epoch), TrainerControl())
    assert sampler.epoch == expected


def test_state_dict_round_trip_restores_the_order_and_rejects_another_mixture():
    sampler = BalancedConcatSampler([40, 90, 15], seed=9)
    sampler.set_epoch(4)
    restored = BalancedConcatSampler([40, 90, 15])
    restored.load_state_dict(sampler.state_dict())
    assert (restored.seed, restored.epoch) == (9, 4)
    assert list(restored) == list(sampler)
    with pytest.raises(ValueError, match="different mixture"):
        BalancedConcatSampler([40, 90, 16]).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="different mixture"):
        BalancedConcatSampler([40, 90, 15], alpha=1.0).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        restored.load_state_dict({"seed": 1})


# ---- reporting --------------------------------------------------------------------------------------------------------
def test_dataset_index_matches_concat_dataset():
    data = tagged([3, 0, 5, 1])
    sampler = BalancedConcatSampler(data, multipliers=[1, 0, 1, 1])
    assert [sampler.dataset_index(k) for k in range(len(data))] == [data[k][0] for k in range(len(data))]
    assert sampler.dataset_index(-1) == 3
    with pytest.raises(ValueError, match="index"):
        sampler.dataset_index(9)


def test_summary_reports_target_and_realised_probabilities():
    sampler = BalancedConcatSampler([100, 400, 900], names=["okvqa", "aokvqa", "vqav2"])
    rows = sampler.summary().splitlines()
    assert "3 datasets" in rows[0] and "1400 samples/epoch" in rows[0]
    cells = {row.split()[0]: row.split() for row in rows[2:]}
    # name, size, weight, target p, realised p, per epoch, passes
    assert cells["okvqa"][1:] == ["100", "10", "0.1667", "0.1664", "233", "2.330"]
    assert cells["vqav2"][5] == "700"
    assert sum(sampler.realised_probabilities) == pytest.approx(1.0)


# ---- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(datasets=[]), ValueError, "at least one dataset"),
        (dict(datasets=[10, 0], alpha=0.0), ValueError, "size 0"),
        (dict(datasets=[10, 20], multipliers=[1.0, -1.0]), ValueError, "multipliers"),
        (dict(datasets=[10, 20], multipliers=[0.0, 0.0]), ValueError, "all dataset weights are 0"),
        (dict(datasets=[10, 20], multipliers=[1.0]), ValueError, r"one per dataset \(2\), got 1"),
        (dict(datasets=[10, 20], multipliers={"nope": 2.0}, names=["a", "b"]), ValueError,
         r"keys must be dataset names \[.a., .b.\] or indices .*got .nope."),
        (dict(datasets=[10, 20], multipliers={5: 2.0}), ValueError, "indices"),
        (dict(datasets=[10, 20], alpha=-0.5), ValueError, "alpha"),
        (dict(datasets=[10, 20], num_samples=0), ValueError, "num_samples"),
        (dict(datasets=[10, 20], num_samples=2.5), TypeError, "num_samples"),
        (dict(datasets=[10, -1]), ValueError, r"datasets\[1\]"),
        (dict(datasets="abc"), TypeError, "ConcatDataset or a list"),
        (dict(datasets=[10, 20], names=["a"]), ValueError, "names"),
        (dict(datasets=[10, 20], seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    kwargs = dict(kwargs)
    datasets = kwargs.pop("datasets")
    with pytest.raises(error, match=match):
        BalancedConcatSampler(datasets, **kwargs)


def test_set_epoch_rejects_negative_and_callback_needs_set_epoch():
    with pytest.raises(ValueError, match="epoch"):
        BalancedConcatSampler([3]).set_epoch(-1)
    with pytest.raises(TypeError, match="set_epoch"):
        SamplerEpochCallback(object())

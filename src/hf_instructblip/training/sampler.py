"""Balanced sampling over a concatenation of datasets: the paper's sqrt(size) instruction mixture.

Dataset d is drawn with probability proportional to ``min(size_d, size_cap) ** alpha * multiplier_d``
(alpha = 0.5 in the paper; 1 = plain concatenation; 0 = uniform over datasets). Every epoch draws an *exact*
number of examples from each dataset (largest-remainder rounding), interleaved in a shuffled order. Inside a
dataset the examples come from a stream of permutations that continues across epochs: no example repeats
before a full pass over its dataset.

Why a pure function of (seed, epoch): every process iterates its own copy of the sampler and accelerate hands
each rank every n-th batch of it, so the ranks agree only if the sequence never depends on process-local state
such as the global RNG; it also makes resuming (`skip_first_batches`) exact.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
from torch.utils.data import ConcatDataset, Sampler
from transformers import TrainerCallback

from ..model.validation import check_int, check_weight

# Stream tags: independent numpy streams for the interleaving and for each dataset's permutations.
_INTERLEAVE_STREAM = 0
_PERMUTATION_STREAM = 1


def _sizes_of(datasets: ConcatDataset | Sequence[int]) -> list[int]:
    """Sizes of the parts of a `ConcatDataset`, or a list of sizes checked as such."""
    if isinstance(datasets, ConcatDataset):
        return [len(part) for part in datasets.datasets]
    if isinstance(datasets, (str, bytes)) or not isinstance(datasets, Sequence):
        raise TypeError(f"datasets: expected a torch ConcatDataset or a list of dataset sizes, "
                        f"got {type(datasets).__name__}")
    if len(datasets) == 0:
        raise ValueError("datasets: expected at least one dataset, got an empty list")
    return [check_int(f"datasets[{i}] (a dataset size)", size, 0) for i, size in enumerate(datasets)]


def per_dataset(values: Sequence[float] | Mapping[str | int, float] | None, names: Sequence[str], what: str,
                default: float | None = None) -> list[float]:
    """One non-negative number per dataset, from a full list or a {name or index: value} map; datasets a map leaves
    out get `default` (None: every dataset must be given). The one reader of multipliers and stream probabilities.

    >>> per_dataset({"coco": 2.0}, ["vqa", "coco"], "multipliers", default=1.0)
    [1.0, 2.0]
    """
    count = len(names)
    if values is None:
        values = {}
    if isinstance(values, Mapping):
        resolved: list[float | None] = [default] * count
        for key, value in values.items():
            if isinstance(key, str) and key in names:
                position = names.index(key)
            elif isinstance(key, (int, np.integer)) and not isinstance(key, bool) and -count <= key < count:
                position = int(key) % count
            else:
                raise ValueError(f"{what}: keys must be dataset names {list(names)} or indices in [0, {count}), "
                                 f"got {key!r}")
            resolved[position] = check_weight(f"{what}[{key!r}]", value)
        if None in resolved:
            raise ValueError(f"{what}: expected one per dataset {list(names)}, got keys {list(values)}")
        return resolved
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{what}: expected a list or a {{name: value}} dict, got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{what}: expected one per dataset ({count}), got {len(values)}")
    return [check_weight(f"{what}[{i}]", value) for i, value in enumerate(values)]


def mixture_weights(
    sizes: Sequence[int], alpha: float = 0.5, multipliers: Sequence[float] | Mapping[str | int, float] | None = None,
    size_cap: int | None = None, names: Sequence[str] | None = None,
) -> list[float]:
    """Unnormalised weights ``min(size, size_cap) ** alpha * multiplier``, validated.

    >>> mixture_weights([100, 400, 900])
    [10.0, 20.0, 30.0]
    """
    names = list(names) if names is not None else [f"dataset_{i}" for i in range(len(sizes))]
    alpha = check_weight("alpha", alpha)
    if size_cap is not None:
        size_cap = check_int("size_cap", size_cap, 1)
    factors = per_dataset(multipliers, names, "multipliers", default=1.0)
    weights = []
    for name, size, factor in zip(names, sizes, factors):
        effective = min(size, size_cap) if size_cap is not None else size
        weight = float(effective) ** alpha * factor  # 0 ** 0 == 1: alpha = 0 weighs an empty dataset too
        if size == 0 and weight > 0:
            raise ValueError(f"datasets: {name!r} has size 0 but weight {weight:g} (alpha={alpha:g}, "
                             f"multiplier={factor:g}); give it multiplier 0 or remove it")
        weights.append(weight)
    if not any(weights):
        raise ValueError(f"weights: all dataset weights are 0 (sizes={list(sizes)}, multipliers={factors})")
    return weights


def largest_remainder_counts(weights: Sequence[float], total: int) -> list[int]:
    """Split `total` into integers proportional to `weights` (Hamilton's method), in exact rational arithmetic so
    the split never depends on float rounding; ties go to the lower index.

    >>> largest_remainder_counts([1.0, 1.0, 1.0], 10)
    [4, 3, 3]
    """
    exact = [Fraction(w) for w in weights]
    norm = sum(exact)
    quotas = [w * total / norm for w in exact]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda d: (-(quotas[d] - counts[d]), d))
    for d in by_remainder[: total - sum(counts)]:
        counts[d] += 1
    return counts


def _as_ints(indices: np.ndarray, chunk: int = 1 << 16) -> Iterator[int]:
    """Python ints from an index array, a chunk at a time (a list of 10^7 ints would cost ~400 MB)."""
    for start in range(0, len(indices), chunk):
        yield from indices[start : start + chunk].tolist()


class BalancedConcatSampler(Sampler[int]):
    """Samples indices of a `ConcatDataset` with per-dataset probabilities ``size ** alpha * multiplier``.

    The order of an epoch is a pure function of ``(seed, epoch)``; ``set_epoch`` selects the epoch (with a plain
    `Trainer`, pass ``SamplerEpochCallback`` too; `InstructBlipTrainer` adds it). For no duplicated samples
    across ranks, make ``num_samples`` a multiple of the global batch size (accelerate pads the last batch
    by cycling from the start otherwise).

    Example:
        >>> from torch.utils.data import ConcatDataset
        >>> data = ConcatDataset([list(range(100)), list(range(400)), list(range(900))])
        >>> sampler = BalancedConcatSampler(data, names=["a", "b", "c"], seed=0)  # alpha = 0.5: sqrt(size)
        >>> sampler.counts  # per epoch, exact: 1400 * (10, 20, 30) / 60 with largest-remainder rounding
        (233, 467, 700)
        >>> sampler.set_epoch(1)  # Trainer and accelerate call it every epoch
    """

    def __init__(
        self, datasets: ConcatDataset | Sequence[int], *, alpha: float = 0.5,
        multipliers: Sequence[float] | Mapping[str | int, float] | None = None, size_cap: int | None = None,
        num_samples: int | None = None, names: Sequence[str] | None = None, seed: int = 0,
    ) -> None:
        sizes = _sizes_of(datasets)
        if names is None:
            names = [f"dataset_{i}" for i in range(len(sizes))]
        elif isinstance(names, str) or len(names) != len(sizes) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"names: expected {len(sizes)} strings (one per dataset), got {names!r}")
        elif len(set(names)) != len(names):
            raise ValueError(f"names: expected distinct dataset names, got {list(names)}")
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.names: tuple[str, ...] = tuple(names)
        self.alpha = check_weight("alpha", alpha)
        self.weights: tuple[float, ...] = tuple(mixture_weights(sizes, alpha, multipliers, size_cap, names))
        self.num_samples = sum(sizes) if num_samples is None else check_int("num_samples", num_samples, 1)
        self.counts: tuple[int, ...] = tuple(largest_remainder_counts(self.weights, self.num_samples))
        self._offsets = [0, *np.cumsum(sizes).tolist()]  # ConcatDataset index of each dataset's first example
        self.seed = check_int("seed", seed, 0)
        self.epoch = 0

    # ---- the Sampler protocol ----
    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return _as_ints(self.epoch_indices(self.epoch))  # the order is fixed when iteration starts

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields (called by Trainer / accelerate each epoch)."""
        self.epoch = check_int("epoch", epoch, 0)

    # ---- the sequence ----
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The global ConcatDataset indices of `epoch`, ``[num_samples]``; a pure function of (seed, epoch)."""
        epoch = check_int("epoch", epoch, 0)
        rng = np.random.default_rng([self.seed, _INTERLEAVE_STREAM, epoch])
        owner = rng.permutation(np.repeat(np.arange(len(self.sizes)), self.counts))  # [N] dataset of each slot
        indices = np.empty(self.num_samples, dtype=np.int64)
        for d, count in enumerate(self.counts):
            if count:
                # Epoch e continues dataset d's permutation stream where epoch e - 1 stopped.
                indices[owner == d] = self._offsets[d] + self._stream(d, epoch * count, count)
        return indices

    def _stream(self, d: int, start: int, count: int) -> np.ndarray:
        """Positions [start, start + count) of dataset d's endless chain of fresh permutations, ``[count]``."""
        size = self.sizes[d]
        first, last = start // size, (start + count - 1) // size
        chain = np.concatenate([
            np.random.default_rng([self.seed, _PERMUTATION_STREAM, d, k]).permutation(size)
            for k in range(first, last + 1)
        ])
        begin = start - first * size
        return chain[begin : begin + count]

    def dataset_index(self, index: int) -> int:
        """Which dataset a ConcatDataset index belongs to (for per-dataset logging)."""
        total = self._offsets[-1]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -total <= index < total:
            raise ValueError(f"index: expected an int in [{-total}, {total}), got {index!r}")
        return bisect.bisect_right(self._offsets, int(index) % total) - 1

    # ---- reporting ----
    @property
    def probabilities(self) -> tuple[float, ...]:
        """Target probability of each dataset (normalised weights)."""
        norm = sum(self.weights)
        return tuple(w / norm for w in self.weights)

    @property
    def realised_probabilities(self) -> tuple[float, ...]:
        """Share of each dataset in an epoch after exact rounding: ``counts / num_samples``."""
        return tuple(c / self.num_samples for c in self.counts)

    def summary(self) -> str:
        """A table of sizes, weights, target and realised probabilities, per-epoch counts and passes."""
        width = max(8, *(len(n) for n in self.names))
        lines = [
            f"BalancedConcatSampler: {len(self.sizes)} datasets, {self.num_samples} samples/epoch, "
            f"alpha={self.alpha:g}, seed={self.seed}",
            f"{'dataset':<{width}} {'size':>9} {'weight':>10} {'target p':>9} {'realised p':>10} "
            f"{'per epoch':>9} {'passes':>7}",
        ]
        rows = zip(self.names, self.sizes, self.weights, self.probabilities, self.realised_probabilities, self.counts)
        for name, size, weight, target, realised, count in rows:
            passes = f"{count / size:7.3f}" if size else f"{'-':>7}"
            lines.append(f"{name:<{width}} {size:>9} {weight:>10.4g} {target:>9.4f} {realised:>10.4f} "
                         f"{count:>9} {passes}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"BalancedConcatSampler(names={list(self.names)}, counts={list(self.counts)}, "
                f"num_samples={self.num_samples}, seed={self.seed}, epoch={self.epoch})")

    # ---- checkpointing ----
    def state_dict(self) -> dict[str, Any]:
        """What fixes the sequence: seed and epoch, plus sizes and counts to detect a changed mixture."""
        return {"seed": self.seed, "epoch": self.epoch, "num_samples": self.num_samples,
                "sizes": list(self.sizes), "counts": list(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore seed and epoch; refuse a state saved for a different mixture (sizes, weights, length)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict from BalancedConcatSampler.state_dict(), got {type(state).__name__}")
        missing = {"seed", "epoch", "num_samples", "sizes", "counts"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        for key, ours in (("sizes", list(self.sizes)), ("counts", list(self.counts)),
                          ("num_samples", self.num_samples)):
            if state[key] != ours:
                raise ValueError(f"state: saved for a different mixture: {key} {state[key]} != this sampler's {ours}")
        self.seed = check_int("state['seed']", state["seed"], 0)
        self.set_epoch(state["epoch"])


class SamplerEpochCallback(TrainerCallback):
    """Sets a sampler's epoch from `Trainer`'s state at the start of every epoch, resumed ones included.

    Why: on several processes, a mid-epoch resume wraps the sharded batch sampler in accelerate's
    `SkipBatchSampler`, whose `set_epoch` no longer reaches the sampler, which would replay epoch 0's order.
    At `on_epoch_begin`, ``int(state.epoch)`` is the epoch about to run, fresh or restored from a checkpoint.

    Example:
        >>> sampler = BalancedConcatSampler([10, 20])
        >>> callback = SamplerEpochCallback(sampler)  # Trainer(..., callbacks=[callback])
    """

    def __init__(self, sampler: Any) -> None:
        if not callable(getattr(sampler, "set_epoch", None)):
            raise TypeError(f"sampler: expected an object with set_epoch(epoch), got {type(sampler).__name__}")
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))
        return control

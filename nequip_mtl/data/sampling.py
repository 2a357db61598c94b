"""The sampling laws of several training datasets, in pure torch (no Lightning, no nequip).

:class:`MultiDatasetSampler` yields indices into the concatenation of ``k`` datasets of
sizes ``n_1 .. n_k`` (dataset ``i`` occupies ``[o_i, o_i + n_i)``, ``o_i = n_1 + .. + n_{i-1}``).
It is the index sampler of one training ``DataLoader`` (``batch_size`` = per-rank batch,
``drop_last=True``). Used by :class:`nequip_mtl.data.MultiDatasetDataModule`; its YAML is the
data module's ``sampling:`` block, for example::

    sampling:
      mode: balanced                      # proportional | weights | temperature | balanced
      frames_per_batch: {pretrain: 2, new: 2}

**Laws.** Write ``B`` for the per-rank batch size, ``W`` for the number of ranks and
``G = W * B`` for the global batch.

- ``proportional``: dataset ``i`` gets the share ``p_i = n_i / N`` (``N = sum n_i``) of the frames:
  plain concatenation. With the default epoch of ``N`` frames, an epoch is a uniformly random
  permutation of all frames (when ``G`` divides ``N``; otherwise see epoch length).
- ``weights``: ``p_i = w_i / sum w`` for explicit positive ``weights: {name: w_i}``; a small
  dataset with a large weight is upsampled.
- ``temperature``: ``p_i = n_i^(1/T) / sum_j n_j^(1/T)`` (``temperature: T > 0``; ``T = 1`` is
  proportional, large ``T`` tends to uniform).
- ``balanced``: every per-rank batch holds exactly ``frames_per_batch[i] = b_i`` frames of dataset
  ``i`` (``B = sum b_i``), stored as contiguous blocks in dataset order.

In the three *mixture* laws an epoch of ``L`` frames holds exactly ``m_i`` frames of dataset ``i``,
the largest-remainder rounding of ``p_i L`` (so ``|m_i - p_i L| < 1`` and ``sum m_i = L``), in
uniformly random positions. The per-batch count of dataset ``i`` is then hypergeometric with mean
``B m_i / L``.

**Epoch length.** An epoch is ``batches_per_epoch`` batches on every rank. Unless given, it is
``ceil(frames_per_epoch / G)`` in the mixture laws (``frames_per_epoch`` defaults to ``N``), and
``max_i ceil(n_i / (W b_i))`` in ``balanced`` (every frame of every dataset seen at least once).
So ``L = batches_per_epoch * G``: the epoch is rounded up to whole global batches.

**Which frames.** Each dataset is read in passes: pass ``q`` of dataset ``i`` is a permutation of
its frames drawn from ``(seed, i, q)``; the frames a dataset gives are consecutive positions of the
endless sequence of its passes, continuing across epochs (as nequip's ``PartialSampler``). So an
upsampled dataset shows every frame once before it repeats any, and everything is a function of
``(seed, epoch)`` only, which makes restarts and ranks exact without stored random state. A batch
that straddles two passes can hold a frame twice.

**Ranks.** Every rank computes the same global epoch; global batch ``t`` is split in ``W`` disjoint
per-rank batches (in ``balanced``, each dataset's ``W b_i`` frames of the global batch are split in
``W`` chunks of ``b_i``). The union of the ranks' batches is the batch one process with ``W``
times the batch size (or the ``b_i``) draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data.distributed import DistributedSampler

MODES = ("proportional", "weights", "temperature", "balanced")
#: keys allowed in a ``sampling:`` block, by mode (``mode``, ``batches_per_epoch`` everywhere)
MODE_KEYS = {
    "proportional": {"frames_per_epoch"},
    "weights": {"weights", "frames_per_epoch"},
    "temperature": {"temperature", "frames_per_epoch"},
    "balanced": {"frames_per_batch"},
}
COMMON_KEYS = {"mode", "batches_per_epoch"}

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _stream_seed(seed: int, dataset: int, tag: int) -> int:
    """A seed for pass/epoch ``tag`` of ``dataset`` (``dataset = -1``: the slot shuffles)."""
    h = (seed * _MIX[0] + (dataset + 2) * _MIX[1] + (tag + 1) * _MIX[2]) % (1 << 64)
    h ^= h >> 31
    return h % (1 << 63)


def largest_remainder(probabilities: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to ``total`` with ``|count_i - p_i total| < 1`` (Hamilton's method;
    ties go to the lower index)."""
    quotas = [p * total for p in probabilities]
    counts = [math.floor(q) for q in quotas]
    rest = total - sum(counts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def cycled_indices(n: int, start: int, count: int, seed: int, dataset: int) -> torch.Tensor:
    """Positions ``[start, start + count)`` of the endless sequence of passes over ``range(n)``,
    pass ``q`` being the permutation drawn from ``(seed, dataset, q)``."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    first, last = start // n, (start + count - 1) // n
    passes = []
    for q in range(first, last + 1):
        g = torch.Generator().manual_seed(_stream_seed(seed, dataset, q))
        passes.append(torch.randperm(n, generator=g))
    offset = start - first * n
    return torch.cat(passes)[offset : offset + count]


def mixture_probabilities(
    mode: str,
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
    temperature: float | None = None,
) -> list[float]:
    """``p_i`` of a mixture law (see the module docstring)."""
    if mode == "proportional":
        raw = [float(n) for n in sizes]
    elif mode == "weights":
        raw = [float(w) for w in weights]
    elif mode == "temperature":
        raw = [float(n) ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(f"`{mode}` is not a mixture mode: use one of {MODES[:3]}")
    total = sum(raw)
    return [r / total for r in raw]


def check_sampling(sampling: Mapping, names: Sequence[str], where: str = "sampling") -> dict:
    """Validate a ``sampling:`` block against the dataset ``names``; return a plain dict.

    Raises ``ValueError`` naming ``where.<key>`` for an unknown mode or key, a weight, temperature
    or frame count that is not positive, or per-dataset keys that do not match ``names``."""
    sampling = dict(sampling or {})
    mode = sampling.get("mode", "proportional")
    if mode not in MODES:
        raise ValueError(f"`{where}.mode` is `{mode}`; allowed: {', '.join(MODES)}")
    unknown = set(sampling) - COMMON_KEYS - MODE_KEYS[mode]
    if unknown:
        allowed = sorted(COMMON_KEYS | MODE_KEYS[mode])
        raise ValueError(
            f"`{where}` has unknown key(s) {sorted(unknown)} for mode `{mode}`; allowed: {allowed}"
        )

    def positive(key: str, value, integer: bool) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (
            ok and value > 0 and math.isfinite(value) and (not integer or float(value).is_integer())
        )
        if not ok:
            kind = "a positive integer" if integer else "a positive number"
            raise ValueError(f"`{where}.{key}` must be {kind}, got {value!r}")

    def per_dataset(key: str, integer: bool) -> list:
        table = sampling.get(key)
        if not isinstance(table, Mapping):
            raise ValueError(
                f"`{where}.{key}` (mode `{mode}`) must map every dataset name to a value"
            )
        missing, extra = set(names) - set(table), set(table) - set(names)
        if missing or extra:
            raise ValueError(
                f"`{where}.{key}` must name exactly the datasets {list(names)}: "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        for name in names:
            positive(f"{key}.{name}", table[name], integer)
        return [int(table[n]) if integer else float(table[n]) for n in names]

    out = {"mode": mode}
    if mode == "weights":
        out["weights"] = per_dataset("weights", integer=False)
    elif mode == "temperature":
        if "temperature" not in sampling:
            raise ValueError(f"`{where}.temperature` is required for mode `temperature`")
        positive("temperature", sampling["temperature"], integer=False)
        out["temperature"] = float(sampling["temperature"])
    elif mode == "balanced":
        out["frames_per_batch"] = per_dataset("frames_per_batch", integer=True)
    for key in ("batches_per_epoch", "frames_per_epoch"):
        if sampling.get(key) is not None:
            positive(key, sampling[key], integer=True)
            out[key] = int(sampling[key])
    return out


class MultiDatasetSampler(DistributedSampler):
    """Indices into the concatenation of several datasets under one sampling law.

    A ``DistributedSampler`` subclass, so Lightning neither replaces it under DDP nor forgets to
    call :meth:`set_epoch`; it takes the ranks from its arguments, never from a process group.

    Args:
        sizes: the datasets' sizes ``n_i`` (all positive)
        batch_size: frames per per-rank batch (``balanced``: must equal ``sum(frames_per_batch)``
            or be ``None``)
        mode, weights, temperature, frames_per_batch, batches_per_epoch, frames_per_epoch: the
            law, as validated by :func:`check_sampling` (per-dataset values as lists)
        seed: the data seed
        num_replicas, rank: ranks ``W`` and this rank ``r``

    Example (two datasets of 40 and 10 frames, 3 + 1 frames a batch)::

        sampler = MultiDatasetSampler([40, 10], mode="balanced", frames_per_batch=[3, 1], seed=0)
        loader = DataLoader(ConcatDataset([a, b]), sampler=sampler, batch_size=4, drop_last=True)
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int | None = None,
        mode: str = "proportional",
        weights: Sequence[float] | None = None,
        temperature: float | None = None,
        frames_per_batch: Sequence[int] | None = None,
        batches_per_epoch: int | None = None,
        frames_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        # DistributedSampler.__init__ would look for a process group and a dataset: set its
        # public attributes ourselves
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"every dataset needs at least one frame, sizes are {self.sizes}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.mode = mode
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.shuffle, self.drop_last, self.dataset = True, True, None
        self.epoch = 0
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        if mode == "balanced":
            self.frames_per_batch = [int(b) for b in frames_per_batch]
            total = sum(self.frames_per_batch)
            if batch_size is not None and int(batch_size) != total:
                raise ValueError(
                    f"balanced batches hold sum(frames_per_batch) = {total} frames, "
                    f"but the batch size is {batch_size}"
                )
            self.batch_size = total
            for i, (n, b) in enumerate(zip(self.sizes, self.frames_per_batch)):
                if n < b * self.num_replicas:
                    raise ValueError(
                        f"dataset {i} has {n} training frames, fewer than the "
                        f"{b} x {self.num_replicas} rank(s) = {b * self.num_replicas} "
                        "that every balanced (global) batch takes from it"
                    )
            default = max(
                math.ceil(n / (b * self.num_replicas))
                for n, b in zip(self.sizes, self.frames_per_batch)
            )
        else:
            if batch_size is None or int(batch_size) < 1:
                raise ValueError(f"mode `{mode}` needs a positive batch size, got {batch_size}")
            self.batch_size = int(batch_size)
            self.probabilities = mixture_probabilities(mode, self.sizes, weights, temperature)
            frames = frames_per_epoch if frames_per_epoch is not None else sum(self.sizes)
            default = math.ceil(frames / (self.batch_size * self.num_replicas))
        self.num_batches = int(batches_per_epoch) if batches_per_epoch is not None else default
        self.num_samples = self.num_batches * self.batch_size
        self.total_size = self.num_samples * self.num_replicas
        if mode != "balanced":
            self.counts = largest_remainder(self.probabilities, self.total_size)
        self._resume_epoch: int | None = None
        self._resume_batch = 0

    # ------------------------------------------------------------------ the law

    def global_batches(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch`` of all ranks: ``(num_batches, num_replicas, batch_size)`` indices into
        the concatenation; ``[:, r]`` is rank ``r``'s batches."""
        nb, w, b = self.num_batches, self.num_replicas, self.batch_size
        if self.mode == "balanced":
            blocks = []
            for i, (n, k) in enumerate(zip(self.sizes, self.frames_per_batch)):
                per_epoch = nb * w * k
                idx = cycled_indices(n, epoch * per_epoch, per_epoch, self.seed, i)
                blocks.append(idx.view(nb, w, k) + self.offsets[i])
            return torch.cat(blocks, dim=-1)
        slots = torch.repeat_interleave(
            torch.arange(len(self.sizes)), torch.tensor(self.counts, dtype=torch.long)
        )
        g = torch.Generator().manual_seed(_stream_seed(self.seed, -1, epoch))
        slots = slots[torch.randperm(len(slots), generator=g)]
        stream = torch.empty(self.total_size, dtype=torch.long)
        for i, (n, m) in enumerate(zip(self.sizes, self.counts)):
            stream[slots == i] = cycled_indices(n, epoch * m, m, self.seed, i) + self.offsets[i]
        return stream.view(nb, w, b)

    def dataset_of(self, indices: torch.Tensor) -> torch.Tensor:
        """The dataset position of concatenation indices."""
        return torch.bucketize(indices, torch.tensor(self.offsets[1:]), right=True)

    # ------------------------------------------------------------------ Sampler interface

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``__iter__`` draws (Lightning calls it every epoch). A
        pending resume position is kept only for the epoch it was saved in."""
        self.epoch = int(epoch)
        if self._resume_epoch is not None and self._resume_epoch != self.epoch:
            self._resume_epoch, self._resume_batch = None, 0

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next ``__iter__`` of ``epoch`` start after its first ``batches_done``
        batches (a whole epoch done: start the next one)."""
        epoch, batches_done = int(epoch), int(batches_done)
        if batches_done >= self.num_batches:
            epoch, batches_done = epoch + 1, 0
        self.epoch = epoch
        self._resume_epoch, self._resume_batch = epoch, batches_done

    @property
    def start_batch(self) -> int:
        """The batch the next ``__iter__`` starts at (0 unless resumed)."""
        return self._resume_batch if self._resume_epoch == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        start = self.start_batch
        self._resume_epoch, self._resume_batch = None, 0
        mine = self.global_batches(self.epoch)[start:, self.rank]
        yield from mine.reshape(-1).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def signature(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        law = {k: getattr(self, k, None) for k in ("frames_per_batch", "counts")}
        return {
            "mode": self.mode,
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            **law,
        }

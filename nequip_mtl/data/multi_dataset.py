"""Several named training datasets as one nequip data module (one training loader)."""

from __future__ import annotations

import bisect
import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from nequip.utils.logger import RankedLogger
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..distributed import rank, world_size
from ..model.reference_fit import ENERGY_REFERENCES_STAT, fit_energy_references
from .binding import bind_dataset_names
from .datamodule import NequIPDataModule  # nequip's, plus setup-time checks of the data
from .keys import (  # registers them with nequip: (num_frames,) long fields
    DATASET_INDEX_KEY,
    FRAME_INDEX_KEY,
)
from .sampling import MultiDatasetSampler, check_sampling

logger = RankedLogger(__name__, rank_zero_only=True)

_CLS = "MultiDatasetDataModule"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_ENTRY_KEYS = ("split_dataset", "train_dataset", "val_dataset", "test_dataset")
_SPLIT_KEYS = ("train", "val", "test")
# the DataLoader arguments that the sampler owns
_SAMPLER_OWNED = ("batch_size", "shuffle", "drop_last")
_REFUSED_LOADER_KEYS = ("sampler", "batch_sampler")
_DEFAULT_LOADER = "torch.utils.data.DataLoader"


class TaggedDataset(torch.utils.data.Dataset):
    """A dataset whose frames carry ``dataset_index`` (:data:`~nequip_mtl.data.keys.DATASET_INDEX_KEY`)
    and their position in it, ``frame_index`` (:data:`~nequip_mtl.data.keys.FRAME_INDEX_KEY`):
    ``(1,)`` long tensors per frame, ``(num_frames,)`` in a batch."""

    def __init__(self, dataset: torch.utils.data.Dataset, index: int) -> None:
        self.dataset, self.index = dataset, int(index)

    def __len__(self) -> int:
        return len(self.dataset)

    def _tag(self, frame: dict, position: int) -> dict:
        frame = dict(frame)
        frame[DATASET_INDEX_KEY] = torch.tensor([self.index], dtype=torch.long)
        frame[FRAME_INDEX_KEY] = torch.tensor([int(position)], dtype=torch.long)
        return frame

    def __getitem__(self, i):
        return self._tag(self.dataset[i], range(len(self))[i])  # a negative i: its position

    def __getitems__(self, indices):
        if hasattr(self.dataset, "__getitems__"):
            frames = self.dataset.__getitems__(indices)
            return [self._tag(f, i) for f, i in zip(frames, indices)]
        return [self[i] for i in indices]


class _ConcatDataset(torch.utils.data.Dataset):
    """Concatenation that fetches a batch's frames dataset by dataset (``__getitems__``)."""

    def __init__(self, datasets: list) -> None:
        self.datasets = datasets
        self.ends = []
        for d in datasets:
            self.ends.append((self.ends[-1] if self.ends else 0) + len(d))

    def __len__(self) -> int:
        return self.ends[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        d = bisect.bisect_right(self.ends, i)
        return d, i - (self.ends[d - 1] if d else 0)

    def __getitem__(self, i):
        d, j = self._locate(int(i))
        return self.datasets[d][j]

    def __getitems__(self, indices):
        located = [self._locate(int(i)) for i in indices]
        out: list = [None] * len(located)
        for d, dataset in enumerate(self.datasets):
            pos = [k for k, (dd, _) in enumerate(located) if dd == d]
            if pos:
                frames = dataset.__getitems__([located[k][1] for k in pos])
                for k, f in zip(pos, frames):
                    out[k] = f
        return out


class ResumableDataLoader(torch.utils.data.DataLoader):
    """The training ``DataLoader`` of :class:`MultiDatasetDataModule`: its ``sampler`` is a
    :class:`~nequip_mtl.data.sampling.MultiDatasetSampler`, and it counts the batches it has
    handed out this epoch, so that ``state_dict()`` (saved by Lightning's fit loop and by nequip's
    data module in every checkpoint) lets a resumed run see exactly the remaining batches."""

    def __iter__(self):
        sampler: MultiDatasetSampler = self.sampler
        self._epoch, self._done = sampler.epoch, sampler.start_batch
        for batch in super().__iter__():
            self._done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: MultiDatasetSampler = self.sampler
        if getattr(self, "_epoch", None) is None:  # no epoch started yet
            return {"epoch": sampler.epoch, "batches_done": sampler.start_batch}
        return {
            "epoch": self._epoch,
            "batches_done": self._done,
            "signature": sampler.signature(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        sampler: MultiDatasetSampler = self.sampler
        saved = state_dict.get("signature")
        done = int(state_dict["batches_done"])
        if saved is not None and saved != sampler.signature() and 0 < done < sampler.num_batches:
            raise ValueError(
                f"{_CLS}: the checkpoint stopped mid-epoch under another sampling setup "
                f"({saved}) than this run's ({sampler.signature()}); the remaining batches of "
                "that epoch cannot be reproduced. Resume with the same datasets, sampling, batch "
                "size and number of ranks, or from an end-of-epoch checkpoint."
            )
        sampler.resume(state_dict["epoch"], done)


def _to_container(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)


def _split_configs(split: dict, seed: int, where: str) -> dict[str, dict]:
    """The train/val/test dataset configs of one ``split_dataset`` entry, as nequip's
    ``NequIPDataModule`` builds them (``RandomSplitAndIndexDataset`` with the data seed)."""
    split = dict(split)
    if "dataset" not in split:
        raise ValueError(f"`{where}.split_dataset` needs a `dataset` key")
    dataset = split.pop("dataset")
    unknown = set(split) - set(_SPLIT_KEYS)
    if unknown or "train" not in split:
        raise ValueError(
            f"`{where}.split_dataset` must have `train` and may have `val`, `test` "
            f"(besides `dataset`); got {sorted(split)}"
        )
    return {
        key: {
            "_target_": "nequip.data.dataset.RandomSplitAndIndexDataset",
            "dataset": dataset,
            "split_dict": split,
            "dataset_key": key,
            "seed": seed,
        }
        for key in split
    }


def _example_frames_only() -> bool:
    """Whether nequip's ``nequip-package`` or ``nequip-compile`` is running: they rebuild the
    data module from a checkpoint only to take example frames from its training loader."""
    from nequip.scripts._workflow_utils import get_workflow_state

    return get_workflow_state() in ("package", "compile")


class _Statistics(dict):
    """nequip's statistics dict, plus entries computed only when looked up (nequip's
    ``training_data_stats`` resolver calls ``.get(name)``)."""

    def __init__(self, stats: Mapping, lazy: dict) -> None:
        super().__init__(stats)
        self._lazy = lazy

    def __missing__(self, key):
        if key not in self._lazy:
            raise KeyError(key)
        self[key] = value = self._lazy[key]()
        return value

    def get(self, key, default=None):
        if key in self or key in self._lazy:
            return self[key]
        return default


class MultiDatasetDataModule(NequIPDataModule):
    """Several named training datasets as one training loader, one val/test loader each.

    nequip's ``NequIPLightningModule`` trains on one training loader: this data module presents
    all training datasets as that one loader, drawn by a :class:`~nequip_mtl.data.sampling.MultiDatasetSampler`
    (proportional, explicit weights, temperature or balanced batches; DDP-aware; resumed exactly,
    mid-epoch too). Every frame carries its dataset's position in ``datasets`` as the per-frame
    long field ``dataset_index`` (:data:`nequip_mtl.data.keys.DATASET_INDEX_KEY`).

    Each dataset is either a dataset config (all of it trains), a ``split_dataset`` entry (like
    nequip's: ``dataset`` plus ``train`` and optional ``val``/``test`` sizes or fractions, split
    with ``seed``), or explicit ``train_dataset`` / ``val_dataset`` / ``test_dataset`` configs.
    The validation and test loaders are those of the datasets that have the split, in dataset
    order; nequip logs loader ``j`` as ``val{j}_epoch/...``: :attr:`val_dataloader_names` /
    :attr:`test_dataloader_names` give the dataset of each (also logged at setup), and the
    :class:`~nequip_mtl.train.callbacks.DatasetMetricNames` callback logs the same metrics by dataset name.

    Data statistics (``stats_manager``, used for ``training_data_stats`` in the model config) are
    computed exactly as nequip computes them, on the training split of the *primary* dataset
    alone (``primary:``, default the first).

    Args:
        seed: data seed (splits and sampling)
        datasets: ``{name: entry}`` in order, or a list of entries each with a ``name``
        sampling: the sampling law (see :mod:`nequip_mtl.data.sampling`); default proportional
        primary: the dataset the statistics are computed on (default: the first)
        train_dataloader, val_dataloader, test_dataloader, stats_manager: as in nequip; the
            training loader's ``batch_size`` is the per-rank batch (``balanced``: omit it, or give
            ``sum(frames_per_batch)``); ``shuffle`` and ``drop_last`` are the sampler's.

    Example::

        data:
          _target_: nequip_mtl.data.MultiDatasetDataModule
          seed: 456
          datasets:
            pretrain:
              split_dataset:
                dataset: {_target_: nequip.data.dataset.ASEDataset, file_path: pretrain.xyz,
                          transforms: [...]}
                train: 0.8
                val: 0.1
                test: 0.1
            new:
              split_dataset: {dataset: {...}, train: 40, val: 10}
          sampling: {mode: balanced, frames_per_batch: {pretrain: 2, new: 2}}
          train_dataloader: {_target_: torch.utils.data.DataLoader, num_workers: 0}
          val_dataloader: {_target_: torch.utils.data.DataLoader, batch_size: 8}
          stats_manager: {_target_: nequip.data.CommonDataStatisticsManager, type_names: [Cu]}
    """

    def __init__(
        self,
        seed: int,
        datasets: Mapping | list,
        sampling: Mapping | None = None,
        primary: str | None = None,
        train_dataloader: Mapping | None = None,
        val_dataloader: Mapping | None = None,
        test_dataloader: Mapping | None = None,
        stats_manager: Mapping | None = None,
    ) -> None:
        entries = self._named_entries(_to_container(datasets))
        self.dataset_names = [name for name, _ in entries]
        self.sampling = check_sampling(
            _to_container(sampling) or {}, self.dataset_names, where="data.sampling"
        )
        if primary is None:
            primary = self.dataset_names[0]
        if primary not in self.dataset_names:
            raise ValueError(
                f"{_CLS}: `data.primary` is `{primary}`, not one of the datasets "
                f"{self.dataset_names}"
            )
        self.primary = primary

        splits = {"train": [], "val": [], "test": []}
        self._split_owner = {"train": [], "val": [], "test": []}
        origins = {"train": [], "val": [], "test": [], "predict": []}
        for index, (name, entry) in enumerate(entries):
            for key, config in self._entry_configs(name, entry, seed).items():
                splits[key].append(config)
                self._split_owner[key].append(index)
                origins[key].append((self._entry_key(name, entry, key), f"dataset `{name}`"))

        loader = _to_container(train_dataloader) or {}
        for key in _REFUSED_LOADER_KEYS:
            if key in loader:
                raise ValueError(
                    f"{_CLS}: `data.train_dataloader.{key}` is set, but the sampler is the data "
                    "module's own: describe the law in `data.sampling` instead"
                )
        target = loader.get("_target_", _DEFAULT_LOADER)
        if target not in (_DEFAULT_LOADER, "torch.utils.data.dataloader.DataLoader"):
            raise ValueError(
                f"{_CLS}: `data.train_dataloader._target_` is `{target}`; only "
                f"`{_DEFAULT_LOADER}` is allowed (the training loader must count its batches "
                "to resume mid-epoch)"
            )
        if self.sampling["mode"] != "balanced" and "batch_size" not in loader:
            raise ValueError(
                f"{_CLS}: `data.train_dataloader.batch_size` is required for sampling mode "
                f"`{self.sampling['mode']}` (only `balanced` derives it from `frames_per_batch`)"
            )
        if (
            self.sampling["mode"] == "balanced"
            and "batch_size" in loader
            and not _example_frames_only()
        ):
            total = sum(self.sampling["frames_per_batch"])
            if loader["batch_size"] != total:
                raise ValueError(
                    f"{_CLS}: `data.train_dataloader.batch_size` is {loader['batch_size']}, but "
                    f"balanced batches hold sum(data.sampling.frames_per_batch) = {total} frames; "
                    "omit the batch size or make them agree"
                )

        super().__init__(
            seed=seed,
            train_dataset=splits["train"],
            val_dataset=splits["val"],
            test_dataset=splits["test"],
            train_dataloader=loader,
            val_dataloader=_to_container(val_dataloader) or {},
            test_dataloader=_to_container(test_dataloader) or {},
            stats_manager=_to_container(stats_manager),
        )
        # nequip's lightning module takes exactly one training loader: ours
        self.num_datasets["train"] = 1
        # where each dataset config is in `data.datasets`, for the setup-time checks
        self.dataset_origins = origins
        logger.info(self.describe())

    # ------------------------------------------------------------------ config parsing

    @staticmethod
    def _named_entries(datasets) -> list[tuple[str, dict]]:
        if isinstance(datasets, Mapping):
            pairs = list(datasets.items())
        elif isinstance(datasets, list):
            pairs = []
            for k, entry in enumerate(datasets):
                if not isinstance(entry, Mapping) or "name" not in entry:
                    raise ValueError(
                        f"{_CLS}: `data.datasets[{k}]` needs a `name` (a list of datasets is a "
                        "list of entries `{name: ..., split_dataset: ...}`)"
                    )
                entry = dict(entry)
                pairs.append((entry.pop("name"), entry))
        else:
            raise ValueError(
                f"{_CLS}: `data.datasets` must map names to dataset entries, got "
                f"{type(datasets).__name__}"
            )
        if not pairs:
            raise ValueError(f"{_CLS}: `data.datasets` is empty: give at least one dataset")
        seen = set()
        for name, _ in pairs:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(
                    f"{_CLS}: dataset name {name!r} in `data.datasets` is not allowed: names are "
                    "non-empty and made of letters, digits, `_` and `-` (they name metrics)"
                )
            if name in seen:
                raise ValueError(f"{_CLS}: dataset name `{name}` appears twice in `data.datasets`")
            seen.add(name)
        return pairs

    @staticmethod
    def _entry_configs(name: str, entry, seed: int) -> dict[str, dict]:
        where = f"data.datasets.{name}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{_CLS}: `{where}` must be a dataset config or a split entry")
        if "_target_" in entry:  # a plain dataset: all of it trains
            return {"train": dict(entry)}
        unknown = set(entry) - set(_ENTRY_KEYS)
        if unknown:
            raise ValueError(
                f"{_CLS}: `{where}` has unknown key(s) {sorted(unknown)}; an entry is a dataset "
                f"config (with `_target_`) or has keys {list(_ENTRY_KEYS)}"
            )
        if "split_dataset" in entry:
            if len(entry) > 1:
                raise ValueError(
                    f"{_CLS}: `{where}` has `split_dataset` and explicit datasets; use one or "
                    "the other"
                )
            return _split_configs(entry["split_dataset"], seed, where)
        if "train_dataset" not in entry:
            raise ValueError(f"{_CLS}: `{where}` needs `split_dataset` or `train_dataset`")
        return {
            key: dict(entry[f"{key}_dataset"]) for key in _SPLIT_KEYS if f"{key}_dataset" in entry
        }

    @staticmethod
    def _entry_key(name: str, entry: Mapping, split: str) -> str:
        """The config key of dataset ``name``'s ``split`` config (of a split entry: the
        ``split_dataset``, whose ``dataset`` is the data)."""
        where = f"data.datasets.{name}"
        if "_target_" in entry:
            return where
        if "split_dataset" in entry:
            return f"{where}.split_dataset"
        return f"{where}.{split}_dataset"

    # ------------------------------------------------------------------ names

    @property
    def val_dataloader_names(self) -> list[str]:
        """The dataset name of each validation loader (loader ``j`` logs as ``val{j}_...``)."""
        return [self.dataset_names[i] for i in self._split_owner["val"]]

    @property
    def test_dataloader_names(self) -> list[str]:
        """The dataset name of each test loader (loader ``j`` logs as ``test{j}_...``)."""
        return [self.dataset_names[i] for i in self._split_owner["test"]]

    def describe(self) -> str:
        """The datasets, the loader index map and the sampling law, as logged at setup."""
        val = ", ".join(f"val{j}={n}" for j, n in enumerate(self.val_dataloader_names))
        test = ", ".join(f"test{j}={n}" for j, n in enumerate(self.test_dataloader_names))
        return (
            f"{_CLS}: datasets {self.dataset_names} (dataset_index 0..{len(self.dataset_names) - 1}),"
            f" primary `{self.primary}` (statistics); sampling {self.sampling}; "
            f"loaders: {val or 'no val'}; {test or 'no test'}"
        )

    # ------------------------------------------------------------------ datasets and loaders

    def setup(self, stage: str) -> None:
        """"""
        super().setup(stage)
        for split in ("train", "val", "test"):
            datasets = getattr(self, f"{split}_dataset", None)
            if datasets is None or isinstance(datasets, torch.utils.data.Dataset):
                continue  # not set up in this stage
            datasets = list(datasets)  # hydra gives a ListConfig of datasets
            if datasets and not isinstance(datasets[0], TaggedDataset):
                owners = self._split_owner[split]
                datasets = [TaggedDataset(d, owners[j]) for j, d in enumerate(datasets)]
            setattr(self, f"{split}_dataset", datasets)
        if stage == "fit":
            self._check_sizes([len(d) for d in self.train_dataset])
        # the training module's dataset names (loss, metrics, references, heads) are bound to
        # these datasets by name, whatever their order; an unknown name is refused here
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is not None:
            bind_dataset_names(module, self.dataset_names)

    def _check_sizes(self, sizes: list[int]) -> None:
        for name, n in zip(self.dataset_names, sizes):
            if n < 1:
                raise ValueError(f"{_CLS}: training dataset `{name}` has no frames")
        if self.sampling["mode"] == "balanced":
            for name, n, b in zip(self.dataset_names, sizes, self.sampling["frames_per_batch"]):
                if n < b:
                    raise ValueError(
                        f"{_CLS}: training dataset `{name}` has {n} frames, fewer than the {b} "
                        f"every balanced batch takes (`data.sampling.frames_per_batch.{name}`)"
                    )

    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return world_size(), rank()

    def make_sampler(self, num_replicas: int = 1, rank: int = 0) -> MultiDatasetSampler:
        """The training sampler for ``num_replicas`` ranks (after ``setup("fit")``)."""
        config = dict(self.train_dataloader_config)
        law = {k: v for k, v in self.sampling.items()}
        try:
            return MultiDatasetSampler(
                [len(d) for d in self.train_dataset],
                batch_size=config.get("batch_size"),
                seed=self.seed,
                num_replicas=num_replicas,
                rank=rank,
                **law,
            )
        except ValueError as err:
            raise ValueError(f"{_CLS} (`data.sampling`, {self.dataset_names}): {err}") from err

    def train_dataloader(self):
        """"""
        if hasattr(self, "_train_dataloader"):
            return self._train_dataloader[0]
        if _example_frames_only():
            # nequip-package / nequip-compile take example frames from the training loader
            # with `batch_size: 1` (data_dict_from_checkpoint): give them as nequip does
            config = dict(self.train_dataloader_config)
            return self._get_dloader([_ConcatDataset(self.train_dataset)], self.generator, config)[
                0
            ]
        world, rank = self._ranks()
        sampler = self.make_sampler(world, rank)
        config = {k: v for k, v in self.train_dataloader_config.items() if k not in _SAMPLER_OWNED}
        config["_target_"] = f"{__name__}.ResumableDataLoader"
        loader = instantiate(
            config,
            dataset=_ConcatDataset(self.train_dataset),
            sampler=sampler,
            batch_size=sampler.batch_size,
            drop_last=True,
        )
        self._train_dataloader = [loader]
        self._maybe_load_dataloader_state_dict(self._train_dataloader, "train")
        return loader

    def get_statistics(self, dataset: str = "train", dataset_idx: int = 0):
        """Statistics as nequip computes them; ``train`` ones on the primary dataset's training
        split alone. The ``train`` statistics also offer ``per_dataset_energy_references``
        (:meth:`energy_references`), computed only when a config asks for it."""
        if dataset == "train":
            dataset_idx = self.dataset_names.index(self.primary)
        stats = super().get_statistics(dataset=dataset, dataset_idx=dataset_idx)
        if dataset != "train":
            return stats
        return _Statistics(stats, {ENERGY_REFERENCES_STAT: self.energy_references})

    def energy_references(self, type_names: list[str] | None = None) -> dict[str, dict]:
        """Each training dataset's per-type energy references, fitted on its own training
        split (:func:`~nequip_mtl.model.reference_fit.fit_energy_references`): the minimum-norm
        least-squares solution ``r`` of ``E_f = sum_t n_ft r_t`` over its frames ``f`` (``n_ft``
        atoms of type ``t``; the pseudo-inverse, so a composition shared by every frame, e.g.
        one molecule, gets the shortest ``r`` that fits). A type that no training frame of a
        dataset holds gets ``None`` (it cannot be fitted).

        The result, ``{dataset: {type: energy or None}}``, is the statistic
        ``per_dataset_energy_references`` for ``nequip_mtl.model.PerDatasetEnergyReferences``.

        Args:
            type_names: the model's type names (default: ``stats_manager.type_names``)
        """
        if type_names is None:
            type_names = (self.stats_manager_cfg or {}).get("type_names")
        if not type_names:
            raise ValueError(
                f"{_CLS}: `{ENERGY_REFERENCES_STAT}` needs the model's type names: set "
                "`data.stats_manager.type_names` (e.g. `${model_type_names}`)"
            )
        type_names = list(type_names)
        self.prepare_data()
        self.setup(stage="fit")
        try:
            out = fit_energy_references(zip(self.dataset_names, self.train_dataset), type_names)
        finally:
            self.teardown(stage="fit")
        for name, references in out.items():
            logger.info(f"{_CLS}: energy references of `{name}` (least squares): {references}")
        return out

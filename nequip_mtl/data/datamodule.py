"""nequip's ``NequIPDataModule`` with setup-time checks of the data that name the fix.

nequip reads the data files when a data module is set up (``nequip-train`` does it first to
compute the training statistics), and maps each atom's chemical species to a model type
only when a frame is read. A data file that is not there then surfaces as Hydra's
``InstantiationException`` with the path deep in the traceback, and a species the model has
no type for as nequip's ``KeyError: 'Got an atomic number as input for a chemical species
that was not specified in `chemical_species_to_atom_type_map`'``, with no element, file or
dataset named. :class:`NequIPDataModule` (and
:class:`~nequip_mtl.data.MultiDatasetDataModule`, a subclass) checks both in ``setup``, for
the datasets of the stage being set up, before nequip reads a frame:

- :func:`check_data_files`: every ``file_path`` of the dataset configs exists, else a
  ``FileNotFoundError`` whose first line names the path and the config key that holds it;
- :func:`check_chemical_species`: every chemical species in the frames of a dataset held in
  memory (nequip's ``ASEDataset`` and every dataset with a ``data_list``) has a type in the
  dataset's ``ChemicalSpeciesToAtomTypeMapper``, else a ``ValueError`` naming the element,
  the file, the dataset and the keys to fix (``model_type_names``,
  ``chemical_species_to_atom_type_map``). Datasets read from disk frame by frame (LMDB,
  HDF5) are not scanned: for them nequip's own error stays.

For example, ``configs/tutorial.yaml`` with ``model_type_names=[Cu,Ni]`` on its EMT alloy
file of Cu, Ni and Pd, and with a ``data_file`` that is not there:

.. code-block:: text

    ValueError: chemical species Pd (atomic number 46; in 9 of the 12 frames, the first frame 0)
    in /abs/data/alloy.xyz (`data.split_dataset`, split into train/val/test) has no model
    type: add Pd to `model_type_names` and `chemical_species_to_atom_type_map`
    The data's type mapper, `data.split_dataset.dataset.transforms[0]`, maps {Cu: Cu, Ni: Ni}
    (chemical species: model type) for the model types ['Cu', 'Ni']; ...

    FileNotFoundError: data file not found: /abs/data/alloy.xyz (config key
    `data.split_dataset.dataset.file_path`)
    It is the data of `data.split_dataset`, split into train/val/test; ...

(the first line of each is one line).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ase.data
import torch
from nequip.data.datamodule import NequIPDataModule as _NequIPDataModule
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from omegaconf import DictConfig, ListConfig, OmegaConf

_SPLITS = ("train", "val", "test", "predict")
#: the splits whose datasets nequip's ``setup(stage)`` instantiates
STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}

#: ``(config key, description)`` of one dataset config: where a user finds it
Origin = tuple[str, str]


def _as_list(value: Any) -> tuple[list, bool]:
    """``(entries, given_as_a_list)`` of a dataset argument of ``NequIPDataModule``."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, list):
        return value, True
    return [value], False


def dataset_origins(
    train_dataset: Any = [],
    val_dataset: Any = [],
    test_dataset: Any = [],
    predict_dataset: Any = [],
    split_dataset: Any = [],
) -> dict[str, list[Origin]]:
    """The config key and a description of every dataset config nequip's ``NequIPDataModule``
    builds from these arguments, per split, in its order: the explicit datasets first, then
    one per subset of each ``split_dataset`` entry."""
    origins: dict[str, list[Origin]] = {s: [] for s in _SPLITS}
    for split, given in zip(_SPLITS, (train_dataset, val_dataset, test_dataset, predict_dataset)):
        entries, many = _as_list(given)
        for i, _ in enumerate(entries):
            key = f"data.{split}_dataset" + (f"[{i}]" if many else "")
            origins[split].append((key, f"the {split} dataset `{key}`"))
    entries, many = _as_list(split_dataset)
    for k, entry in enumerate(entries):
        key = "data.split_dataset" + (f"[{k}]" if many else "")
        subsets = [s for s in entry if s != "dataset"] if isinstance(entry, Mapping) else []
        for split in subsets:
            origins[split].append((key, f"`{key}`, split into {'/'.join(subsets)}"))
    return origins


def _file_paths(config: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(config key, path)`` of every ``file_path`` in a dataset config, nested ones too."""
    if isinstance(config, Mapping):
        for k, value in config.items():
            if k == "file_path" and isinstance(value, (str, os.PathLike)):
                yield f"{key}.{k}", value
            else:
                yield from _file_paths(value, f"{key}.{k}")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            yield from _file_paths(value, f"{key}[{i}]")


def check_data_files(configs: Sequence[Any], origins: Sequence[Origin]) -> None:
    """Refuse a ``file_path`` of these dataset configs that does not exist, naming the path
    and its config key in the first line of the error."""
    for config, (key, where) in zip(configs, origins):
        for path_key, path in _file_paths(config, key):
            if os.path.exists(path):
                continue
            raise FileNotFoundError(
                f"data file not found: {path} (config key `{path_key}`)\n"
                f"It is the data of {where}; a relative path is read from the working "
                f"directory {os.getcwd()}. nequip-mtl's configs (configs/) set it from a top-level "
                "key (e.g. `data_file`) as `${hydra:runtime.cwd}/...`, relative to the "
                "directory nequip-train is launched from: launch from the directory the "
                "config's comments give, or override that key with an absolute path (e.g. "
                "`data_file=/abs/path/data.xyz`)."
            )


def _unwrap(dataset: Any, config: Any, key: str) -> tuple[Any, str]:
    """The dataset that holds the frames, under the subsets nequip's splits make
    (``torch.utils.data.Subset``), and the config key of its config."""
    while (
        isinstance(dataset, torch.utils.data.Subset)
        and isinstance(config, Mapping)
        and "dataset" in config
    ):
        dataset, config, key = dataset.dataset, config["dataset"], f"{key}.dataset"
    return dataset, key


def _symbol(z: int) -> str:
    return ase.data.chemical_symbols[z] if 0 < z < len(ase.data.chemical_symbols) else f"Z={z}"


def unmapped_species(dataset: Any) -> tuple[ChemicalSpeciesToAtomTypeMapper, int, dict] | None:
    """``(mapper, its index in the transforms, {atomic number: (frames, first frame)})``
    of the species in ``dataset``'s frames that its type mapper has no type for; ``None``
    where the dataset holds no frames in memory or maps no species."""
    transforms = list(getattr(dataset, "transforms", None) or [])
    index = next(
        (i for i, t in enumerate(transforms) if isinstance(t, ChemicalSpeciesToAtomTypeMapper)),
        None,
    )
    frames = getattr(dataset, "data_list", None)
    if index is None or not isinstance(frames, Sequence) or not frames:
        return None
    mapper = transforms[index]
    numbers = [f["atomic_numbers"].reshape(-1) for f in frames if "atomic_numbers" in f]
    if len(numbers) != len(frames):
        return None
    z = torch.cat(numbers).to(torch.long)
    frame = torch.repeat_interleave(torch.tensor([len(n) for n in numbers]))
    table = mapper.lookup_table
    known = (z >= 0) & (z < len(table))
    bad = ~known
    bad[known] = table[z[known]] < 0
    out = {}
    for atomic_number in torch.unique(z[bad]).tolist():
        where = torch.unique(frame[bad & (z == atomic_number)])
        out[atomic_number] = (len(where), int(where[0]))
    return mapper, index, out


def check_chemical_species(
    datasets: Sequence[Any], configs: Sequence[Any], origins: Sequence[Origin]
) -> None:
    """Refuse a chemical species in the frames of these datasets that their
    ``ChemicalSpeciesToAtomTypeMapper`` has no model type for, naming the element, the file,
    the dataset and the config keys to fix."""
    seen = set()
    for dataset, config, (key, where) in zip(datasets, configs, origins):
        base, base_key = _unwrap(dataset, config, key)
        file_path = getattr(base, "file_path", None)
        if (file_path, base_key) in seen:
            continue  # train/val/test of one split: the same file
        seen.add((file_path, base_key))
        found = unmapped_species(base)
        if not found or not found[2]:
            continue
        mapper, index, species = found
        table = mapper.lookup_table
        types = list(mapper.model_type_names)
        mapped = sorted((int(table[z]), z) for z in range(len(table)) if table[z] >= 0)
        mapping = ", ".join(f"{_symbol(z)}: {types[i]}" for i, z in mapped)
        symbols = ", ".join(_symbol(z) for z in species)
        each = " and ".join(
            f"{_symbol(z)} (atomic number {z}; in {n} of the {len(base)} frames, the first "
            f"frame {first})"
            for z, (n, first) in species.items()
        )
        source = file_path if file_path is not None else f"the frames of `{base_key}`"
        mapper_key = f"{base_key}.transforms[{index}]"
        raise ValueError(
            f"chemical species {each} in {source} ({where}) "
            f"{'has' if len(species) == 1 else 'have'} no model type: add {symbols} to "
            "`model_type_names` and `chemical_species_to_atom_type_map`\n"
            f"The data's type mapper, `{mapper_key}`, maps {{{mapping}}} (chemical species: "
            f"model type) for the model types {types}; nequip-mtl's configs (configs/) set both "
            "keys from the top-level `model_type_names`. Or leave those frames out of the data."
        )


class NequIPDataModule(_NequIPDataModule):
    """nequip's :class:`nequip.data.datamodule.NequIPDataModule` (same arguments, same
    behaviour) that checks, when a stage is set up, that every data file of its datasets
    exists and that every chemical species in their frames has a model type: each error
    names the file, the dataset and the config key to fix (:func:`check_data_files`,
    :func:`check_chemical_species`). ``nequip-train`` sets the data module up to compute the
    training statistics, so both are reported before the model is built.

    .. code-block:: yaml

        data:
          _target_: nequip_mtl.data.NequIPDataModule   # was nequip.data.datamodule.NequIPDataModule
          seed: 123
          split_dataset: {...}
    """

    def __init__(
        self,
        seed: int,
        train_dataset: Any = [],
        val_dataset: Any = [],
        test_dataset: Any = [],
        predict_dataset: Any = [],
        split_dataset: Any = [],
        train_dataloader: dict = {},
        val_dataloader: dict = {},
        test_dataloader: dict = {},
        predict_dataloader: dict = {},
        stats_manager: dict | None = None,
    ) -> None:
        super().__init__(
            seed=seed,
            train_dataset=train_dataset,
            val_dataset=val_dataset,
            test_dataset=test_dataset,
            predict_dataset=predict_dataset,
            split_dataset=split_dataset,
            train_dataloader=train_dataloader,
            val_dataloader=val_dataloader,
            test_dataloader=test_dataloader,
            predict_dataloader=predict_dataloader,
            stats_manager=stats_manager,
        )
        #: ``{split: [(config key, description)]}``, parallel to ``{split}_dataset_config``
        self.dataset_origins = dataset_origins(
            train_dataset, val_dataset, test_dataset, predict_dataset, split_dataset
        )

    def _origins(self, split: str) -> list[Origin]:
        configs = getattr(self, f"{split}_dataset_config")
        origins = getattr(self, "dataset_origins", {}).get(split, [])
        if len(origins) != len(configs):  # not built from this class's arguments
            origins = [
                (f"data ({split} dataset {j})", f"{split} dataset {j}") for j in range(len(configs))
            ]
        return origins

    def setup(self, stage: str) -> None:
        """"""
        splits = STAGE_SPLITS.get(stage, ())
        for split in splits:
            check_data_files(getattr(self, f"{split}_dataset_config"), self._origins(split))
        super().setup(stage)
        for split in splits:
            datasets = getattr(self, f"{split}_dataset", None)
            if datasets is None or isinstance(datasets, torch.utils.data.Dataset):
                continue
            check_chemical_species(
                list(datasets), getattr(self, f"{split}_dataset_config"), self._origins(split)
            )

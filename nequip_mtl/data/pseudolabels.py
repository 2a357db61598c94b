"""Replay without the original labels: structures labelled by the pretrained model itself.

A foundation model's user rarely holds its training data labelled at its level of theory.
Replaying *pseudolabels* (the pretrained model's own energies, forces and stresses on a
sample of structures like those it was trained on, or on the user's structures rattled)
keeps the fine-tuned model close to the pretrained one where the new data says nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from nequip.data import AtomicDataDict
from nequip.data.dataset import AtomicDataset

from ..distributed import rank, several_ranks

_WHO = "PseudolabelledDataset"
_ENERGY, _FORCES, _STRESS = (
    AtomicDataDict.TOTAL_ENERGY_KEY,
    AtomicDataDict.FORCE_KEY,
    AtomicDataDict.STRESS_KEY,
)


def _has_cell(frame: AtomicDataDict.Type) -> bool:
    pbc = frame.get(AtomicDataDict.PBC_KEY)
    return AtomicDataDict.CELL_KEY in frame and pbc is not None and bool(pbc.all())


def _type_mapper_names(dataset: Any) -> list[str] | None:
    """The ``model_type_names`` of the dataset's species-to-type mapper, if it has one."""
    for transform in getattr(dataset, "transforms", None) or []:
        names = getattr(transform, "model_type_names", None)
        if names is not None:
            return [str(n) for n in names]
    return None


def load_pretrained(model: str) -> torch.nn.Module:
    """The eager model of a ``.nequip.zip`` package or a ``.ckpt`` checkpoint."""
    from nequip.model.saved_models.load_utils import load_saved_model

    return load_saved_model(str(model), compile_mode="eager")


def _fingerprint(model: str, frames: Sequence[AtomicDataDict.Type], fields: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(Path(model).read_bytes())
    digest.update(" ".join(fields).encode())
    for frame in frames:
        for key in (
            AtomicDataDict.POSITIONS_KEY,
            AtomicDataDict.ATOM_TYPE_KEY,
            AtomicDataDict.CELL_KEY,
        ):
            if key in frame:
                digest.update(frame[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class PseudolabelledDataset(AtomicDataset):
    """The frames of ``dataset`` labelled by a pretrained model (a nequip dataset).

    The labels (``total_energy``, ``forces``, and ``stress`` where every frame has a
    periodic cell) are the model's predictions, computed once when the dataset is built
    (with a progress bar) and cached in ``cache``: a later run, a restart or another rank
    reads them, and they are recomputed only if the model file, the structures or the
    fields change. Under DDP rank 0 computes them while the others wait. Use it wherever
    nequip takes a dataset config, e.g. as the replayed dataset of
    :class:`~nequip_mtl.data.MultiDatasetDataModule`:

    .. code-block:: yaml

        datasets:
          pretrain:                          # replay, labelled by the pretrained model
            split_dataset:
              dataset:
                _target_: nequip_mtl.data.PseudolabelledDataset
                model: ${pretrained}         # its .nequip.zip package (or a .ckpt)
                cache: pseudolabels.pt
                dataset:                     # the structures: any nequip dataset
                  _target_: nequip.data.dataset.ASEDataset
                  file_path: structures.xyz
                  transforms: [...]          # its type mapper must use the model's type names
              train: 0.9
              val: 0.1

    Refused when it is built: a model whose type names differ from the dataset's type
    mapper's, or structures without a periodic cell when ``stress: true``.

    Args:
        dataset: the structures (a nequip dataset; its own labels, if any, are replaced)
        model (str): the pretrained model, a ``.nequip.zip`` package or a ``.ckpt``
        cache (str, optional): file caching the labels (default: none, recompute)
        stress (bool, optional): label stresses (default: if every frame has a cell)
        batch_size (int): frames per forward pass of the labelling (default ``16``)
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        model: str,
        cache: str | None = None,
        stress: bool | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__(transforms=[])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{_WHO}.batch_size must be an integer >= 1, got {batch_size!r}")
        if not Path(model).is_file():
            raise FileNotFoundError(f"{_WHO}.model: no such file {model!r}")
        self.dataset = dataset
        self.model_path = str(model)
        frames = [dataset[i] for i in range(len(dataset))]
        cells = [_has_cell(f) for f in frames]
        if stress and not all(cells):
            raise ValueError(
                f"{_WHO}: `stress: true`, but {cells.count(False)} of {len(frames)} structures "
                "have no periodic cell (a stress needs one); set `stress: false` or give "
                "periodic structures"
            )
        self.fields = [_ENERGY, _FORCES] + (
            [_STRESS] if (all(cells) if stress is None else stress) else []
        )
        self._frames = frames
        self.labels = self._labels(cache, batch_size)

    # ------------------------------------------------------------------ labelling

    def _labels(self, cache: str | None, batch_size: int) -> dict[str, list[torch.Tensor]]:
        key = _fingerprint(self.model_path, self._frames, self.fields)
        cached = self._read(cache, key)
        if cached is not None:
            return cached
        if several_ranks() and rank() != 0 and cache is not None:
            torch.distributed.barrier()  # rank 0 computes and writes the cache
            cached = self._read(cache, key)
            if cached is None:
                raise RuntimeError(f"{_WHO}: rank 0 wrote no usable cache at {cache!r}")
            return cached
        labels = self._predict(batch_size)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{cache}.tmp{os.getpid()}"
            torch.save({"key": key, "labels": labels}, tmp)
            os.replace(tmp, cache)
        if several_ranks() and cache is not None:
            torch.distributed.barrier()
        return labels

    @staticmethod
    def _read(cache: str | None, key: str) -> dict[str, list[torch.Tensor]] | None:
        if cache is None or not Path(cache).exists():
            return None
        stored = torch.load(cache, weights_only=True)
        return stored["labels"] if stored.get("key") == key else None

    def _check_types(self, model: torch.nn.Module) -> None:
        names = [str(n) for n in getattr(model, "type_names", [])]
        mapper = _type_mapper_names(self.dataset)
        if mapper is not None and names and mapper != names:
            raise ValueError(
                f"{_WHO}: the model {self.model_path!r} has the type names {names}, but the "
                f"structures' type mapper (`dataset.transforms`) uses {mapper}: map the "
                "species to the model's type names (e.g. `model_type_names: "
                "${model_type_names_from_package:...}`)"
            )
        top = max(int(f[AtomicDataDict.ATOM_TYPE_KEY].max()) for f in self._frames)
        if names and top >= len(names):
            raise ValueError(
                f"{_WHO}: the structures have atom type {top}, but the model "
                f"{self.model_path!r} knows {len(names)} types {names}"
            )

    def _predict(self, batch_size: int) -> dict[str, list[torch.Tensor]]:
        from tqdm.auto import tqdm

        model = load_pretrained(self.model_path)
        self._check_types(model)
        model.eval()
        labels: dict[str, list[torch.Tensor]] = {f: [] for f in self.fields}
        starts = range(0, len(self._frames), batch_size)
        desc = f"pseudolabelling {len(self._frames)} structures"
        for start in tqdm(starts, desc=desc, disable=several_ranks() and rank() != 0):
            chunk = self._frames[start : start + batch_size]
            batch = AtomicDataDict.batched_from_list(
                [{k: v for k, v in f.items() if k not in self.fields} for f in chunk]
            )
            out = model(batch)
            atoms = batch[AtomicDataDict.BATCH_KEY]
            for j, frame in enumerate(chunk):
                dtype = frame[AtomicDataDict.POSITIONS_KEY].dtype
                for field in self.fields:
                    value = out[field]
                    value = value[atoms == j] if field == _FORCES else value[j : j + 1]
                    labels[field].append(value.detach().to("cpu", dtype).clone())
        return labels

    # ------------------------------------------------------------------ a nequip dataset

    def __len__(self) -> int:
        return len(self._frames)

    def _get_data_list(self, indices) -> list[AtomicDataDict.Type]:
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        out = []
        for i in indices:
            i = int(i)
            frame = dict(self._frames[i])
            frame.pop(AtomicDataDict.STRESS_KEY, None)
            frame.update({field: self.labels[field][i] for field in self.fields})
            out.append(frame)
        return out

"""The per-dataset energy reference fit: each training dataset's per-type energy zero, the
minimum-norm least-squares solution of its frames' total energies on their per-type atom
counts. :class:`~nequip_mtl.data.MultiDatasetDataModule` offers the result as the training
statistic ``per_dataset_energy_references``, which
:func:`~nequip_mtl.model.PerDatasetEnergyReferences` reads (``references:
${training_data_stats:per_dataset_energy_references}``); the transfer check
(:mod:`nequip_mtl.diagnostics.transfer`) reports what the fit leaves unexplained.

torch only (nequip's frames are dicts of tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "ENERGY_REFERENCES_STAT",
    "read_frame",
    "frame_composition_and_energy",
    "composition_and_energies",
    "least_squares_references",
    "fit_energy_references",
]

#: the name of the per-dataset energy references in the data module's ``train`` statistics
ENERGY_REFERENCES_STAT = "per_dataset_energy_references"

_WHO = "MultiDatasetDataModule"


def read_frame(dataset, i: int, type_names: Sequence[str], name: str) -> dict:
    """Frame ``i`` of ``dataset`` (the training dataset ``name``), refused clearly when a
    species is not one of the model's types."""
    try:
        return dataset[i]
    except KeyError as err:  # nequip's ChemicalSpeciesToAtomTypeMapper: unmapped species
        raise ValueError(
            f"{_WHO}: frame {i} of training dataset `{name}` could not be read ({err}): "
            "does it hold a chemical species that is not one of the model's type names "
            f"{list(type_names)}? Every species of every dataset must be a model type (in "
            "`chemical_species_to_atom_type_map` and `model_type_names`)"
        ) from err


def frame_composition_and_energy(
    frame: dict, i: int, type_names: Sequence[str], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-type atom counts ``(types,)`` and total energy ``()``, float64, of frame ``i`` of
    the training dataset ``name``."""
    num_types = len(type_names)
    if "total_energy" not in frame:
        raise ValueError(
            f"{_WHO}: frame {i} of training dataset `{name}` has no `total_energy`, so its "
            f"`{ENERGY_REFERENCES_STAT}` cannot be fitted; give them by hand"
        )
    types = frame["atom_types"].reshape(-1)
    if types.numel() and int(types.max()) >= num_types:
        raise ValueError(
            f"{_WHO}: frame {i} of training dataset `{name}` has atom type index "
            f"{int(types.max())}, beyond the {num_types} type names {list(type_names)}"
        )
    counts = torch.bincount(types, minlength=num_types).to(torch.float64)
    return counts, frame["total_energy"].reshape(()).to(torch.float64)


def composition_and_energies(dataset, type_names: Sequence[str], name: str):
    """Per-type atom counts ``(frames, types)`` and total energies ``(frames,)``, float64, of
    the frames of ``dataset`` (the training dataset ``name``)."""
    pairs = [
        frame_composition_and_energy(read_frame(dataset, i, type_names, name), i, type_names, name)
        for i in range(len(dataset))
    ]
    return torch.stack([c for c, _ in pairs]), torch.stack([e for _, e in pairs])


def least_squares_references(counts: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares ``r`` (``(types,)``) of ``energies = counts @ r``
    (the pseudo-inverse: a type no frame holds gets exactly 0)."""
    return torch.linalg.pinv(counts) @ energies


def fit_energy_references(
    datasets: Iterable[tuple[str, object]], type_names: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """``{name: {type: energy or None}}`` for each ``(name, dataset)``: the minimum-norm
    least-squares solution ``r`` of ``E_f = sum_t n_ft r_t`` over the dataset's frames ``f``
    (``n_ft`` atoms of type ``t``; the pseudo-inverse, so a composition shared by every frame,
    e.g. one molecule, gets the shortest ``r`` that fits). A type that no frame of a dataset
    holds gets ``None`` (it cannot be fitted)."""
    type_names = list(type_names)
    out = {}
    for name, dataset in datasets:
        counts, energies = composition_and_energies(dataset, type_names, name)
        fit = least_squares_references(counts, energies)
        present = counts.sum(dim=0) > 0
        out[name] = {
            t: (float(fit[j]) if bool(present[j]) else None) for j, t in enumerate(type_names)
        }
    return out

"""The transfer check: how far apart several training datasets (levels of theory) are for one
model, measured before any compute is spent on training them jointly.

Three readings, each cheap (one pass over each training split, a few forward and backward
passes of the model):

1. **each dataset on its own** (:class:`DatasetSummary`): the RMS per atom of what its per-type
   energy references leave unexplained (the minimum-norm least-squares fit of frame energy on
   per-type atom counts that :func:`~nequip_mtl.model.PerDatasetEnergyReferences` uses,
   :func:`~nequip_mtl.model.reference_fit.least_squares_references`), and the RMS of its force
   components: the size of what the model has to learn from that dataset;
2. **on structures two datasets share** (:class:`SharedStructures`: the same species and
   positions, atom by atom, to within ``tolerance``; matched by hashing positions rounded to
   that grid, then checked): the RMS difference of their energies per atom, each after its own
   dataset's references and with the mean offset removed, and of their forces, also relative
   to the force RMS of the first dataset (the high fidelity) on those frames. Most pairs of
   datasets share no structure; that is said, not computed;
3. **the datasets' loss gradients** (:class:`GradientAgreement`) at the model as given
   (untrained, or pretrained), summed over a few balanced batches (the same number of frames of
   each dataset in every batch): each dataset's training loss, grouped as the dataset tasks of
   ``tasks: datasets`` group it (:class:`~nequip_mtl.step.DatasetTasks`), back-propagated into
   the step engine's own :class:`~nequip_mtl.step.TaskGradients` rows; the cosine of every pair
   on the parameters both datasets reach (a dataset's readout head or trainable references
   left out), and on all trainable parameters: whether a step that lowers one dataset's loss
   lowers the other's, to first order.

:func:`transfer_check` computes the first two, :func:`dataset_gradients` the third; a
:class:`TransferCheck` holds them and renders the table (:meth:`TransferCheck.table`). The
``nequip-mtl-transfer-check`` command runs all three on a nequip config
(:mod:`nequip_mtl.train.transfer_check`), e.g. from the repository root:

.. code-block:: bash

    nequip-mtl-transfer-check --config-path configs --config-name multifidelity dft_train=40

Pure torch and nequip's data dicts (no Lightning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ..model.reference_fit import (
    frame_composition_and_energy,
    least_squares_references,
    read_frame,
)
from ..step.rows import TaskGradients
from ..step.tasks import DatasetTasks
from .conflict import PAIR_SEPARATOR, ConflictStatistics, conflict_statistics

__all__ = [
    "DEFAULT_TOLERANCE",
    "DatasetSummary",
    "SharedStructures",
    "GradientAgreement",
    "TransferCheck",
    "structure_key",
    "transfer_check",
    "balanced_batches",
    "dataset_gradients",
    "shared_parameter_cosines",
]

#: positions (and cells) closer than this (in the data's length unit) count as the same
DEFAULT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """One training dataset on its own.

    Attributes:
        name: the dataset
        frames: its training frames
        atoms: their atoms in all
        energy_residual_rms: RMS over frames of ``(E_f - sum_t n_ft r_t) / N_f``, with ``r``
            the dataset's least-squares per-type references (energy units of the data)
        force_rms: RMS of its force components (``None``: no force labels)
    """

    name: str
    frames: int
    atoms: int
    energy_residual_rms: float
    force_rms: float | None


@dataclasses.dataclass(frozen=True)
class SharedStructures:
    """The labels of two datasets on the structures they share.

    Attributes:
        first, second: the datasets (``first``: the one the force ratio is relative to)
        frames: the number of shared structures
        energy_offset: mean over them of ``e_first - e_second``, ``e`` the energy per atom
            after its own dataset's references (``None`` without shared structures)
        energy_difference_rms: RMS of ``e_first - e_second - energy_offset``
        force_difference_rms: RMS of ``F_first - F_second`` over the force components
            labelled in both (``None``: none are)
        force_rms: RMS of ``F_first`` over the same components
    """

    first: str
    second: str
    frames: int
    energy_offset: float | None = None
    energy_difference_rms: float | None = None
    force_difference_rms: float | None = None
    force_rms: float | None = None

    @property
    def force_ratio(self) -> float | None:
        """``force_difference_rms / force_rms``: the second dataset's forces as an error
        against the first's, relative to the first's size."""
        if self.force_difference_rms is None or not self.force_rms:
            return None
        return self.force_difference_rms / self.force_rms


@dataclasses.dataclass(frozen=True)
class GradientAgreement:
    """The datasets' loss gradients at one model, averaged over a few balanced batches.

    Attributes:
        statistics: norms and cosines of the mean gradients over all trainable parameters
            (:class:`~nequip_mtl.diagnostics.ConflictStatistics`, one row per dataset)
        shared_cosines: ``(m, m)`` their cosines over the parameters both datasets of a pair
            reach (``nan`` where they share none)
        shared_cosine_errors: ``(m, m)`` the jackknife standard error of ``shared_cosines``
            over the batches (each batch left out in turn; ``nan`` with one batch): how much
            the reading would move with other frames
        batches: the number of balanced batches
        frames_per_dataset: frames of each dataset in every batch
    """

    statistics: ConflictStatistics
    shared_cosines: torch.Tensor
    shared_cosine_errors: torch.Tensor
    batches: int
    frames_per_dataset: int

    @property
    def names(self) -> list[str]:
        return self.statistics.names

    def _pair(self, a: str, b: str) -> tuple[int, int]:
        return self.names.index(a), self.names.index(b)

    def cosine(self, a: str, b: str, shared: bool = True) -> float:
        """The cosine between datasets ``a`` and ``b``'s gradients (``shared``: on the
        parameters both reach; else on all trainable parameters)."""
        i, j = self._pair(a, b)
        return float((self.shared_cosines if shared else self.statistics.cosines)[i, j])

    def cosine_error(self, a: str, b: str) -> float:
        """The standard error of :meth:`cosine` (``shared``) over the batches."""
        i, j = self._pair(a, b)
        return float(self.shared_cosine_errors[i, j])


@dataclasses.dataclass
class TransferCheck:
    """The transfer check's readings, and their table (:meth:`table`).

    Attributes:
        datasets: one :class:`DatasetSummary` per training dataset, in dataset order
        pairs: one :class:`SharedStructures` per pair of datasets (``first`` the reference
            dataset where the pair has it)
        reference: the dataset the force ratios are relative to (the high fidelity)
        tolerance: the position tolerance of "shared"
        gradients: the gradient agreement, or ``None`` if not measured
        notes: lines printed under the table (e.g. why the gradients were not measured)
        units: ``{"energy": ..., "length": ...}`` for the header, or ``None`` (the data's)
    """

    datasets: list[DatasetSummary]
    pairs: list[SharedStructures]
    reference: str
    tolerance: float = DEFAULT_TOLERANCE
    gradients: GradientAgreement | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    units: Mapping[str, str] | None = None

    def pair(self, a: str, b: str) -> SharedStructures:
        """The shared-structure reading of datasets ``a`` and ``b`` (either order)."""
        for p in self.pairs:
            if {p.first, p.second} == {a, b}:
                return p
        raise KeyError(f"no pair of datasets {a!r} and {b!r}")

    def table(self) -> str:
        """The readings as plain text (what ``nequip-mtl-transfer-check`` prints)."""
        energy, force = "energy units of the data", "force units"
        if self.units:
            e, length = self.units.get("energy"), self.units.get("length", "Å")
            if e:
                energy, force = str(e), f"{e}/{length}"
        names = [d.name for d in self.datasets]
        lines = [
            f"Transfer check of {len(names)} training datasets: "
            + ", ".join(f"{n} (reference)" if n == self.reference else n for n in names),
            f"Energies in {energy}, forces in {force}.",
            "",
            "Each dataset on its own (training split; energies after its own least-squares "
            "per-type references):",
        ]
        rows = [
            [
                d.name,
                str(d.frames),
                _fmt(d.energy_residual_rms),
                _fmt(d.force_rms),
            ]
            for d in self.datasets
        ]
        lines += _columns(
            ["dataset", "frames", "energy residual RMS/atom", "force RMS"], rows, indent=2
        )
        lines += ["", "Between datasets:"]
        header = [
            "pair",
            "shared frames",
            "energy diff RMS/atom",
            "force diff RMS",
            "force diff / force RMS",
        ]
        if self.gradients is not None:
            header += ["gradient cosine"]
        rows = []
        for p in self.pairs:
            row = [
                f"{p.first}{PAIR_SEPARATOR}{p.second}",
                str(p.frames),
                _fmt(p.energy_difference_rms),
                _fmt(p.force_difference_rms),
                _fmt(p.force_ratio),
            ]
            if self.gradients is not None:
                cos = self.gradients.cosine(p.first, p.second)
                error = self.gradients.cosine_error(p.first, p.second)
                row.append(_fmt(cos) + ("" if math.isnan(error) else f" ± {error:.2g}"))
            rows.append(row)
        lines += _columns(header, rows, indent=2)
        lines.append("")
        if not any(p.frames for p in self.pairs):
            lines.append(
                f"No shared structures (same species and positions to within "
                f"{self.tolerance:g}) between any two datasets: the label differences are "
                "not measured."
            )
        else:
            lines.append(
                f"Shared structures: same species and positions to within {self.tolerance:g}; "
                "energy differences per atom after each dataset's references, mean offset "
                "removed; the ratio is to the force RMS of the pair's first dataset on them."
            )
        if self.gradients is not None:
            g = self.gradients
            overall = ", ".join(
                f"{p.first}{PAIR_SEPARATOR}{p.second} {_fmt(g.cosine(p.first, p.second, False))}"
                for p in self.pairs
            )
            norms = ", ".join(f"{n} {_fmt(float(v))}" for n, v in zip(g.names, g.statistics.norms))
            lines.append(
                f"Gradient cosine: of the datasets' training losses at the model as built, "
                f"mean gradients over {g.batches} batches of {g.frames_per_dataset} frames of "
                "each dataset, on the parameters both datasets reach (one dataset's readout "
                "head or references left out), ± its standard error over the batches (more "
                f"--batches lower it); on all trainable parameters: {overall}. Gradient "
                f"norms: {norms}."
            )
        lines += self.notes
        return "\n".join(lines)


# ---------------------------------------------------------------------- 1. and 2.: labels


def structure_key(frame: Mapping[str, torch.Tensor], tolerance: float) -> bytes:
    """A 16-byte digest of a frame's atom types, and positions and cell rounded to a grid of
    ``tolerance``: frames of two datasets with the same atoms, in the same order, at the same
    positions (written from the same structures) get the same key, and frames with the same
    key have the same types and positions to within ``tolerance``. Two positions closer than
    ``tolerance`` may still round apart: such a pair is missed, never mismatched."""
    digest = hashlib.blake2b(digest_size=16)
    parts = [frame["atom_types"].reshape(-1).to(torch.int64), _grid(frame["pos"], tolerance)]
    if "cell" in frame:
        parts.append(_grid(frame["cell"], tolerance))
    for part in parts:
        digest.update(part.numpy().tobytes())
        digest.update(b"|")
    return digest.digest()


def _grid(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    return torch.round(x.detach().to(torch.float64).reshape(-1) / tolerance).to(torch.int64)


@dataclasses.dataclass
class _Scan:
    """One pass over a training dataset."""

    name: str
    dataset: object
    energy_per_atom: torch.Tensor  # (frames,) after the dataset's references
    atoms: int
    force_sq: float
    force_n: int
    keys: dict[bytes, int]

    def summary(self) -> DatasetSummary:
        rms = float(self.energy_per_atom.square().mean().sqrt())
        force = math.sqrt(self.force_sq / self.force_n) if self.force_n else None
        return DatasetSummary(self.name, len(self.energy_per_atom), self.atoms, rms, force)


def _forces(frame: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    forces = frame.get("forces")
    return None if forces is None else forces.detach().to(torch.float64)


def _scan(name: str, dataset, type_names: Sequence[str], tolerance: float) -> _Scan:
    counts, energies, atoms, keys = [], [], [], {}
    force_sq, force_n = 0.0, 0
    for i in range(len(dataset)):
        frame = read_frame(dataset, i, type_names, name)
        c, e = frame_composition_and_energy(frame, i, type_names, name)
        counts.append(c)
        energies.append(e)
        atoms.append(frame["pos"].shape[0])
        forces = _forces(frame)
        if forces is not None:
            ok = torch.isfinite(forces)
            force_sq += float(forces[ok].square().sum())
            force_n += int(ok.sum())
        keys.setdefault(structure_key(frame, tolerance), i)
    counts_t, energies_t = torch.stack(counts), torch.stack(energies)
    residual = energies_t - counts_t @ least_squares_references(counts_t, energies_t)
    n = torch.tensor(atoms, dtype=torch.float64)
    return _Scan(name, dataset, residual / n, int(n.sum()), force_sq, force_n, keys)


def _shared(a: _Scan, b: _Scan, type_names: Sequence[str]) -> SharedStructures:
    de, diff_sq, ref_sq, n_f = [], 0.0, 0.0, 0
    for key in sorted(a.keys.keys() & b.keys.keys(), key=a.keys.get):  # in a's frame order
        i, j = a.keys[key], b.keys[key]
        fa = read_frame(a.dataset, i, type_names, a.name)
        fb = read_frame(b.dataset, j, type_names, b.name)
        de.append(a.energy_per_atom[i] - b.energy_per_atom[j])
        forces_a, forces_b = _forces(fa), _forces(fb)
        if forces_a is not None and forces_b is not None:
            ok = torch.isfinite(forces_a) & torch.isfinite(forces_b)
            diff_sq += float((forces_a - forces_b)[ok].square().sum())
            ref_sq += float(forces_a[ok].square().sum())
            n_f += int(ok.sum())
    if not de:
        return SharedStructures(a.name, b.name, 0)
    d = torch.stack(de)
    offset = d.mean()
    return SharedStructures(
        a.name,
        b.name,
        len(de),
        energy_offset=float(offset),
        energy_difference_rms=float((d - offset).square().mean().sqrt()),
        force_difference_rms=math.sqrt(diff_sq / n_f) if n_f else None,
        force_rms=math.sqrt(ref_sq / n_f) if n_f else None,
    )


def transfer_check(
    datasets: Mapping[str, object],
    type_names: Sequence[str],
    reference: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> TransferCheck:
    """Readings 1 and 2 (the gradients are :func:`dataset_gradients`'s) of training datasets.

    Args:
        datasets: ``{name: dataset}`` (nequip frames: ``atom_types``, ``pos``,
            ``total_energy``, optionally ``forces`` and ``cell``), in dataset order
        type_names: the model's type names (``atom_types`` indexes them)
        reference: the dataset other datasets are compared against (the high fidelity;
            default the first)
        tolerance: positions and cells closer than this are the same structure

    Returns:
        a :class:`TransferCheck` without gradients; its pairs are ``(reference, other)`` for
        every other dataset, then the other pairs in dataset order
    """
    names = list(datasets)
    if len(names) < 2:
        raise ValueError(f"the transfer check compares datasets; got one: {names}")
    reference = names[0] if reference is None else reference
    if reference not in names:
        raise ValueError(f"the reference dataset {reference!r} is not one of {names}")
    if not tolerance > 0:
        raise ValueError(f"the position tolerance must be positive, got {tolerance}")
    scans = {n: _scan(n, datasets[n], list(type_names), tolerance) for n in names}
    order = [reference] + [n for n in names if n != reference]
    pairs = [
        _shared(scans[a], scans[b], list(type_names))
        for k, a in enumerate(order)
        for b in order[k + 1 :]
    ]
    return TransferCheck([scans[n].summary() for n in names], pairs, reference, tolerance)


# ---------------------------------------------------------------------- 3.: gradients


def balanced_batches(
    datasets: Sequence, frames_per_dataset: int, num_batches: int, seed: int = 0
) -> list[dict]:
    """``num_batches`` batches of ``frames_per_dataset`` frames of every dataset each, drawn
    without replacement from a seeded permutation of each (cycling through a dataset with
    fewer frames than needed). Frames must carry what the loss selects datasets by
    (``dataset_index``, as :class:`~nequip_mtl.data.MultiDatasetDataModule`'s do)."""
    from nequip.data import AtomicDataDict

    if frames_per_dataset < 1 or num_batches < 1:
        raise ValueError(
            f"need at least one batch of at least one frame per dataset, got {num_batches} "
            f"batch(es) of {frames_per_dataset} frame(s)"
        )
    generator = torch.Generator().manual_seed(int(seed))
    orders = [torch.randperm(len(d), generator=generator).tolist() for d in datasets]
    batches = []
    for b in range(num_batches):
        frames = [
            dataset[order[(b * frames_per_dataset + k) % len(order)]]
            for dataset, order in zip(datasets, orders)
            for k in range(frames_per_dataset)
        ]
        batches.append(AtomicDataDict.batched_from_list(frames))
    return batches


def shared_parameter_cosines(parameter_grams: torch.Tensor) -> torch.Tensor:
    """``(m, m)`` cosines of task gradients restricted, for each pair, to the parameters both
    reach, from their per-parameter Gram matrices ``(num_params, m, m)``
    (:meth:`~nequip_mtl.step.TaskGradients.parameter_grams`); ``nan`` where a pair shares
    no parameter."""
    grams = parameter_grams.to(torch.float64)
    reached = grams.diagonal(dim1=1, dim2=2) > 0  # (num_params, m)
    m = grams.shape[-1]
    out = torch.full((m, m), math.nan, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            both = reached[:, i] & reached[:, j]
            if not bool(both.any()):
                continue
            sub = grams[both].sum(dim=0)
            out[i, j] = (sub[i, j] / (sub[i, i] * sub[j, j]).sqrt()).clamp(-1.0, 1.0)
    return out


def _mean_over(blocks: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """``(num_params, m, m)`` per-parameter Gram matrices of the mean gradients over the
    batches ``keep``, from those of every (batch, task) row ``(num_params, B, m, B, m)``."""
    sub = blocks[:, keep][:, :, :, keep]
    return sub.sum(dim=(1, 3)) / len(keep) ** 2


def dataset_gradients(
    model: Callable[[dict], dict],
    loss: torch.nn.Module,
    components: Mapping[str, str | None],
    batches: Sequence[dict],
    params: Sequence[torch.nn.Parameter],
    target: Callable[[dict], dict] | None = None,
    frames_per_dataset: int | None = None,
) -> GradientAgreement:
    """The gradient of each dataset's training loss, averaged over ``batches``, and how the
    datasets' gradients agree.

    Each dataset's loss is its loss components' coefficient-weighted mean on the batch (the
    dataset task of ``tasks: datasets``, :class:`~nequip_mtl.step.DatasetTasks`); its gradient
    with respect to ``params`` on each batch goes into a row of a
    :class:`~nequip_mtl.step.TaskGradients` of its own (``torch.autograd.grad``: no ``.grad``
    is touched), so that the cosines of the mean gradients and their spread over the batches
    both follow from one Gram matrix. Nothing is trained; the loss manager's state is reset
    afterwards.

    Args:
        model: called on a batch, returns the output dict (a nequip model, or a nequip
            training module: its forward enables gradients)
        loss: the training loss, a nequip ``MetricsManager`` whose components each keep one
            dataset's frames (:func:`~nequip_mtl.train.PerDatasetLoss`)
        components: ``{component: dataset}`` for every loss component
            (:func:`~nequip_mtl.train.task_kinds.component_datasets`)
        batches: batches holding every dataset's frames (:func:`balanced_batches`)
        params: the trainable parameters
        target: the labels of a batch (default: the batch itself)
        frames_per_dataset: recorded in the result (for the table)
    """
    coeffs = {name: entry.coeff for name, entry in loss.entries.items()}
    missing = [n for n, c in coeffs.items() if c is not None and components.get(n) is None]
    if missing:
        raise ValueError(
            f"the loss components {missing} keep no one dataset's frames: the per-dataset "
            "gradients need a per-dataset loss (nequip_mtl.train.PerDatasetLoss)"
        )
    # an inactive component (`coeff: null`) that keeps no dataset belongs to no task
    coeffs = {n: c for n, c in coeffs.items() if components.get(n) is not None}
    plan = DatasetTasks().plan(coeffs, components)
    names, num = list(plan.parts), len(batches)
    if num < 1:
        raise ValueError("the gradients need at least one batch")
    m = len(names)
    rows = TaskGradients(list(params), num * m, track_reach=False)
    try:
        with torch.enable_grad():
            for b, batch in enumerate(batches):
                loss.reset()
                labels = dict(batch) if target is None else target(batch)
                output = model(batch)
                tasks = plan.losses(loss(output, labels))
                rows.add_gradients([tasks[n] for n in names], first=b * m)
                del output, tasks
        loss.reset()
        blocks = rows.parameter_grams(num * m).reshape(-1, num, m, num, m)
    finally:
        rows.close()
    every = list(range(num))
    mean = _mean_over(blocks, every)
    shared = shared_parameter_cosines(mean)
    errors = torch.full_like(shared, math.nan)
    if num > 1:
        left_out = torch.stack(
            [
                shared_parameter_cosines(_mean_over(blocks, every[:b] + every[b + 1 :]))
                for b in every
            ]
        )
        spread = (left_out - left_out.mean(dim=0)).square().sum(dim=0)
        errors = (spread * (num - 1) / num).sqrt()
    return GradientAgreement(
        conflict_statistics(mean.sum(dim=0), names),
        shared,
        errors,
        num,
        frames_per_dataset or 0,
    )


# ---------------------------------------------------------------------- text


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _columns(header: list[str], rows: list[list[str]], indent: int = 0) -> list[str]:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    pad = " " * indent

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return pad + "  ".join([first, *rest]).rstrip()

    return [line(header)] + [line(r) for r in rows]

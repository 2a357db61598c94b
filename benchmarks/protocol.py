"""The benchmarks' protocol: every study's data, model, trainer, clocks, runs and timing.

- **data**: the EMT alloy (:func:`alloy_data`, eV), the DFT and xTB ethanol frames
  (:data:`ETHANOL`, :data:`XTB_ETHANOL`, kcal/mol), split files (:func:`write_splits`),
  nequip's data modules (:func:`datamodule`, :func:`files_datamodule`) and nequip_mtl's
  (:func:`balanced_datamodule`);
- **model, loss, module**: :func:`model_config`, :func:`with_references`,
  :func:`per_dataset_loss`, :func:`build_module`;
- **runs on a training clock**: :func:`fit_on_clock`, :func:`train_run`, :func:`pretrain`
  (cached), :func:`run_all`; **step timing**: :class:`Worker`, :func:`interleaved`,
  :func:`timing_rows`, :func:`machine_info`.

Heavy imports (torch, Lightning, nequip) are inside the functions: ``OMP_NUM_THREADS`` is
set (``benchmarks/__init__.py``) before torch is first imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import methods as M
from benchmarks import report as R

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TMP = RESULTS / "_tmp"  # gitignored: generated data, Lightning scratch

TYPE_NAMES = ["Cu", "Ni", "Pd"]
# the three tasks of the alloy data, by the coefficient keys of nequip's loss builders
TASKS = {2: ["total_energy", "forces"], 3: ["total_energy", "forces", "stress"]}
# --- the real DFT ethanol data, shipped in benchmarks/data/ (its README: source, license)
#: 100 frames of ethanol (C2H6O, non-periodic), energies in kcal/mol, forces in kcal/mol/Å
ETHANOL = ROOT / "data" / "ethanol_reduced_100.xyz"
ETHANOL_TYPE_NAMES = ["C", "H", "O"]
#: 1200 frames of GFN2-xTB ethanol MD at 300/600/900 K, kcal/mol (benchmarks/data/README.md)
XTB_ETHANOL = ROOT / "data" / "ethanol_xtb_1200.xyz"
#: 1 kcal/mol in meV
KCAL_MOL_TO_MEV = 43.364


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set of the benchmarks and its units."""

    type_names: list[str]
    num_tasks: int
    n_train: int
    frames: int
    description: str
    energy_unit: str
    length_unit: str
    #: meV per energy unit of the data
    to_mev: float


DATASETS = {
    "alloy": Dataset(TYPE_NAMES, 3, 150, 200, "EMT alloy", "eV", "Å", 1e3),
    "ethanol": Dataset(ETHANOL_TYPE_NAMES, 2, 80, 100, "DFT ethanol (rMD17-style, kcal/mol)",
                       "kcal/mol", "Å", KCAL_MOL_TO_MEV),
}  # fmt: skip


def reported_metrics(dataset: str) -> dict[str, tuple[str, float, str]]:
    """Validation metric names (EnergyForce(Stress)Metrics) -> (column, unit factor, unit):
    reported value = metric in the data's units x factor (meV)."""
    d = DATASETS[dataset]
    out = {"per_atom_energy_mae": ("energy MAE", d.to_mev, "meV/atom"),
           "forces_mae": ("force MAE", d.to_mev, "meV/Å"),
           "stress_mae": ("stress MAE", d.to_mev, "meV/Å³")}  # fmt: skip
    return dict(list(out.items())[: d.num_tasks])


def units_text(dataset: str) -> str:
    """How a table's errors relate to the data's units."""
    if DATASETS[dataset].energy_unit == "eV":
        return "Errors in meV (the data is in eV)."
    return f"Errors in meV (1 kcal/mol = {KCAL_MOL_TO_MEV} meV); the json keeps kcal/mol."


def model_text(a: dict, params) -> str:
    """The model of a run's arguments ``a``, as the tables' preambles state it."""
    return (f"NequIP model with {params} parameters (l_max={a['l_max']}, {a['num_layers']} "
            f"layers, {a['num_features']} features), float32")  # fmt: skip


# ----------------------------------------------------------------------------- data


def alloy_data(frames: int, seed: int = 0, **generator) -> Path:
    """The seeded EMT alloy file (``nequip-mtl-make-data``), generated once into ``_tmp``;
    ``generator``: further arguments of :func:`nequip_mtl.tools.generate_frames` (e.g.
    ``slab_fraction``), part of the file name."""
    from nequip_mtl.tools import make_dataset

    tag = "".join(f"_{k}{v}" for k, v in sorted(generator.items()))
    path = TMP / f"alloy_{frames}f_seed{seed}{tag}.xyz"
    if not path.exists():
        TMP.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part.xyz")
        make_dataset(part, num_frames=frames, seed=seed, elements=TYPE_NAMES, **generator)
        part.replace(path)
    return path


def data_statistics(
    path: Path, r_max: float, type_names: list[str] | None = None, shifts: str = "fit"
) -> dict[str, float]:
    """The model constants of the whole file (as nequip's ``training_data_stats``): per-type
    energy shifts from a composition fit (``shifts="fit"``) or the per-atom energy mean for
    every type (``"mean"``: frames of one composition, where the fit is singular)."""
    type_names = list(type_names or TYPE_NAMES)
    import ase.io
    import numpy as np
    from ase.neighborlist import neighbor_list

    frames = ase.io.read(path, index=":")
    e_per_atom = [a.get_potential_energy() / len(a) for a in frames]
    forces = np.concatenate([a.get_forces().ravel() for a in frames])
    neighbors = [len(neighbor_list("i", a, r_max)) / len(a) for a in frames]
    atoms = sum(len(a) for a in frames)
    # per-type energy shifts: least-squares fit of E = sum_t n_t mu_t (what a user would
    # take from isolated-atom energies or a linear composition fit)
    counts = np.array([[a.get_chemical_symbols().count(t) for t in type_names] for a in frames])
    energies = np.array([a.get_potential_energy() for a in frames])
    if shifts == "fit":
        mu, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    elif shifts == "mean":
        mu = np.full(len(type_names), float(np.mean(e_per_atom)))
    else:
        raise ValueError(f"shifts must be 'fit' or 'mean', got {shifts!r}")
    resid = energies - counts @ mu
    return {
        "per_type_energy_shifts": {t: float(x) for t, x in zip(type_names, mu)},
        "energy_residual_rms_per_atom": float(np.sqrt(np.mean((resid / counts.sum(1)) ** 2))),
        "num_frames": len(frames), "mean_atoms": atoms / len(frames),
        "per_atom_energy_mean": float(np.mean(e_per_atom)),
        "forces_rms": float(np.sqrt(np.mean(forces**2))),
        "num_neighbors_mean": float(np.average(neighbors, weights=[len(a) for a in frames])),
    }  # fmt: skip


def loader_config(batch_size: int | None = None, shuffle: bool | None = None) -> dict:
    """A ``torch.utils.data.DataLoader`` config (``None``: the option left out)."""
    out = {"_target_": "torch.utils.data.DataLoader"}
    if batch_size is not None:
        out["batch_size"] = batch_size
    if shuffle is not None:
        out["shuffle"] = shuffle
    return out


def cache_path(folder: str, a: dict, keys, *extra, seed: int) -> Path:
    """``_tmp/<folder>/seed<seed>_<digest>.pt``: the cache file of a model that depends on
    the run arguments ``keys`` of ``a``, the model options and ``extra`` (json-able)."""
    keys = (*keys, *model_arguments(a))
    blob = json.dumps([{k: a[k] for k in keys}, *extra, seed], sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    return TMP / folder / f"seed{seed}_{digest}.pt"


def ase_dataset(path: Path, r_max: float, type_names: list[str] | None = None) -> dict:
    """The nequip ``ASEDataset`` config of an extxyz file (species mapped to themselves,
    neighbour lists with ``r_max``)."""
    type_names = list(type_names or TYPE_NAMES)
    return {
        "_target_": "nequip.data.dataset.ASEDataset", "file_path": str(path),
        "ase_args": {"format": "extxyz"},
        "transforms": [
            {"_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
             "model_type_names": type_names,
             "chemical_species_to_atom_type_map": {s: s for s in type_names}},
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": r_max},
        ],
    }  # fmt: skip


def datamodule(
    path: Path, n_train: int, n_val: int, batch_size: int, r_max: float, seed: int = 1,
    val_batch: int = 10, shuffle: bool = True, type_names: list[str] | None = None,
):  # fmt: skip
    """nequip's data module of the file ``path`` split into ``n_train`` training and
    ``n_val`` validation frames (seeded ``seed``)."""
    from nequip.data.datamodule import NequIPDataModule

    return NequIPDataModule(
        seed=seed,
        split_dataset={"dataset": ase_dataset(path, r_max, type_names), "train": n_train,
                       "val": n_val},
        train_dataloader=loader_config(batch_size, shuffle),
        val_dataloader=loader_config(val_batch),
    )  # fmt: skip


def split_statistics(
    path: Path, n_train: int, n_val: int, r_max: float, type_names: list[str], seed: int = 1
) -> dict:
    """The model constants of the *training split* of :func:`datamodule` (same ``seed``):
    the per-atom energy mean as every type's shift, the force RMS, the neighbour count."""
    import torch

    dm = datamodule(path, n_train, n_val, 1, r_max, seed=seed, type_names=type_names)
    dm.setup("fit")
    train = dm.train_dataset[0]  # a list of one dataset (the train Subset)
    e_per_atom, forces, neighbors, atoms = [], [], [], 0
    for i in range(len(train)):
        d = train[i]
        n = int(d["pos"].shape[0])
        e_per_atom.append(float(d["total_energy"].reshape(())) / n)
        forces.append(d["forces"].reshape(-1).double())
        neighbors.append(d["edge_index"].shape[1])
        atoms += n
    forces = torch.cat(forces)
    mean = float(torch.tensor(e_per_atom, dtype=torch.float64).mean())
    return {"per_type_energy_shifts": {t: mean for t in type_names},
            "num_frames": n_train + n_val, "num_train_frames": len(train),
            "mean_atoms": atoms / len(train), "per_atom_energy_mean": mean,
            "forces_rms": float(forces.pow(2).mean().sqrt()),
            "num_neighbors_mean": sum(neighbors) / atoms}  # fmt: skip


def data_and_statistics(
    dataset: str, frames: int, n_train: int, r_max: float, type_names: list[str]
) -> tuple[Path, dict]:
    """The data file of ``dataset`` (``alloy``: generated; ``ethanol``) and the model
    constants: the alloy's from the whole file, ethanol's from the training split only."""
    if dataset == "alloy":
        path = alloy_data(frames, seed=0)
        return path, data_statistics(path, r_max)
    return ETHANOL, split_statistics(ETHANOL, n_train, frames - n_train, r_max, type_names)


def run_datamodule(data: str | Path, a: dict, type_names: list[str]):
    """The accuracy benchmarks' data module: ``data`` split into ``a["n_train"]`` training
    and ``a["n_val"]`` validation frames (fixed split, seed 1), batches of ``a["batch_size"]``."""
    return datamodule(Path(data), a["n_train"], a["n_val"], a["batch_size"], a["r_max"], seed=1,
                      type_names=type_names)  # fmt: skip


def write_splits(folder: str, names, make) -> dict[str, str]:
    """``{name: path}`` of the extxyz files ``_tmp/<folder>/<name>.xyz`` of ``names``, written
    once from ``make()`` (``{name: ASE frames}``)."""
    files = {k: TMP / folder / f"{k}.xyz" for k in names}
    if not all(f.exists() for f in files.values()):
        from nequip_mtl.tools.emt_alloy import write_frames

        (TMP / folder).mkdir(parents=True, exist_ok=True)
        for k, frames in make().items():  # atomically: a part file, renamed
            part = files[k].with_suffix(f".{os.getpid()}.part.xyz")
            write_frames(frames, part)
            part.replace(files[k])
    return {k: str(v) for k, v in files.items()}


def shuffled(frames: list, rng) -> list:
    """``frames`` in the order of one permutation drawn from the numpy generator ``rng``."""
    return [frames[i] for i in rng.permutation(len(frames))]


def file_dataset(files: dict, a: dict, key: str) -> dict:
    """The ``ASEDataset`` config of the file ``files[key]`` (``a``: ``r_max``, ``type_names``)."""
    return ase_dataset(Path(files[key]), a["r_max"], a["type_names"])


def files_datamodule(files: dict, a: dict, seed: int, train: str, val: list[str]):
    """nequip's plain data module training on the file ``train`` (shuffled batches of
    ``a["batch_size"]``), one validation loader per file of ``val``, in that order."""
    from nequip.data.datamodule import NequIPDataModule

    return NequIPDataModule(
        seed=seed, train_dataset=file_dataset(files, a, train),
        val_dataset=[file_dataset(files, a, v) for v in val],
        train_dataloader=loader_config(a["batch_size"], shuffle=True),
        val_dataloader=loader_config(10),
    )  # fmt: skip


def balanced_datamodule(
    datasets: dict, k: int, seed: int, batches_per_epoch: int | None = None,
    val_batch: int | None = 10, **kwargs,
):  # fmt: skip
    """nequip_mtl's ``MultiDatasetDataModule`` of ``datasets`` (name -> its dataset configs),
    balanced batches of ``k`` frames of each (``val_batch`` None: no validation loader)."""
    from nequip_mtl.data import MultiDatasetDataModule

    sampling = {"mode": "balanced", "frames_per_batch": {name: k for name in datasets}}
    if batches_per_epoch is not None:
        sampling["batches_per_epoch"] = batches_per_epoch
    if val_batch is not None:
        kwargs["val_dataloader"] = loader_config(val_batch)
    return MultiDatasetDataModule(seed=seed, datasets=datasets, sampling=sampling,
                                  train_dataloader=loader_config(), **kwargs)  # fmt: skip


def per_dataset_loss(weights: dict[str, float], stress: bool = False) -> dict:
    """nequip_mtl's ``PerDatasetLoss`` over the datasets of ``weights``: per-atom energy and
    force MSE (and with ``stress`` stress MSE) 1:1 within a dataset, the components of dataset
    ``d`` at ``weights[d]``."""
    names = TASKS[3 if stress else 2]
    return {"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": list(weights),
            "coeffs": {d: dict.fromkeys(names, w) for d, w in weights.items()}}  # fmt: skip


def with_references(
    model: dict, references: dict, heads: bool = False, embedding: bool = False
) -> dict:
    """``model`` wrapped with nequip_mtl's ``PerDatasetEnergyReferences``: the fixed
    per-dataset energy ``references`` (``{dataset: {type: energy}}``), with ``heads``
    per-dataset readout heads, with ``embedding`` its fidelity-aware trunk layers
    (``fidelity_embedding: true``; the option is left out otherwise)."""
    out = {"_target_": "nequip_mtl.model.PerDatasetEnergyReferences",
           "datasets": list(references), "references": references, "trainable": False,
           "readout_heads": heads, "model": model}  # fmt: skip
    if embedding:
        out["fidelity_embedding"] = True
    return out


# ----------------------------------------------------------------------------- model/module


def model_config(
    dtype: str, stats: dict, *, num_layers: int, num_features: int, l_max: int, r_max: float,
    radial_width: int, model_seed: int = 7, type_names: list[str] | None = None,
) -> dict:  # fmt: skip
    """nequip's ``NequIPGNNModel`` config, its constants from ``stats`` (:func:`data_statistics`)."""
    return {
        "_target_": "nequip.model.NequIPGNNModel", "seed": model_seed, "model_dtype": dtype,
        "type_names": list(type_names or TYPE_NAMES), "r_max": r_max, "l_max": l_max,
        "parity": True, "num_layers": num_layers, "num_features": num_features,
        "radial_mlp_depth": 2, "radial_mlp_width": radial_width,
        "avg_num_neighbors": stats["num_neighbors_mean"],
        "per_type_energy_shifts": dict(stats["per_type_energy_shifts"]),
        "per_type_energy_scales": stats["forces_rms"],
    }  # fmt: skip


def model_arguments(a: Any) -> dict:
    """The model options of :func:`model_config` from a run's arguments (a dict or an
    argparse namespace with num_layers, num_features, l_max, r_max, radial_width)."""
    a = a if isinstance(a, dict) else vars(a)
    keys = ("num_layers", "num_features", "l_max", "r_max", "radial_width")
    return {k: a[k] for k in keys}


def add_run_arguments(
    parser, *, batch_size: int = 5, frames: int | None = None, frames_help: str | None = None,
    num_features: int = 32, num_layers: int = 2, l_max: int = 1, radial_width: int = 32,
    r_max: float = 4.5, lr: float | None = 5e-3,
) -> None:  # fmt: skip
    """The model and optimizer options, the accuracy protocol's defaults unless given;
    ``None``: no such option (``frames``: the number of alloy frames generated)."""
    parser.add_argument("--batch-size", type=int, default=batch_size)
    if frames is not None:
        parser.add_argument("--frames", type=int, default=frames, help=frames_help)
    parser.add_argument("--num-features", type=int, default=num_features)
    parser.add_argument("--num-layers", type=int, default=num_layers)
    parser.add_argument("--l-max", type=int, default=l_max)
    parser.add_argument("--radial-width", type=int, default=radial_width)
    parser.add_argument("--r-max", type=float, default=r_max)
    if lr is not None:
        parser.add_argument("--lr", type=float, default=lr)


def add_budget_arguments(parser, *, epochs: bool = True) -> None:
    """The clock options of a study that trains to a budget (:func:`fill_defaults` fills
    them): ``--seeds``, ``--budget-s``, ``--epochs`` (the equal-epochs view), ``--clock``,
    ``--val-every``."""
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    parser.add_argument("--budget-s", type=float, default=None, help="training clock per run (s)")
    if epochs:
        parser.add_argument("--epochs", type=int, default=None, help="the equal-epochs view")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--val-every", type=int, default=None, help="evaluate every N epochs")


def fill_defaults(args, quick: dict, full: dict) -> None:
    """Every option of ``args`` left unset (``None``) takes its value in ``quick`` (with
    ``--quick``) or ``full``."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run_model(a: dict, stats: dict, seed: int, type_names: list[str]) -> dict:
    """The float32 model of a run's arguments ``a``, initialised with ``seed``."""
    return model_config("float32", stats, **model_arguments(a), model_seed=seed,
                        type_names=type_names)  # fmt: skip


def loss_config(num_tasks: int, coeffs: dict[str, float] | None = None) -> dict:
    coeffs = coeffs or {name: 1.0 for name in TASKS[num_tasks]}
    target = "EnergyForceStressLoss" if num_tasks == 3 else "EnergyForceLoss"
    return {"_target_": f"nequip.train.{target}", "per_atom_energy": True, "coeffs": dict(coeffs)}


def metrics_config(num_tasks: int) -> dict:
    coeffs = {"per_atom_energy_mae": 1.0, "forces_mae": 1.0}
    if num_tasks == 3:
        return {"_target_": "nequip.train.EnergyForceStressMetrics",
                "coeffs": {**coeffs, "stress_mae": 1.0}}  # fmt: skip
    return {"_target_": "nequip.train.EnergyForceMetrics", "coeffs": coeffs}


def build_module(
    method: M.Method, model: dict, num_tasks: int, lr: float, coeffs: dict | None = None,
    loss: dict | None = None, num_val: int = 1,
):  # fmt: skip
    """``method``'s training module: Adam (or the method's optimizer) at ``lr``, nequip's
    energy-force(-stress) loss with ``coeffs`` (or the ``loss`` config given) and
    validation metrics on ``num_val`` validation loaders (``0``: no validation)."""
    from hydra.utils import get_class

    optimizer = {"_target_": "torch.optim.Adam", "lr": lr}
    if method.optimizer is not None:
        optimizer = {"lr": lr, **method.optimizer}
    return get_class(method.module)(
        model=model, num_datasets={"train": 1, "val": num_val, "test": 0, "predict": 0},
        optimizer=optimizer, loss=loss if loss is not None else loss_config(num_tasks, coeffs),
        val_metrics=metrics_config(num_tasks) if num_val else None, **method.kwargs,
    )  # fmt: skip


def build_callbacks(method: M.Method) -> list:
    from hydra.utils import instantiate

    return [instantiate(dict(cb)) for cb in method.callbacks]


def num_params(module) -> int:
    return sum(p.numel() for p in module.model.parameters())


# ----------------------------------------------------------------------------- trainer


def init_torch() -> None:
    """nequip's global state and one torch thread per ``OMP_NUM_THREADS``."""
    import torch
    from nequip.utils.global_state import set_global_state

    set_global_state()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def trainer(callbacks=(), **kwargs):
    """A CPU Lightning trainer without logger, checkpoints, progress bar or summary,
    scratch in ``_tmp``; ``kwargs`` add to or override those settings."""
    import lightning

    settings = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False,
                "default_root_dir": str(TMP)}  # fmt: skip
    return lightning.Trainer(callbacks=list(callbacks), **{**settings, **kwargs})


#: validation loader -> prefix of its metrics' names: one loader, short names
ONE_LOADER = {"val0_epoch": ""}


def loader_metrics(values: dict, loaders: dict[str, str]) -> dict[str, float]:
    """The metrics of the validation loaders ``loaders`` (``val<j>_epoch`` -> name prefix)
    among Lightning's logged ``values``, named ``<prefix><metric>``."""
    out = {}
    for k, v in values.items():
        loader, _, short = k.partition("/")
        if loader in loaders and short:
            out[loaders[loader] + short] = float(v)
    return out


def validate(module, datamodule, loaders: dict[str, str] = ONE_LOADER) -> dict[str, float]:
    """One validation pass of ``module`` (the trainer's own loop, no logging): every
    metric of the loaders ``loaders`` (default ``val0``, by short name; see
    :func:`loader_metrics`)."""
    out = trainer(inference_mode=False).validate(module, datamodule=datamodule, verbose=False)
    values = {k: v for per_loader in out for k, v in per_loader.items()}
    return loader_metrics(values, loaders)


# ----------------------------------------------------------------------------- clocks

#: the training clocks: the CPU time of this (the compute) thread, or wall-clock time
TICKS = {"cpu": time.thread_time, "wall": time.perf_counter}


class StepTimes:
    """Per-step wall-clock and CPU time of this thread (with ``OMP_NUM_THREADS=1`` all of
    a step's work runs on it), from :meth:`start` to :meth:`stop`, in s."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def start(self) -> None:
        self._t0, self._c0 = time.perf_counter(), time.thread_time()

    def stop(self) -> None:
        self.cpu.append(time.thread_time() - self._c0)
        self.wall.append(time.perf_counter() - self._t0)


def step_timers(times: StepTimes, before_start=None, after_stop=None) -> tuple:
    """Two callbacks timing every step into ``times``, to put first and last; the
    ``before_start(batch_idx)`` and ``after_stop()`` hooks run outside the timed span."""
    import lightning

    class Start(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if before_start is not None:
                before_start(batch_idx)
            times.start()

    class Stop(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.stop()
            if after_stop is not None:
                after_stop()

    return Start(), Stop()


# ----------------------------------------------------------------------------- the run


def budget_callbacks(a: dict, steps_per_epoch: int, metrics, loaders: dict = ONE_LOADER):
    """The training clock (stops the run once the budget is spent and ``a["epochs"]``
    epochs are done) and the per-epoch validation record of ``metrics`` (names as
    :func:`loader_metrics` gives them for ``loaders``). The clock must come first in the
    trainer's callbacks and its ``tail`` after every other callback with batch hooks: a
    step's time is from the first batch-start hook to the last batch-end hook, the
    callbacks' own work (a budget's measurement, a probe) included."""
    import lightning

    tick = TICKS[a["clock"]]
    budget_s, min_epochs = a["budget_s"], a["epochs"]

    class Clock(lightning.Callback):
        """Training clock; stops training once the budget is spent and ``min_epochs`` are done."""

        def __init__(self):
            self.elapsed = 0.0
            self.steps = 0
            self._t0 = 0.0
            self.budget_hit_at: dict | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = tick()
            self.elapsed += now - self._t0
            self.steps += 1
            self._t0 = now  # the later callbacks' batch-end work: counted by the tail

    class ClockTail(lightning.Callback):
        """The clock's end of a step, after every other callback's batch-end hook: adds
        their time, then stops the run once the budget is spent."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.elapsed += tick() - clock._t0
            if clock.elapsed >= budget_s:
                if clock.budget_hit_at is None:
                    clock.budget_hit_at = {"step": clock.steps, "epoch": trainer.current_epoch,
                                           "clock_s": clock.elapsed}  # fmt: skip
                if clock.steps >= min_epochs * steps_per_epoch:
                    trainer.should_stop = True

    class Record(lightning.Callback):
        """Validation metrics after every epoch, with the training clock and step."""

        def __init__(self, clock_cb):
            self.clock = clock_cb
            self.points: list[dict] = []

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            values = loader_metrics(trainer.callback_metrics, loaders)
            self.points.append({
                "epoch": self.clock.steps / steps_per_epoch, "step": self.clock.steps,
                "clock_s": self.clock.elapsed, "lr": trainer.optimizers[0].param_groups[0]["lr"],
                **{k: values.get(k) for k in metrics},
            })  # fmt: skip

    clock = Clock()
    clock.tail = ClockTail()
    return clock, Record(clock)


def cosine_on_clock(clock, budget_s: float, lr: float):
    """A callback annealing the learning rate from ``lr`` to 0 (cosine) over the
    training-clock budget, set before every step: the same schedule in time for every
    method, whatever its step cost."""
    import lightning

    class CosineOnClock(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            frac = min(1.0, clock.elapsed / budget_s)
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    return CosineOnClock()


def switch_on_clock(clock, scheduler, at_s: float, coeffs: dict, record: dict):
    """A callback that, at the first epoch starting after ``at_s`` s of training clock,
    enters that epoch into nequip's ``LossCoefficientScheduler`` (which must come after
    it in the callback list) with ``coeffs``; ``record`` gets the epoch and clock."""
    import lightning

    class SwitchOnClock(lightning.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if not record and clock.elapsed >= at_s:
                scheduler.schedule[trainer.current_epoch] = dict(coeffs)
                record.update(epoch=trainer.current_epoch, clock_s=clock.elapsed)

    return SwitchOnClock()


def snapshot_on_clock(clock, at_s: float, store: dict):
    """A callback that keeps a copy of the model's weights after the first step at which the
    training clock reaches ``at_s`` s (the state a run with that budget would end in):
    ``store`` gets ``state``, ``step`` and ``clock_s``. It must come after the clock."""
    import copy

    import lightning

    class SnapshotOnClock(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not store and clock.elapsed >= at_s:
                state = copy.deepcopy(pl_module.model.state_dict())
                store.update(state=state, step=clock.steps, clock_s=clock.elapsed)

    return SnapshotOnClock()


def budget_results(a: dict, clock, record, per_epoch: int, final: dict) -> tuple[dict, dict]:
    """At equal time (the state when the budget ran out, ``final`` its validation; if the
    run went on to reach ``a["epochs"]``, the last epoch validated within the budget) and at
    equal epochs (the validation after epoch ``a["epochs"]``, ``None`` if not recorded)."""
    at_epochs = next((p for p in record.points if p["step"] == a["epochs"] * per_epoch), None)
    hit = clock.budget_hit_at or {"step": clock.steps}
    if clock.steps > hit["step"]:
        within = [p for p in record.points if p["clock_s"] <= a["budget_s"]]
        budget = {**(within[-1] if within else record.points[0]),
                  "note": "last epoch within budget"}  # fmt: skip
    else:
        budget = {"epoch": clock.steps / per_epoch, "step": clock.steps, "clock_s": clock.elapsed,
                  **final}  # fmt: skip
    return budget, at_epochs


def run_results(a: dict, clock, record, per_epoch: int, final: dict, t0: float, module) -> dict:
    """What every study keeps of a run on the protocol's clock: the equal-time and
    equal-epochs results (:func:`budget_results`), the curve, steps, clocks, parameters."""
    budget, at_epochs = budget_results(a, clock, record, per_epoch, final)
    last = {"epoch": None, "step": clock.steps, "clock_s": clock.elapsed, **final}
    return {"budget": budget, "epochs": at_epochs, "curve": [*record.points, last],
            "steps": clock.steps, "clock_s": clock.elapsed, "wall_s": time.perf_counter() - t0,
            "params": num_params(module)}  # fmt: skip


def fit_on_clock(
    module, dm, a: dict, per_epoch: int, metrics, loaders: dict = ONE_LOADER, callbacks=()
) -> dict:
    """Train ``module`` on ``dm`` until its training clock reaches ``a["budget_s"]`` and
    ``a["epochs"]`` are done (:func:`budget_callbacks`; ``lr_schedule: cosine``: the learning
    rate annealed over the clock), validating every ``val_every`` epochs, then once more: its
    :func:`run_results` and the last step's learning rate (``lr_end``). ``callbacks``: more,
    or a function of the clock giving them."""
    clock, record = budget_callbacks(a, per_epoch, metrics, loaders)
    callbacks = list(callbacks(clock) if callable(callbacks) else callbacks)
    if a.get("lr_schedule", "constant") == "cosine":
        callbacks = [cosine_on_clock(clock, a["budget_s"], a["lr"]), *callbacks]
    fit = trainer([clock, *callbacks, clock.tail, record], max_epochs=10_000, num_sanity_val_steps=0,
                  check_val_every_n_epoch=a.get("val_every", 1))  # fmt: skip
    t0 = time.perf_counter()
    fit.fit(module, datamodule=dm)
    lr_end = float(fit.optimizers[0].param_groups[0]["lr"])  # the last step's
    final = {k: v for k, v in validate(module, dm, loaders).items() if k in metrics}
    return {**run_results(a, clock, record, per_epoch, final, t0, module), "lr_end": lr_end}


def train_run(task: dict) -> dict:
    """The accuracy protocol's run: one (method, seed) of ``task`` (``method``, ``seed``,
    ``args``, ``stats``, ``data``, optional ``state_dir``) on :func:`fit_on_clock`, the
    two-stage schedule switched on the clock; its curve and results (picklable)."""
    import lightning
    import torch

    init_torch()
    a = task["args"]
    dataset = a.get("dataset", "alloy")
    metrics = reported_metrics(dataset)
    type_names, num_tasks = DATASETS[dataset].type_names, DATASETS[dataset].num_tasks
    seed = task["seed"]
    method = M.methods(interval="epoch")[task["method"]].with_seed(seed)
    lightning.seed_everything(seed, workers=True, verbose=False)

    model = run_model(a, task["stats"], seed, type_names)
    coeffs = M.task_coeffs(method.coeffs, num_tasks)
    module = build_module(method, model, num_tasks, lr=a["lr"], coeffs=coeffs)
    dm = run_datamodule(task["data"], a, type_names)
    switch = {}

    def callbacks(clock):
        out = []
        if method.two_stage is not None:
            from nequip.train.callbacks import LossCoefficientScheduler

            scheduler = LossCoefficientScheduler(schedule={})
            at_s = method.two_stage["at"] * a["budget_s"]
            second = M.second_stage_coeffs(method, num_tasks)
            out += [switch_on_clock(clock, scheduler, at_s, second, switch), scheduler]
        return out + build_callbacks(method)

    per_epoch = math.ceil(a["n_train"] / a["batch_size"])
    out = fit_on_clock(module, dm, a, per_epoch, metrics, callbacks=callbacks)
    if task.get("state_dir"):  # the final model, for independent checks (tests)
        torch.save(module.state_dict(), Path(task["state_dir"]) / f"{task['method']}_seed{seed}.pt")
    return {"method": task["method"], "seed": seed, **out,
            "skipped_steps": getattr(module, "skipped_steps", 0), "switch": switch or None,
            "final_coeffs": {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()}}  # fmt: skip


def pretrain(
    task: dict, datamodule, per_epoch: int, stats: dict, metrics, loaders, num_tasks: int = 2
) -> dict:
    """Pretrain with nequip's weighted sum (of ``num_tasks`` components: :data:`TASKS`) on
    ``datamodule()`` for ``pretrain_s`` s of training clock at ``pretrain_lr``, constant
    or (``pretrain_lr_schedule: cosine``) annealed to 0 over that clock, whatever schedule
    the study's later runs use, once per cache file ``task["cache"]`` (the weights and the
    result; a later call loads the result, ``cached``: True)."""
    import lightning
    import torch

    path = Path(task["cache"])
    if path.exists():
        return {**torch.load(path, weights_only=False)["result"], "cached": True}
    init_torch()
    a, seed = task["args"], task["seed"]
    a = {**a, "budget_s": a["pretrain_s"], "lr": a["pretrain_lr"], "epochs": 0,
         "val_every": 10_000,
         "lr_schedule": a.get("pretrain_lr_schedule", "constant")}  # fmt: skip
    lightning.seed_everything(seed, workers=True, verbose=False)
    model = run_model(a, stats, seed, a["type_names"])
    module = build_module(M.methods()["ws"], model, num_tasks, lr=a["lr"], num_val=len(loaders))
    out = fit_on_clock(module, datamodule(), a, per_epoch, metrics, loaders)
    result = {"method": "pretrained", "seed": seed, **out}
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part")
    torch.save({"model": module.model.state_dict(), "result": result}, part)
    part.replace(path)
    return {**result, "cached": False}


# ----------------------------------------------------------------------------- runs


def rotated(items: list, seeds: list[int], shift: int = 1) -> list[tuple[int, Any]]:
    """``(seed, item)`` seed by seed, the order of ``items`` rotated by ``shift`` per seed
    (so that no item always runs first)."""
    out = []
    for i, seed in enumerate(seeds):
        k = (i * shift) % len(items)
        out += [(seed, x) for x in items[k:] + items[:k]]
    return out


def run_all(fn, tasks: list, jobs: int, done) -> None:
    """``done(fn(task))`` for every task as it finishes: ``jobs`` > 1 in that many spawned
    processes (one thread each), else one after the other in this process."""
    if jobs > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
            for r in pool.imap_unordered(fn, tasks):
                done(r)
    else:
        for t in tasks:
            done(fn(t))


def run_arguments(args, exclude=("methods", "seeds", "out", "save_states", "argv")) -> dict:
    """A run's arguments (:func:`train_run`'s ``a``): the options but the selection ones."""
    return {**{k: v for k, v in vars(args).items() if k not in exclude},
            "n_val": args.frames - args.n_train}  # fmt: skip


def ran_methods(data: dict, first: list[str] = ()) -> list[str]:
    """The methods of a results json that ran, in the run's own order (``first``, then
    ``--methods``; all methods: the registry's order)."""
    ran = {r["method"] for r in data["runs"]}
    wanted = [*first, *(data["meta"]["args"].get("methods") or M.ALL_METHODS)]
    return [m for m in dict.fromkeys(wanted) if m in ran]


def progress(r, i, n, t0, metrics) -> None:
    """One line per finished :func:`train_run`: its steps and errors (meV), the load."""
    b = r["budget"]
    fe, ff = metrics["per_atom_energy_mae"][1], metrics["forces_mae"][1]
    print(f"[{i}/{n} {time.perf_counter() - t0:.0f} s] {r['method']} seed {r['seed']}: {r['steps']} steps, "
          f"force MAE {ff * b['forces_mae']:.1f} meV/Å, energy {fe * b['per_atom_energy_mae']:.2f} meV/atom "
          f"(run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip


def study_parser(doc: str, jobs: bool = True):
    """A study's command line: ``--quick``, ``--jobs``, ``--out``, ``--from-json``."""
    import argparse

    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a small, fast run (a smoke test)")
    if jobs:
        p.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    p.add_argument("--out", default=None, help="results path without suffix (default: results/)")
    R.add_from_json(p)
    return p


def out_path(args, name: str) -> str:
    """``--out``, or ``results/<name>`` (``--quick``: ``_tmp/<name>_quick``)."""
    return args.out or str(TMP / f"{name}_quick" if args.quick else RESULTS / name)


# ----------------------------------------------------------------------------- --resume


def earlier_study(out) -> dict:
    """The results json of the earlier study at ``out`` that ``--resume`` continues;
    refused if there is none."""
    path = Path(out).with_suffix(".json")
    if not path.exists():
        raise SystemExit(f"--resume: no earlier results at {path} (--out names them)")
    return R.read_json(path)


def merge_resumed(earlier: dict, a: dict, stats: dict, out, resumable, lists):
    """``(arguments, statistics, lists)`` of a study resumed from ``earlier``: every
    setting of ``a`` but those named in ``resumable`` (what to run, where the data lies) and
    each statistic both parts computed must equal the earlier study's (the same data and
    protocol), else refused naming the difference; the lists (``lists``: their names) start
    with the earlier records, the arguments keep the first command line and add this one
    to ``resumed_argv``."""
    e = earlier["meta"]["args"]
    differ = sorted(k for k in {*e, *a} - set(resumable) if e.get(k) != a.get(k))
    if differ:
        raise SystemExit(f"--resume {Path(out).with_suffix('.json')}: settings differ from the "
                         "earlier study's: " + ", ".join(f"{k} {e.get(k)!r} -> {a.get(k)!r}"
                                                         for k in differ))  # fmt: skip
    e_stats = earlier["meta"]["data"]["statistics"]
    for key in e_stats.keys() & stats.keys():
        if not _close(e_stats[key], stats[key]):
            raise SystemExit(f"--resume: the data changed ({key}: {e_stats[key]} -> "
                             f"{stats[key]}); run a new study")  # fmt: skip
    merged = {**a, "argv": e["argv"],
              "resumed_argv": [*e.get("resumed_argv", []), a["argv"]]}  # fmt: skip
    return merged, {**e_stats, **stats}, {k: list(earlier.get(k, [])) for k in lists}


def _close(x, y) -> bool:
    """Equal up to float rounding (a json round trip), nested."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return x == y


class Results:
    """A study's results json (``<out>.json``), rewritten after every finished run: the meta
    data (machine, arguments, command line, time) and the lists of runs (``lists``: their
    names, and the runs they start with)."""

    def __init__(self, out, study: str, argv, args, data=None, omp=False, **lists):
        self.path = Path(out).with_suffix(".json")
        self.info = {**machine_info(), "date": now()}
        self.t0 = time.perf_counter()
        self.meta0 = {"args": args, "command": R.command(study, argv, omp), "data": data}
        self.lists = {k: list(v) for k, v in lists.items()}

    def meta(self, **extra) -> dict:
        return {"machine": self.info, **self.meta0, "time": self.info["date"],
                "elapsed_s": time.perf_counter() - self.t0, **extra}  # fmt: skip

    def add(self, key: str, run: dict) -> None:
        self.lists[key].append(run)
        R.write_json(self.path, {"meta": self.meta(partial=True), **self.lists})

    def data(self) -> dict:
        """The whole json: the meta data (with the load at the end) and every run."""
        meta = self.meta()
        meta["machine"] = {**self.info, "loadavg_end": os.getloadavg()}
        return {"meta": meta, **self.lists}


# ----------------------------------------------------------------------------- step timing

#: the clocks of a timed step
CLOCKS = ("wall", "cpu")


def step_model(a: Any, stats: dict, dtype: str) -> dict:
    """The step-cost studies' model (initial weights seeded 7), with nequip's train-time
    compile if ``a.compile``."""
    model = model_config(dtype, stats, **model_arguments(a))
    if getattr(a, "compile", False):
        model["compile_mode"] = "compile"  # nequip's train-time compile
    return model


def step_trainer(callbacks, steps: int):
    """A trainer of ``steps`` training batches, no validation."""
    return trainer(callbacks, max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
                   num_sanity_val_steps=0)  # fmt: skip


def add_step_arguments(parser, **run) -> None:
    """The step-cost studies' options: ``--dtypes``, ``--steps``, ``--warmup`` and the model
    and optimizer ones (their model: 3 layers, radial MLP width 64; ``run``: more)."""
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    add_run_arguments(parser, num_layers=3, radial_width=64, lr=1e-3, **run)


def quick_steps(args) -> None:
    """``--quick``: a small model, 6 timed steps, float32."""
    args.num_features, args.l_max, args.num_layers, args.radial_width = 16, 1, 2, 32
    args.steps, args.dtypes = 6, ["float32"]


class Worker:
    """One method training in its own thread, one step per turn: a normal ``trainer.fit`` of
    ``setup.module(...)`` on ``setup.datamodule(fresh=True)`` whose callbacks hand control back
    after every step (after the clock stopped) and wait for the next turn, so exactly one
    method computes at any time, Lightning's untimed bookkeeping included."""

    def __init__(self, setup, key: str, method: M.Method, dtype: str, num_tasks: int, steps: int):
        import threading

        self.key, self.go, self.done = key, threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.times, self.params = StepTimes(), 0

        def before_start(batch_idx):
            if batch_idx == 0:  # setup finished: report, wait for the first turn
                self._yield()

        # after the clock stopped, also after the last step: teardown waits for its turn
        start, end = step_timers(self.times, before_start, self._yield)

        def body():
            try:
                module = setup.module(method, dtype, num_tasks)
                self.params = num_params(module)
                # first at batch start and last at batch end: the method's callbacks are timed
                callbacks = [start, *build_callbacks(method), end]
                step_trainer(callbacks, steps).fit(module, datamodule=setup.datamodule(fresh=True))
            except BaseException as e:  # noqa: BLE001 - reported by the scheduler
                self.error = e
            finally:
                self.done.set()

        self.thread = threading.Thread(target=body, name=f"bench-{key}", daemon=True)

    def _yield(self) -> None:
        self.done.set()
        self.go.wait()
        self.go.clear()

    def turn(self) -> None:
        """Let the thread run until it yields again (one step, or setup, or teardown)."""
        self.done.clear()
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()
        else:
            self.go.set()
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"{self.key} failed") from self.error


def interleaved(args, table, setup, dtype: str, num_tasks: int, what: str):
    """Step i of every method of ``args.methods`` on ``setup``, in a fresh random order per
    step: ``({clock: {method: timed steps}}, parameters, the load every 10 steps)``."""
    import gc
    import random

    total = args.warmup + args.steps
    t_cfg = time.perf_counter()
    workers = {m: Worker(setup, m, table[m], dtype, num_tasks, total) for m in args.methods}
    for w in workers.values():  # setups, one after the other, up to step 0
        w.turn()
    gc.collect()
    gc.freeze()  # setup objects out of the collector's way during the steps
    rng = random.Random(0)
    load = []
    for i in range(total):
        order = list(args.methods)
        rng.shuffle(order)  # a fresh order per step: no fixed predecessor
        for m in order:
            workers[m].turn()
        if (i + 1) % 10 == 0 or i + 1 == total:
            load.append(round(os.getloadavg()[0], 2))
            print(f"[{what}] step {i + 1}/{total} ({time.perf_counter() - t_cfg:.0f} s, "
                  f"load {load[-1]:.2f})", flush=True)  # fmt: skip
    for w in workers.values():  # teardown, one after the other
        w.turn()
        w.thread.join()
    gc.unfreeze()
    n_params = workers[args.methods[0]].params
    times = {
        c: {m: getattr(workers[m].times, c)[args.warmup :] for m in args.methods} for c in CLOCKS
    }
    del workers
    gc.collect()
    return times, n_params, load


def timing_rows(args, table, times, n_params, **fields) -> list[dict]:
    """One result row per method: raw step times, medians, means and the ratios to the
    references (``fields``: the configuration, e.g. ``dtype`` and ``tasks``)."""
    import statistics

    rows = []
    for m in args.methods:
        row = {
            "raw_cpu_s": [round(x, 5) for x in times["cpu"][m]],
            "raw_wall_s": [round(x, 5) for x in times["wall"][m]],
            "method": m, "label": table[m].label, "family": table[m].family,
            **fields, "params": n_params, "n_steps": len(times["cpu"][m]),
        }  # fmt: skip
        for c in CLOCKS:
            ts = times[c][m]
            row[f"{c}_median_s"] = statistics.median(ts)
            row[f"{c}_mean_s"] = statistics.fmean(ts)
            for key, ref in R.REFERENCES.items():
                if ref not in args.methods:
                    continue
                row[f"{c}_{key}"] = row[f"{c}_median_s"] / statistics.median(times[c][ref])
                row[f"{c}_mean_{key}"] = row[f"{c}_mean_s"] / statistics.fmean(times[c][ref])
                # the same batch, a few seconds apart: per-step paired ratios
                paired = [x / y for x, y in zip(ts, times[c][ref])]
                q = statistics.quantiles(paired, n=4)
                row[f"{c}_{key}_paired_iqr"] = [q[0], q[2]]
                row[f"{c}_{key}_paired_median"] = statistics.median(paired)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("raw")}), flush=True)
    return rows


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (``lscpu`` fields, load, versions)."""
    import lightning
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
    }  # fmt: skip
    import nequip

    info["nequip"] = nequip.__version__
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        keys = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                "Hypervisor vendor")  # fmt: skip
        info.update({k: fields[k].strip() for k in keys if k in fields})
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_total_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, subprocess.SubprocessError):  # not Linux: the fields it has
        pass
    return info


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")

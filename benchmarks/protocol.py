"""The benchmarks' protocol: data, model, trainer, clocks, the training run, validation.

Every study trains the same kind of NequIP model on the same data with the same optimizer
settings, built here:

- **data**: the offline EMT alloy (:func:`alloy_data`, energies, forces and stresses in eV
  units) and the real DFT ethanol frames (:data:`ETHANOL`, kcal/mol), their model
  constants (:func:`data_and_statistics`) and nequip data modules (:func:`datamodule`);
- **model and module**: :func:`model_config`, :func:`build_module` (a
  :class:`~benchmarks.methods.Method` as a training module), :func:`add_run_arguments`
  (the command-line options of the model and optimizer);
- **trainer and clocks**: :func:`trainer` (one factory for every study's Lightning
  trainer), :class:`StepTimes` and :func:`step_timers` (per-step CPU time of the compute
  thread and wall-clock time), :func:`train_run` (the accuracy protocol's run: train one
  (method, seed) until its training clock reaches a budget, validating every epoch);
- **validation** (:func:`validate`), the machine (:func:`machine_info`) and the run pool
  (:func:`run_all`).

A run's arguments as the accuracy protocol stores them in its json (``meta.args``), the
``a`` of :func:`train_run`::

    {"dataset": "ethanol", "n_train": 80, "n_val": 20, "batch_size": 5, "lr": 0.005,
     "num_layers": 2, "num_features": 32, "l_max": 1, "r_max": 4.5, "radial_width": 32,
     "budget_s": 30.0, "epochs": 8, "clock": "cpu", "val_every": 1}

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
    "ethanol": Dataset(
        ETHANOL_TYPE_NAMES,
        2,
        80,
        100,
        "DFT ethanol (rMD17-style, kcal/mol)",
        "kcal/mol",
        "Å",
        KCAL_MOL_TO_MEV,
    ),
}


def reported_metrics(dataset: str) -> dict[str, tuple[str, float, str]]:
    """Validation metric names (EnergyForce(Stress)Metrics) -> (column, unit factor, unit):
    reported value = metric in the data's units x factor (meV)."""
    d = DATASETS[dataset]
    out = {
        "per_atom_energy_mae": ("energy MAE", d.to_mev, "meV/atom"),
        "forces_mae": ("force MAE", d.to_mev, "meV/Å"),
    }
    if d.num_tasks == 3:
        out["stress_mae"] = ("stress MAE", d.to_mev, "meV/Å³")
    return out


# ----------------------------------------------------------------------------- data


def alloy_data(frames: int, seed: int = 0, **generator) -> Path:
    """The seeded EMT alloy file (``nequip-mtl-make-data``), generated once into ``_tmp``;
    ``generator``: further arguments of :func:`nequip_mtl.data.generate_frames` (e.g.
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
    """The data-derived model constants (as nequip's ``training_data_stats`` would give,
    but over the whole file, so every method gets exactly the same model). ``shifts``:
    ``fit`` (per-type energy shifts from a composition fit) or ``mean`` (the per-atom energy
    mean for every type, nequip's ``per_atom_energy_mean``: for data whose frames all have
    one composition, where the fit is singular)."""
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
    counts = np.array(
        [[a.get_chemical_symbols().count(t) for t in type_names] for a in frames], float
    )
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
        "num_frames": len(frames),
        "mean_atoms": atoms / len(frames),
        "per_atom_energy_mean": float(np.mean(e_per_atom)),
        "forces_rms": float(np.sqrt(np.mean(forces**2))),
        "num_neighbors_mean": float(np.average(neighbors, weights=[len(a) for a in frames])),
    }


def write_frames(path: Path, frames) -> None:
    """Write ASE ``frames`` to the extxyz file ``path`` atomically (a part file, renamed)."""
    from nequip_mtl.tools.emt_alloy import write_frames as write

    part = path.with_suffix(f".{os.getpid()}.part.xyz")
    write(frames, part)
    part.replace(path)


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
        "_target_": "nequip.data.dataset.ASEDataset",
        "file_path": str(path),
        "ase_args": {"format": "extxyz"},
        "transforms": [
            {
                "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                "model_type_names": type_names,
                "chemical_species_to_atom_type_map": {s: s for s in type_names},
            },
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": r_max},
        ],
    }


def datamodule(
    path: Path,
    n_train: int,
    n_val: int,
    batch_size: int,
    r_max: float,
    seed: int = 1,
    val_batch: int = 10,
    shuffle: bool = True,
    type_names: list[str] | None = None,
):
    from nequip.data.datamodule import NequIPDataModule

    return NequIPDataModule(
        seed=seed,
        split_dataset={
            "dataset": ase_dataset(path, r_max, type_names),
            "train": n_train,
            "val": n_val,
        },
        train_dataloader={
            "_target_": "torch.utils.data.DataLoader",
            "batch_size": batch_size,
            "shuffle": shuffle,
        },
        val_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": val_batch},
    )


def split_statistics(
    path: Path,
    n_train: int,
    n_val: int,
    r_max: float,
    type_names: list[str],
    seed: int = 1,
) -> dict:
    """The model constants from the *training split* of :func:`datamodule` (same split,
    same ``seed``), in the data's own units: the per-atom energy mean as the shift of every
    type (nequip's ``per_atom_energy_mean``; a composition fit is singular when every frame
    has the same composition), the force RMS and the mean neighbour count."""
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
    return {
        "per_type_energy_shifts": {t: mean for t in type_names},
        "num_frames": n_train + n_val,
        "num_train_frames": len(train),
        "mean_atoms": atoms / len(train),
        "per_atom_energy_mean": mean,
        "forces_rms": float(forces.pow(2).mean().sqrt()),
        "num_neighbors_mean": sum(neighbors) / atoms,
    }


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
    return datamodule(
        Path(data),
        a["n_train"],
        a["n_val"],
        a["batch_size"],
        a["r_max"],
        seed=1,
        type_names=type_names,
    )


# ----------------------------------------------------------------------------- model/module


def model_config(
    dtype: str,
    stats: dict,
    *,
    num_layers: int,
    num_features: int,
    l_max: int,
    r_max: float,
    radial_width: int,
    model_seed: int = 7,
    type_names: list[str] | None = None,
) -> dict:
    return {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": model_seed,
        "model_dtype": dtype,
        "type_names": list(type_names or TYPE_NAMES),
        "r_max": r_max,
        "l_max": l_max,
        "parity": True,
        "num_layers": num_layers,
        "num_features": num_features,
        "radial_mlp_depth": 2,
        "radial_mlp_width": radial_width,
        "avg_num_neighbors": stats["num_neighbors_mean"],
        "per_type_energy_shifts": dict(stats["per_type_energy_shifts"]),
        "per_type_energy_scales": stats["forces_rms"],
    }


def model_arguments(a: Any) -> dict:
    """The model options of :func:`model_config` from a run's arguments (a dict or an
    argparse namespace with num_layers, num_features, l_max, r_max, radial_width)."""
    a = a if isinstance(a, dict) else vars(a)
    keys = ("num_layers", "num_features", "l_max", "r_max", "radial_width")
    return {k: a[k] for k in keys}


def add_run_arguments(
    parser,
    *,
    batch_size: int = 5,
    frames: int | None = None,
    frames_help: str | None = None,
    num_features: int = 32,
    num_layers: int = 2,
    l_max: int = 1,
    radial_width: int = 32,
    r_max: float = 4.5,
    lr: float | None = 5e-3,
) -> None:
    """The model and optimizer options (what :func:`model_arguments`,
    :func:`run_datamodule` and :func:`build_module` read), with the accuracy protocol's
    defaults; the step-cost studies pass their own. ``None``: no such option (``frames``:
    the number of alloy frames generated)."""
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
    """The clock options of a study that trains to a budget (what :func:`fill_defaults`
    fills): ``--seeds``, ``--budget-s``, ``--epochs`` (the equal-epochs view; ``epochs=False``:
    none), ``--clock`` and ``--val-every``."""
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
    """The accuracy benchmarks' float32 model from a run's arguments ``a``, initialised
    with ``seed``."""
    return model_config(
        "float32", stats, **model_arguments(a), model_seed=seed, type_names=type_names
    )


def loss_config(num_tasks: int, coeffs: dict[str, float] | None = None) -> dict:
    coeffs = coeffs or {name: 1.0 for name in TASKS[num_tasks]}
    target = (
        "nequip.train.EnergyForceStressLoss" if num_tasks == 3 else "nequip.train.EnergyForceLoss"
    )
    return {"_target_": target, "per_atom_energy": True, "coeffs": dict(coeffs)}


def metrics_config(num_tasks: int) -> dict:
    if num_tasks == 3:
        return {
            "_target_": "nequip.train.EnergyForceStressMetrics",
            "coeffs": {"per_atom_energy_mae": 1.0, "forces_mae": 1.0, "stress_mae": 1.0},
        }
    return {
        "_target_": "nequip.train.EnergyForceMetrics",
        "coeffs": {"per_atom_energy_mae": 1.0, "forces_mae": 1.0},
    }


def build_module(
    method: M.Method,
    model: dict,
    num_tasks: int,
    lr: float,
    coeffs: dict | None = None,
    loss: dict | None = None,
    num_val: int = 1,
):
    """``method``'s training module: Adam (or the method's optimizer) at ``lr``, nequip's
    energy-force(-stress) loss with ``coeffs`` (or the ``loss`` config given) and
    validation metrics on ``num_val`` validation loaders (``0``: no validation)."""
    from hydra.utils import get_class

    optimizer = {"_target_": "torch.optim.Adam", "lr": lr}
    if method.optimizer is not None:
        optimizer = {"lr": lr, **method.optimizer}
    return get_class(method.module)(
        model=model,
        num_datasets={"train": 1, "val": num_val, "test": 0, "predict": 0},
        optimizer=optimizer,
        loss=loss if loss is not None else loss_config(num_tasks, coeffs),
        val_metrics=metrics_config(num_tasks) if num_val else None,
        **method.kwargs,
    )


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

    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(TMP),
    }
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
    """Two callbacks timing every training step into ``times``: put the first before and
    the second after every other callback, so that the step is timed from the first
    ``on_train_batch_start`` to the last ``on_train_batch_end``. ``before_start(batch_idx)``
    and ``after_stop()`` run outside the timed span."""
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
    :func:`loader_metrics` gives them for ``loaders``)."""
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
            self.elapsed += tick() - self._t0
            self.steps += 1
            if self.elapsed >= budget_s:
                if self.budget_hit_at is None:
                    self.budget_hit_at = {
                        "step": self.steps,
                        "epoch": trainer.current_epoch,
                        "clock_s": self.elapsed,
                    }
                if self.steps >= min_epochs * steps_per_epoch:
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
            self.points.append(
                {
                    "epoch": self.clock.steps / steps_per_epoch,
                    "step": self.clock.steps,
                    "clock_s": self.clock.elapsed,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    **{k: values.get(k) for k in metrics},
                }
            )

    clock = Clock()
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


def budget_results(a: dict, clock, record, per_epoch: int, final: dict) -> tuple[dict, dict]:
    """The two results of a run of :func:`budget_callbacks`: at equal time (the state when
    the budget ran out, ``final`` its validation; if training had to go on to reach
    ``a["epochs"]``, the last epoch validated within the budget) and at equal epochs (the
    validation at the end of epoch ``a["epochs"]``, ``None`` if not recorded)."""
    at_epochs = next((p for p in record.points if p["step"] == a["epochs"] * per_epoch), None)
    hit = clock.budget_hit_at or {"step": clock.steps}
    if clock.steps > hit["step"]:
        within = [p for p in record.points if p["clock_s"] <= a["budget_s"]]
        budget = {
            **(within[-1] if within else record.points[0]),
            "note": "last epoch within budget",
        }
    else:
        budget = {
            "epoch": clock.steps / per_epoch,
            "step": clock.steps,
            "clock_s": clock.elapsed,
            **final,
        }
    return budget, at_epochs


def run_results(a: dict, clock, record, per_epoch: int, final: dict, t0: float, module) -> dict:
    """What every study keeps of a run on the protocol's clock: the equal-time and
    equal-epochs results (:func:`budget_results`), the curve, steps, clocks, parameters."""
    budget, at_epochs = budget_results(a, clock, record, per_epoch, final)
    return {
        "budget": budget,
        "epochs": at_epochs,
        "curve": record.points
        + [{"epoch": None, "step": clock.steps, "clock_s": clock.elapsed, **final}],
        "steps": clock.steps,
        "clock_s": clock.elapsed,
        "wall_s": time.perf_counter() - t0,
        "params": num_params(module),
    }


def fit_on_clock(
    module, dm, a: dict, per_epoch: int, metrics, loaders: dict = ONE_LOADER, callbacks=()
) -> dict:
    """Train ``module`` on ``dm`` on the protocol's clock (:func:`budget_callbacks`,
    validating every ``a["val_every"]`` epochs; with ``a["lr_schedule"] == "cosine"`` the
    learning rate annealed over the budget, :func:`cosine_on_clock`), then validate it once
    more: its :func:`run_results` (``metrics`` named as :func:`loader_metrics` gives them
    for ``loaders``)."""
    clock, record = budget_callbacks(a, per_epoch, metrics, loaders)
    if a.get("lr_schedule", "constant") == "cosine":
        callbacks = [cosine_on_clock(clock, a["budget_s"], a["lr"]), *callbacks]
    fit = trainer(
        [clock, *callbacks, record],
        max_epochs=10_000,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=a["val_every"],
    )
    t0 = time.perf_counter()
    fit.fit(module, datamodule=dm)
    final = {k: v for k, v in validate(module, dm, loaders).items() if k in metrics}
    return run_results(a, clock, record, per_epoch, final, t0, module)


def train_run(task: dict) -> dict:
    """The accuracy protocol's run: train one (method, seed) of ``task`` (``method``,
    ``seed``, ``args``, ``stats``, ``data``, optional ``state_dir``) on its training clock
    (``args["clock"]``) until the budget ``args["budget_s"]`` is spent and
    ``args["epochs"]`` epochs are done (the learning rate constant or, with
    ``lr_schedule: cosine``, annealed over the clock); validate every ``val_every``
    epochs. Returns its curve and results (picklable)."""
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
    per_epoch = math.ceil(a["n_train"] / a["batch_size"])
    clock, record = budget_callbacks(a, per_epoch, metrics)
    extra, switch = [], {}
    if method.two_stage is not None:
        from nequip.train.callbacks import LossCoefficientScheduler

        scheduler = LossCoefficientScheduler(schedule={})
        at_s = method.two_stage["at"] * a["budget_s"]
        second = M.second_stage_coeffs(method, num_tasks)
        extra += [switch_on_clock(clock, scheduler, at_s, second, switch), scheduler]
    if a.get("lr_schedule", "constant") == "cosine":
        extra.append(cosine_on_clock(clock, a["budget_s"], a["lr"]))
    fit = trainer(
        [clock, *extra, *build_callbacks(method), record],
        max_epochs=10_000,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=a.get("val_every", 1),
    )
    t0 = time.perf_counter()
    fit.fit(module, datamodule=dm)
    final = {k: v for k, v in validate(module, dm).items() if k in metrics}
    if task.get("state_dir"):  # the final model, for independent checks (tests)
        torch.save(module.state_dict(), Path(task["state_dir"]) / f"{task['method']}_seed{seed}.pt")
    return {
        "method": task["method"],
        "seed": seed,
        **run_results(a, clock, record, per_epoch, final, t0, module),
        "skipped_steps": getattr(module, "skipped_steps", 0),
        "switch": switch or None,
        "final_coeffs": {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()},
    }


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
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
            for r in pool.imap_unordered(fn, tasks):
                done(r)
    else:
        for t in tasks:
            done(fn(t))


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (``lscpu`` fields, load, versions)."""
    import lightning
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        import nequip

        info["nequip"] = nequip.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        for key in (
            "Model name",
            "CPU(s)",
            "Thread(s) per core",
            "L2 cache",
            "L3 cache",
            "Hypervisor vendor",
        ):
            if key in fields:
                info[key] = fields[key].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_total_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    return info


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")

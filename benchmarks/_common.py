"""Shared pieces of the benchmarks: the offline alloy data, the model, the methods.

Every method is selected exactly as a user would select it in a nequip config: by the
``_target_`` of the training module, of its ``aggregator``, or of a callback on
nequip's weighted-sum module. :data:`METHODS` lists them; :func:`missing_methods`
reports any whose ``_target_`` does not import in this tree.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TMP = RESULTS / "_tmp"  # gitignored: generated data, Lightning scratch

TYPE_NAMES = ["Cu", "Ni", "Pd"]

# the three tasks of the alloy data, by the coefficient keys of nequip's loss builders
TASKS = {2: ["total_energy", "forces"], 3: ["total_energy", "forces", "stress"]}


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to train: a training module (+ kwargs) and optional callbacks."""

    label: str
    module: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    callbacks: tuple[dict[str, Any], ...] = ()
    optimizer: dict[str, Any] | None = None  # None: the benchmark's default (Adam)
    baseline: bool = False  # one of nequip's built-in choices
    family: str = "aggregator"  # baseline | aggregator | weighting
    #: loss coefficients of energy and forces (``TASKS`` names); ``None``: 1 each.
    #: The stress coefficient follows the energy's (both are per-structure targets).
    coeffs: dict[str, float] | None = None
    #: two-stage schedule: at the first epoch that starts after ``at`` x the training
    #: budget, nequip's ``LossCoefficientScheduler`` switches to ``coeffs``
    two_stage: dict[str, Any] | None = None

    def targets(self) -> list[str]:
        out = [self.module]
        agg = self.kwargs.get("aggregator")
        if agg:
            out.append(agg["_target_"])
        out += [cb["_target_"] for cb in self.callbacks]
        return out


MTL = "nequip_mtl.train.MultitaskLightningModule"


def _agg(name: str, label: str, **kw) -> Method:
    return Method(
        label,
        MTL,
        {"aggregator": {"_target_": f"nequip_mtl.aggregators.{name}", **kw}},
        family="aggregator",
    )


def _methods(interval: str) -> dict[str, Method]:
    """All methods; ``interval`` is the update interval of the loss-weighting callbacks."""
    softadapt = {"beta": 1.1, "interval": interval, "frequency": 2}
    return {
        # --- nequip's built-in choices (the baselines)
        "ws": Method(
            "weighted sum (nequip)",
            "nequip.train.NequIPLightningModule",
            baseline=True,
            family="baseline",
        ),
        "config_nequip": Method(
            "ConFIG (nequip)",
            "nequip.train.ConFIGLightningModule",
            baseline=True,
            family="baseline",
        ),
        "softadapt_nequip": Method(
            "SoftAdapt (nequip)",
            "nequip.train.NequIPLightningModule",
            callbacks=({"_target_": "nequip.train.callbacks.SoftAdapt", **softadapt},),
            baseline=True,
            family="baseline",
        ),
        # --- gradient aggregation (nequip_mtl)
        "config": Method("ConFIG (nequip_mtl)", "nequip_mtl.train.ConFIGLightningModule"),
        "mean": _agg("Mean", "Mean"),
        "sum": _agg("Sum", "Sum"),
        "pcgrad": _agg("PCGrad", "PCGrad"),
        "imtlg": _agg("IMTLG", "IMTL-G"),
        "mgda": _agg("MGDA", "MGDA"),
        "upgrad": _agg("UPGrad", "UPGrad"),
        "dualproj": _agg("DualProj", "DualProj"),
        "alignedmtl": _agg("AlignedMTL", "Aligned-MTL"),
        "cagrad": _agg("CAGrad", "CAGrad"),
        "mconfig_adam": Method(
            "M-ConFIG + Adam (no 2nd moment)",
            MTL,
            {
                "aggregator": {
                    "_target_": "nequip_mtl.aggregators.MomentumConFIG",
                    "second_moment": False,
                }
            },
        ),
        "mconfig_adam0": Method(
            "M-ConFIG + Adam(beta1=0) (no 2nd moment)",
            MTL,
            {
                "aggregator": {
                    "_target_": "nequip_mtl.aggregators.momentum_config.MomentumConFIG",
                    "second_moment": False,
                }
            },
            # the aggregator already averages the gradients: no second momentum in Adam
            optimizer={"_target_": "torch.optim.Adam", "betas": [0.0, 0.999]},
        ),
        "mconfig_sgd": Method(
            "M-ConFIG + SGD (2nd moment)",
            MTL,
            {
                "aggregator": {
                    "_target_": "nequip_mtl.aggregators.MomentumConFIG",
                    "second_moment": True,
                }
            },
            optimizer={"_target_": "torch.optim.SGD"},
        ),
        # --- loss weighting (nequip_mtl)
        "uncertainty": Method(
            "Uncertainty weighting",
            "nequip_mtl.train.UncertaintyWeightingLightningModule",
            family="weighting",
        ),
        "famo": Method("FAMO", "nequip_mtl.train.FAMOLightningModule", family="weighting"),
        "softadapt": Method(
            "SoftAdapt (nequip_mtl)",
            "nequip.train.NequIPLightningModule",
            callbacks=({"_target_": "nequip_mtl.train.callbacks.SoftAdapt", **softadapt},),
            family="weighting",
        ),
        "dwa": Method(
            "DWA",
            "nequip.train.NequIPLightningModule",
            callbacks=(
                {
                    "_target_": "nequip_mtl.train.callbacks.DynamicWeightAverage",
                    "temperature": 2.0,
                    "interval": interval,
                    "frequency": 1,
                },
            ),
            family="weighting",
        ),
        "rlw": Method(
            "RLW",
            "nequip.train.NequIPLightningModule",
            callbacks=(
                {
                    "_target_": "nequip_mtl.train.callbacks.RandomLossWeighting",
                    "interval": "batch",
                    "frequency": 1,
                    "seed": 0,
                },
            ),
            family="weighting",
        ),
    }


#: energy:force ratios of the swept weighted sum (``ws`` itself is 1:1)
WS_RATIOS = {"ws_e100": (100, 1), "ws_e10": (10, 1), "ws_f10": (1, 10), "ws_f100": (1, 100)}


def _weighted_sums() -> dict[str, Method]:
    """nequip's plain weighted sum at other energy:force(:stress) ratios, and the MACE-style
    two-stage schedule (forces 100x energy, then energy 10x forces for the last quarter)."""
    plain = "nequip.train.NequIPLightningModule"
    out = {
        name: Method(
            f"weighted sum {e}:{f}",
            plain,
            coeffs={"total_energy": float(e), "forces": float(f)},
            baseline=True,
            family="baseline",
        )
        for name, (e, f) in WS_RATIOS.items()
    }
    out["ws_two_stage"] = Method(
        "weighted sum 1:100, then 10:1",
        plain,
        coeffs={"total_energy": 1.0, "forces": 100.0},
        two_stage={"at": 0.75, "coeffs": {"total_energy": 10.0, "forces": 1.0}},
        baseline=True,
        family="baseline",
    )
    return out


#: the loss metric names of nequip's EnergyForce(Stress)Loss with per_atom_energy
LOSS_METRIC_NAMES = {
    "total_energy": "per_atom_energy_mse",
    "forces": "forces_mse",
    "stress": "stress_mse",
}


def task_coeffs(coeffs: dict[str, float] | None, num_tasks: int) -> dict[str, float] | None:
    """Energy/force coefficients expanded to the data set's tasks (stress = energy's)."""
    if coeffs is None:
        return None
    out = {"total_energy": coeffs["total_energy"], "forces": coeffs["forces"]}
    if num_tasks == 3:
        out["stress"] = coeffs["total_energy"]
    return out


def second_stage_coeffs(method: Method, num_tasks: int) -> dict[str, float]:
    """The second stage's coefficients by loss metric name (LossCoefficientScheduler's keys)."""
    coeffs = task_coeffs(method.two_stage["coeffs"], num_tasks)
    return {LOSS_METRIC_NAMES[k]: v for k, v in coeffs.items()}


#: the Gram-based aggregation methods that take ``weights_every`` (issue 12)
GRAM_METHODS = [
    "config", "mean", "sum", "pcgrad", "imtlg", "mgda", "upgrad", "dualproj", "alignedmtl", "cagrad"
]  # fmt: skip
PERIODS = (2, 4, 8, 16)


def _periodic(table: dict[str, Method]) -> dict[str, Method]:
    """``<method>_k<k>``: the method with ``weights_every: k``."""
    out = {}
    for name in GRAM_METHODS:
        m = table[name]
        for k in PERIODS:
            out[f"{name}_k{k}"] = dataclasses.replace(
                m, label=f"{m.label}, every {k}", kwargs={**m.kwargs, "weights_every": k}
            )
    return out


def _calibrated(steps: int) -> dict[str, Method]:
    """Calibrate-then-freeze on nequip's plain module (``gradnorm`` and UPGrad's weights)."""
    cb = "nequip_mtl.train.callbacks.CalibrateLossCoefficients"
    upgrad = {"_target_": "nequip_mtl.aggregators.UPGrad"}
    return {
        "calib_gradnorm": Method(
            "calibrate-then-freeze (gradnorm)",
            "nequip.train.NequIPLightningModule",
            callbacks=({"_target_": cb, "steps": steps, "rule": "gradnorm"},),
            family="weighting",
        ),
        "calib_upgrad": Method(
            "calibrate-then-freeze (UPGrad weights)",
            "nequip.train.NequIPLightningModule",
            callbacks=(
                {"_target_": cb, "steps": steps, "rule": "aggregator", "aggregator": upgrad},
            ),
            family="weighting",
        ),
    }


def _held_form() -> dict[str, Method]:
    """Issue 12: ``upgrad_k8`` / ``config_k8`` holding loss-scaled weights between refreshes,
    ``w_i * sqrt(L_i(ref) / L_i(t))`` (benchmark-only module ``held_form.py``); ``_lsm``:
    with moving averages of the losses instead of single batches."""
    target = "held_form.LossScaledHeldWeightsModule"
    out = {}
    for name in ("upgrad", "config"):
        m = _periodic(_methods("epoch"))[f"{name}_k8"]
        for suffix, kw, what in (("ls", {}, ""), ("lsm", {"loss_ema": 0.9}, ", loss EMA 0.9")):
            out[f"{name}_k8_{suffix}"] = dataclasses.replace(
                m,
                label=f"{m.label}, loss-scaled held weights{what}",
                module=target,
                kwargs={**m.kwargs, **kw},
            )
    return out


def methods(interval: str = "epoch", calibration_steps: int = 20) -> dict[str, Method]:
    """Every method; the calibrate-then-freeze ones calibrate for ``calibration_steps``."""
    table = _methods(interval)
    return {
        **table,
        **_weighted_sums(),
        **_calibrated(calibration_steps),
        **_periodic(table),
        **_held_form(),
    }


#: the methods run when none are named
DEFAULT_METHODS = list(_methods("epoch"))
ALL_METHODS = list(methods("epoch"))


def _resolves(target: str) -> bool:
    module, _, name = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def missing_methods(keys: list[str], table: dict[str, Method]) -> dict[str, list[str]]:
    """``{method: [unresolvable _target_s]}`` for the methods that cannot be built here."""
    out = {}
    for k in keys:
        bad = [t for t in table[k].targets() if not _resolves(t)]
        if bad:
            out[k] = bad
    return out


# ----------------------------------------------------------------------------- data


def alloy_data(frames: int, seed: int = 0) -> Path:
    """The seeded EMT alloy file (``nequip-mtl-make-data``), generated once into ``_tmp``."""
    from nequip_mtl.data import make_dataset

    path = TMP / f"alloy_{frames}f_seed{seed}.xyz"
    if not path.exists():
        TMP.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part.xyz")
        make_dataset(part, num_frames=frames, seed=seed, elements=TYPE_NAMES)
        part.replace(path)
    return path


def data_statistics(path: Path, r_max: float) -> dict[str, float]:
    """The data-derived model constants (as nequip's ``training_data_stats`` would give,
    but over the whole file, so every method gets exactly the same model)."""
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
        [[a.get_chemical_symbols().count(t) for t in TYPE_NAMES] for a in frames], float
    )
    energies = np.array([a.get_potential_energy() for a in frames])
    shifts, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    resid = energies - counts @ shifts
    return {
        "per_type_energy_shifts": {t: float(x) for t, x in zip(TYPE_NAMES, shifts)},
        "energy_residual_rms_per_atom": float(np.sqrt(np.mean((resid / counts.sum(1)) ** 2))),
        "num_frames": len(frames),
        "mean_atoms": atoms / len(frames),
        "per_atom_energy_mean": float(np.mean(e_per_atom)),
        "forces_rms": float(np.sqrt(np.mean(forces**2))),
        "num_neighbors_mean": float(np.average(neighbors, weights=[len(a) for a in frames])),
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

    type_names = list(type_names or TYPE_NAMES)

    return NequIPDataModule(
        seed=seed,
        split_dataset={
            "dataset": {
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
            },
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


# --- the real DFT ethanol data (issue 12): /work/shared/data/README.md

#: 100 frames of ethanol (C2H6O, non-periodic), energies in kcal/mol, forces in kcal/mol/Å
#: (``shared/`` sits beside the repository: here, and in CI's fresh clone)
ETHANOL = Path(
    os.environ.get(
        "NEQUIP_MTL_ETHANOL", ROOT.parent.parent / "shared" / "data" / "ethanol_reduced_100.xyz"
    )
)
ETHANOL_TYPE_NAMES = ["C", "H", "O"]
#: 1 kcal/mol in meV
KCAL_MOL_TO_MEV = 43.364


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


def add_run_arguments(parser) -> None:
    """The accuracy protocol's model and optimizer options (what :func:`run_model`,
    :func:`run_datamodule` and :func:`build_module` read), with its defaults."""
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--num-features", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--l-max", type=int, default=1)
    parser.add_argument("--radial-width", type=int, default=32)
    parser.add_argument("--r-max", type=float, default=4.5)
    parser.add_argument("--lr", type=float, default=5e-3)


def run_model(a: dict, stats: dict, seed: int, type_names: list[str]) -> dict:
    """The accuracy benchmarks' float32 model from a run's arguments ``a`` (num_layers,
    num_features, l_max, r_max, radial_width), initialised with ``seed``."""
    return model_config(
        "float32",
        stats,
        num_layers=a["num_layers"],
        num_features=a["num_features"],
        l_max=a["l_max"],
        r_max=a["r_max"],
        radial_width=a["radial_width"],
        model_seed=seed,
        type_names=type_names,
    )


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


def data_and_statistics(
    dataset: str, frames: int, n_train: int, r_max: float, type_names: list[str]
) -> tuple[Path, dict]:
    """The data file of ``dataset`` (``alloy``: generated; ``ethanol``) and the model
    constants: the alloy's from the whole file, ethanol's from the training split only."""
    if dataset == "alloy":
        path = alloy_data(frames, seed=0)
        return path, data_statistics(path, r_max)
    return ETHANOL, split_statistics(ETHANOL, n_train, frames - n_train, r_max, type_names)


def validate(module, datamodule) -> dict[str, float]:
    """One validation pass of ``module`` (the trainer's own loop, no logging): every
    ``val0_epoch/`` metric by its short name."""
    import lightning

    trainer = lightning.Trainer(
        accelerator="cpu",
        inference_mode=False,  # forces are gradients
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(TMP),
    )
    out = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {k.split("/")[-1]: float(v) for k, v in out.items() if k.startswith("val0_epoch/")}


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
    method: Method, model: dict, num_tasks: int, lr: float, coeffs: dict | None = None
):
    from hydra.utils import get_class

    optimizer = {"_target_": "torch.optim.Adam", "lr": lr}
    if method.optimizer is not None:
        optimizer = {"lr": lr, **method.optimizer}
    return get_class(method.module)(
        model=model,
        num_datasets={"train": 1, "val": 1, "test": 0, "predict": 0},
        optimizer=optimizer,
        loss=loss_config(num_tasks, coeffs),
        val_metrics=metrics_config(num_tasks),
        **method.kwargs,
    )


def build_callbacks(method: Method) -> list:
    from hydra.utils import instantiate

    return [instantiate(dict(cb)) for cb in method.callbacks]


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


def machine_line(info: dict) -> str:
    return (
        f"{info.get('Model name', platform.machine())}, {info.get('CPU(s)', info['cpu_count'])} vCPU "
        f"({info.get('Hypervisor vendor', 'bare metal')} VM), {info.get('mem_total_gib', '?')} GiB RAM, "
        f"torch {info['torch']}, nequip {info.get('nequip', '?')}, lightning {info['lightning']}, "
        f"{info['torch_threads']} torch thread(s), load avg at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
    )


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")

"""Per-step cost of multitask training modules relative to the weighted-sum step.

Every method trains the same NequIP model (same seed, same batches) inside one process.
Methods are interleaved in rounds (round r runs each method for ``--steps`` batches, in
a rotated order) so that slow drifts of the machine hit every method alike; the first
round is warm-up and is discarded. The time of a step is measured from Lightning's
``on_train_batch_start`` to ``on_train_batch_end`` (forward, losses, backward passes,
aggregation and optimizer step).

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --tasks 2 3 --dtypes float32 float64

Writes ``benchmarks/results/step_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning  # noqa: E402
import torch  # noqa: E402
from nequip.data.datamodule import NequIPDataModule  # noqa: E402
from nequip.utils.global_state import set_global_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

METHODS = {
    "weighted_sum (nequip)": ("nequip.train.NequIPLightningModule", {}),
    "ConFIG (nequip)": ("nequip.train.ConFIGLightningModule", {}),
    "ConFIG (nequip_mtl)": ("nequip_mtl.train.ConFIGLightningModule", {}),
}

LOSS_NAMES = {2: ["total_energy", "forces"], 3: ["total_energy", "forces", "stress"]}


class StepTimer(lightning.Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def _datamodule(args) -> NequIPDataModule:
    species = ["Cu"]
    return NequIPDataModule(
        seed=1,
        split_dataset={
            "dataset": {
                "_target_": "nequip.data.dataset.EMTTestDataset",
                "transforms": [
                    {
                        "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                        "model_type_names": species,
                        "chemical_species_to_atom_type_map": {s: s for s in species},
                    },
                    {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": args.r_max},
                ],
                "supercell": [args.supercell] * 3,
                "seed": 1,
                "num_frames": args.batch_size * args.steps,
                "element": "Cu",
            },
            "train": args.batch_size * args.steps - 1,
            "val": 1,
        },
        train_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": args.batch_size},
        val_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": 1},
    )


def _module(target: str, extra: dict, dtype: str, num_tasks: int, args):
    from hydra.utils import get_class

    coeffs = {name: 1.0 for name in LOSS_NAMES[num_tasks]}
    loss = (
        {"_target_": "nequip.train.EnergyForceStressLoss", "coeffs": coeffs}
        if num_tasks == 3
        else {"_target_": "nequip.train.EnergyForceLoss", "coeffs": coeffs}
    )
    model = {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": 7,
        "model_dtype": dtype,
        "type_names": ["Cu"],
        "r_max": args.r_max,
        "l_max": args.l_max,
        "parity": True,
        "num_layers": args.num_layers,
        "num_features": args.num_features,
        "radial_mlp_depth": 2,
        "radial_mlp_width": args.num_features * 2,
        "avg_num_neighbors": 40.0,
        "per_type_energy_shifts": {"Cu": -3.0},
        "per_type_energy_scales": {"Cu": 0.5},
    }
    return get_class(target)(
        model=model,
        num_datasets={"train": 1, "val": 1, "test": 0, "predict": 0},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-4},
        loss=loss,
        val_metrics={
            "_target_": "nequip.train.EnergyForceMetrics",
            "coeffs": {"total_energy_mae": 1.0, "forces_mae": 1.0},
        },
        **extra,
    )


def _time_method(target, extra, dtype, num_tasks, args, datamodule, tmp) -> tuple[list[float], int]:
    torch.manual_seed(0)
    module = _module(target, extra, dtype, num_tasks, args)
    timer = StepTimer()
    trainer = lightning.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
        default_root_dir=tmp,
    )
    trainer.fit(module, datamodule=datamodule)
    n_params = sum(p.numel() for p in module.model.parameters())
    return timer.times[1:], n_params  # drop each run's first (allocation) step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=4, help="rounds incl. one warm-up round")
    parser.add_argument("--steps", type=int, default=6, help="batches per method per round")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--supercell", type=int, default=2)
    parser.add_argument("--num-features", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--l-max", type=int, default=2)
    parser.add_argument("--r-max", type=float, default=4.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(RESULTS / "step_cost"))
    args = parser.parse_args(argv)

    set_global_state()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    datamodule = _datamodule(args)
    tmp = str(Path(args.out).parent / "_tmp")
    results = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            times = {m: [] for m in args.methods}
            n_params = 0
            for r in range(args.rounds):
                order = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
                for m in order:
                    target, extra = METHODS[m]
                    t, n_params = _time_method(target, extra, dtype, num_tasks, args, datamodule, tmp)
                    if r > 0:
                        times[m].extend(t)
            base = statistics.median(times["weighted_sum (nequip)"]) if "weighted_sum (nequip)" in times else None
            nequip_config = statistics.median(times["ConFIG (nequip)"]) if "ConFIG (nequip)" in times else None
            for m in args.methods:
                med = statistics.median(times[m])
                row = {
                    "method": m,
                    "dtype": dtype,
                    "tasks": num_tasks,
                    "params": n_params,
                    "median_step_s": med,
                    "n_steps": len(times[m]),
                    "vs_weighted_sum": med / base if base else None,
                    "vs_nequip_config": med / nequip_config if nequip_config else None,
                }
                results.append(row)
                print(json.dumps(row))

    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"Step cost, {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['time']}",
        "",
        "| dtype | tasks | params | method | median step (ms) | vs weighted sum | vs nequip ConFIG |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['tasks']} | {r['params']} | {r['method']} | {1e3 * r['median_step_s']:.1f} "
            f"| {r['vs_weighted_sum']:.3f} | {r['vs_nequip_config']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

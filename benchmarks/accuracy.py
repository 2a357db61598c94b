"""Validation accuracy of every multitask method at equal compute and at equal epochs.

Each (method, seed) trains the same NequIP model on the same data with the same optimizer
settings: ``--dataset alloy`` (default) is the offline EMT alloy data (energies, forces,
stresses; ``nequip-mtl-make-data``), ``--dataset ethanol`` the real DFT ethanol frames
of ``/work/shared/data/ethanol_reduced_100.xyz`` (100 frames of C2H6O, non-periodic,
energies and forces in kcal/mol and kcal/mol/Å; 80 training / 20 validation frames;
env var ``NEQUIP_MTL_ETHANOL`` overrides the path). Ethanol errors are reported in meV
(1 kcal/mol = 43.364 meV), like the alloy ones; the json keeps the data's own units.
Each run trains until its *training clock* reaches the budget ``--budget-s``; then the
model is validated once more. The training clock counts the time from ``on_train_batch_start``
to ``on_train_batch_end`` of every step (forward, backward passes, aggregation,
optimizer step, callbacks), not validation. By default it is the CPU time of the single
compute thread (``--clock cpu``), which on an idle machine equals the wall-clock time
and on a shared machine is not inflated by other processes; ``--clock wall`` uses
wall-clock time instead.

Two protocols come out of the same runs:

- **equal wall-clock** (``--budget-s``): the validation after the budget is spent;
- **equal epochs** (``--epochs``): the validation at the end of epoch ``--epochs``
  (every epoch is validated). The learning rate is constant, so a run truncated after
  ``E`` epochs is exactly a run of ``E`` epochs. A method too slow to finish ``E``
  epochs within the budget keeps training until it has (its budget result is still
  taken when the budget runs out).

Runs are ordered seed by seed, with the method order rotated per seed. Seeds set the
model initialisation and the batch order; the data split is fixed.

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py                   # full (< 1 h on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --quick           # a few minutes
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --methods ws config mconfig_adam --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --dataset ethanol --jobs 2

Writes ``benchmarks/results/accuracy.{json,md}`` and ``accuracy_curves.png``
(``accuracy_ethanol.*`` with ``--dataset ethanol``; ``--out`` to choose).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# validation metric names (EnergyForceStressMetrics) -> (column, unit factor, unit):
# reported value = metric in the data's units x factor
METRICS_BY_DATASET = {
    # eV -> meV
    "alloy": {
        "per_atom_energy_mae": ("energy MAE", 1e3, "meV/atom"),
        "forces_mae": ("force MAE", 1e3, "meV/Å"),
        "stress_mae": ("stress MAE", 1e3, "meV/Å³"),
    },
    # kcal/mol -> meV
    "ethanol": {
        "per_atom_energy_mae": ("energy MAE", C.KCAL_MOL_TO_MEV, "meV/atom"),
        "forces_mae": ("force MAE", C.KCAL_MOL_TO_MEV, "meV/Å"),
    },
}
#: the data set's (type names, number of tasks, training frames, frames, description)
DATASETS = {
    "alloy": (C.TYPE_NAMES, 3, 150, 200, "EMT alloy"),
    "ethanol": (C.ETHANOL_TYPE_NAMES, 2, 80, 100, "DFT ethanol (rMD17-style, kcal/mol)"),
}
METRICS = METRICS_BY_DATASET["alloy"]  # the data set in use (use_dataset)


def use_dataset(name: str) -> None:
    """Select the metrics and units of data set ``name`` for this process."""
    global METRICS
    METRICS = METRICS_BY_DATASET[name]


DEFAULT_METHODS = [m for m in C.DEFAULT_METHODS if m != "mean"]  # Mean == Sum for equal coeffs


# ----------------------------------------------------------------------------- one run


def _callbacks(budget_s: float, min_epochs: int, steps_per_epoch: int, clock: str):
    import lightning

    tick = time.thread_time if clock == "cpu" else time.perf_counter

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
            metrics = {
                k.split("/")[-1]: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("val0_epoch")
            }
            self.points.append(
                {
                    "epoch": self.clock.steps / steps_per_epoch,
                    "step": self.clock.steps,
                    "clock_s": self.clock.elapsed,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    **{k: metrics.get(k) for k in METRICS},
                }
            )

    clock_cb = Clock()
    return clock_cb, Record(clock_cb)


def _metrics_now(module, datamodule) -> dict:
    """The data set's reported metrics after one validation pass."""
    return {k: v for k, v in C.validate(module, datamodule).items() if k in METRICS}


def _cosine_on_clock(clock, budget_s: float, lr: float):
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


def _switch_on_clock(clock, scheduler, at_s: float, coeffs: dict, record: dict):
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


def run_one(task: dict) -> dict:
    """Train one (method, seed) and return its curve and results (picklable)."""
    import lightning
    import torch
    from nequip.utils.global_state import set_global_state

    set_global_state()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    a = task["args"]
    dataset = a.get("dataset", "alloy")
    use_dataset(dataset)
    type_names, num_tasks = DATASETS[dataset][:2]
    method = C.methods(interval="epoch")[task["method"]]
    seed = task["seed"]
    lightning.seed_everything(seed, workers=True, verbose=False)

    stats = task["stats"]
    model = C.run_model(a, stats, seed, type_names)
    if any("RandomLossWeighting" in cb["_target_"] for cb in method.callbacks):
        method = dataclasses.replace(
            method,
            callbacks=tuple(
                {**cb, "seed": seed} if "RandomLossWeighting" in cb["_target_"] else cb
                for cb in method.callbacks
            ),
        )
    module = C.build_module(
        method, model, num_tasks, lr=a["lr"], coeffs=C.task_coeffs(method.coeffs, num_tasks)
    )
    dm = C.run_datamodule(task["data"], a, type_names)
    clock, record = _callbacks(
        a["budget_s"], a["epochs"], math.ceil(a["n_train"] / a["batch_size"]), a["clock"]
    )
    extra, switch = [], {}
    if method.two_stage is not None:
        from nequip.train.callbacks import LossCoefficientScheduler

        scheduler = LossCoefficientScheduler(schedule={})
        at_s = method.two_stage["at"] * a["budget_s"]
        second = C.second_stage_coeffs(method, num_tasks)
        extra += [_switch_on_clock(clock, scheduler, at_s, second, switch), scheduler]
    if a.get("lr_schedule", "constant") == "cosine":
        extra.append(_cosine_on_clock(clock, a["budget_s"], a["lr"]))
    trainer = lightning.Trainer(
        max_epochs=10_000,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=a.get("val_every", 1),
        callbacks=[clock, *extra, *C.build_callbacks(method), record],
        default_root_dir=str(C.TMP),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    final = _metrics_now(module, dm)
    if task.get("state_dir"):  # the final model, for independent checks (tests)
        import torch

        torch.save(
            module.state_dict(),
            Path(task["state_dir"]) / f"{task['method']}_seed{seed}.pt",
        )
    at_epochs = next(
        (
            p
            for p in record.points
            if p["step"] == a["epochs"] * math.ceil(a["n_train"] / a["batch_size"])
        ),
        None,
    )
    per_epoch = math.ceil(a["n_train"] / a["batch_size"])
    hit = clock.budget_hit_at or {"step": clock.steps}
    # the budget result is the state when the budget ran out; if training had to go on
    # to reach `epochs`, the last epoch validated within the budget is used instead
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
    return {
        "method": task["method"],
        "seed": seed,
        "budget": budget,
        "epochs": at_epochs,
        "curve": record.points
        + [{"epoch": None, "step": clock.steps, "clock_s": clock.elapsed, **final}],
        "steps": clock.steps,
        "clock_s": clock.elapsed,
        "wall_s": time.perf_counter() - t0,
        "skipped_steps": getattr(module, "skipped_steps", 0),
        "switch": switch or None,
        "final_coeffs": {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()},
        "params": sum(p.numel() for p in module.model.parameters()),
    }


# ----------------------------------------------------------------------------- summary


def _mean_sd(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs, methods, key) -> list[dict]:
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {"method": m, "n": len(rs), "n_reached": sum(r[key] is not None for r in rs)}
        for metric in METRICS:
            row[metric] = _mean_sd([r[key][metric] if r[key] else None for r in rs])
        row["steps"] = _mean_sd([r[key]["step"] if r[key] else None for r in rs])[0]
        row["epoch"] = _mean_sd([r[key]["epoch"] if r[key] else None for r in rs])[0]
        rows.append(row)
    return rows


def _cell(v, metric):
    mean, sd = v
    if mean is None:
        return "n/a"
    f = METRICS[metric][1]
    return f"{mean * f:.1f} ± {sd * f:.1f}"


def targets_lines(by_budget, labels) -> list[str]:
    """The accuracy targets of issue #8, read off the equal-time table."""
    table_ = C.methods()
    by = {r["method"]: r for r in by_budget}
    ours = [
        r for r in by_budget if not table_[r["method"]].baseline and r["forces_mae"][0] is not None
    ]
    if not ours or "config_nequip" not in by or "ws" not in by:
        return []
    best = min(ours, key=lambda r: r["forces_mae"][0])
    f = METRICS["forces_mae"][1]

    def ms(r, k):
        return f"{r[k][0] * f:.1f} ± {r[k][1] * f:.1f}"

    nc, ws = by["config_nequip"], by["ws"]
    met_f = best["forces_mae"][0] < nc["forces_mae"][0]
    met_e = best["per_atom_energy_mae"][0] <= ws["per_atom_energy_mae"][0]
    return [
        "Targets at equal training time (mean ± sd over seeds):",
        "",
        f"- best of ours by force MAE: {labels[best['method']]}, force MAE {ms(best, 'forces_mae')} "
        f"meV/Å vs nequip's ConFIG {ms(nc, 'forces_mae')}: {'met' if met_f else 'MISSED'}",
        f"- its energy MAE {ms(best, 'per_atom_energy_mae')} meV/atom vs the weighted sum's "
        f"{ms(ws, 'per_atom_energy_mae')}: {'met (no worse)' if met_e else 'MISSED (worse)'}",
        f"- the weighted sum's force MAE: {ms(ws, 'forces_mae')} meV/Å",
    ]


def versus_ws_lines(rows, labels, view: str) -> list[str]:
    """Which methods beat the weighted sum on *both* force and energy MAE (means), and the
    best ratios to it otherwise."""
    by = {r["method"]: r for r in rows}
    ws = by.get("ws")
    if ws is None or ws["forces_mae"][0] is None:
        return []
    f_ws, e_ws = ws["forces_mae"][0], ws["per_atom_energy_mae"][0]
    ratios = {
        m: (r["forces_mae"][0] / f_ws, r["per_atom_energy_mae"][0] / e_ws)
        for m, r in by.items()
        if m != "ws" and r["forces_mae"][0] is not None and r["n_reached"] == r["n"]
    }
    if not ratios:
        return []
    both = sorted((m for m, (f, e) in ratios.items() if f < 1 and e < 1), key=lambda m: ratios[m])
    best_f = min(ratios, key=lambda m: ratios[m][0])
    best_e = min(ratios, key=lambda m: ratios[m][1])
    best_both = min(ratios, key=lambda m: max(ratios[m]))

    def r(m):
        return f"{labels[m]} (force {ratios[m][0]:.2f}x, energy {ratios[m][1]:.2f}x)"

    return [
        f"Against nequip's weighted sum at {view} (ratios of mean MAEs; < 1 is better):",
        "",
        "- better on both force and energy MAE: "
        + (", ".join(r(m) for m in both) if both else "none"),
        f"- best force ratio: {r(best_f)}",
        f"- best energy ratio: {r(best_e)}",
        f"- best worse-of-the-two ratio: {r(best_both)}",
    ]


def table(rows, labels, caption) -> list[str]:
    head = " | ".join(f"{METRICS[k][0]} ({METRICS[k][2]})" for k in METRICS)
    lines = [
        caption,
        "",
        f"| method | {head} | steps | epochs |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    ws = next((r for r in rows if r["method"] == "ws"), None)
    for r in sorted(rows, key=lambda r: (r["forces_mae"][0] is None, r["forces_mae"][0] or 0)):
        cells = " | ".join(_cell(r[k], k) for k in METRICS)
        steps = "n/a" if r["steps"] is None else f"{r['steps']:.0f}"
        epochs = "n/a" if r["epoch"] is None else f"{r['epoch']:.1f}"
        note = "" if r["n_reached"] == r["n"] else f" ({r['n_reached']}/{r['n']} runs)"
        bold = "**" if ws is not None and r is ws else ""
        lines.append(f"| {bold}{labels[r['method']]}{bold}{note} | {cells} | {steps} | {epochs} |")
    return lines


def _mean_curve(rs, metric, grid):
    import numpy as np

    ys = []
    for r in rs:
        pts = sorted((p["clock_s"], p[metric]) for p in r["curve"] if p.get(metric) is not None)
        if pts:
            x, y = np.array(pts).T
            ys.append(np.interp(grid, x, np.log(y), left=np.nan))
    if not ys:
        return None
    ys = np.array(ys)
    ok = ~np.isnan(ys).any(axis=0)  # only where every seed has a point
    out = np.full(grid.shape, np.nan)
    out[ok] = np.exp(ys[:, ok].mean(axis=0))
    return out


def plot_curves(path: Path, runs, methods, labels, budget_s: float, clock: str) -> None:
    """Two rows (aggregators, loss weighting; the nequip baselines in both) x 3 metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table_ = C.methods()
    baselines = [m for m in methods if table_[m].baseline]
    rows = [
        (
            "gradient aggregation (nequip_mtl)",
            [m for m in methods if table_[m].family == "aggregator"],
        ),
        ("loss weighting (nequip_mtl)", [m for m in methods if table_[m].family == "weighting"]),
    ]
    rows = [(t, ms) for t, ms in rows if ms] or [("nequip's methods", [])]
    fig, axes = plt.subplots(
        len(rows), len(METRICS), figsize=(6 * len(METRICS), 5 * len(rows)), squeeze=False
    )
    grid = np.linspace(0, budget_s, 80)
    base_style = {
        "ws": ("k", "-"),
        "config_nequip": ("0.45", "-"),
        "softadapt_nequip": ("0.7", "-"),
    }
    cmap = plt.get_cmap("tab10")
    for (title, ours), ax_row in zip(rows, axes):
        for j, m in enumerate(baselines + ours):
            color, style = base_style.get(m, (cmap(j % 10), "--" if j % 20 >= 10 else "-"))
            if m not in base_style:
                color, style = (
                    cmap((j - len(baselines)) % 10),
                    ("-" if j - len(baselines) < 10 else "--"),
                )
            lw = 2.4 if m in base_style else 1.4
            rs = [r for r in runs if r["method"] == m]
            for ax, metric in zip(ax_row, METRICS):
                y = _mean_curve(rs, metric, grid)
                if y is not None:
                    ax.plot(
                        grid, y * METRICS[metric][1], style, color=color, lw=lw, label=labels[m]
                    )
        for ax, metric in zip(ax_row, METRICS):
            ax.set_yscale("log")
            ax.set_xlabel(f"training {'CPU' if clock == 'cpu' else 'wall-clock'} time (s)")
            ax.set_ylabel(f"validation {METRICS[metric][0]} ({METRICS[metric][2]})")
            ax.set_title(title)
            ax.grid(alpha=0.3, which="both")
        ax_row[-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "Validation error vs training time (geometric mean over seeds; thick grey/black: nequip's "
        "weighted sum, ConFIG and SoftAdapt)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few minutes: short budget, 2 seeds, few methods"
    )
    parser.add_argument("--dataset", choices=list(DATASETS), default="alloy")
    parser.add_argument("--methods", nargs="+", default=None, choices=C.ALL_METHODS)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="training-clock budget per run (s)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="the equal-epochs protocol")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    parser.add_argument(
        "--frames", type=int, default=None, help="alloy: 200 (generated); ethanol: 100 (all)"
    )
    parser.add_argument("--n-train", type=int, default=None, help="alloy: 150; ethanol: 80")
    C.add_run_arguments(parser)
    parser.add_argument("--out", default=None, help="default results/accuracy[_ethanol]")
    parser.add_argument("--from-json", help="only rewrite the md/png outputs from this json")
    parser.add_argument("--save-states", help=argparse.SUPPRESS)  # final models (tests)
    args = parser.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        saved = argparse.Namespace(
            **{"dataset": "alloy", **data["meta"]["args"], "out": args.out or args.from_json}
        )
        saved.out = str(Path(saved.out).with_suffix(""))
        use_dataset(saved.dataset)
        ran = {r["method"] for r in data["runs"]}
        # the run's own method order (the table's tie order); all methods: the registry's
        methods = [m for m in (saved.methods or C.ALL_METHODS) if m in ran]
        info = {**data["meta"]["machine"], "date": data["meta"]["time"]}
        write_outputs(
            saved,
            info,
            data["meta"]["data"],
            methods,
            data["runs"],
            data["meta"]["elapsed_s"],
            data["meta"]["missing_methods"],
        )
        return
    use_dataset(args.dataset)
    type_names, _, n_train, frames, _ = DATASETS[args.dataset]
    default_out = C.RESULTS / ("accuracy" if args.dataset == "alloy" else "accuracy_ethanol")
    quick = {"budget_s": 8.0, "epochs": 1, "seeds": [0, 1]}
    full = {"budget_s": 30.0, "epochs": 8, "seeds": [0, 1, 2]}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.frames = args.frames or frames
    args.n_train = args.n_train or n_train
    if args.dataset == "ethanol" and args.frames > frames:
        parser.error(f"the ethanol file has {frames} frames")
    args.out = args.out or str(C.TMP / "accuracy_quick" if args.quick else default_out)
    if args.quick:
        args.methods = args.methods or [
            "ws",
            "config_nequip",
            "softadapt_nequip",
            "config",
            "mconfig_adam",
            "famo",
        ]
    methods = args.methods or DEFAULT_METHODS
    table_ = C.methods()
    missing = C.missing_methods(methods, table_)
    for m, bad in missing.items():
        print(f"SKIPPING {m}: cannot import {bad}", flush=True)
    methods = [m for m in methods if m not in missing]

    path, stats = C.data_and_statistics(
        args.dataset, args.frames, args.n_train, args.r_max, type_names
    )
    a = {
        **{
            k: v
            for k, v in vars(args).items()
            if k not in ("methods", "seeds", "out", "save_states")
        },
        "n_val": args.frames - args.n_train,
    }
    tasks = []
    for i, seed in enumerate(args.seeds):
        k = i % len(methods)
        for m in methods[k:] + methods[:k]:
            tasks.append(
                {
                    "method": m,
                    "seed": seed,
                    "args": a,
                    "stats": stats,
                    "data": str(path),
                    "state_dir": args.save_states,
                }
            )

    import torch  # noqa: F401  (after OMP_NUM_THREADS)

    info = C.machine_info()
    t0 = time.perf_counter()
    runs = []
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, tasks):
                runs.append(r)
                _progress(r, len(runs), len(tasks), t0)
    else:
        for t in tasks:
            r = run_one(t)
            runs.append(r)
            _progress(r, len(runs), len(tasks), t0)
    elapsed = time.perf_counter() - t0
    write_outputs(args, info, stats, methods, runs, elapsed, missing)


def _progress(r, i, n, t0):
    b = r["budget"]
    fe, ff = METRICS["per_atom_energy_mae"][1], METRICS["forces_mae"][1]
    print(
        f"[{i}/{n} {time.perf_counter() - t0:.0f} s] {r['method']} seed {r['seed']}: {r['steps']} steps, "
        f"force MAE {ff * b['forces_mae']:.1f} meV/Å, energy {fe * b['per_atom_energy_mae']:.2f} meV/atom "
        f"(run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})",
        flush=True,
    )


def write_outputs(args, info, stats, methods, runs, elapsed, missing) -> None:
    out = Path(args.out)
    table_ = C.methods()
    labels = {m: table_[m].label for m in methods}
    by_budget = summarize(runs, methods, "budget")
    by_epochs = summarize(runs, methods, "epochs")
    meta = {
        "machine": {**info, "loadavg_end": os.getloadavg()},
        "args": vars(args),
        "data": stats,
        "time": info.get("date", C.now()),
        "elapsed_s": elapsed,
        "missing_methods": missing,
    }
    C.write_json(
        out.with_suffix(".json"),
        {"meta": meta, "equal_budget": by_budget, "equal_epochs": by_epochs, "runs": runs},
    )
    params = runs[0]["params"] if runs else None
    clock = "CPU" if args.clock == "cpu" else "wall-clock"
    dataset = getattr(args, "dataset", "alloy")
    description = DATASETS[dataset][4]
    if dataset == "alloy":
        loss = "loss coefficients 1:1:1 (per-atom energy, forces, stress MSE)"
        units = "Errors in meV (the data is in eV)."
    else:
        loss = "loss coefficients 1:1 (per-atom energy, forces MSE, in kcal/mol units)"
        units = (
            f"Errors converted from the data's kcal/mol and kcal/mol/Å to meV/atom and meV/Å "
            f"(1 kcal/mol = {C.KCAL_MOL_TO_MEV} meV); the json keeps kcal/mol."
        )
    lines = [
        f"Accuracy on {C.machine_line(info)}; {info.get('date', C.now())}; total {elapsed / 60:.1f} min "
        f"({args.jobs} run(s) at a time).",
        "",
        f"NequIP model with {params} parameters (l_max={args.l_max}, {args.num_layers} layers, "
        f"{args.num_features} features), float32, Adam (M-ConFIG + SGD: SGD) with constant lr "
        f"{args.lr}, batch {args.batch_size}; "
        f"{args.n_train} training / {args.frames - args.n_train} validation {description} frames; "
        f"{loss}. Mean ± sample standard "
        f"deviation over seeds {args.seeds}; sorted by force MAE; the weighted sum is in bold. "
        f"{units}",
        "",
    ]
    lines += table(
        by_budget,
        labels,
        f"**Equal training time: {args.budget_s:.0f} s of training {clock} time per run**",
    )
    lines += [""]
    lines += table(by_epochs, labels, f"**Equal epochs: {args.epochs} epochs per run**")
    lines += [""] + targets_lines(by_budget, labels)
    lines += [""] + versus_ws_lines(by_budget, labels, "equal training time")
    lines += [""] + versus_ws_lines(by_epochs, labels, "equal epochs")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    plot_curves(
        out.parent / (out.name + "_curves.png"), runs, methods, labels, args.budget_s, args.clock
    )


if __name__ == "__main__":
    main()

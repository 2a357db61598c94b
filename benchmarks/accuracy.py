"""Validation accuracy of every multitask method at equal compute and at equal epochs.

Each (method, seed) trains the same NequIP model on the same data with the same optimizer
settings: ``--dataset alloy`` (default) is the offline EMT alloy data (energies, forces,
stresses; ``nequip-mtl-make-data``), ``--dataset ethanol`` the real DFT ethanol frames
of ``benchmarks/data/ethanol_reduced_100.xyz`` (100 frames of C2H6O, non-periodic,
energies and forces in kcal/mol and kcal/mol/Å; 80 training / 20 validation frames).
Ethanol errors are reported in meV
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

    OMP_NUM_THREADS=1 python -m benchmarks.accuracy                   # full (< 1 h on 2 cores)
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --quick           # a few minutes
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --methods ws config mconfig_adam --seeds 0 1
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --dataset ethanol --jobs 2

Writes ``benchmarks/results/accuracy.{json,md}`` and ``accuracy_curves.png``
(``accuracy_ethanol.*`` with ``--dataset ethanol``; ``--out`` to choose). ``--from-json``
rewrites them from a results json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

DEFAULT_METHODS = [m for m in M.DEFAULT_METHODS if m != "mean"]  # Mean == Sum for equal coeffs
QUICK_METHODS = ["ws", "config_nequip", "softadapt_nequip", "config", "mconfig_adam", "famo"]


# ----------------------------------------------------------------------------- summary


def summarize(runs, methods, key, metrics) -> list[dict]:
    """Per method: mean and sd over seeds of every metric at ``key`` (``budget`` or
    ``epochs``), the mean steps and epochs, and how many runs reached it."""
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {"method": m, "n": len(rs), "n_reached": sum(r[key] is not None for r in rs)}
        for metric in metrics:
            row[metric] = R.mean_sd([r[key][metric] if r[key] else None for r in rs])
        row["steps"] = R.mean_sd([r[key]["step"] if r[key] else None for r in rs])[0]
        row["epoch"] = R.mean_sd([r[key]["epoch"] if r[key] else None for r in rs])[0]
        rows.append(row)
    return rows


def by_force(rows) -> list[dict]:
    """The rows sorted by mean force MAE (rows without one last)."""
    return sorted(rows, key=lambda r: (r["forces_mae"][0] is None, r["forces_mae"][0] or 0))


def cells(r, metrics) -> list[str]:
    """The metric cells (mean ± sd in meV), the steps and the epochs of a summary row."""
    return [
        *(R.pm(r[k], metrics[k][1]) for k in metrics),
        "n/a" if r["steps"] is None else f"{r['steps']:.0f}",
        "n/a" if r["epoch"] is None else f"{r['epoch']:.1f}",
    ]


def header(metrics) -> list[str]:
    return [f"{name} ({unit})" for name, _, unit in metrics.values()]


def targets_lines(by_budget, labels, metrics) -> list[str]:
    """The accuracy targets of issue #8, read off the equal-time table."""
    table_ = M.methods()
    by = {r["method"]: r for r in by_budget}
    ours = [
        r for r in by_budget if not table_[r["method"]].baseline and r["forces_mae"][0] is not None
    ]
    if not ours or "config_nequip" not in by or "ws" not in by:
        return []
    best = min(ours, key=lambda r: r["forces_mae"][0])
    f = metrics["forces_mae"][1]

    def ms(r, k):
        return R.pm(r[k], f)

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


def table(rows, labels, caption, metrics) -> list[str]:
    lines = [
        caption,
        "",
        R.md_row(["method", *header(metrics), "steps", "epochs"]),
        R.md_rule(len(metrics) + 3),
    ]
    ws = next((r for r in rows if r["method"] == "ws"), None)
    for r in by_force(rows):
        note = "" if r["n_reached"] == r["n"] else f" ({r['n_reached']}/{r['n']} runs)"
        bold = "**" if ws is not None and r is ws else ""
        lines.append(R.md_row([f"{bold}{labels[r['method']]}{bold}{note}", *cells(r, metrics)]))
    return lines


def plot_curves(path: Path, runs, methods, labels, budget_s: float, clock: str, metrics) -> None:
    """Two rows (aggregators, loss weighting; the nequip baselines in both) x 3 metrics."""
    import numpy as np

    plt = R.pyplot()
    table_ = M.methods()
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
        len(rows), len(metrics), figsize=(6 * len(metrics), 5 * len(rows)), squeeze=False
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
            for ax, metric in zip(ax_row, metrics):
                y = R.mean_curve(rs, metric, grid)
                if y is not None:
                    ax.plot(
                        grid, y * metrics[metric][1], style, color=color, lw=lw, label=labels[m]
                    )
        for ax, metric in zip(ax_row, metrics):
            ax.set_yscale("log")
            ax.set_xlabel(f"training {'CPU' if clock == 'cpu' else 'wall-clock'} time (s)")
            ax.set_ylabel(f"validation {metrics[metric][0]} ({metrics[metric][2]})")
            ax.set_title(title)
            ax.grid(alpha=0.3, which="both")
        ax_row[-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "Validation error vs training time (geometric mean over seeds; thick grey/black: nequip's "
        "weighted sum, ConFIG and SoftAdapt)"
    )
    fig.tight_layout()
    R.save(fig, path)


# ----------------------------------------------------------------------------- report


def ran_methods(data: dict, first: list[str] = ()) -> list[str]:
    """The methods of a results json that ran, in the run's own order (``first``, then
    ``--methods``; all methods: the registry's order)."""
    ran = {r["method"] for r in data["runs"]}
    wanted = [*first, *(data["meta"]["args"].get("methods") or M.ALL_METHODS)]
    return [m for m in dict.fromkeys(wanted) if m in ran]


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    a = {"dataset": "alloy", **meta["args"]}
    metrics = P.reported_metrics(a["dataset"])
    methods = ran_methods(data)
    labels = {m: M.methods()[m].label for m in methods}
    info, elapsed = meta["machine"], meta["elapsed_s"]
    params = runs[0]["params"] if runs else None
    clock = "CPU" if a["clock"] == "cpu" else "wall-clock"
    if a["dataset"] == "alloy":
        loss = "loss coefficients 1:1:1 (per-atom energy, forces, stress MSE)"
        units = "Errors in meV (the data is in eV)."
    else:
        loss = "loss coefficients 1:1 (per-atom energy, forces MSE, in kcal/mol units)"
        units = (
            f"Errors converted from the data's kcal/mol and kcal/mol/Å to meV/atom and meV/Å "
            f"(1 kcal/mol = {P.KCAL_MOL_TO_MEV} meV); the json keeps kcal/mol."
        )
    lines = [
        f"Accuracy on {R.machine_line(info)}; {meta['time']}; total {elapsed / 60:.1f} min "
        f"({a['jobs']} run(s) at a time).",
        "",
        f"NequIP model with {params} parameters (l_max={a['l_max']}, {a['num_layers']} layers, "
        f"{a['num_features']} features), float32, Adam (M-ConFIG + SGD: SGD) with constant lr "
        f"{a['lr']}, batch {a['batch_size']}; "
        f"{a['n_train']} training / {a['frames'] - a['n_train']} validation "
        f"{P.DATASETS[a['dataset']].description} frames; "
        f"{loss}. Mean ± sample standard "
        f"deviation over seeds {a['seeds']}; sorted by force MAE; the weighted sum is in bold. "
        f"{units}",
        "",
    ]
    by_budget = summarize(runs, methods, "budget", metrics)
    by_epochs = summarize(runs, methods, "epochs", metrics)
    caption = f"**Equal training time: {a['budget_s']:.0f} s of training {clock} time per run**"
    lines += table(by_budget, labels, caption, metrics)
    lines += [""]
    lines += table(by_epochs, labels, f"**Equal epochs: {a['epochs']} epochs per run**", metrics)
    lines += [""] + targets_lines(by_budget, labels, metrics)
    lines += [""] + versus_ws_lines(by_budget, labels, "equal training time")
    lines += [""] + versus_ws_lines(by_epochs, labels, "equal epochs")
    return "\n".join(lines) + "\n"


def report(data: dict, out: Path) -> None:
    """``out``.json (the raw runs and meta data, with the two summaries), .md and
    ``_curves.png``."""
    meta, runs = data["meta"], data["runs"]
    a = {"dataset": "alloy", **meta["args"]}
    metrics = P.reported_metrics(a["dataset"])
    methods = ran_methods(data)
    summaries = {
        "equal_budget": summarize(runs, methods, "budget", metrics),
        "equal_epochs": summarize(runs, methods, "epochs", metrics),
    }
    R.write_json(out.with_suffix(".json"), {"meta": meta, **summaries, "runs": runs})
    R.write_text(out.with_suffix(".md"), markdown(data))
    labels = {m: M.methods()[m].label for m in methods}
    curves = out.parent / (out.name + "_curves.png")
    plot_curves(curves, runs, methods, labels, a["budget_s"], a["clock"], metrics)


# ----------------------------------------------------------------------------- run


def progress(r, i, n, t0, metrics) -> None:
    b = r["budget"]
    fe, ff = metrics["per_atom_energy_mae"][1], metrics["forces_mae"][1]
    print(
        f"[{i}/{n} {time.perf_counter() - t0:.0f} s] {r['method']} seed {r['seed']}: {r['steps']} steps, "
        f"force MAE {ff * b['forces_mae']:.1f} meV/Å, energy {fe * b['per_atom_energy_mae']:.2f} meV/atom "
        f"(run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})",
        flush=True,
    )


def run_arguments(args, exclude=("methods", "seeds", "out", "save_states")) -> dict:
    """A run's arguments (``train_run``'s ``a``): the options but the selection ones."""
    return {
        **{k: v for k, v in vars(args).items() if k not in exclude},
        "n_val": args.frames - args.n_train,
    }


def run(args, methods: list[str]) -> dict:
    """Train every (method, seed), ``--jobs`` at a time; the results json's content."""
    dataset = P.DATASETS[args.dataset]
    path, stats = P.data_and_statistics(
        args.dataset, args.frames, args.n_train, args.r_max, dataset.type_names
    )
    a = run_arguments(args)
    tasks = [
        {"method": m, "seed": seed, "args": a, "stats": stats, "data": str(path),
         "state_dir": args.save_states}
        for seed, m in P.rotated(methods, args.seeds)
    ]  # fmt: skip

    import torch  # noqa: F401  (after OMP_NUM_THREADS)

    metrics = P.reported_metrics(args.dataset)
    info = P.machine_info()
    t0 = time.perf_counter()
    runs = []

    def done(r):
        runs.append(r)
        progress(r, len(runs), len(tasks), t0, metrics)

    P.run_all(P.train_run, tasks, args.jobs, done)
    meta = {
        "machine": {**info, "loadavg_end": os.getloadavg()},
        "args": vars(args),
        "data": stats,
        "time": P.now(),
        "elapsed_s": time.perf_counter() - t0,
    }
    return {"meta": meta, "runs": runs}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few minutes: short budget, 2 seeds, few methods"
    )
    parser.add_argument("--dataset", choices=list(P.DATASETS), default="alloy")
    parser.add_argument("--methods", nargs="+", default=None, choices=M.ALL_METHODS)
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
    P.add_run_arguments(parser)
    parser.add_argument("--out", default=None, help="default results/accuracy[_ethanol]")
    R.add_from_json(parser)
    parser.add_argument("--save-states", help=argparse.SUPPRESS)  # final models (tests)
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    dataset = P.DATASETS[args.dataset]
    default_out = P.RESULTS / ("accuracy" if args.dataset == "alloy" else "accuracy_ethanol")
    quick = {"budget_s": 8.0, "epochs": 1, "seeds": [0, 1]}
    full = {"budget_s": 30.0, "epochs": 8, "seeds": [0, 1, 2]}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.frames = args.frames or dataset.frames
    args.n_train = args.n_train or dataset.n_train
    if args.dataset == "ethanol" and args.frames > dataset.frames:
        parser.error(f"the ethanol file has {dataset.frames} frames")
    args.out = args.out or str(P.TMP / "accuracy_quick" if args.quick else default_out)
    if args.quick:
        args.methods = args.methods or list(QUICK_METHODS)
    methods = args.methods or DEFAULT_METHODS
    missing = M.missing_methods(methods, M.methods())
    for m, bad in missing.items():
        print(f"SKIPPING {m}: cannot import {bad}", flush=True)
    methods = [m for m in methods if m not in missing]
    data = run(args, methods)
    data["meta"]["missing_methods"] = missing
    report(data, Path(args.out))


if __name__ == "__main__":
    main()

"""Validation accuracy of every multitask method at equal compute and at equal epochs.

Each (method, seed) trains the same NequIP model on the same data with the same optimizer
settings (:func:`benchmarks.protocol.train_run`): ``--dataset alloy`` (default), the offline
EMT alloy (energies, forces, stresses in eV), or ``--dataset ethanol``, the DFT ethanol
frames of ``benchmarks/data/`` (kcal/mol, reported in meV; 80 training / 20 validation). A
run trains until its *training clock* (the CPU time of the compute thread over the training
steps, ``--clock cpu``; or wall-clock time) reaches ``--budget-s``, then is validated once
more: the **equal-time** view. Every epoch is validated, and with the constant learning
rate the validation after ``--epochs`` epochs is the **equal-epochs** view (a method too slow
to finish them within the budget trains on until it has). Runs go seed by seed, the method
order rotated per seed; seeds set the initialisation and batch order, the split is fixed.

    OMP_NUM_THREADS=1 python -m benchmarks.accuracy                   # full (< 1 h on 2 cores)
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --quick           # a few minutes
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --dataset ethanol --methods ws upgrad --jobs 2

Writes ``benchmarks/results/accuracy.{json,md}`` and ``accuracy_curves.png`` (``--out`` to
choose); ``--from-json`` rewrites them from a results json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

DEFAULT_METHODS = [m for m in M.DEFAULT_METHODS if m != "mean"]  # Mean == Sum for equal coeffs
QUICK_METHODS = ["ws", "config_nequip", "softadapt_nequip", "config", "mconfig_adam", "famo"]


# ----------------------------------------------------------------------------- report


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
    """One view: every method's errors, steps and epochs, by force MAE, the weighted sum
    in bold."""
    lines = [caption, "", R.md_row(["method", *R.header(metrics), "steps", "epochs"]),
             R.md_rule(len(metrics) + 3)]  # fmt: skip
    for r in R.sorted_by(rows):
        note = "" if r["n_reached"] == r["n"] else f" ({r['n_reached']}/{r['n']} runs)"
        bold = "**" if r["method"] == "ws" else ""
        lines.append(R.md_row([f"{bold}{labels[r['method']]}{bold}{note}", *R.cells(r, metrics)]))
    return lines


#: the nequip baselines' curves: (colour, line style, width)
BASE_STYLE = {"ws": ("k", "-", 2.4), "config_nequip": ("0.45", "-", 2.4),
              "softadapt_nequip": ("0.7", "-", 2.4)}  # fmt: skip


def plot_curves(path: Path, runs, methods, labels, a: dict, metrics) -> None:
    """Two rows (aggregators, loss weighting; the nequip baselines in both) x the metrics."""
    table_ = M.methods()
    baselines = [m for m in methods if table_[m].baseline]
    panels = [
        (title, baselines + [m for m in methods if table_[m].family == family])
        for title, family in (("gradient aggregation (nequip_mtl)", "aggregator"),
                              ("loss weighting (nequip_mtl)", "weighting"))
        if any(table_[m].family == family for m in methods)
    ] or [("nequip's methods", baselines)]  # fmt: skip
    cmap = R.pyplot().get_cmap("tab10")

    def style(m, j):
        j -= len(baselines)
        return BASE_STYLE.get(m) or (cmap(j % 10), "-" if j < 10 else "--", 1.4)

    R.plot_curves(path, runs, panels, labels, metrics, a["budget_s"], style, clock=a["clock"],
                  title="Validation error vs training time (geometric mean over seeds; thick "
                  "grey/black: nequip's weighted sum, ConFIG and SoftAdapt)")  # fmt: skip


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    a = {"dataset": "alloy", **meta["args"]}
    metrics = P.reported_metrics(a["dataset"])
    methods = P.ran_methods(data)
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
    by_budget = R.summarize(runs, methods, "budget", metrics)
    by_epochs = R.summarize(runs, methods, "epochs", metrics)
    caption = f"**Equal training time: {a['budget_s']:.0f} s of training {clock} time per run**"
    lines += table(by_budget, labels, caption, metrics)
    lines += [""]
    lines += table(by_epochs, labels, f"**Equal epochs: {a['epochs']} epochs per run**", metrics)
    lines += [""] + versus_ws_lines(by_budget, labels, "equal training time")
    lines += [""] + versus_ws_lines(by_epochs, labels, "equal epochs")
    return "\n".join(lines) + "\n"


def report(data: dict, out: Path) -> None:
    """``out``.json (the raw runs and meta data, with the two summaries), .md and
    ``_curves.png``."""
    meta, runs = data["meta"], data["runs"]
    a = {"dataset": "alloy", **meta["args"]}
    metrics = P.reported_metrics(a["dataset"])
    methods = P.ran_methods(data)
    summaries = {
        "equal_budget": R.summarize(runs, methods, "budget", metrics),
        "equal_epochs": R.summarize(runs, methods, "epochs", metrics),
    }
    R.write_json(out.with_suffix(".json"), {"meta": meta, **summaries, "runs": runs})
    R.write_text(out.with_suffix(".md"), markdown(data))
    labels = {m: M.methods()[m].label for m in methods}
    curves = out.parent / (out.name + "_curves.png")
    plot_curves(curves, runs, methods, labels, a, metrics)


# ----------------------------------------------------------------------------- run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = P.study_parser(__doc__)
    parser.add_argument("--dataset", choices=list(P.DATASETS), default="alloy")
    parser.add_argument("--methods", nargs="+", default=None, choices=M.ALL_METHODS)
    P.add_budget_arguments(parser)
    parser.add_argument("--frames", type=int, default=None,
                        help="alloy: 200 (generated); ethanol: 100 (all)")  # fmt: skip
    parser.add_argument("--n-train", type=int, default=None, help="alloy: 150; ethanol: 80")
    P.add_run_arguments(parser)
    parser.add_argument("--save-states", help=argparse.SUPPRESS)  # final models (tests)
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    dataset = P.DATASETS[args.dataset]
    quick = {"budget_s": 8.0, "epochs": 1, "seeds": [0, 1], "val_every": 1}
    P.fill_defaults(args, quick, {**quick, "budget_s": 30.0, "epochs": 8, "seeds": [0, 1, 2]})
    args.frames = args.frames or dataset.frames
    args.n_train = args.n_train or dataset.n_train
    if args.dataset == "ethanol" and args.frames > dataset.frames:
        parser.error(f"the ethanol file has {dataset.frames} frames")
    name = "accuracy" if args.dataset == "alloy" or args.quick else "accuracy_ethanol"
    args.out = P.out_path(args, name)
    if args.quick:
        args.methods = args.methods or list(QUICK_METHODS)
    methods = args.methods or DEFAULT_METHODS
    if missing := M.missing_methods(methods, M.methods()):
        raise SystemExit(f"cannot import {missing}")
    path, stats = P.data_and_statistics(args.dataset, args.frames, args.n_train, args.r_max,
                                        dataset.type_names)  # fmt: skip
    a = P.run_arguments(args)
    tasks = [
        {"method": m, "seed": seed, "args": a, "stats": stats, "data": str(path),
         "state_dir": args.save_states}
        for seed, m in P.rotated(methods, args.seeds)
    ]  # fmt: skip
    results = P.Results(args.out, "accuracy", argv, vars(args), stats, runs=[])
    metrics = P.reported_metrics(args.dataset)

    def done(r):
        results.add("runs", r)
        P.progress(r, len(results.lists["runs"]), len(tasks), results.t0, metrics)

    P.run_all(P.train_run, tasks, args.jobs, done)
    report(results.data(), Path(args.out))


if __name__ == "__main__":
    main()

"""Each multitask method against a swept weighted sum: the energy-force Pareto front.

nequip's plain module at five energy:force ratios (100:1 to 1:100; alloy: stress follows
energy) and a MACE-style two-stage schedule (1:100, then 10:1 for the last quarter of the
training clock, switched by nequip's ``LossCoefficientScheduler``), and our methods at their
defaults, on the protocol of ``benchmarks/accuracy.py`` (:func:`benchmarks.protocol.train_run`).
The weighted sums that no other beats on both energy and force MAE (means over seeds) form
the front; every other method is *beyond* it (no weighted sum better on both, and better on
both than a front point), *on* it, or *dominated* (:func:`benchmarks.report.classify`).
Views: equal training time and, with the constant learning rate, equal epochs (the
two-stage schedule left out); ``--lr-schedule cosine`` anneals the learning rate to 0 over
the clock (equal time only).

    OMP_NUM_THREADS=1 python -m benchmarks.pareto --dataset ethanol --jobs 2
    OMP_NUM_THREADS=1 python -m benchmarks.pareto --dataset alloy --budget-s 120 \\
        --lr-schedule cosine --val-every 5 --methods upgrad upgrad_k8 --jobs 2 --out /tmp/p
    OMP_NUM_THREADS=1 python -m benchmarks.pareto --quick            # about a minute

Writes ``benchmarks/results/pareto_<dataset>.{json,md,png}`` and ``..._curves.png`` (error
against training time, the learning rate beside); ``--from-json`` rewrites them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R
from benchmarks.methods import BASELINES, SWEEP, TWO_STAGE

#: our methods (and nequip's ConFIG) placed against the front by default
DEFAULT_METHODS = [
    "config_nequip", "config", "upgrad", "dualproj", "pcgrad", "upgrad_k8", "calib_upgrad",
    "calib_gradnorm", "uncertainty", "softadapt",
]  # fmt: skip
E, F = "per_atom_energy_mae", "forces_mae"


def classify(rows: list[dict]) -> dict[str, dict]:
    """Every row against the weighted-sum front on energy and force MAE
    (:func:`benchmarks.report.classify`)."""
    return R.classify(rows, BASELINES, (E, F))


def flattening(runs, budget_s: float) -> dict | None:
    """How much the 1:1 weighted sum's validation force MAE still fell over the last
    quarter of the budget (mean over seeds of MAE(3/4 budget) / MAE(budget) - 1)."""
    import numpy as np

    drops = []
    for r in (r for r in runs if r["method"] == "ws"):
        pts = sorted((p["clock_s"], p[F]) for p in r["curve"] if p.get(F) is not None)
        if len(pts) < 2:
            continue
        x, y = np.array(pts).T
        drops.append(float(np.interp(0.75 * budget_s, x, y)) / r["budget"][F] - 1.0)
    if not drops:
        return None
    return {"last_quarter_drop": float(np.mean(drops)), "per_seed": drops}


def status_lines(rows, labels, view: str) -> list[str]:
    status = classify(rows)
    front = [r["method"] for r in rows if status[r["method"]]["status"] == "front"]
    lines = [f"Against the weighted-sum front at {view}:", ""]
    lines.append("- weighted-sum front: " + ", ".join(labels[m] for m in front))
    ours = [r["method"] for r in rows if r["method"] not in BASELINES]
    for kind in ("beyond", "on", "dominated"):
        ms = [m for m in ours if status[m]["status"] == kind]
        lines.append(f"- {kind}: " + (", ".join(labels[m] for m in ms) if ms else "none"))
    return lines


def table(rows, labels, caption, metrics) -> list[str]:
    """One view: every method's errors, steps and epochs, by force MAE, the weighted sums
    in bold, and its place against their front."""
    status = classify(rows)

    def short(m):
        return labels[m].replace("weighted sum ", "")

    head = ["method", *R.header(metrics), "steps", "epochs", "vs the weighted-sum front"]
    lines = [caption, "", R.md_row(head), R.md_rule(len(head))]
    for r in R.sorted_by(rows):
        m = r["method"]
        name = f"**{labels[m]}**" if m in BASELINES else labels[m]
        note = "" if r["n_reached"] == r["n"] else f" ({r['n_reached']}/{r['n']} runs)"
        lines.append(
            R.md_row([name + note, *R.cells(r, metrics), R.place(status[m], short, m in BASELINES)])
        )
    return lines


def views_of(a: dict, runs, methods, metrics) -> list[tuple[str, str, list[dict]]]:
    """``(key, caption, rows)`` per view."""
    clock = "CPU" if a["clock"] == "cpu" else "wall-clock"
    views = [("budget", f"equal training time: {a['budget_s']:.0f} s of training {clock} time",
              R.summarize(runs, methods, "budget", metrics))]  # fmt: skip
    if a["lr_schedule"] == "constant":
        no_switch = [m for m in methods if m != TWO_STAGE]
        views.append(("epochs", f"equal epochs: {a['epochs']} epochs",
                      R.summarize(runs, no_switch, "epochs", metrics)))  # fmt: skip
    return views


def setting(data: dict) -> tuple[dict, dict, list[str], dict]:
    """A results json's arguments (with the defaults of earlier runs), metrics, methods that
    ran and their labels."""
    a = {"dataset": "alloy", "lr_schedule": "constant", **data["meta"]["args"]}
    methods = P.ran_methods(data, first=BASELINES)
    table_ = M.methods()
    labels = {m: table_[m].label for m in methods} | {"ws": "weighted sum 1:1"}
    return a, P.reported_metrics(a["dataset"]), methods, labels


def render(data: dict, title: str) -> str:
    """The tables of a run of :func:`benchmarks.protocol.train_run` (this study's or
    ``benchmarks/accuracy.py``'s): every view, each method placed against the weighted sums
    that ran."""
    meta, runs = data["meta"], data["runs"]
    a, metrics, methods, labels = setting(data)
    lr = (f"constant lr {a['lr']}" if a["lr_schedule"] == "constant"
          else f"lr {a['lr']} annealed to 0 (cosine) over the {a['budget_s']:.0f} s training clock")  # fmt: skip
    notes = []
    if (flat := flattening(runs, a["budget_s"])) is not None:
        notes.append(f"The 1:1 weighted sum's validation force MAE fell by "
                     f"{100 * flat['last_quarter_drop']:.1f}% over the last quarter of the budget "
                     "(mean over seeds).")  # fmt: skip
    if switches := [r["switch"] for r in runs if r.get("switch")]:
        frac = [s["clock_s"] / a["budget_s"] for s in switches]
        notes.append(f"The two-stage schedule switched at epoch {min(s['epoch'] for s in switches)}-"
                     f"{max(s['epoch'] for s in switches)}, after {100 * min(frac):.0f}-"
                     f"{100 * max(frac):.0f}% of the training clock.")  # fmt: skip
    lines = R.preamble(
        title, meta, a["jobs"], meta.get("command"),
        f"{P.model_text(a, runs[0]['params'] if runs else None)}, Adam"
        + (" (M-ConFIG + SGD: SGD)" if "mconfig_sgd" in methods else "")
        + f" with {lr}, batch {a['batch_size']}; {a['n_train']} training / "
        f"{a['frames'] - a['n_train']} validation {P.DATASETS[a['dataset']].description} "
        "frames. Weighted sums: nequip's plain module at energy:force coefficient ratios"
        + (" (stress = energy's)" if a["dataset"] == "alloy" else "")
        + "; our methods at 1:1 coefficients and their defaults. Mean ± sample standard "
        f"deviation over seeds {a['seeds']}. {P.units_text(a['dataset'])}",
        *notes,
    )  # fmt: skip
    for _, cap, rows in views_of(a, runs, methods, metrics):
        lines += table(rows, labels, f"**{cap[0].upper() + cap[1:]}**", metrics)
        lines += [""] + status_lines(rows, labels, cap.split(":")[0]) + [""]
    return "\n".join(lines)


def markdown(data: dict) -> str:
    return render(data, "Pareto benchmark")


#: the rows of the error-against-time figure: the methods of a family, with the weighted sums
FAMILIES = {"gradient aggregation (nequip_mtl)": "aggregator",
            "loss weighting (nequip_mtl)": "weighting"}  # fmt: skip


def report(data: dict, out: Path, title: str = "Pareto benchmark") -> None:
    """``out``.json (raw runs, meta data, the views), .md, .png (the front) and
    ``_curves.png`` (validation errors against training time, the learning rate beside)."""
    meta, runs = data["meta"], data["runs"]
    a, metrics, methods, labels = setting(data)
    views = views_of(a, runs, methods, metrics)
    meta = {**meta, "flattening": flattening(runs, a["budget_s"])}
    meta.pop("partial", None)
    views_json = {key: {"caption": cap, "rows": rows, "status": classify(rows)}
                  for key, cap, rows in views}  # fmt: skip
    R.write_json(out.with_suffix(".json"), {"meta": meta, "views": views_json, "runs": runs})
    R.write_text(out.with_suffix(".md"), render(data, title))
    fig = R.plot_front(
        [(cap, rows) for _, cap, rows in views], labels,
        f"{P.DATASETS[a['dataset']].description}: validation error of each method against "
        f"nequip's weighted sum (mean ± sd over {len(a['seeds'])} seeds)",
        metrics, x=E, y=F, sweep=SWEEP, baselines=BASELINES,
    )  # fmt: skip
    R.save(fig, out.parent / (out.name + ".png"))
    table_ = M.methods()
    base = [m for m in methods if table_[m].baseline]
    panels = [(t, base + [m for m in methods if table_[m].family == f])
              for t, f in FAMILIES.items() if any(table_[m].family == f for m in methods)]  # fmt: skip
    cmap = R.pyplot().get_cmap("tab10")

    def style(m, j):
        if m in base:
            return str(0.15 + 0.6 * base.index(m) / len(base)), "--" if m == TWO_STAGE else "-", 2.0
        return cmap((j - len(base)) % 10), "-" if j - len(base) < 10 else "--", 1.4

    lr_run = next((r for r in runs if r["method"] == "ws"), runs[0])
    R.plot_curves(out.parent / (out.name + "_curves.png"), runs, panels or [("", base)], labels,
                  metrics, a["budget_s"], style, clock=a["clock"], lr_run=lr_run)  # fmt: skip


def parse(argv):
    p = P.study_parser(__doc__)
    p.add_argument("--dataset", choices=list(P.DATASETS), default="ethanol")
    p.add_argument("--methods", nargs="+", default=None, choices=M.ALL_METHODS,
                   help="our methods placed against the front (the sweep always runs)")  # fmt: skip
    P.add_budget_arguments(p)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    P.add_run_arguments(p)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.from_json:
        return args
    quick = {"budget_s": 2.0, "epochs": 1, "seeds": [0], "val_every": 1}
    P.fill_defaults(
        args, quick, {"budget_s": 30.0, "epochs": 8, "seeds": [0, 1, 2], "val_every": 4}
    )
    if args.lr_schedule == "cosine":
        args.epochs = 1  # no equal-epochs view: a run stops when its budget is spent
    elif args.epochs % args.val_every:
        p.error(f"--epochs {args.epochs} must be a multiple of --val-every {args.val_every}")
    args.n_train, args.frames = P.DATASETS[args.dataset].n_train, P.DATASETS[args.dataset].frames
    if args.quick:
        args.methods = args.methods or ["upgrad"]
        args.num_features, args.radial_width = 8, 8
    args.methods = args.methods or DEFAULT_METHODS
    args.out = P.out_path(args, f"pareto_{args.dataset}")
    return args


def run(args, argv, methods: list[str], study: str, report_fn) -> None:
    """Train every (method, seed) of ``methods`` on the protocol's clock, ``--jobs`` at a
    time, the method order rotated per seed; the json after every run, then the report."""
    if missing := M.missing_methods(methods, M.methods()):
        raise SystemExit(f"cannot import {missing}")
    type_names = P.DATASETS[args.dataset].type_names
    path, stats = P.data_and_statistics(args.dataset, args.frames, args.n_train, args.r_max,
                                        type_names)  # fmt: skip
    a = P.run_arguments(args)
    tasks = [{"method": m, "seed": seed, "args": a, "stats": stats, "data": str(path),
              "state_dir": getattr(args, "save_states", None)}
             for seed, m in P.rotated(methods, args.seeds, shift=5 if study == "pareto" else 1)]  # fmt: skip
    results = P.Results(args.out, study, argv, vars(args), stats, runs=[])
    metrics = P.reported_metrics(args.dataset)

    def done(r):
        results.add("runs", r)
        P.progress(r, len(results.lists["runs"]), len(tasks), results.t0, metrics)

    P.run_all(P.train_run, tasks, args.jobs, done)
    report_fn(results.data(), Path(args.out))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    run(args, argv, BASELINES + [m for m in args.methods if m not in BASELINES], "pareto", report)


if __name__ == "__main__":
    main()

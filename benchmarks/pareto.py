"""Each multitask method against a swept weighted sum: the energy-force Pareto front.

A user's alternative to a multitask method is not the weighted sum at 1:1 but a weighted
sum whose coefficients they tune. This benchmark trains nequip's plain module at five
energy:force ratios (100:1, 10:1, 1:1, 1:10, 1:100; on the alloy data the stress
coefficient follows the energy's) and with a MACE-style two-stage schedule (1:100, then
10:1 for the last quarter of the training time, switched by nequip's
``LossCoefficientScheduler``), and our methods at their defaults, all with the same
model, data, optimizer and training-clock budget (the protocol of ``accuracy.py``, whose
run it uses, ``protocol.train_run``: see its docstring for the clock, the data sets and
the units).

The weighted-sum points that no other weighted-sum point beats on both energy and force
MAE (means over seeds) form the empirical front. Each other method is then

- **beyond** the front: no weighted-sum point is better on both, and it is better on both
  than at least one point of the front (it moves the front);
- **on** the front: no weighted-sum point is better on both, and it beats no front point
  on both;
- **dominated**: some weighted-sum point is better on both (named in the table).

Views: equal training time (``--budget-s``), and with the constant learning rate also
equal epochs (``--epochs``; the two-stage schedule has not switched yet at that point and
is left out of that view). ``--lr-schedule cosine`` anneals the learning rate to 0 over
the training clock (the same schedule in time for every method), for budgets long enough
that the models are trained rather than in early training; it has only the equal-time view.

    OMP_NUM_THREADS=1 python -m benchmarks.pareto --dataset ethanol --jobs 2
    OMP_NUM_THREADS=1 python -m benchmarks.pareto --dataset alloy --jobs 2
    OMP_NUM_THREADS=1 python -m benchmarks.pareto --dataset ethanol --budget-s 180 \\
        --lr-schedule cosine --methods upgrad upgrad_k8 config calib_upgrad calib_gradnorm \\
        uncertainty --val-every 10 --jobs 36 --out benchmarks/results/pareto_ethanol_long
    OMP_NUM_THREADS=1 python -m benchmarks.pareto --quick            # about a minute

Writes ``benchmarks/results/pareto_<dataset>.{json,md,png}`` (``--out`` to choose) and
``..._curves.png`` (validation error against training time, the learning rate beside).
``--from-json`` rewrites all of them from a results json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import accuracy as A
from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R
from benchmarks.methods import BASELINES, SWEEP, TWO_STAGE

#: our methods (and nequip's ConFIG) placed against the front by default
DEFAULT_METHODS = [
    "config_nequip",
    "config",
    "upgrad",
    "dualproj",
    "pcgrad",
    "upgrad_k8",
    "calib_upgrad",
    "calib_gradnorm",
    "uncertainty",
    "softadapt",
]
E, F = "per_atom_energy_mae", "forces_mae"


# ----------------------------------------------------------------------------- front


def _better_on_both(a: dict, b: dict, objectives=(E, F)) -> bool:
    """``a`` has lower means than ``b`` on both ``objectives`` (energy and force MAE)."""
    return all(a[k][0] < b[k][0] for k in objectives)


def classify(rows: list[dict], baselines=BASELINES, objectives=(E, F)) -> dict[str, dict]:
    """Front membership of every row (summaries with ``(mean, sd)`` per metric):
    ``{"status": front|beyond|on|dominated, "by": [...], "beats": [...]}``; ``by``: the
    weighted sums (``baselines``) better on both ``objectives`` (energy and force MAE),
    ``beats``: the *front* points it is better on both than (beating a weighted sum that
    is itself off the front does not move the front)."""

    def better(a, b):
        return _better_on_both(a, b, objectives)

    ws = [r for r in rows if r["method"] in baselines and r[objectives[0]][0] is not None]
    front = [w for w in ws if not any(better(v, w) for v in ws if v is not w)]
    out = {}
    for r in rows:
        if any(r[k][0] is None for k in objectives):
            out[r["method"]] = {"status": "n/a", "by": [], "beats": []}
            continue
        by = [w["method"] for w in ws if w is not r and better(w, r)]
        beats = [w["method"] for w in front if w is not r and better(r, w)]
        if r["method"] in baselines:
            status = "dominated" if by else "front"
        else:
            status = "dominated" if by else ("beyond" if beats else "on")
        out[r["method"]] = {"status": status, "by": by, "beats": beats}
    return out


def pareto_points(rows: list[dict], metrics, x: str = E, y: str = F) -> list[dict]:
    """The plotted points, in display units: mean and sd per method of the ``x`` (the
    energy MAE, as ``energy``) and ``y`` (the force MAE, as ``force``) metrics."""
    fx, fy = metrics[x][1], metrics[y][1]
    return [
        {
            "method": r["method"],
            "energy": r[x][0] * fx,
            "energy_sd": r[x][1] * fx,
            "force": r[y][0] * fy,
            "force_sd": r[y][1] * fy,
        }
        for r in rows
        if r[x][0] is not None and r[y][0] is not None
    ]


# ----------------------------------------------------------------------------- plots


def plot_pareto(
    views: list[tuple[str, list[dict]]],
    labels: dict[str, str],
    title: str,
    metrics,
    *,
    x: str = E,
    y: str = F,
    sweep: list[str] = SWEEP,
    baselines: list[str] = BASELINES,
    what: str = "validation",
):
    """One panel per view: our methods and the weighted-sum sweep (joined in ``sweep``
    order), mean ± sd over seeds of the ``x`` and ``y`` metrics (energy and force MAE),
    log-log. Returns the figure (the caller saves it); every point is an errorbar whose
    marker line has its method key as ``gid``."""
    plt = R.pyplot()
    fig, axes = plt.subplots(1, len(views), figsize=(8 * len(views), 6.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (view, rows) in zip(axes[0], views):
        status = classify(rows, baselines, (x, y))
        points = {p["method"]: p for p in pareto_points(rows, metrics, x, y)}
        line = [points[m] for m in sweep if m in points]
        ax.plot([p["energy"] for p in line], [p["force"] for p in line], "-", color="0.6", lw=1)
        ours = [m for m in points if m not in baselines]
        for m, p in points.items():
            if m in baselines:
                style = {"fmt": "s" if m in sweep else "D", "color": "k", "ms": 7}
            else:
                style = {"fmt": "o", "color": cmap(ours.index(m) % 10), "ms": 7}
            container = ax.errorbar(
                p["energy"],
                p["force"],
                xerr=p["energy_sd"],
                yerr=p["force_sd"],
                capsize=3,
                label=f"{labels[m]} ({status[m]['status']})",
                **style,
            )
            container[0].set_gid(m)  # the data marker's line
            text = labels[m].replace("weighted sum ", "")
            ax.annotate(text, (p["energy"], p["force"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{what} {metrics[x][0]} ({metrics[x][2]})")
        ax.set_ylabel(f"{what} {metrics[y][0]} ({metrics[y][2]})")
        ax.set_title(view)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(path: Path, runs, methods, labels, budget_s: float, metrics) -> None:
    """Validation energy and force MAE against training time (geometric mean over seeds),
    and the learning rate; weighted sums in black/grey."""
    import numpy as np

    plt = R.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    grid = np.linspace(0, budget_s, 100)
    cmap = plt.get_cmap("tab10")
    ours = [m for m in methods if m not in BASELINES]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if m in BASELINES:
            shade = 0.15 + 0.6 * (BASELINES.index(m) / len(BASELINES))
            color, style = str(shade), ("--" if m == TWO_STAGE else "-")
        else:
            color, style = cmap(ours.index(m) % 10), "-"
        for ax, metric in zip(axes, (E, F)):
            y = R.mean_curve(rs, metric, grid)
            if y is not None:
                ax.plot(grid, y * metrics[metric][1], style, color=color, label=labels[m])
    for ax, metric in zip(axes, (E, F)):
        ax.set_yscale("log")
        ax.set_xlabel("training CPU time (s)")
        ax.set_ylabel(f"validation {metrics[metric][0]} ({metrics[metric][2]})")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    r0 = next((r for r in runs if r["method"] == "ws"), runs[0])
    pts = [(p["clock_s"], p["lr"]) for p in r0["curve"] if p.get("lr") is not None]
    if pts:
        axes[2].plot(*zip(*pts), "k.-")
    axes[2].set_xlabel("training CPU time (s)")
    axes[2].set_ylabel("learning rate (weighted sum 1:1, seed 0)")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    R.save(fig, path)


# ----------------------------------------------------------------------------- report


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
        at = float(np.interp(0.75 * budget_s, x, y))
        drops.append(at / r["budget"][F] - 1.0)
    if not drops:
        return None
    return {"last_quarter_drop": float(np.mean(drops)), "per_seed": drops}


def status_lines(rows, labels, view: str) -> list[str]:
    status = classify(rows)
    front = [r["method"] for r in rows if status[r["method"]]["status"] == "front"]
    lines = [f"Against the weighted-sum front at {view}:", ""]
    lines.append("- weighted-sum front: " + ", ".join(labels[m] for m in front))
    for kind in ("beyond", "on", "dominated"):
        ms = [r["method"] for r in rows if r["method"] not in BASELINES]
        ms = [m for m in ms if status[m]["status"] == kind]
        lines.append(f"- {kind}: " + (", ".join(labels[m] for m in ms) if ms else "none"))
    return lines


def table(rows, labels, caption, metrics) -> list[str]:
    status = classify(rows)
    lines = [
        caption,
        "",
        R.md_row(["method", *A.header(metrics), "steps", "epochs", "vs the weighted-sum front"]),
        R.md_rule(len(metrics) + 4),
    ]
    for r in A.by_force(rows):
        s = status[r["method"]]
        where = s["status"]
        if s["by"]:
            where += " by " + ", ".join(labels[m].replace("weighted sum ", "") for m in s["by"])
        elif s["beats"] and r["method"] not in BASELINES:
            where += (
                " (beats "
                + ", ".join(labels[m].replace("weighted sum ", "") for m in s["beats"])
                + ")"
            )
        bold = "**" if r["method"] in BASELINES else ""
        name = f"{bold}{labels[r['method']]}{bold}"
        lines.append(R.md_row([name, *A.cells(r, metrics), where]))
    return lines


def views_of(a: dict, runs, methods, metrics) -> list[tuple[str, str, list[dict]]]:
    """``(key, caption, rows)`` per view."""
    clock = "CPU" if a["clock"] == "cpu" else "wall-clock"
    views = [
        (
            "budget",
            f"equal training time: {a['budget_s']:.0f} s of training {clock} time",
            A.summarize(runs, methods, "budget", metrics),
        )
    ]
    if a["lr_schedule"] == "constant":
        no_switch = [m for m in methods if m != TWO_STAGE]
        views.append(
            (
                "epochs",
                f"equal epochs: {a['epochs']} epochs",
                A.summarize(runs, no_switch, "epochs", metrics),
            )
        )
    return views


def labels_of(methods) -> dict[str, str]:
    table_ = M.methods()
    return {m: table_[m].label for m in methods} | {"ws": "weighted sum 1:1"}


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    a = meta["args"]
    metrics = P.reported_metrics(a["dataset"])
    methods = A.ran_methods(data, first=BASELINES)
    labels = labels_of(methods)
    info, elapsed = meta["machine"], meta["elapsed_s"]
    flat = flattening(runs, a["budget_s"])
    dataset_line = P.DATASETS[a["dataset"]].description
    lr = (
        f"constant lr {a['lr']}"
        if a["lr_schedule"] == "constant"
        else f"lr {a['lr']} annealed to 0 (cosine) over the {a['budget_s']:.0f} s training clock"
    )
    units = (
        "Errors in meV (the data is in eV)."
        if a["dataset"] == "alloy"
        else f"Errors converted from kcal/mol to meV (1 kcal/mol = {P.KCAL_MOL_TO_MEV} meV); "
        "the json keeps kcal/mol."
    )
    params = runs[0]["params"] if runs else None
    lines = [
        f"Pareto benchmark on {R.machine_line(info)}; {meta['time']}; "
        f"total {elapsed / 60:.1f} min ({a['jobs']} run(s) at a time).",
        "",
        f"Command: `{R.command('pareto', a['argv'], omp=False)}`",
        "",
        f"NequIP model with {params} parameters (l_max={a['l_max']}, {a['num_layers']} layers, "
        f"{a['num_features']} features), float32, Adam with {lr}, batch {a['batch_size']}; "
        f"{a['n_train']} training / {a['frames'] - a['n_train']} validation {dataset_line} frames. "
        "Weighted sums: nequip's plain module at energy:force coefficient ratios"
        + (" (stress = energy's)" if a["dataset"] == "alloy" else "")
        + "; our methods at 1:1 coefficients and their defaults. Mean ± sample standard "
        f"deviation over seeds {a['seeds']}. {units}",
        "",
    ]
    if flat is not None:
        lines += [
            f"The 1:1 weighted sum's validation force MAE fell by "
            f"{100 * flat['last_quarter_drop']:.1f}% over the last quarter of the budget "
            f"(mean over seeds).",
            "",
        ]
    switches = [r["switch"] for r in runs if r.get("switch")]
    if switches:
        frac = [s["clock_s"] / a["budget_s"] for s in switches]
        lines += [
            f"The two-stage schedule switched at epoch {min(s['epoch'] for s in switches)}-"
            f"{max(s['epoch'] for s in switches)}, after {100 * min(frac):.0f}-"
            f"{100 * max(frac):.0f}% of the training clock.",
            "",
        ]
    for _, cap, rows in views_of(a, runs, methods, metrics):
        lines += table(rows, labels, f"**{cap[0].upper() + cap[1:]}**", metrics)
        lines += [""] + status_lines(rows, labels, cap.split(":")[0]) + [""]
    return "\n".join(lines)


def report(data: dict, out: Path) -> None:
    """``out``.json (raw runs, meta data, the views), .md, .png (the front) and
    ``_curves.png``."""
    meta, runs = data["meta"], data["runs"]
    a = meta["args"]
    metrics = P.reported_metrics(a["dataset"])
    methods = A.ran_methods(data, first=BASELINES)
    labels = labels_of(methods)
    views = views_of(a, runs, methods, metrics)
    meta = {**meta, "flattening": flattening(runs, a["budget_s"])}
    meta.pop("partial", None)
    R.write_json(
        out.with_suffix(".json"),
        {
            "meta": meta,
            "views": {
                key: {"caption": cap, "rows": rows, "status": classify(rows)}
                for key, cap, rows in views
            },
            "runs": runs,
        },
    )
    R.write_text(out.with_suffix(".md"), markdown(data))
    fig = plot_pareto(
        [(cap, rows) for _, cap, rows in views],
        labels,
        f"{P.DATASETS[a['dataset']].description}: validation error of each method against "
        f"nequip's weighted sum at swept coefficients (mean ± sd over {len(a['seeds'])} seeds)",
        metrics,
    )
    R.save(fig, out.parent / (out.name + ".png"))
    plot_curves(
        out.parent / (out.name + "_curves.png"), runs, methods, labels, a["budget_s"], metrics
    )


# ----------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a minute: tiny budget, 1 seed")
    p.add_argument("--dataset", choices=list(P.DATASETS), default="ethanol")
    p.add_argument("--methods", nargs="+", default=None, choices=M.ALL_METHODS,
                   help="our methods placed against the front (the sweep always runs)")  # fmt: skip
    P.add_budget_arguments(p)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    P.add_run_arguments(p)
    p.add_argument("--out", default=None, help="default results/pareto_<dataset>")
    R.add_from_json(p)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.from_json:
        return args
    quick = {"budget_s": 2.0, "epochs": 1, "seeds": [0], "val_every": 1}
    full = {"budget_s": 30.0, "epochs": 8, "seeds": [0, 1, 2], "val_every": 4}
    P.fill_defaults(args, quick, full)
    if args.lr_schedule == "cosine":
        args.epochs = 1  # no equal-epochs view: a run stops when its budget is spent
    elif args.epochs % args.val_every:
        p.error(f"--epochs {args.epochs} must be a multiple of --val-every {args.val_every}")
    args.n_train, args.frames = P.DATASETS[args.dataset].n_train, P.DATASETS[args.dataset].frames
    if args.quick:
        args.methods = args.methods or ["upgrad"]
        args.num_features, args.radial_width = 8, 8
    args.methods = args.methods or DEFAULT_METHODS
    args.out = args.out or str(
        (P.TMP if args.quick else P.RESULTS)
        / f"pareto_{args.dataset}{'_quick' if args.quick else ''}"
    )
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    methods = BASELINES + [m for m in args.methods if m not in BASELINES]
    missing = M.missing_methods(methods, M.methods())
    if missing:
        raise SystemExit(f"cannot import {missing}")
    type_names = P.DATASETS[args.dataset].type_names
    path, stats = P.data_and_statistics(
        args.dataset, args.frames, args.n_train, args.r_max, type_names
    )
    a = A.run_arguments(args, exclude=("methods", "seeds", "out", "argv"))
    tasks = [
        {"method": m, "seed": seed, "args": a, "stats": stats, "data": str(path)}
        for seed, m in P.rotated(methods, args.seeds, shift=5)  # rotate the order per seed
    ]

    import torch  # noqa: F401  (after OMP_NUM_THREADS)

    info = {**P.machine_info(), "date": P.now()}
    metrics = P.reported_metrics(args.dataset)
    t0 = time.perf_counter()
    runs = []

    def meta():
        return {"machine": info, "args": vars(args), "command": R.command("pareto", argv, omp=False),
                "data": stats, "time": info["date"], "elapsed_s": time.perf_counter() - t0}  # fmt: skip

    def done(r):
        """Keep every finished run: the json so far (``--from-json`` reads it)."""
        runs.append(r)
        A.progress(r, len(runs), len(tasks), t0, metrics)
        partial = {**meta(), "partial": len(runs) < len(tasks)}
        R.write_json(Path(args.out).with_suffix(".json"), {"meta": partial, "runs": runs})

    P.run_all(P.train_run, tasks, args.jobs, done)
    data = {"meta": meta(), "runs": runs}
    data["meta"]["machine"] = {"loadavg_end": os.getloadavg(), **info}
    report(data, Path(args.out))


if __name__ == "__main__":
    main()

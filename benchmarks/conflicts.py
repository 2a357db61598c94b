"""How much the energy, force (and stress) gradients conflict over whole training runs.

Every (variant, seed) trains the protocol's model for ``--epochs`` epochs with a
:class:`~nequip_mtl.train.callbacks.GradientConflictMonitor` (``interval: batch``,
``frequency: --every``); a recording callback keeps every measured step: the norm of every
*unweighted* task gradient (of ``per_atom_energy_mse``, ``forces_mse``, ``stress_mse`` of the
whole batch), the cosine of every pair, and each one's cosine with the update applied.
Variants (:data:`benchmarks.methods.VARIANTS`): nequip's weighted sum at energy:force 100:1,
1:1 and 1:100 (stress following energy; the monitor runs extra per-task backward passes,
the trajectory is unchanged), UPGrad and our ConFIG at 1:1(:1) (the monitor reuses the
module's Gram matrix). Data (``--dataset``): the EMT alloy or the DFT ethanol frames, as
``benchmarks/accuracy.py``; each run is validated once, at its end (for context only).

    OMP_NUM_THREADS=1 python -m benchmarks.conflicts --dataset ethanol --epochs 40 --every 1
    OMP_NUM_THREADS=1 python -m benchmarks.conflicts --quick --dataset ethanol   # < 1 min

Writes ``conflicts_<dataset>.json`` (every measured step; ``--from-json`` recomputes the
rest), ``.md``, ``_cosines.png`` and ``_evolution.png`` into ``--out DIR``.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R
from benchmarks.methods import VARIANTS, coeffs_for, short_label, variant_label

#: the data sets' descriptions in this study's tables
DESCRIPTIONS = {"alloy": "offline EMT alloy (Cu/Ni/Pd)", "ethanol": "DFT ethanol (C2H6O)"}

#: the loss components (the monitor's task names) and their short symbols
SHORT = {"per_atom_energy_mse": "E", "forces_mse": "F", "stress_mse": "S"}


def _recorder(monitor):
    import lightning

    class Record(lightning.Callback):
        """After every step: keep the monitor's values if it measured that step."""

        def __init__(self):
            self.records: list[dict] = []
            self._seen: int | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = monitor.last_step
            if step is None or step == self._seen:
                return
            self._seen = step
            stats = monitor.last_statistics
            names = list(stats.names)
            rec = {
                "step": int(step), "epoch": int(trainer.current_epoch),
                "source": monitor.last_source,
                "norms": {n: float(stats.norms[i]) for i, n in enumerate(names)},
                "cos": {f"{names[i]}~{names[j]}": float(stats.cosines[i, j]) for i, j in stats.pairs()},
                "cos_update": ({n: float(stats.cos_update[i]) for i, n in enumerate(names)}
                               if stats.cos_update is not None else {}),
                "update_norm": stats.update_norm,
            }  # fmt: skip
            # the values the monitor logged must be these (same statistics object)
            for key, value in monitor.last_metrics.items():
                if key.startswith("grad_conflict/cos/"):
                    assert math.isclose(rec["cos"][key.split("/", 2)[2]], value), key
            self.records.append(rec)

    return Record()


def run_one(task: dict) -> dict:
    """Train one (variant, seed) with the monitor; return every measured step (picklable)."""
    import lightning

    from nequip_mtl.train.callbacks import GradientConflictMonitor

    P.init_torch()
    a = task["args"]
    type_names, num_tasks = P.DATASETS[a["dataset"]].type_names, P.DATASETS[a["dataset"]].num_tasks
    key, r = VARIANTS[task["variant"]]
    method = M.methods(interval="epoch")[key]
    seed = task["seed"]
    lightning.seed_everything(seed, workers=True, verbose=False)
    model = P.run_model(a, task["stats"], seed, type_names)
    coeffs = coeffs_for(r, num_tasks)
    module = P.build_module(method, model, num_tasks, lr=a["lr"], coeffs=coeffs)
    dm = P.run_datamodule(task["data"], a, type_names)
    monitor = GradientConflictMonitor("batch", a["every"])
    record = _recorder(monitor)
    # validated once, after training
    trainer = P.trainer([monitor, *P.build_callbacks(method), record], max_epochs=a["epochs"],
                        num_sanity_val_steps=0, check_val_every_n_epoch=a["epochs"] + 1)  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    return {
        "variant": task["variant"], "seed": seed, "module": method.module,
        "aggregator": method.kwargs.get("aggregator", {}).get("_target_"), "coeffs": coeffs,
        "steps": int(trainer.global_step), "wall_s": wall, "params": P.num_params(module),
        "final_val": P.validate(module, dm), "records": record.records,
    }  # fmt: skip


def _quantiles(xs: list[float]) -> dict:
    import numpy as np

    x = np.asarray(xs, dtype=float)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"n": int(x.size), "frac_neg": float(np.mean(x < 0)),
            "frac_below_half": float(np.mean(x < -0.5)), "q1": float(q1), "median": float(med),
            "q3": float(q3), "min": float(x.min()), "max": float(x.max())}  # fmt: skip


def tasks_of(runs: list[dict]) -> list[str]:
    return next((list(rec["norms"]) for r in runs for rec in r["records"]), [])


def pairs_of(tasks: list[str]) -> list[str]:
    return [f"{a}~{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]


def ratios_of(tasks: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) task pairs of the reported norm ratios: every other task
    over the energy, and stress over forces."""
    out = [(t, tasks[0]) for t in tasks[1:]]
    return out + [("stress_mse", "forces_mse")] * ("stress_mse" in tasks and "forces_mse" in tasks)


def ratio_key(num: str, den: str) -> str:
    # not `|`: it would split a Markdown table cell
    return f"‖g_{SHORT.get(num, num)}‖/‖g_{SHORT.get(den, den)}‖"


def windows(runs: list[dict]) -> tuple[list[int], list[int]]:
    """The early and the late window of the runs: the first and the last quarter of their
    epochs (at least one epoch each; the same epoch for a one-epoch run)."""
    epochs = sorted({rec["epoch"] for r in runs for rec in r["records"]})
    q = max(1, len(epochs) // 4)
    return epochs[:q], epochs[-q:]


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Per variant: the cosines of every pair (all steps pooled over seeds, and per window,
    :func:`windows`), per seed the fraction negative, how often the update opposes a task,
    the median norms and norm ratios per window."""
    import numpy as np

    tasks = tasks_of(runs)
    early, late = windows(runs)
    out = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        recs = [rec for r in rs for rec in r["records"]]
        if not recs:
            continue
        win = {"early": [rec for rec in recs if rec["epoch"] in early],
               "late": [rec for rec in recs if rec["epoch"] in late]}  # fmt: skip
        s: dict = {"steps_measured": len(recs), "early_epochs": early, "late_epochs": late}
        s["cos"] = {}
        for p in pairs_of(tasks):
            s["cos"][p] = {
                "all": _quantiles([rec["cos"][p] for rec in recs]),
                **{w: _quantiles([rec["cos"][p] for rec in rw]) for w, rw in win.items()},
                "frac_neg_per_seed": [float(np.mean([rec["cos"][p] < 0 for rec in r["records"]]))
                                      for r in rs],
            }  # fmt: skip
        s["cos_update_frac_neg"] = {
            t: float(np.mean([rec["cos_update"][t] < 0 for rec in recs]))
            for t in tasks if all(t in rec["cos_update"] for rec in recs)
        }  # fmt: skip
        s["norm_median"] = {
            t: {w: float(np.median([rec["norms"][t] for rec in rw])) for w, rw in win.items()}
            for t in tasks
        }  # fmt: skip
        s["norm_ratio"] = {}
        for num, den in ratios_of(tasks):
            ratio = {w: [rec["norms"][num] / rec["norms"][den] for rec in rw]
                     for w, rw in {"all": recs, **win}.items()}  # fmt: skip
            q1, med, q3 = np.percentile(ratio["all"], [25, 50, 75])
            e, la = float(np.median(ratio["early"])), float(np.median(ratio["late"]))
            s["norm_ratio"][ratio_key(num, den)] = {"median": float(med), "q1": float(q1),
                "q3": float(q3), "early": e, "late": la, "drift": la / e}  # fmt: skip
        s["final_val"] = {k: float(np.mean([r["final_val"][k] for r in rs]))
                          for k in rs[0]["final_val"]}  # fmt: skip
        out[v] = s
    return out


def _pair_text(p: str) -> str:
    a, b = p.split("~")
    return f"{SHORT.get(a, a)}-{SHORT.get(b, b)}"


def _epochs_text(summary: dict, key: str) -> str:
    if not (epochs := next(iter(summary.values()))[key] if summary else []):
        return "n/a"
    return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"


def variants_of(data: dict) -> list[str]:
    """The variants of a results json that ran, in the order of ``--variants``."""
    runs = data["runs"]
    return [v for v in data["meta"]["args"]["variants"] if any(r["variant"] == v for r in runs)]


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    variants = variants_of(data)
    summary = summarize(runs, variants)
    ran = [v for v in variants if v in summary]
    a = meta["args"]
    ds = a["dataset"]
    dataset = P.DATASETS[ds]
    e_unit, l_unit = dataset.energy_unit, dataset.length_unit
    tasks = tasks_of(runs)
    labels = {v: variant_label(v, dataset.num_tasks) for v in variants}
    params = runs[0]["params"] if runs else None
    units = {"per_atom_energy_mse": f"({e_unit}/atom)²", "forces_mse": f"({e_unit}/{l_unit})²",
             "stress_mse": f"({e_unit}/{l_unit}³)²"}  # fmt: skip
    fe = ratio_key(tasks[1], tasks[0])
    every = ("every optimizer step" if a["every"] == 1
             else f"optimizer steps 0, {a['every']}, {2 * a['every']}, ...")  # fmt: skip

    def opposes(s, t):
        return f"{s['cos_update_frac_neg'][t]:.3f}" if t in s["cos_update_frac_neg"] else "n/a"

    lines = [
        f"# Gradient conflicts: {ds}",
        "",
        f"Measured on {R.machine_line(meta['machine'])}; {meta['time']}; total "
        f"{meta['elapsed_s'] / 60:.1f} min ({a['jobs']} run(s) at a time).",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{DESCRIPTIONS[ds]} data: {a['n_train']} training / {a['n_val']} validation frames, "
        f"batch {a['batch_size']} ({math.ceil(a['n_train'] / a['batch_size'])} steps per epoch), "
        f"{a['epochs']} epoch(s), seeds {a['seeds']}. NequIP model with {params} parameters "
        f"(l_max={a['l_max']}, {a['num_layers']} layers, {a['num_features']} features, radial "
        f"width {a['radial_width']}, r_max {a['r_max']} Å), float32, Adam with constant lr "
        f"{a['lr']}. `GradientConflictMonitor(interval='batch', frequency={a['every']})`: on "
        f"{every}, one gradient per loss component of the whole batch with respect to the model "
        "parameters, of the *unweighted* component (the loss coefficients do not enter the "
        "gradients measured, only the trajectory). Loss components: "
        + ", ".join(f"`{t}` in {units[t]}" for t in tasks)
        + f" (the data's units, {e_unit} and {l_unit}); gradient norms are in loss units per "
        "parameter unit. Norm ratios are unit-free with respect to the energy unit (every "
        "component scales with its square).",
        "",
        f"Early / late: the first / last quarter of the epochs (epochs "
        f"{_epochs_text(summary, 'early_epochs')} / {_epochs_text(summary, 'late_epochs')}, "
        "counting from 0).",
        "",
        "**Overview.** Per pair of task gradients: the fraction of measured steps with a "
        "negative cosine (all seeds pooled), with the median cosine in brackets; the median "
        f"norm ratio {fe} early → late; the fraction of steps whose applied update has a "
        "negative cosine with a task gradient (the step makes that task worse, to first order).",
        "",
        *R.md_table(
            ["variant", *(f"{_pair_text(p)}: cos < 0 (median)" for p in pairs_of(tasks)),
             f"{fe} early → late", "update opposes " + " / ".join(SHORT[t] for t in tasks)],
            [[labels[v],
              *(f"{c['all']['frac_neg']:.3f} ({c['all']['median']:+.3f})"
                for c in summary[v]["cos"].values()),
              "{early:.3g} → {late:.3g}".format(**summary[v]["norm_ratio"][fe]),
              " / ".join(opposes(summary[v], t) for t in tasks)] for v in ran],
        ),
        "",
        "**Cosines** of task-gradient pairs, all measured steps of all seeds pooled "
        "(negative: the two gradients pull the parameters in opposing directions); "
        "'neg' is the fraction of steps with cosine < 0, with the per-seed fractions in "
        "brackets, '< -0.5' the fraction with cosine < -0.5 (strong conflict); early / late: "
        "the same in the early / late window.",
        "",
        *R.md_table(
            ["variant", "pair", "steps", "neg", "per seed", "< -0.5", "median", "Q1", "Q3", "min",
             "neg early", "neg late", "median early", "median late"],
            [[labels[v], _pair_text(p), c["all"]["n"], f"{c['all']['frac_neg']:.3f}",
              "(" + ", ".join(f"{x:.3f}" for x in c["frac_neg_per_seed"]) + ")",
              f"{c['all']['frac_below_half']:.3f}",
              *(f"{c['all'][k]:+.3f}" for k in ("median", "q1", "q3", "min")),
              f"{c['early']['frac_neg']:.3f}", f"{c['late']['frac_neg']:.3f}",
              f"{c['early']['median']:+.3f}", f"{c['late']['median']:+.3f}"]
             for v in ran for p, c in summary[v]["cos"].items()],
        ),
        "",
        "**Norm ratios** of the unweighted task gradients: median (Q1-Q3) over all measured "
        "steps, the median in the early and in the late window, and the drift (late / early).",
        "",
        *R.md_table(
            ["variant", "ratio", "median", "Q1-Q3", "early", "late", "drift"],
            [[labels[v], k, f"{n['median']:.3g}", f"{n['q1']:.3g}-{n['q3']:.3g}",
              f"{n['early']:.3g}", f"{n['late']:.3g}", f"{n['drift']:.3g}x"]
             for v in ran for k in (ratio_key(*r) for r in ratios_of(tasks))
             for n in [summary[v]["norm_ratio"][k]]],
        ),
        "",
        "**Norms**: median unweighted task-gradient norms in the early and the late window "
        "(early → late), in loss units per parameter unit, and the fraction of steps whose "
        "applied update has a negative cosine with a task gradient (the step makes that task "
        "worse, to first order).",
        "",
        *R.md_table(
            ["variant", *(f"norm {SHORT[t]} {units[t]}" for t in tasks),
             *(f"update opposes {SHORT[t]}" for t in tasks)],
            [[labels[v], *("{early:.3g} → {late:.3g}".format(**summary[v]["norm_median"][t])
                           for t in tasks),
              *(opposes(summary[v], t) for t in tasks)] for v in ran],
        ),
    ]  # fmt: skip
    val_units = {"per_atom_energy_mae": f"{e_unit}/atom", "forces_mae": f"{e_unit}/{l_unit}",
                 "stress_mae": f"{e_unit}/{l_unit}³"}  # fmt: skip
    val_keys = [k for k in val_units if runs and k in runs[0]["final_val"]]
    lines += [
        "",
        "For context only (not an accuracy benchmark; see `benchmarks/accuracy.py`): "
        f"validation MAE after the {a['epochs']} epoch(s), mean over seeds, in the data's units.",
        "",
        *R.md_table(["variant", *(f"{k} ({val_units[k]})" for k in val_keys)],
                    [[labels[v], *(f"{summary[v]['final_val'][k]:.4g}" for k in val_keys)]
                     for v in ran]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _binned(runs, key_fn, bin_steps: int, steps_per_epoch: int):
    """``{bin centre in epochs: [values]}``: the measured steps of all seeds, in bins of
    ``bin_steps`` optimizer steps."""
    out: dict[float, list[float]] = {}
    for r in runs:
        for rec in r["records"]:
            x = key_fn(rec)
            if x is not None:
                b = rec["step"] // bin_steps
                out.setdefault((b + 0.5) * bin_steps / steps_per_epoch, []).append(x)
    return dict(sorted(out.items()))


def plot(out: Path, meta: dict, runs: list[dict], variants: list[str]) -> tuple[list[Path], dict]:
    """Write the two figures; return their paths and the numbers they show."""
    import numpy as np

    plt = R.pyplot()
    ds = meta["args"]["dataset"]
    num_tasks = P.DATASETS[ds].num_tasks
    tasks = tasks_of(runs)
    pairs = pairs_of(tasks)
    variants = [v for v in variants if any(r["variant"] == v for r in runs)]
    labels = {v: variant_label(v, num_tasks) for v in variants}
    colors = {v: plt.get_cmap("tab10")(i) for i, v in enumerate(VARIANTS)}
    paths = []
    shown: dict = {"violin": {}, "evolution": {}}

    # 1. distributions of the cosines, one panel per pair
    width = max(8.0, 5.5 * len(pairs))
    fig, axes = plt.subplots(1, len(pairs), figsize=(width, 5.2), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        data = [[rec["cos"][p] for r in runs if r["variant"] == v for rec in r["records"]]
                for v in variants]  # fmt: skip
        parts = ax.violinplot(data, showmedians=True, showextrema=True)
        for body, v in zip(parts["bodies"], variants):
            body.set_facecolor(colors[v])
            body.set_alpha(0.5)
        ax.axhline(0, color="k", lw=0.8)
        shown["violin"][p] = {}
        for i, (v, d) in enumerate(zip(variants, data)):
            frac = float(np.mean(np.asarray(d) < 0))
            ax.text(i + 1, 1.04, f"{frac:.0%} < 0", ha="center", fontsize=8)
            shown["violin"][p][v] = {"n": len(d), "frac_neg": frac, "median": float(np.median(d))}
        ax.set_xticks(range(1, len(variants) + 1))
        ax.set_xticklabels([short_label(v, num_tasks) for v in variants], fontsize=8)
        ax.set_ylim(-1.05, 1.12)
        ax.set_ylabel("cosine between task gradients")
        ax.set_title(f"{_pair_text(p)} ({p.replace('~', ' vs ')})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(textwrap.fill(f"{ds}: cosines of the unweighted task gradients, all measured "
                               f"steps of seeds {meta['args']['seeds']} (bar: median; text: "
                               "fraction < 0)", int(width * 14)), fontsize=10)  # fmt: skip
    fig.tight_layout()
    paths.append(out.parent / f"{out.name}_cosines.png")
    R.save(fig, paths[-1])

    # 2. evolution over training, one panel per cosine pair, task norm and norm ratio (the
    # alloy: a row of each; ethanol: 2 x 2), in bins of about 1/25 of the run, a whole number
    # of monitor periods each
    a = meta["args"]
    steps_per_epoch = math.ceil(a["n_train"] / a["batch_size"])
    bin_steps = max(a["every"], round(a["epochs"] * steps_per_epoch / 25 / a["every"]) * a["every"])
    shown["evolution"]["bin_steps"] = bin_steps
    series = [(f"cos({_pair_text(p)})", lambda rec, p=p: rec["cos"].get(p), False) for p in pairs]
    series += [
        (f"‖g_{SHORT[t]}‖ ({t}, unweighted)", lambda rec, t=t: rec["norms"][t], True) for t in tasks
    ]
    series += [(ratio_key(n, d), lambda rec, n=n, d=d: rec["norms"][n] / rec["norms"][d], True)
               for n, d in ratios_of(tasks)]  # fmt: skip
    ncol = 3 if len(series) > 4 else 2
    nrow = math.ceil(len(series) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 3.9 * nrow + 0.8), squeeze=False)
    for ax in axes.ravel()[len(series) :]:
        ax.set_visible(False)
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        for ax, (panel, key, log) in zip(axes.ravel(), series):
            binned = _binned(rs, key, bin_steps, steps_per_epoch)
            ep, vals = np.array(list(binned)), list(binned.values())
            med = np.array([np.median(x) for x in vals])
            shown["evolution"].setdefault(panel, {})[v] = {
                "epoch": ep.tolist(), "median": med.tolist(), "n": [len(x) for x in vals]}  # fmt: skip
            ax.plot(ep, med, "-", color=colors[v], lw=1.6, label=labels[v])
            q1, q3 = ([np.percentile(x, q) for x in vals] for q in (25, 75))
            ax.fill_between(ep, q1, q3, color=colors[v], alpha=0.15)
            ax.set_ylabel(panel)
            ax.set_xlabel("epoch (steps / steps per epoch)")
            ax.set_yscale("log" if log else "linear")
            ax.grid(alpha=0.3, which="both")
            if not log:
                ax.axhline(0, color="k", lw=0.8)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"{ds}: median (line) and quartiles (band) over the measured "
                               f"steps of seeds {a['seeds']} in bins of {bin_steps} optimizer "
                               "steps; norms of the unweighted task gradients in loss units",
                               int(5.5 * ncol * 14)), fontsize=10)  # fmt: skip
    fig.tight_layout()
    paths.append(out.parent / f"{out.name}_evolution.png")
    R.save(fig, paths[-1])
    return paths, shown


def report(data: dict, out: Path) -> None:
    """The md and png files, and the json: the raw runs and meta data as given, the
    summary behind the tables and the numbers the figures show."""
    meta, runs = data["meta"], data["runs"]
    variants = variants_of(data)
    summary = summarize(runs, variants)
    R.write_text(out.with_suffix(".md"), markdown(data))
    _, shown = plot(out, meta, runs, variants)
    R.write_json(
        out.with_suffix(".json"), {"meta": meta, "summary": summary, "figures": shown, "runs": runs}
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = P.study_parser(__doc__)
    parser.add_argument("--dataset", choices=[*P.DATASETS, "both"], default="both")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    parser.add_argument("--epochs", type=int, default=None, help="alloy 8, ethanol 40; quick 1")
    parser.add_argument("--every", type=int, default=None, help="monitor frequency (steps)")
    P.add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.from_json:  # the raw runs and the meta data stay as they were measured
        return R.from_json(args.from_json, args.out, report, out_is_dir=True)
    out_dir = Path(args.out) if args.out else (P.TMP if args.quick else P.RESULTS)
    for ds in list(P.DATASETS) if args.dataset == "both" else [args.dataset]:
        report(
            run_dataset(ds, args, argv, out_dir / f"conflicts_{ds}"), out_dir / f"conflicts_{ds}"
        )


def run_dataset(ds: str, args, argv, out: Path) -> dict:
    """Every (variant, seed) on data set ``ds``; the results json's content."""
    dataset = P.DATASETS[ds]
    epochs, every = (1, 1) if args.quick else {"alloy": (8, 2), "ethanol": (40, 1)}[ds]
    a = {
        "dataset": ds, "variants": args.variants, "jobs": args.jobs, "quick": args.quick,
        "seeds": args.seeds or ([0] if args.quick else [0, 1]), "epochs": args.epochs or epochs,
        "every": args.every or every, "n_train": dataset.n_train,
        "n_val": dataset.frames - dataset.n_train, "batch_size": args.batch_size,
        **P.model_arguments(args), "lr": args.lr,
    }  # fmt: skip
    path, stats = P.data_and_statistics(ds, dataset.frames, dataset.n_train, args.r_max,
                                        dataset.type_names)  # fmt: skip
    tasks = [
        {"variant": v, "seed": seed, "args": a, "stats": stats, "data": str(path)}
        for seed, v in P.rotated(args.variants, a["seeds"])  # rotate the order per seed
    ]
    results = P.Results(out, "conflicts", argv, a, {"path": str(path), **stats}, omp=True, runs=[])
    results.meta0["units"] = {"energy": dataset.energy_unit, "length": dataset.length_unit}
    results.meta0["run_order"] = [(t["variant"], t["seed"]) for t in tasks]

    def done(r):
        results.add("runs", r)
        print(f"[{ds} {len(results.lists['runs'])}/{len(tasks)} {time.perf_counter() - results.t0:.0f} s] "
              f"{r['variant']} seed {r['seed']}: {r['steps']} steps, {len(r['records'])} measured, "
              f"{r['wall_s']:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip

    P.run_all(run_one, tasks, args.jobs, done)
    results.lists["runs"].sort(key=lambda r: (args.variants.index(r["variant"]), r["seed"]))
    return results.data()


if __name__ == "__main__":
    main()

"""How much the energy, force (and stress) gradients conflict over whole training runs.

Every (variant, seed) trains the benchmark NequIP model (``l_max=1``, 2 layers, 32
features, radial MLP width 32, ``r_max=4.5``, float32, Adam with constant lr 5e-3,
batch 5) for ``--epochs`` epochs with a
:class:`~nequip_mtl.train.callbacks.GradientConflictMonitor` (``interval: batch``,
``frequency: --every``), and a recording callback keeps every measured step's values
(``last_metrics``): the norm of every *unweighted* task gradient (the gradient of the
loss component ``per_atom_energy_mse``, ``forces_mse``, ``stress_mse`` of the global
batch with respect to the model's trainable parameters), the cosine of every pair of
task gradients, and the cosine between each task gradient and the update applied.

The variants (``--variants``; default all five):

- ``ws_100``, ``ws_1``, ``ws_0.01``: nequip's weighted sum
  (``nequip.train.NequIPLightningModule``) with energy:force coefficient ratio
  100:1, 1:1 and 1:100 (alloy: the stress coefficient equals the energy one,
  E:F:S = r:1:r); the monitor runs extra per-task backward passes on the measured steps
  (the trajectory is unchanged by them);
- ``upgrad``: ``nequip_mtl.train.MultitaskLightningModule`` with
  ``nequip_mtl.aggregators.UPGrad``, coefficients 1:1(:1);
- ``config``: ``nequip_mtl.train.ConFIGLightningModule``, coefficients 1:1(:1);
  for both the monitor reuses the module's own Gram matrix (every step, no extra cost).

Data sets (``--dataset``): ``alloy``, the offline EMT alloy data (200 frames generated
with seed 0, 150 training frames; energies, forces, stresses in eV units; model
constants from the whole file, as ``benchmarks/accuracy.py``), and ``ethanol``, the
real DFT ethanol frames (``protocol.ETHANOL``, 100 frames, kcal/mol and kcal/mol/Å; 80
training / 20 validation; model constants from the training split). Seeds set the model
initialisation and the batch order; the data split is fixed. Each run is validated
once, at its end (validation errors for context only).

The commands that produced ``benchmarks/results/conflicts_{alloy,ethanol}.*`` (about
13 minutes on 2 shared vCPUs, one run at a time: 7.3 min ethanol, 5.5 min alloy)::

    OMP_NUM_THREADS=1 python -m benchmarks.conflicts --dataset ethanol --epochs 40 --every 1 --jobs 1
    OMP_NUM_THREADS=1 python -m benchmarks.conflicts --dataset alloy --epochs 8 --every 2 --jobs 1

Rewrite the tables and figures from a saved json (no training; the json's raw runs and
meta data are kept, its derived ``summary`` and ``figures`` are recomputed)::

    OMP_NUM_THREADS=1 python -m benchmarks.conflicts --from-json benchmarks/results/conflicts_ethanol.json

A smoke test, well under a minute per data set, writing to ``benchmarks/results/_tmp/``::

    OMP_NUM_THREADS=1 python -m benchmarks.conflicts --quick --dataset ethanol

Writes, into ``--out DIR`` (default ``benchmarks/results``; with ``--quick``
``benchmarks/results/_tmp``), ``conflicts_<dataset>.json`` (every measured step of every
run; the meta data: machine, arguments, command line; the summary behind the tables and
the numbers the figures show), ``conflicts_<dataset>.md`` (tables) and
``conflicts_<dataset>_cosines.png``, ``conflicts_<dataset>_evolution.png`` (the docs show
the committed figures from there).
"""

from __future__ import annotations

import argparse
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


# ----------------------------------------------------------------------------- one run


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
                "step": int(step),
                "epoch": int(trainer.current_epoch),
                "source": monitor.last_source,
                "norms": {n: float(stats.norms[i]) for i, n in enumerate(names)},
                "cos": {
                    f"{names[i]}~{names[j]}": float(stats.cosines[i, j]) for i, j in stats.pairs()
                },
                "cos_update": (
                    {n: float(stats.cos_update[i]) for i, n in enumerate(names)}
                    if stats.cos_update is not None
                    else {}
                ),
                "update_norm": stats.update_norm,
            }
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
    trainer = P.trainer(
        [monitor, *P.build_callbacks(method), record],
        max_epochs=a["epochs"],
        num_sanity_val_steps=0,
        check_val_every_n_epoch=a["epochs"] + 1,  # validated once, after training
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    return {
        "variant": task["variant"],
        "seed": seed,
        "module": method.module,
        "aggregator": method.kwargs.get("aggregator", {}).get("_target_"),
        "coeffs": coeffs,
        "steps": int(trainer.global_step),
        "wall_s": wall,
        "params": P.num_params(module),
        "final_val": P.validate(module, dm),
        "records": record.records,
    }


# ----------------------------------------------------------------------------- statistics


def _quantiles(xs: list[float]) -> dict:
    import numpy as np

    x = np.asarray(xs, dtype=float)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {
        "n": int(x.size),
        "frac_neg": float(np.mean(x < 0)),
        "frac_below_half": float(np.mean(x < -0.5)),
        "q1": float(q1),
        "median": float(med),
        "q3": float(q3),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def tasks_of(runs: list[dict]) -> list[str]:
    for r in runs:
        for rec in r["records"]:
            return list(rec["norms"])
    return []


def pairs_of(tasks: list[str]) -> list[str]:
    return [f"{a}~{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]


def ratios_of(tasks: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) task pairs of the reported norm ratios: every other task
    over the energy, and stress over forces."""
    e = tasks[0]
    out = [(t, e) for t in tasks[1:]]
    if "stress_mse" in tasks and "forces_mse" in tasks:
        out.append(("stress_mse", "forces_mse"))
    return out


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
    """Per variant: cosine distributions per pair (all measured steps pooled over seeds;
    also the early and the late window, see :func:`windows`), per-seed fractions of
    negative cosines, the fraction of steps where the update opposes a task, and the
    median task-gradient norms and norm ratios in both windows."""
    import numpy as np

    tasks = tasks_of(runs)
    early, late = windows(runs)
    out = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        recs = [rec for r in rs for rec in r["records"]]
        if not recs:
            continue
        win = {
            "early": [rec for rec in recs if rec["epoch"] in early],
            "late": [rec for rec in recs if rec["epoch"] in late],
        }
        s: dict = {"steps_measured": len(recs), "early_epochs": early, "late_epochs": late}
        s["cos"] = {}
        for p in pairs_of(tasks):
            s["cos"][p] = {
                "all": _quantiles([rec["cos"][p] for rec in recs]),
                **{w: _quantiles([rec["cos"][p] for rec in rw]) for w, rw in win.items()},
                "frac_neg_per_seed": [
                    float(np.mean([rec["cos"][p] < 0 for rec in r["records"]])) for r in rs
                ],
            }
        s["cos_update_frac_neg"] = {
            t: float(np.mean([rec["cos_update"][t] < 0 for rec in recs]))
            for t in tasks
            if all(t in rec["cos_update"] for rec in recs)
        }
        s["norm_median"] = {
            t: {w: float(np.median([rec["norms"][t] for rec in rw])) for w, rw in win.items()}
            for t in tasks
        }
        s["norm_ratio"] = {}
        for num, den in ratios_of(tasks):
            ratio = {
                w: [rec["norms"][num] / rec["norms"][den] for rec in rw]
                for w, rw in {"all": recs, **win}.items()
            }
            q1, med, q3 = np.percentile(ratio["all"], [25, 50, 75])
            e, la = float(np.median(ratio["early"])), float(np.median(ratio["late"]))
            s["norm_ratio"][ratio_key(num, den)] = {
                "median": float(med),
                "q1": float(q1),
                "q3": float(q3),
                "early": e,
                "late": la,
                "drift": la / e,
            }
        s["final_val"] = {
            k: float(np.mean([r["final_val"][k] for r in rs])) for k in rs[0]["final_val"]
        }
        out[v] = s
    return out


# ----------------------------------------------------------------------------- outputs


def _pair_text(p: str) -> str:
    a, b = p.split("~")
    return f"{SHORT.get(a, a)}-{SHORT.get(b, b)}"


def _epochs_text(summary: dict, key: str) -> str:
    epochs = next(iter(summary.values()))[key] if summary else []
    if not epochs:
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
    a = meta["args"]
    ds = a["dataset"]
    dataset, description = P.DATASETS[ds], DESCRIPTIONS[ds]
    num_tasks, e_unit, l_unit = dataset.num_tasks, dataset.energy_unit, dataset.length_unit
    tasks = tasks_of(runs)
    labels = {v: variant_label(v, num_tasks) for v in variants}
    info = meta["machine"]
    params = runs[0]["params"] if runs else None
    steps_per_epoch = math.ceil(a["n_train"] / a["batch_size"])
    units = {
        "per_atom_energy_mse": f"({e_unit}/atom)²",
        "forces_mse": f"({e_unit}/{l_unit})²",
        "stress_mse": f"({e_unit}/{l_unit}³)²",
    }
    loss_units = ", ".join(f"`{t}` in {units[t]}" for t in tasks)
    lines = [
        f"# Gradient conflicts: {ds}",
        "",
        f"Measured on {R.machine_line(info)}; {meta['time']}; total {meta['elapsed_s'] / 60:.1f} "
        f"min ({a['jobs']} run(s) at a time).",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{description} data: {a['n_train']} training / {a['n_val']} validation frames, "
        f"batch {a['batch_size']} ({steps_per_epoch} steps per epoch), {a['epochs']} epoch(s), "
        f"seeds {a['seeds']}. NequIP model with {params} parameters (l_max={a['l_max']}, "
        f"{a['num_layers']} layers, {a['num_features']} features, radial width "
        f"{a['radial_width']}, r_max {a['r_max']} Å), float32, Adam with constant lr {a['lr']}. "
        f"`GradientConflictMonitor(interval='batch', frequency={a['every']})`: on "
        + (
            "every optimizer step"
            if a["every"] == 1
            else f"optimizer steps 0, {a['every']}, {2 * a['every']}, ..."
        )
        + ", one gradient per "
        "loss component of the whole batch with respect to the model parameters, of the "
        "*unweighted* component (the loss coefficients do not enter the gradients measured, "
        "only the trajectory). "
        f"Loss components: {loss_units} (the data's units, {e_unit} and {l_unit}); "
        "gradient norms are in loss units per parameter unit. Norm ratios are unit-free with "
        "respect to the energy unit (every component scales with its square).",
        "",
        f"Early / late: the first / last quarter of the epochs (epochs "
        f"{_epochs_text(summary, 'early_epochs')} / {_epochs_text(summary, 'late_epochs')}, "
        "counting from 0).",
        "",
        "**Overview.** Per pair of task gradients: the fraction of measured steps with a "
        "negative cosine (all seeds pooled), with the median cosine in brackets; the median "
        f"norm ratio {ratio_key(tasks[1], tasks[0])} early → late; the fraction of steps "
        "whose applied update has a negative cosine with a task gradient (the step makes "
        "that task worse, to first order).",
        "",
        "| variant | "
        + " | ".join(f"{_pair_text(p)}: cos < 0 (median)" for p in pairs_of(tasks))
        + f" | {ratio_key(tasks[1], tasks[0])} early → late | update opposes "
        + " / ".join(SHORT[t] for t in tasks)
        + " |",
        "|---" * (3 + len(pairs_of(tasks))) + "|",
    ]
    for v in variants:
        if v not in summary:
            continue
        sv = summary[v]
        cells = " | ".join(
            f"{c['all']['frac_neg']:.3f} ({c['all']['median']:+.3f})" for c in sv["cos"].values()
        )
        nr = sv["norm_ratio"][ratio_key(tasks[1], tasks[0])]
        opp = " / ".join(
            f"{sv['cos_update_frac_neg'][t]:.3f}" if t in sv["cos_update_frac_neg"] else "n/a"
            for t in tasks
        )
        lines.append(f"| {labels[v]} | {cells} | {nr['early']:.3g} → {nr['late']:.3g} | {opp} |")
    lines += [
        "",
        "**Cosines** of task-gradient pairs, all measured steps of all seeds pooled "
        "(negative: the two gradients pull the parameters in opposing directions); "
        "'neg' is the fraction of steps with cosine < 0, with the per-seed fractions in "
        "brackets, '< -0.5' the fraction with cosine < -0.5 (strong conflict); early / late: "
        "the same in the early / late window.",
        "",
        "| variant | pair | steps | neg | per seed | < -0.5 | median | Q1 | Q3 | min | "
        "neg early | neg late | median early | median late |",
        "|---" * 14 + "|",
    ]
    for v in variants:
        if v not in summary:
            continue
        for p, c in summary[v]["cos"].items():
            al = c["all"]
            seeds = ", ".join(f"{x:.3f}" for x in c["frac_neg_per_seed"])
            lines.append(
                f"| {labels[v]} | {_pair_text(p)} | {al['n']} | {al['frac_neg']:.3f} | "
                f"({seeds}) | {al['frac_below_half']:.3f} | {al['median']:+.3f} | "
                f"{al['q1']:+.3f} | {al['q3']:+.3f} | "
                f"{al['min']:+.3f} | {c['early']['frac_neg']:.3f} | {c['late']['frac_neg']:.3f} | "
                f"{c['early']['median']:+.3f} | {c['late']['median']:+.3f} |"
            )
    ratio_keys = [ratio_key(n, d) for n, d in ratios_of(tasks)]
    lines += [
        "",
        "**Norm ratios** of the unweighted task gradients: median (Q1-Q3) over all measured "
        "steps, the median in the early and in the late window, and the drift (late / early).",
        "",
        "| variant | ratio | median | Q1-Q3 | early | late | drift |",
        "|---" * 7 + "|",
    ]
    for v in variants:
        if v not in summary:
            continue
        for k in ratio_keys:
            n = summary[v]["norm_ratio"][k]
            lines.append(
                f"| {labels[v]} | {k} | {n['median']:.3g} | {n['q1']:.3g}-{n['q3']:.3g} | "
                f"{n['early']:.3g} | {n['late']:.3g} | {n['drift']:.3g}x |"
            )
    lines += [
        "",
        "**Norms**: median unweighted task-gradient norms in the early and the late window "
        "(early → late), in loss units per parameter unit, and the fraction of steps whose "
        "applied update has a negative cosine with a task gradient (the step makes that task "
        "worse, to first order).",
        "",
        "| variant | "
        + " | ".join(f"norm {SHORT[t]} {units[t]}" for t in tasks)
        + " | "
        + " | ".join(f"update opposes {SHORT[t]}" for t in tasks)
        + " |",
        "|---" * (1 + 2 * len(tasks)) + "|",
    ]
    for v in variants:
        if v not in summary:
            continue
        s = summary[v]
        norms = " | ".join(
            f"{s['norm_median'][t]['early']:.3g} → {s['norm_median'][t]['late']:.3g}" for t in tasks
        )
        opp = " | ".join(
            f"{s['cos_update_frac_neg'][t]:.3f}" if t in s["cos_update_frac_neg"] else "n/a"
            for t in tasks
        )
        lines.append(f"| {labels[v]} | {norms} | {opp} |")
    val_keys = [
        k for k in ("per_atom_energy_mae", "forces_mae", "stress_mae") if k in tasks_val(runs)
    ]
    val_units = {
        "per_atom_energy_mae": f"{e_unit}/atom",
        "forces_mae": f"{e_unit}/{l_unit}",
        "stress_mae": f"{e_unit}/{l_unit}³",
    }
    lines += [
        "",
        "For context only (not an accuracy benchmark; see `benchmarks/accuracy.py`): "
        f"validation MAE after the {a['epochs']} epoch(s), mean over seeds, in the data's units.",
        "",
        "| variant | " + " | ".join(f"{k} ({val_units[k]})" for k in val_keys) + " |",
        "|---" * (1 + len(val_keys)) + "|",
    ]
    for v in variants:
        if v not in summary:
            continue
        fv = summary[v]["final_val"]
        lines.append(f"| {labels[v]} | " + " | ".join(f"{fv[k]:.4g}" for k in val_keys) + " |")
    return "\n".join(lines) + "\n"


def tasks_val(runs: list[dict]) -> list[str]:
    return list(runs[0]["final_val"]) if runs else []


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
        data = [
            [rec["cos"][p] for r in runs if r["variant"] == v for rec in r["records"]]
            for v in variants
        ]
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
    fig.suptitle(
        textwrap.fill(
            f"{ds}: cosines of the unweighted task gradients, all measured steps of "
            f"seeds {meta['args']['seeds']} (bar: median; text: fraction < 0)",
            int(width * 14),
        ),
        fontsize=10,
    )
    fig.tight_layout()
    paths.append(out.parent / f"{out.name}_cosines.png")
    R.save(fig, paths[-1])

    # 2. evolution over training: cosines per pair, norms per task, norm ratios
    ratios = ratios_of(tasks)
    # alloy: a row of cosines, of norms, of ratios; ethanol: 2 x 2
    npanel = len(pairs) + len(tasks) + len(ratios)
    ncol = 3 if npanel > 4 else 2
    nrow = math.ceil(npanel / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 3.9 * nrow + 0.8), squeeze=False)
    panels = list(axes.ravel())
    for ax in panels:
        ax.set_visible(False)
    cos_axes = panels[: len(pairs)]
    norm_axes = panels[len(pairs) : len(pairs) + len(tasks)]
    ratio_axes = panels[len(pairs) + len(tasks) :]

    a = meta["args"]
    steps_per_epoch = math.ceil(a["n_train"] / a["batch_size"])
    total = a["epochs"] * steps_per_epoch
    # about 25 bins over the run, a whole number of monitor periods each
    bin_steps = max(a["every"], round(total / 25 / a["every"]) * a["every"])

    shown["evolution"]["bin_steps"] = bin_steps

    def band(ax, v, series, panel, log=False):
        ep = np.array(list(series))
        vals = list(series.values())
        med = np.array([np.median(x) for x in vals])
        shown["evolution"].setdefault(panel, {})[v] = {
            "epoch": ep.tolist(),
            "median": med.tolist(),
            "n": [len(x) for x in vals],
        }
        ax.set_ylabel(panel)
        q1 = np.array([np.percentile(x, 25) for x in vals])
        q3 = np.array([np.percentile(x, 75) for x in vals])
        ax.plot(ep, med, "-", color=colors[v], lw=1.6, label=labels[v])
        ax.fill_between(ep, q1, q3, color=colors[v], alpha=0.15)
        ax.set_visible(True)
        ax.set_xlabel("epoch (steps / steps per epoch)")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")

    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        for ax, p in zip(cos_axes, pairs):
            series = _binned(rs, lambda rec, p=p: rec["cos"].get(p), bin_steps, steps_per_epoch)
            band(ax, v, series, f"cos({_pair_text(p)})")
            ax.axhline(0, color="k", lw=0.8)
        for ax, t in zip(norm_axes, tasks):
            band(
                ax,
                v,
                _binned(rs, lambda rec, t=t: rec["norms"][t], bin_steps, steps_per_epoch),
                f"‖g_{SHORT[t]}‖ ({t}, unweighted)",
                log=True,
            )
        for ax, (num, den) in zip(ratio_axes, ratios):
            band(
                ax,
                v,
                _binned(
                    rs,
                    lambda rec, a=num, b=den: rec["norms"][a] / rec["norms"][b],
                    bin_steps,
                    steps_per_epoch,
                ),
                ratio_key(num, den),
                log=True,
            )
    cos_axes[0].legend(fontsize=7)
    fig.suptitle(
        textwrap.fill(
            f"{ds}: median (line) and quartiles (band) over the measured steps of seeds "
            f"{a['seeds']} in bins of {bin_steps} optimizer steps; norms of the unweighted "
            "task gradients in loss units",
            int(5.5 * ncol * 14),
        ),
        fontsize=10,
    )
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


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=[*P.DATASETS, "both"], default="both")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    parser.add_argument("--epochs", type=int, default=None, help="alloy 8, ethanol 40; quick 1")
    parser.add_argument("--every", type=int, default=None, help="monitor frequency (steps)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget (smoke test)")
    P.add_run_arguments(parser)
    parser.add_argument(
        "--out",
        help="output directory (default benchmarks/results; quick: benchmarks/results/_tmp)",
    )
    R.add_from_json(
        parser,
        many=True,
        what="the md/png (and the json's derived 'summary' and 'figures') from the raw runs of",
    )
    args = parser.parse_args(argv)
    command = R.command("conflicts", sys.argv[1:] if argv is None else argv)
    if args.from_json:
        # the raw runs and the meta data stay as they were measured
        return R.from_json(args.from_json, args.out, report, out_is_dir=True)
    datasets = list(P.DATASETS) if args.dataset == "both" else [args.dataset]
    out_dir = Path(args.out) if args.out else (P.TMP if args.quick else P.RESULTS)
    for ds in datasets:
        report(run_dataset(ds, args, command), out_dir / f"conflicts_{ds}")


def run_dataset(ds: str, args, command: str) -> dict:
    """Every (variant, seed) on data set ``ds``; the results json's content."""
    dataset = P.DATASETS[ds]
    full = {"alloy": (8, 2), "ethanol": (40, 1)}[ds]
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else full[0])
    every = args.every if args.every is not None else (1 if args.quick else full[1])
    a = {
        "dataset": ds,
        "variants": args.variants,
        "seeds": seeds,
        "epochs": epochs,
        "every": every,
        "jobs": args.jobs,
        "quick": args.quick,
        "n_train": dataset.n_train,
        "n_val": dataset.frames - dataset.n_train,
        "batch_size": args.batch_size,
        "num_features": args.num_features,
        "num_layers": args.num_layers,
        "l_max": args.l_max,
        "radial_width": args.radial_width,
        "r_max": args.r_max,
        "lr": args.lr,
    }
    path, stats = P.data_and_statistics(
        ds, dataset.frames, dataset.n_train, args.r_max, dataset.type_names
    )
    tasks = [
        {"variant": v, "seed": seed, "args": a, "stats": stats, "data": str(path)}
        for seed, v in P.rotated(args.variants, seeds)  # rotate the order per seed
    ]

    import torch  # noqa: F401  (after OMP_NUM_THREADS)

    info = P.machine_info()
    t0 = time.perf_counter()
    runs = []

    def progress(r):
        runs.append(r)
        print(
            f"[{ds} {len(runs)}/{len(tasks)} {time.perf_counter() - t0:.0f} s] {r['variant']} "
            f"seed {r['seed']}: {r['steps']} steps, {len(r['records'])} measured, "
            f"{r['wall_s']:.0f} s (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )

    P.run_all(run_one, tasks, args.jobs, progress)
    order = {(t["variant"], t["seed"]): i for i, t in enumerate(tasks)}
    runs.sort(key=lambda r: (args.variants.index(r["variant"]), r["seed"]))
    meta = {
        "machine": {**info, "loadavg_end": os.getloadavg()},
        "args": a,
        "command": command,
        "time": P.now(),
        "elapsed_s": time.perf_counter() - t0,
        "data": {"path": str(path), **stats},
        "units": {"energy": dataset.energy_unit, "length": dataset.length_unit},
        "run_order": sorted(order, key=order.get),
    }
    return {"meta": meta, "runs": runs}


if __name__ == "__main__":
    main()

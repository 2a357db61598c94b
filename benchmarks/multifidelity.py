"""Multi-fidelity: the best high-fidelity model from a little expensive data and a lot of cheap.

A pair (``--pair``, :mod:`benchmarks.fidelity_pairs`) is an expensive set, split into a fixed
test set and nested training sets of N_H frames (``--dft-train``), and a cheap set:
``ethanol_random`` (DFT ethanol split at random, GFN2-xTB ethanol MD), ``ethanol_low`` (the
same, the DFT training sets the lowest-energy frames, the test set the highest) and
``si_xtb`` (GFN2-xTB Si bulk cells to train, GFN1-xTB bulk and defects, GFN2-xTB defects to
test; stress trained and reported) and ``si_bulk`` (GFN2-xTB bulk split at random, GFN1-xTB
on the same bulk geometries only: cheap data that covers nothing new). Strategies
(:func:`benchmarks.methods.multifidelity_methods`): the high fidelity alone; low-fidelity
pretraining then high-fidelity fine-tuning (sequential); joint training on balanced batches
with per-dataset energy references and nequip's weighted sum at high:low ``w``:1, with
references alone, with readout heads or with the fidelity embedding of the trunk, each at
the swept weights. Every joint model is scored as the **deployed high-fidelity model**
(``select_fidelity``).

Views: **equal total compute** (``counted``): every model gets ``--budget-s`` of training
clock, the sequential one's pretraining (``--pretrain-s``, once per seed, cached) included:
its fine-tuning is evaluated when pretraining + fine-tuning clock reach the budget;
**pretraining free** (``budget``): the fine-tuning gets the whole budget on top; **equal
epochs** (``epochs``): passes over the N_H frames. The untrained model's errors (the learning
check) and, once per seed, the transfer check (``nequip-mtl-transfer-check``'s readings,
``--transfer-batches``) and the cosine between the two datasets' task gradients at
initialisation and after pretraining (``--cosine-steps``) are recorded too.

    OMP_NUM_THREADS=1 python -m benchmarks.multifidelity --pair ethanol_low
    OMP_NUM_THREADS=1 python -m benchmarks.multifidelity --pair si_xtb --quick   # about a minute

Writes ``benchmarks/results/multifidelity_<pair>.{json,md,png}`` (``--out``), the json after
every finished run. ``benchmarks/results/multifidelity.json`` is the earlier
``ethanol_random`` result (pretraining free only).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path

from benchmarks import fidelity_pairs as FP
from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

#: the high-fidelity test frames: the only validation loader of a high-only or joint run
LOADERS = {"val0_epoch": ""}
#: the pretraining's validation loaders: the high-fidelity and the low-fidelity test frames
PRETRAIN_LOADERS = {"val0_epoch": "high/", "val1_epoch": "low/"}
#: the names of the pretraining's metrics in a results json written before pairs existed
LEGACY_PREFIX = {"high": "dft", "low": "xtb"}
E, F, S = "per_atom_energy_mae", "forces_mae", "stress_mae"
QUICK_METHODS = ["mf_dft_only", "mf_pretrain_ft", "mf_joint_1", "mf_heads_1", "mf_trunk_1"]
#: the states and variants of the gradient-cosine measurement
COSINE_STATES = ("init", "pretrained")
COSINE_VARIANTS = ("references", "one_shift")
#: the views: equal total compute (pretraining counted), pretraining free, equal epochs
VIEWS = ("counted", "budget", "epochs")


# ----------------------------------------------------------------------------- the pair


def pair_of(a: dict) -> FP.Pair:
    """The pair of a run's arguments (a json from before pairs: ``ethanol_random``)."""
    return FP.PAIRS[a.get("pair", FP.DEFAULT_PAIR)]


def metrics_of(a: dict) -> dict[str, tuple[str, float, str]]:
    """The reported high-fidelity test metrics -> (column, factor to meV, unit)."""
    p = pair_of(a)
    out = {E: (f"{p.high} energy MAE", p.to_mev, "meV/atom"),
           F: (f"{p.high} force MAE", p.to_mev, "meV/Å")}  # fmt: skip
    if a.get("stress"):
        out[S] = (f"{p.high} stress MAE", p.to_mev, "meV/Å³")
    return out


def num_tasks(a: dict) -> int:
    return 3 if a.get("stress") else 2


def labels_of(a: dict) -> dict[str, str]:
    """Every strategy's label, the pair's two levels named."""
    p = pair_of(a)
    return {m: v.label.format(high=p.high, low=p.low)
            for m, v in M.multifidelity_methods().items()}  # fmt: skip


def data_files(pair: str, data_dir, sizes) -> tuple[dict[str, str], dict]:
    """The split extxyz files (once, in ``_tmp``, a folder per pair and source contents:
    :func:`benchmarks.fidelity_pairs.split`) and what the files hold (types, stress)."""
    import ase.io

    p = FP.PAIRS[pair]
    src = p.files(Path(data_dir))
    if missing := [str(f) for f in src.values() if not f.exists()]:
        raise SystemExit(f"--pair {pair}: missing {', '.join(missing)} (--data-dir {data_dir})")
    frames = {k: ase.io.read(f, index=":") for k, f in src.items()}
    names = ["high_test", "low_train", "low_test", *(f"high_train_{n}" for n in sizes)]
    folder = f"multifidelity_{pair}_{FP.digest(src.values())}"
    files = P.write_splits(folder, names, lambda: FP.split(p, frames, sizes))
    return files, FP.properties(frames)


def statistics(files: dict, sizes, a: dict) -> dict[str, dict]:
    """The model constants (the per-atom energy mean as every type's shift) of each
    high-fidelity training set (``high_<n>``) and of the low-fidelity training frames
    (``low``); ``high_test``: the test frames' (their count)."""

    def stats(key):
        return P.data_statistics(Path(files[key]), a["r_max"], a["type_names"], "mean")

    out = {"low": stats("low_train"), "high_test": stats("high_test")}
    for n in sizes:
        out[f"high_{n}"] = stats(f"high_train_{n}")
    return out


def embedding_supported() -> bool:
    """Whether ``PerDatasetEnergyReferences`` here takes ``fidelity_embedding``."""
    import inspect

    from nequip_mtl.model import PerDatasetEnergyReferences

    return "fidelity_embedding" in inspect.signature(PerDatasetEnergyReferences).parameters


# ----------------------------------------------------------------------------- runs


def datamodule(files: dict, a: dict, seed: int, n: int, mode: str):
    """nequip's data module on ``n`` high-fidelity (``high``) or the low-fidelity (``low``)
    training frames, or balanced batches of both (``joint``); the high-fidelity test frames
    the first validation loader."""
    if mode == "high":
        return P.files_datamodule(files, a, seed, f"high_train_{n}", ["high_test"])
    if mode == "low":
        return P.files_datamodule(files, a, seed, "low_train", ["high_test", "low_test"])
    datasets = {
        "high": {"train_dataset": P.file_dataset(files, a, f"high_train_{n}"),
                 "val_dataset": P.file_dataset(files, a, "high_test")},
        "low": {"train_dataset": P.file_dataset(files, a, "low_train")},
    }  # fmt: skip
    k = a["batch_size"]
    return P.balanced_datamodule(datasets, k, seed, math.ceil(n / k))


def joint_loss(a: dict, high: float = 1.0) -> dict:
    """The per-dataset loss: per-atom energy, force (and stress) MSE 1:1 within a dataset,
    the high-fidelity components ``high`` x the low-fidelity ones."""
    return P.per_dataset_loss({"high": high, "low": 1.0}, stress=bool(a.get("stress")))


def deployed(module):
    """A copy of the trained model of ``module`` deployed at the high fidelity: nequip's
    ``modify`` with the ``select_fidelity`` modifier (``dataset=high``)."""
    from nequip.model import modify

    (key,) = module.model.keys()
    model = copy.deepcopy(module.model[key])
    return modify(model, [{"modifier": "select_fidelity", "dataset": "high"}])


def evaluate_plain(model, files: dict, a: dict, seed: int, n: int) -> dict[str, float]:
    """The high-fidelity test errors of a plain nequip ``model`` (no ``dataset_index`` in
    the frames): on nequip's plain module and data module."""
    types = a["type_names"]
    stats = {"num_neighbors_mean": 1.0, "per_type_energy_shifts": dict.fromkeys(types, 0.0),
             "forces_rms": 1.0}  # fmt: skip
    plain = P.build_module(M.methods()["ws"], P.run_model(a, stats, seed, types), num_tasks(a),
                           lr=a["lr"], num_val=1)  # fmt: skip
    (key,) = plain.model.keys()
    plain.model[key] = model
    dm = datamodule(files, a, seed, n, "high")
    return {k: v for k, v in P.validate(plain, dm, LOADERS).items() if k in metrics_of(a)}


def _shift_key(state: dict) -> str:
    """The per-type energy shift buffer of a plain NequIP model's state dict."""
    (key,) = [k for k in state if k.endswith("per_type_energy_scale_shift.shifts")]
    return key


def load_pretrained(module, cache: str, keep_shift: bool) -> None:
    """Load the pretrained weights into ``module``'s model (wrapped: under its ``base.``
    names); ``keep_shift``: its own per-type energy shift stays."""
    import torch

    pre = torch.load(cache, weights_only=False)["model"]
    own = module.model.state_dict()
    shift = _shift_key(pre)
    state = {}
    for k in own:
        plain = k.replace("per_type_energy_scale_shift.base.", "per_type_energy_scale_shift.")
        keep = plain not in pre or (keep_shift and plain == shift)
        state[k] = own[k] if keep else pre[plain]
    module.model.load_state_dict(state)


def pretrained_path(a: dict, stats: dict, seed: int) -> Path:
    keys = ("pair", "pretrain_s", "pretrain_lr", "batch_size", "clock", "type_names", "stress")
    return P.cache_path("multifidelity_pretrained", a, keys, stats["low"], seed=seed)


def pretrain_metrics(a: dict) -> list[str]:
    return [f"{d}/{k}" for d in ("high", "low") for k in metrics_of(a)]


def pretrain_run(task: dict) -> dict:
    """Pretrain on the low-fidelity frames for ``pretrain_s`` s of training clock (once:
    cached)."""
    a, stats = task["args"], task["stats"]
    return P.pretrain(task,
                      lambda: datamodule(task["files"], a, task["seed"], 0, "low"),
                      math.ceil(stats["low"]["num_frames"] / a["batch_size"]), stats["low"],
                      pretrain_metrics(a), PRETRAIN_LOADERS, num_tasks(a))  # fmt: skip


def build_run(task: dict):
    """The task's strategy on ``n`` high-fidelity frames, ready to train (seeded): its
    module, data module, batches per epoch and what the run records besides."""
    import lightning

    P.init_torch()
    a, seed, n = task["args"], task["seed"], task["n"]
    method = M.multifidelity_methods(a["calibration_steps"])[task["method"]]
    fid = method.fidelity
    types = a["type_names"]
    lightning.seed_everything(seed, workers=True, verbose=False)
    stats = task["stats"][f"high_{n}"]
    extra = {}
    if fid["mode"] == "joint":
        dm = datamodule(task["files"], a, seed, n, "joint")
        refs = dm.energy_references(types)
        model = P.with_references(P.run_model(a, stats, seed, types), refs, fid["heads"],
                                  fid.get("embedding", False))  # fmt: skip
        loss = joint_loss(a, fid["high"])
        extra["references"] = refs
    else:
        dm = datamodule(task["files"], a, seed, n, "high")
        loss = None
        if fid["mode"] == "pretrain":  # the pretrained model's constants, its energy zero
            stats = {**task["stats"]["low"], "per_type_energy_shifts": stats["per_type_energy_shifts"]}  # fmt: skip
        model = P.run_model(a, stats, seed, types)
    module = P.build_module(method, model, num_tasks(a), lr=a["lr"], loss=loss, num_val=1)
    if fid["mode"] == "pretrain":
        load_pretrained(module, task["cache"], keep_shift=True)
    return module, dm, math.ceil(n / a["batch_size"]), extra


def mf_run(task: dict) -> dict:
    """Train the task's strategy on ``n`` high-fidelity frames (and the low-fidelity ones);
    its high-fidelity test errors (joint models: the deployed model's), in every view."""
    import torch

    a, seed, n = task["args"], task["seed"], task["n"]
    method = M.multifidelity_methods(a["calibration_steps"])[task["method"]]
    mode = method.fidelity["mode"]
    metrics = metrics_of(a)
    module, dm, per_epoch, extra = build_run(task)
    if mode == "high_only":  # the learning check: the untrained model's errors
        extra["untrained"] = {k: v for k, v in P.validate(module, dm, LOADERS).items()
                              if k in metrics}  # fmt: skip
    snapshot: dict = {}
    callbacks = own = P.build_callbacks(method)
    if mode == "pretrain":  # equal total compute: the pretraining's clock counted
        pre_clock = torch.load(task["cache"], weights_only=False)["result"]["clock_s"]

        def callbacks(clock):
            return [P.snapshot_on_clock(clock, a["budget_s"] - pre_clock, snapshot), *own]

    out = P.fit_on_clock(module, dm, a, per_epoch, list(metrics), LOADERS, callbacks)
    if snapshot:
        module.model.load_state_dict(snapshot["state"])
        counted = {k: v for k, v in P.validate(module, dm, LOADERS).items() if k in metrics}
        out["counted"] = {"epoch": snapshot["step"] / per_epoch, "step": snapshot["step"],
                          "clock_s": snapshot["clock_s"], "pretrain_clock_s": pre_clock,
                          **counted}  # fmt: skip
    if mode == "joint":
        dep = evaluate_plain(deployed(module), task["files"], a, seed, n)
        train_final = {k: out["curve"][-1][k] for k in metrics}
        extra["training_model"] = train_final
        extra["deployed"] = dep
        extra["deployed_rel_diff"] = max(
            abs(dep[k] - train_final[k]) / abs(train_final[k]) for k in metrics
        )
        if "note" not in out["budget"]:  # the equal-time result is the final state: deployed
            out["budget"].update(dep)
        out["curve"][-1].update(dep)
    coeffs = {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()}
    return {"method": task["method"], "seed": seed, "n_dft": n, **out, "final_coeffs": coeffs,
            **extra}  # fmt: skip


def _cosine_recorder(steps: list):
    import lightning

    class Record(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats = pl_module.task_gradient_statistics
            if stats is not None and stats.global_step == len(steps):
                c = stats.statistics()
                i, j = stats.names.index("high"), stats.names.index("low")
                steps.append(float(c.cosines[i, j]))

    return Record()


def cosine_run(task: dict) -> dict:
    """The cosine of the high- and low-fidelity dataset-task gradients on the first
    ``cosine_steps`` balanced batches, the model held fixed (lr 0), at initialisation and
    from the pretrained model, with per-dataset references and with one shared shift (the
    high fidelity's, or the low one's)."""
    import lightning

    P.init_torch()
    a, seed, n = task["args"], task["seed"], task["n"]
    method = M.multifidelity_methods()["mf_upgrad"]
    types = a["type_names"]
    out = {"seed": seed, "n_dft": n}
    for state in COSINE_STATES:
        stats = task["stats"][f"high_{n}"] if state == "init" else task["stats"]["low"]
        for variant in COSINE_VARIANTS:
            lightning.seed_everything(seed, workers=True, verbose=False)
            dm = datamodule(task["files"], a, seed, n, "joint")
            model = P.run_model(a, stats, seed, types)
            if variant == "references":
                model = P.with_references(model, dm.energy_references(types))
            module = P.build_module(method, model, num_tasks(a), lr=0.0, loss=joint_loss(a),
                                    num_val=0)  # fmt: skip
            if state == "pretrained":
                load_pretrained(module, task["cache"], keep_shift=False)
            steps: list[float] = []
            fit = P.trainer([_cosine_recorder(steps)], max_steps=a["cosine_steps"],
                            limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
            fit.fit(module, datamodule=dm)
            out[f"{state}/{variant}"] = steps
    return out


def transfer_run(task: dict) -> dict:
    """The transfer check (``nequip-mtl-transfer-check``'s readings,
    :func:`nequip_mtl.train.transfer_check.check_modules`) of the joint model with references
    at initialisation on the size-``n`` training sets: each dataset's energy residual after
    its references and force RMS, the structures the two share, the gradient cosine over
    ``transfer_batches`` balanced batches."""
    import lightning

    from nequip_mtl.data.binding import bind_dataset_names
    from nequip_mtl.train.transfer_check import check_modules

    P.init_torch()
    a, seed, n = task["args"], task["seed"], task["n"]
    types = a["type_names"]
    lightning.seed_everything(seed, workers=True, verbose=False)
    dm = datamodule(task["files"], a, seed, n, "joint")
    model = P.with_references(P.run_model(a, task["stats"][f"high_{n}"], seed, types),
                              dm.energy_references(types))  # fmt: skip
    module = P.build_module(M.methods()["ws"], model, num_tasks(a), lr=0.0, loss=joint_loss(a),
                            num_val=0)  # fmt: skip
    bind_dataset_names(module, dm.dataset_names)
    check = check_modules(dm, module, frames=a["batch_size"], batches=a["transfer_batches"],
                          reference="high")  # fmt: skip
    pair, g = check.pair("high", "low"), check.gradients
    return {"seed": seed, "n_dft": n,
            "datasets": {d.name: {"frames": d.frames, "energy_residual_rms": d.energy_residual_rms,
                                  "force_rms": d.force_rms} for d in check.datasets},
            "shared_frames": pair.frames, "energy_difference_rms": pair.energy_difference_rms,
            "force_ratio": pair.force_ratio, "cosine": g.cosine("high", "low"),
            "cosine_error": g.cosine_error("high", "low"),
            "cosine_all": g.cosine("high", "low", shared=False), "batches": g.batches,
            "frames_per_dataset": g.frames_per_dataset, "table": check.table()}  # fmt: skip


# ----------------------------------------------------------------------------- summaries


def sizes_of(data: dict) -> list[int]:
    return sorted({r["n_dft"] for r in data["runs"]}, reverse=True)


def views_of(a: dict) -> tuple[str, ...]:
    """The views of a results json: equal total compute only where the pretraining was
    counted (every json since pairs exist)."""
    return VIEWS if "pair" in a else VIEWS[1:]


def at_view(run: dict, view: str) -> dict | None:
    """A run's result in ``view``: at equal total compute, a run without pretraining has
    its equal-time result."""
    if view == "counted":
        return run.get("counted") or run["budget"]
    return run[view]


def summaries(data: dict, n: int) -> dict[str, list[dict]]:
    """Per view: the rows of the size-``n`` runs (mean, sd over seeds), in the registry's
    order."""
    a = data["meta"]["args"]
    runs = [r for r in data["runs"] if r["n_dft"] == n]
    methods = [m for m in M.MF_METHODS if m in {r["method"] for r in runs}]
    metrics = metrics_of(a)
    return {v: R.summarize([{**r, v: at_view(r, v)} for r in runs], methods, v, metrics)
            for v in views_of(a)}  # fmt: skip


def captions(a: dict) -> dict[str, str]:
    p = pair_of(a)
    free = f"equal training time: {a['budget_s']:g} s of training CPU time per run"
    if "pair" in a:
        free = (f"pretraining free: {a['budget_s']:g} s of training CPU time per run, the "
                f"{p.low} pretraining ({a['pretrain_s']:g} s) not counted")  # fmt: skip
    return {"counted": f"equal total compute: {a['budget_s']:g} s of training CPU time per "
                       f"model, the {p.low} pretraining counted",
            "budget": free,
            "epochs": f"equal epochs: {a['epochs']} epochs (passes over the {p.high} frames) "
                      "per run"}  # fmt: skip


def _gap(row, base, k) -> str:
    if row is None or base is None or row[k][0] is None or base[k][0] is None:
        return "n/a"
    return f"{100.0 * (row[k][0] / base[k][0] - 1.0):+.0f} %"


def _words(metric: str) -> str:
    return {E: "energy", F: "force", S: "stress"}[metric]


def _short(a: dict):
    p = pair_of(a)
    return lambda label: label.replace(f"joint, weighted sum {p.high}:{p.low} ", "")


def table(a: dict, rows: list[dict], caption: str) -> list[str]:
    """One view of one size: the errors, the change against the high fidelity only, the
    place against the references' weighted-sum sweep front (energy and force MAE)."""
    labels, metrics, high = labels_of(a), metrics_of(a), pair_of(a).high
    st = R.classify(rows, M.MF_SWEEP, (E, F))
    base = next((r for r in rows if r["method"] == "mf_dft_only"), None)
    short = _short(a)
    head = ["strategy", *R.header(metrics), *(f"{_words(k)} vs {high} only" for k in metrics),
            "steps", "epochs", "vs joint sweep front", "seeds"]  # fmt: skip
    body = [[f"**{labels[m]}**" if m in M.MF_SWEEP else labels[m], *c[: len(metrics)],
             *(_gap(r, base, k) for k in metrics), *c[len(metrics) :],
             R.place(st[m], lambda x: short(labels[x]), m in M.MF_SWEEP), r["n_reached"]]
            for r in R.sorted_by(rows, F) for m, c in [(r["method"], R.cells(r, metrics))]]  # fmt: skip
    return [caption, "", *R.md_table(head, body)]


def reduction_table(data: dict, view: str) -> list[str]:
    """Every method run at more than one size: each metric per size, with its change
    against the high fidelity only at that size."""
    a = data["meta"]["args"]
    sizes, labels, metrics, high = sizes_of(data), labels_of(a), metrics_of(a), pair_of(a).high
    rows = {n: {r["method"]: r for r in summaries(data, n)[view]} for n in sizes}

    def cell(n, m, k):
        r = rows[n].get(m)
        if r is None:
            return "not run"
        return f"{R.pm(r[k], metrics[k][1])} ({_gap(r, rows[n].get('mf_dft_only'), k)})"

    head = ["strategy", *(f"{_words(k)} MAE, N_H = {n} ({metrics[k][2]})"
                          for k in (F, *(k for k in metrics if k != F)) for n in sizes)]  # fmt: skip
    body = [[labels[m], *(cell(n, m, k) for k in (F, *(k for k in metrics if k != F))
                          for n in sizes)]
            for m in M.MF_METHODS if sum(m in rows[n] for n in sizes) > 1]  # fmt: skip
    return [f"**Reducing the {high} frames ({captions(a)[view]})**: the methods run at several "
            f"sizes, in brackets the change against {high} only at that size", "",
            *R.md_table(head, body)]  # fmt: skip


def better_than_both(data: dict, n: int, view: str) -> list[str]:
    """The joint strategies whose mean energy and force MAE are both below those of the high
    fidelity only and of sequential training, at size ``n`` in ``view``."""
    rows = {r["method"]: r for r in summaries(data, n)[view]}
    refs = [rows.get(m) for m in ("mf_dft_only", "mf_pretrain_ft")]
    if any(r is None or r[F][0] is None for r in refs):
        return []
    table = M.multifidelity_methods()
    return [m for m, r in rows.items() if table[m].fidelity["mode"] == "joint"
            and r[F][0] is not None and r[E][0] is not None
            and all(r[k][0] < ref[k][0] for k in (E, F) for ref in refs)]  # fmt: skip


def verdict_lines(data: dict) -> list[str]:
    """Per size and view (but equal epochs): which joint strategies beat both references."""
    a = data["meta"]["args"]
    p, labels, caps = pair_of(a), labels_of(a), captions(a)
    rows = []
    for n in sizes_of(data):
        for view in views_of(a)[:-1]:
            best = better_than_both(data, n, view)
            rows.append([n, caps[view].split(":")[0],
                         ", ".join(labels[m] for m in best) if best else "none"])  # fmt: skip
    return [f"**Joint strategies better than both {p.high} only and sequential training** "
            f"({p.low} pretraining, then {p.high} fine-tuning) on {p.high} energy and force MAE "
            "(means over seeds):", "",
            *R.md_table(["N_H", "view", "joint strategies better than both"], rows), ""]  # fmt: skip


def learning_lines(data: dict) -> list[str]:
    """The learning check: the untrained model against the trained high-only model."""
    a = data["meta"]["args"]
    metrics, high = metrics_of(a), pair_of(a).high
    rows = []
    for n in sizes_of(data):
        runs = [r for r in data["runs"] if r["n_dft"] == n and "untrained" in r]
        if not runs:
            continue
        row = [n]
        for k in (F, E):
            before = R.mean_sd([r["untrained"][k] for r in runs])
            after = R.mean_sd([r["budget"][k] for r in runs])
            ratio = "n/a" if after[0] is None else f"{before[0] / after[0]:.1f}x"
            row += [R.pm(before, metrics[k][1]), R.pm(after, metrics[k][1]), ratio]
        rows.append(row)
    if not rows:
        return []
    head = ["N_H"] + [c for k in (F, E) for c in (
        f"untrained {_words(k)} MAE ({metrics[k][2]})",
        f"{high} only, trained ({metrics[k][2]})", "untrained / trained")]  # fmt: skip
    return [f"**Learning check**: the {high}-only model untrained (its initialisation) and "
            f"after {a['budget_s']:g} s of training CPU time", "", *R.md_table(head, rows), ""]  # fmt: skip


def transfer_lines(data: dict) -> list[str]:
    """The transfer check's readings (mean ± sd over seeds where they vary)."""
    if not (checks := data.get("transfer")):
        return []
    a = data["meta"]["args"]
    p, c0 = pair_of(a), checks[0]

    def pm(values, factor=1.0, spec=".2f"):
        return R.pm(R.mean_sd(values), factor, spec)

    levels = {"high": p.high, "low": p.low}
    rows = [[name, levels[name], d["frames"], R.fmt(d["energy_residual_rms"] * p.to_mev, ".1f"),
             R.fmt(d["force_rms"] * p.to_mev if d["force_rms"] is not None else None, ".0f")]
            for name, d in c0["datasets"].items()]  # fmt: skip
    shared = ("no shared structures" if not c0["shared_frames"] else
              f"{c0['shared_frames']} shared structures, force difference / {p.high} force RMS "
              f"{R.fmt(c0['force_ratio'])}")  # fmt: skip
    return [
        f"**Transfer check** (`nequip-mtl-transfer-check`'s readings) on the N_H = "
        f"{c0['n_dft']} {p.high} and the {p.low} training frames: each dataset's energy "
        "residual per atom after its own least-squares per-type references and its force RMS; "
        f"{shared}; the gradient cosine of the two datasets' losses at the joint model with "
        f"references as initialised, over {c0['batches']} balanced batches of "
        f"{c0['frames_per_dataset']} frames of each: {pm([c['cosine'] for c in checks])} on "
        f"the parameters both reach (standard error over batches "
        f"{pm([c['cosine_error'] for c in checks])}), {pm([c['cosine_all'] for c in checks])} "
        f"on all trainable parameters (mean ± sd over seeds {[c['seed'] for c in checks]}).",
        "",
        *R.md_table(["dataset", "level", "frames", "energy residual RMS (meV/atom)",
                     "force RMS (meV/Å)"], rows),
        "",
    ]  # fmt: skip


def cosine_lines(data: dict) -> list[str]:
    """The table of the high-low gradient cosines: median, extremes, fraction negative."""
    import statistics

    if not (cos := data.get("cosines")):
        return []
    a = data["meta"]["args"]
    p = pair_of(a)
    names = {"references": "per-dataset references", "one_shift": "one shared shift"}
    states = {"init": "at initialisation", "pretrained": f"{p.low}-pretrained"}
    rows = []
    for state in COSINE_STATES:
        for variant in COSINE_VARIANTS:
            if xs := [x for c in cos for x in c[f"{state}/{variant}"]]:
                neg = sum(x < 0 for x in xs) / len(xs)
                rows.append([states[state], names[variant], f"{statistics.median(xs):+.2f}",
                             f"{min(xs):+.2f}", f"{max(xs):+.2f}", f"{100 * neg:.0f} %", len(xs)])  # fmt: skip
    what = "energy, force and stress" if a.get("stress") else "energy + force"
    return [
        f"**Gradient cosine between the {p.high} and {p.low} dataset tasks** (per-atom {what} "
        f"MSE of each dataset, 1:1) on the first {a['cosine_steps']} balanced batches of the "
        f"{cos[0]['n_dft']} {p.high} training frames, the model held fixed, over batches and "
        "seeds: with per-dataset energy references (the joint runs' model) or one shared shift "
        "(the plain model, as a concatenation of the two files would train).",
        "",
        *R.md_table(["model", "energy zeros", "median cosine", "min", "max", "negative", "batches"],
                    rows),
        "",
    ]  # fmt: skip


def _pretrain_value(run: dict, level: str, metric: str):
    b = run["budget"]
    key = f"{level}/{metric}"
    return b[key] if key in b else b.get(f"{LEGACY_PREFIX[level]}/{metric}")


def data_text(data: dict) -> str:
    a = data["meta"]["args"]
    p, runs, k = pair_of(a), data["runs"], a["batch_size"]
    stats = data["meta"]["data"]["statistics"]
    n_test = stats["high_test"]["num_frames"] if "high_test" in stats else p.n_test
    n_low = stats["low"]["num_frames"] if "low" in stats else p.low_train
    what = "energy, force and stress" if a.get("stress") else "energy and force"
    pair = a.get("pair", FP.DEFAULT_PAIR)
    return (
        f"Pair `{pair}`: {p.description}. High fidelity: {p.high}, {n_test} test frames, training sets of N_H = "
        f"{', '.join(str(n) for n in a['dft_train'])} frames (nested); low fidelity: {n_low} "
        f"{p.low} frames. {P.model_text(a, runs[0]['params'] if runs else None)}, Adam at "
        f"constant lr {a['lr']}, per-atom {what} MSE 1:1 within a dataset, model "
        f"constants from the {p.high} training frames; an epoch is ceil(N_H / {k}) batches of "
        f"{k} {p.high} frames (joint: plus {k} {p.low} frames each). Joint runs: fixed "
        f"least-squares per-dataset energy references, the {p.high}:{p.low} ratio as named "
        "(dataset tasks, calibrate-then-freeze: 1:1; calibration "
        f"{a['calibration_steps']} steps), scored as the deployed {p.high} model "
        "(`select_fidelity`)."
    )


def budget_text(data: dict) -> str:
    a = data["meta"]["args"]
    p, pre = pair_of(a), data.get("pretrain") or []
    done = (f"{R.mean_sd([r['steps'] for r in pre])[0]:.0f} steps, "
            f"{R.mean_sd([r['wall_s'] for r in pre])[0]:.0f} s wall" if pre else "not run")  # fmt: skip
    what = (
        f"{a['pretrain_s']:g} s of training CPU time (lr {a['pretrain_lr']}; {done}), once "
        f"per seed; the fine-tune starts with {p.high}'s energy zero and a fresh Adam."
    )
    if "pair" not in a:
        return (
            f"**Budget split**: the {p.low} pretraining is *not* counted in the fine-tune's "
            f"budget: {what}"
        )
    return (
        f"**Budget split**: the {p.low} pretraining takes {what} *Equal total compute*: "
        f"the fine-tune is evaluated when the pretraining's and its own training clock "
        f"reach {a['budget_s']:g} s together; *pretraining free*: it trains for "
        f"{a['budget_s']:g} s on top."
    )


def markdown(data: dict) -> str:
    meta = data["meta"]
    a = meta["args"]
    p = pair_of(a)
    runs = data["runs"]
    sizes = sizes_of(data)
    pre = data.get("pretrain") or []
    command = R.commands("multifidelity", a)
    title = "Multi-fidelity benchmark" + (f" (`{a['pair']}`)" if "pair" in a else "")
    lines = R.preamble(
        title, meta, 1, command, data_text(data), budget_text(data),
        f"{p.high} test errors, mean ± sample standard deviation over seeds {a['seeds']}; "
        f"sorted by force MAE; the joint weighted-sum sweep (references alone) in bold; *vs "
        f"{p.high} only*: the change of the mean error against {p.high} only at that size; the "
        f"place against the sweep's front on {p.high} energy and force MAE (means). "
        f"{'Errors in meV (the data is in eV).' if p.energy_unit == 'eV' else P.units_text('ethanol')}",
    )  # fmt: skip
    if (expected := a.get("expected_runs")) is not None and len(runs) < expected:
        lines += [f"**Incomplete**: {len(runs)} of {expected} runs finished.", ""]
    if diffs := [r["deployed_rel_diff"] for r in runs if "deployed_rel_diff" in r]:
        lines += [f"Deployed {p.high} model against the training model on the {p.high} test "
                  f"frames: largest relative difference of an MAE {max(diffs):.1e} over "
                  f"{len(diffs)} joint runs.", ""]  # fmt: skip
    lines += learning_lines(data)
    lines += transfer_lines(data)
    lines += cosine_lines(data)
    lines += verdict_lines(data)
    if len(sizes) > 1:
        for view in views_of(a):
            lines += reduction_table(data, view) + [""]
    for n in sizes:
        rows = summaries(data, n)
        for view, cap in captions(a).items():
            if view in rows:
                lines += table(a, rows[view], f"**N_H = {n} {p.high} training frames, {cap}**")
                lines += [""]
    if pre:
        pm = {d: R.pm(R.mean_sd([_pretrain_value(r, d, F) for r in pre]), p.to_mev)
              for d in ("high", "low")}  # fmt: skip
        lines += [f"**The {p.low}-pretrained model** (before fine-tuning; forces only: its "
                  f"energy zero is {p.low}'s): {p.high} test force MAE {pm['high']} meV/Å, "
                  f"{p.low} test force MAE {pm['low']} meV/Å.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    """High-fidelity test errors (equal total compute, or equal time) against N_H."""
    plt = R.pyplot()
    a = data["meta"]["args"]
    p, sizes, labels, metrics = pair_of(a), sizes_of(data), labels_of(a), metrics_of(a)
    view = views_of(a)[0]
    keys = [F, *(k for k in metrics if k != F)]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.8))
    rows = {n: {r["method"]: r for r in summaries(data, n)[view]} for n in sizes}
    for m in M.MF_METHODS:
        pts = [(n, rows[n][m]) for n in sizes if m in rows[n]]
        if not pts:
            continue
        for ax, k in zip(axes, keys):
            xs = [n for n, r in pts if r[k][0] is not None]
            ys = [r[k][0] * metrics[k][1] for _, r in pts if r[k][0] is not None]
            sd = [r[k][1] * metrics[k][1] for _, r in pts if r[k][0] is not None]
            style = "o-" if len(xs) > 1 else "o"
            ax.errorbar(xs, ys, yerr=sd, fmt=style, capsize=3, label=labels[m], alpha=0.8)
    for ax, k in zip(axes, keys):
        ax.set_xlabel(f"{p.high} training frames (N_H)")
        ax.set_ylabel(f"{metrics[k][0]} ({metrics[k][2]})")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Multi-fidelity {a.get('pair', 'ethanol')}: {p.high} test error, "
                 f"{captions(a)[view].split(':')[0]} ({a['budget_s']:g} s), mean ± sd over seeds")  # fmt: skip
    fig.tight_layout()
    return R.save(fig, path)


#: the results json's lists of records: pretrainings, cosines and transfer checks (one per
#: seed), and the runs
LISTS = ("pretrain", "cosines", "transfer", "runs")


def report(data: dict, out: Path) -> None:
    """``out``.json (raw runs, meta, the summaries), .md and .png."""
    meta = {k: v for k, v in data["meta"].items() if k != "partial"}
    views = {str(n): summaries(data, n) for n in sizes_of(data)}
    lists = {k: data[k] for k in LISTS if k in data}
    R.write_json(out.with_suffix(".json"), {"meta": meta, "views": views, **lists})
    R.write_text(out.with_suffix(".md"), markdown(data))
    plot(data, out.parent / (out.name + ".png"))


# ----------------------------------------------------------------------------- command


def parse(argv):
    p = P.study_parser(__doc__, jobs=False)
    p.add_argument("--pair", choices=list(FP.PAIRS), default=FP.DEFAULT_PAIR)
    p.add_argument("--data-dir", default=str(FP.DATA), help="the folder of the pair's files")
    p.add_argument("--methods", nargs="+", default=None, choices=M.MF_METHODS,
                   help=f"at every size (default: {' '.join(M.MF_DEFAULT)})")  # fmt: skip
    p.add_argument("--dft-train", type=int, nargs="+", default=None,
                   help="N_H, the high-fidelity training set sizes (default 80 40 10)")  # fmt: skip
    P.add_budget_arguments(p)
    p.add_argument("--pretrain-s", type=float, default=None,
                   help="the low-fidelity pretraining's clock (s), below --budget-s")  # fmt: skip
    p.add_argument("--pretrain-lr", type=float, default=5e-3)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--calibration-steps", type=int, default=None)
    p.add_argument("--cosine-steps", type=int, default=None, help="batches of the cosines")
    p.add_argument("--transfer-batches", type=int, default=None,
                   help="balanced batches of the transfer check's gradient cosine")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the results json at --out: keep its runs and run only the "
                        "missing (N_H, seed, method) of the union of its and these sizes, "
                        "seeds and methods; every other setting must equal its")  # fmt: skip
    P.add_run_arguments(p, batch_size=4, lr=None)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.from_json:
        return args
    quick = {"pretrain_s": 1.0, "budget_s": 2.0, "epochs": 1, "seeds": [0], "val_every": 1,
             "calibration_steps": 3, "cosine_steps": 2, "transfer_batches": 2,
             "dft_train": [20, 8]}  # fmt: skip
    full = {"pretrain_s": 25.0, "budget_s": 40.0, "epochs": 10, "seeds": [0, 1, 2],
            "val_every": 10, "calibration_steps": 20, "cosine_steps": 8, "transfer_batches": 16,
            "dft_train": [80, 40, 10]}  # fmt: skip
    P.fill_defaults(args, quick, full)
    if args.epochs % args.val_every:
        p.error(f"--epochs {args.epochs} must be a multiple of --val-every {args.val_every}")
    if not 0 < args.pretrain_s < args.budget_s:
        p.error(f"--pretrain-s {args.pretrain_s:g} must be above 0 and below --budget-s "
                f"{args.budget_s:g} (at equal total compute the fine-tune gets the rest)")  # fmt: skip
    if args.quick:
        args.methods = args.methods or list(QUICK_METHODS)
        args.num_features, args.radial_width = 8, 8
    args.methods = list(dict.fromkeys(args.methods or M.MF_DEFAULT))
    args.dft_train = sorted(set(args.dft_train), reverse=True)
    args.out = P.out_path(args, f"multifidelity_{args.pair}")
    return args


def plan(args) -> list[tuple[int, int, str]]:
    """``(n_dft, seed, method)`` of every run, seed by seed (so that a partial json holds
    whole seeds), each seed the largest size first; the methods' order rotated per seed."""
    out = []
    for i, seed in enumerate(args.seeds):
        k = (3 * i) % len(args.methods)
        for n in args.dft_train:
            out += [(n, seed, m) for m in args.methods[k:] + args.methods[:k]]
    return out


#: the arguments a resumed study may change (what to run, where the data lies)
RESUMABLE = ("argv", "methods", "dft_train", "seeds", "expected_runs", "data_dir",
             "resumed_argv", "quick", "from_json")  # fmt: skip


def resumed(args, out: Path) -> dict:
    """The earlier json at ``out`` (refused if absent); ``args`` gain the union of its and
    their sizes, seeds and methods."""
    earlier = P.earlier_study(out)
    e = earlier["meta"]["args"]
    args.methods = list(dict.fromkeys([*e["methods"], *args.methods]))
    args.dft_train = sorted({*e["dft_train"], *args.dft_train}, reverse=True)
    args.seeds = sorted({*e["seeds"], *args.seeds})
    return earlier


def merge_earlier(earlier: dict, a: dict, stats: dict, out: Path):
    """The arguments, statistics and lists of a resumed study (:func:`protocol.merge_resumed`:
    every setting but :data:`RESUMABLE`, and the statistics of the sizes both ran, as the
    earlier study's)."""
    return P.merge_resumed(earlier, a, stats, out, RESUMABLE, LISTS)


def check_methods(methods: list[str]) -> None:
    """Refuse methods this checkout cannot build, naming what is missing."""
    table = M.multifidelity_methods()
    if missing := M.missing_methods(methods, table):
        raise SystemExit(f"cannot import {missing}")
    trunk = [m for m in methods if table[m].fidelity.get("embedding")]
    if trunk and not embedding_supported():
        raise SystemExit(
            f"{', '.join(trunk)}: nequip_mtl.model.PerDatasetEnergyReferences here has no "
            "`fidelity_embedding` option (the fidelity-aware trunk layers); leave these "
            "methods out (--methods) or update nequip_mtl"
        )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    out = Path(args.out)
    earlier = resumed(args, out) if args.resume else None
    check_methods(args.methods)
    files, held = data_files(args.pair, args.data_dir, args.dft_train)
    args.type_names, args.stress = held["type_names"], held["stress"]
    stats = statistics(files, args.dft_train, vars(args))
    a = {k: v for k, v in vars(args).items() if k not in ("out", "resume")}
    todo = plan(args)
    a["expected_runs"] = len(todo)
    lists = {k: [] for k in LISTS}
    if earlier is not None:
        a, stats, lists = merge_earlier(earlier, a, stats, out)
        finished = {(r["n_dft"], r["seed"], r["method"]) for r in lists["runs"]}
        todo = [t for t in todo if t not in finished]
    base = {"args": a, "stats": stats, "files": files}

    def task(seed, n=None, method=None):
        return {**base, "seed": seed, "n": n, "method": method,
                "cache": str(pretrained_path(a, stats, seed))}  # fmt: skip

    results = P.Results(out, "multifidelity", a["argv"], a,
                        {"files": files, "statistics": stats}, **lists)  # fmt: skip
    if earlier is not None:  # the elapsed time counts every part
        results.t0 -= earlier["meta"].get("elapsed_s", 0.0)
    runs = results.lists["runs"]

    def done(key: str) -> set[int]:
        return {x["seed"] for x in results.lists[key]}

    for n, seed, method in todo:
        if seed not in done("pretrain") or not Path(task(seed)["cache"]).exists():
            # the cosines and the sequential runs need it; a resumed study whose cache is
            # gone pretrains again (same settings) and records the new pretraining
            r = pretrain_run(task(seed))
            results.lists["pretrain"] = [x for x in results.lists["pretrain"] if x["seed"] != seed]
            results.add("pretrain", r)
            print(f"pretrained seed {seed}{' (cached)' if r['cached'] else ''}: {r['steps']} "
                  f"steps, high-fidelity force {r['budget'][f'high/{F}']:.4g}", flush=True)  # fmt: skip
        if seed not in done("cosines"):
            c = cosine_run(task(seed, max(args.dft_train)))
            results.add("cosines", c)
            print(f"cosines seed {seed}: " + ", ".join(
                f"{k} {sorted(v)[len(v) // 2]:+.2f}" for k, v in c.items() if isinstance(v, list)), flush=True)  # fmt: skip
        if seed not in done("transfer"):
            t = transfer_run(task(seed, max(args.dft_train)))
            results.add("transfer", t)
            print(f"transfer check seed {seed}: gradient cosine {t['cosine']:+.2f} ± "
                  f"{t['cosine_error']:.2f}", flush=True)  # fmt: skip
        r = mf_run(task(seed, n, method))
        results.add("runs", r)
        b = at_view(r, "counted")
        print(f"[{len(runs)}/{a['expected_runs']} {time.perf_counter() - results.t0:.0f} s] "
              f"{method} n={n} seed {seed}: {r['steps']} steps, equal compute: force {b[F]:.4g}, "
              f"energy {b[E]:.4g} (run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    for key in ("pretrain", "cosines", "transfer"):
        results.lists[key].sort(key=lambda r: r["seed"])
    report(results.data(), out)


if __name__ == "__main__":
    main()

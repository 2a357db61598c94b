"""Multi-fidelity: the best DFT model from a little DFT data and a lot of xTB data.

DFT ethanol (20 test frames; 80 training frames and nested subsets, ``--dft-train``) and
1000 GFN2-xTB ethanol MD frames. Strategies (:func:`benchmarks.methods.multifidelity_methods`):
DFT alone; xTB pretraining (not counted in the budget) then DFT fine-tuning; joint training
on balanced batches with per-dataset energy references and nequip's weighted sum at DFT:xTB
``w``:1 (the sweep: the front), with readout heads, or with the datasets as tasks. Every
joint model is scored as the **deployed DFT model** (``select_fidelity``). An epoch is one
pass over the DFT frames; views: equal training time and equal epochs. Once per seed, the
cosine between the DFT and xTB task gradients is measured (``--cosine-steps``).

    OMP_NUM_THREADS=1 python -m benchmarks.multifidelity
    OMP_NUM_THREADS=1 python -m benchmarks.multifidelity --quick            # about a minute

Writes ``benchmarks/results/multifidelity.{json,md,png}`` (``--out``), the json after every
finished run.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

TYPES = P.ETHANOL_TYPE_NAMES
N_DFT_TEST, N_XTB_TRAIN, N_XTB_TEST = 20, 1000, 100
#: the DFT test frames: the only validation loader of a DFT (or joint) run
LOADERS = {"val0_epoch": ""}
#: the pretraining's validation loaders: DFT test frames, xTB test frames
PRETRAIN_LOADERS = {"val0_epoch": "dft/", "val1_epoch": "xtb/"}
F, E = "forces_mae", "per_atom_energy_mae"
METRICS = {E: ("DFT energy MAE", P.KCAL_MOL_TO_MEV, "meV/atom"),
           F: ("DFT force MAE", P.KCAL_MOL_TO_MEV, "meV/Å")}  # fmt: skip
PRETRAIN_METRICS = {f"{d}/{k}": v for d in ("dft", "xtb") for k, v in METRICS.items()}
#: the reduced DFT sizes run these (the baselines, the whole weighted-sum sweep, UPGrad)
REDUCTION_METHODS = ["mf_dft_only", "mf_pretrain_ft", *M.MF_SWEEP, "mf_upgrad"]
QUICK_METHODS = ["mf_dft_only", "mf_pretrain_ft", "mf_joint_1", "mf_upgrad", "mf_joint_heads"]
#: the states and variants of the gradient-cosine measurement
COSINE_STATES = ("init", "pretrained")
COSINE_VARIANTS = ("references", "one_shift")


def data_files(sizes) -> dict[str, str]:
    """The extxyz files (once, in ``_tmp``): ``dft_test`` (20 frames), ``dft_train_<n>`` (the
    first ``n`` of the other 80: nested), ``xtb_train`` (1000), ``xtb_test`` (100)."""

    def make():
        import ase.io
        import numpy as np

        rng = np.random.default_rng(0)
        dft = P.shuffled(ase.io.read(P.ETHANOL, index=":"), rng)
        test, train = dft[:N_DFT_TEST], dft[N_DFT_TEST:]
        for n in sizes:
            if not 0 < n <= len(train):
                raise SystemExit(f"--dft-train {n}: must be 1 to {len(train)}")
        xtb = P.shuffled(ase.io.read(P.XTB_ETHANOL, index=":"), rng)
        return {"dft_test": test, "xtb_train": xtb[:N_XTB_TRAIN],
                "xtb_test": xtb[N_XTB_TRAIN : N_XTB_TRAIN + N_XTB_TEST],
                **{f"dft_train_{n}": train[:n] for n in sizes}}  # fmt: skip

    names = ["dft_test", "xtb_train", "xtb_test", *(f"dft_train_{n}" for n in sizes)]
    return P.write_splits("multifidelity_data", names, make)


def statistics(files: dict, sizes, r_max: float) -> dict[str, dict]:
    """The model constants (every frame is C2H6O: the mean shift) of each DFT training set
    (``dft_<n>``) and of the xTB training frames (``xtb``)."""
    out = {"xtb": P.data_statistics(Path(files["xtb_train"]), r_max, TYPES, "mean")}
    for n in sizes:
        out[f"dft_{n}"] = P.data_statistics(Path(files[f"dft_train_{n}"]), r_max, TYPES, "mean")
    return out


def datamodule(files: dict, a: dict, seed: int, n: int, mode: str):
    """nequip's data module on ``n`` DFT (``dft``) or the xTB (``xtb``) training frames, or
    balanced batches of both (``joint``); the DFT test frames the first validation loader."""
    if mode == "dft":
        return P.files_datamodule(files, a, seed, f"dft_train_{n}", ["dft_test"])
    if mode == "xtb":
        return P.files_datamodule(files, a, seed, "xtb_train", ["dft_test", "xtb_test"])
    datasets = {
        "dft": {"train_dataset": P.file_dataset(files, a, f"dft_train_{n}"),
                "val_dataset": P.file_dataset(files, a, "dft_test")},
        "xtb": {"train_dataset": P.file_dataset(files, a, "xtb_train")},
    }  # fmt: skip
    k = a["batch_size"]
    return P.balanced_datamodule(datasets, k, seed, math.ceil(n / k))


def joint_loss(dft: float = 1.0) -> dict:
    """The per-dataset loss: per-atom energy and force MSE 1:1 within a dataset, the DFT
    components ``dft`` x the xTB ones."""
    return P.per_dataset_loss({"dft": dft, "xtb": 1.0})


def deployed(module):
    """A copy of the trained model of ``module`` deployed at the DFT fidelity: nequip's
    ``modify`` with the ``select_fidelity`` modifier (``dataset=dft``)."""
    from nequip.model import modify

    (key,) = module.model.keys()
    model = copy.deepcopy(module.model[key])
    return modify(model, [{"modifier": "select_fidelity", "dataset": "dft"}])


def evaluate_plain(model, files: dict, a: dict, seed: int, n: int) -> dict[str, float]:
    """The DFT test errors of a plain nequip ``model`` (no ``dataset_index`` in the frames):
    on nequip's plain module and data module."""
    stats = {"num_neighbors_mean": 1.0, "per_type_energy_shifts": dict.fromkeys(TYPES, 0.0),
             "forces_rms": 1.0}  # fmt: skip
    plain = P.build_module(M.methods()["ws"], P.run_model(a, stats, seed, TYPES), 2,
                           lr=a["lr"], num_val=1)  # fmt: skip
    (key,) = plain.model.keys()
    plain.model[key] = model
    dm = datamodule(files, a, seed, n, "dft")
    return {k: v for k, v in P.validate(plain, dm, LOADERS).items() if k in METRICS}


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
    keys = ("pretrain_s", "pretrain_lr", "batch_size", "clock")
    return P.cache_path("multifidelity_pretrained", a, keys, stats["xtb"], seed=seed)


def pretrain_run(task: dict) -> dict:
    """Pretrain on the xTB frames for ``pretrain_s`` s of training clock (once: cached)."""
    a = task["args"]
    return P.pretrain(task,
                      lambda: datamodule(task["files"], a, task["seed"], 0, "xtb"),
                      math.ceil(N_XTB_TRAIN / a["batch_size"]), task["stats"]["xtb"],
                      list(PRETRAIN_METRICS), PRETRAIN_LOADERS)  # fmt: skip


def mf_run(task: dict) -> dict:
    """Train the task's strategy on ``n`` DFT frames (and the xTB frames); its DFT test
    errors (joint models: the deployed DFT model's)."""
    import lightning

    P.init_torch()
    a, seed, n = task["args"], task["seed"], task["n"]
    method = M.multifidelity_methods(a["calibration_steps"])[task["method"]]
    fid = method.fidelity
    lightning.seed_everything(seed, workers=True, verbose=False)
    stats = task["stats"][f"dft_{n}"]
    per_epoch = math.ceil(n / a["batch_size"])
    extra = {}
    if fid["mode"] == "joint":
        dm = datamodule(task["files"], a, seed, n, "joint")
        refs = dm.energy_references(TYPES)
        model = P.with_references(P.run_model(a, stats, seed, TYPES), refs, fid["heads"])
        loss = joint_loss(fid["dft"])
        extra["references"] = refs
    else:
        dm = datamodule(task["files"], a, seed, n, "dft")
        loss = None
        if fid["mode"] == "pretrain":  # the pretrained model's constants, DFT's energy zero
            xtb = task["stats"]["xtb"]
            stats = {**xtb, "per_type_energy_shifts": stats["per_type_energy_shifts"]}
        model = P.run_model(a, stats, seed, TYPES)
    module = P.build_module(method, model, 2, lr=a["lr"], loss=loss, num_val=1)
    if fid["mode"] == "pretrain":
        load_pretrained(module, task["cache"], keep_shift=True)
    out = P.fit_on_clock(
        module, dm, a, per_epoch, list(METRICS), LOADERS, P.build_callbacks(method)
    )
    if fid["mode"] == "joint":
        dep = evaluate_plain(deployed(module), task["files"], a, seed, n)
        train_final = {k: out["curve"][-1][k] for k in METRICS}
        extra["training_model"] = train_final
        extra["deployed"] = dep
        extra["deployed_rel_diff"] = max(
            abs(dep[k] - train_final[k]) / abs(train_final[k]) for k in METRICS
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
                i, j = stats.names.index("dft"), stats.names.index("xtb")
                steps.append(float(c.cosines[i, j]))

    return Record()


def cosine_run(task: dict) -> dict:
    """The cosine of the DFT and xTB dataset-task gradients on the first ``cosine_steps``
    balanced batches, the model held fixed (lr 0), at initialisation and from the pretrained
    model, with per-dataset references and with one shared shift (DFT's, or xTB's)."""
    import lightning

    P.init_torch()
    a, seed, n = task["args"], task["seed"], task["n"]
    method = M.multifidelity_methods()["mf_upgrad"]
    out = {"seed": seed, "n_dft": n}
    for state in COSINE_STATES:
        stats = task["stats"][f"dft_{n}"] if state == "init" else task["stats"]["xtb"]
        for variant in COSINE_VARIANTS:
            lightning.seed_everything(seed, workers=True, verbose=False)
            dm = datamodule(task["files"], a, seed, n, "joint")
            model = P.run_model(a, stats, seed, TYPES)
            if variant == "references":
                model = P.with_references(model, dm.energy_references(TYPES))
            module = P.build_module(method, model, 2, lr=0.0, loss=joint_loss(), num_val=0)
            if state == "pretrained":
                load_pretrained(module, task["cache"], keep_shift=False)
            steps: list[float] = []
            fit = P.trainer([_cosine_recorder(steps)], max_steps=a["cosine_steps"],
                            limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
            fit.fit(module, datamodule=dm)
            out[f"{state}/{variant}"] = steps
    return out


def sizes_of(data: dict) -> list[int]:
    return sorted({r["n_dft"] for r in data["runs"]}, reverse=True)


def summaries(data: dict, n: int) -> dict[str, list[dict]]:
    """Per view (``budget``, ``epochs``): the rows of the size-``n`` runs (mean, sd over
    seeds), in the registry's order."""
    runs = [r for r in data["runs"] if r["n_dft"] == n]
    methods = [m for m in M.MF_METHODS if m in {r["method"] for r in runs}]
    return {key: R.summarize(runs, methods, key, METRICS) for key in ("budget", "epochs")}


#: every strategy's label
LABELS = {m: v.label for m, v in M.multifidelity_methods().items()}


def captions(a: dict) -> dict[str, str]:
    return {"budget": f"equal training time: {a['budget_s']:g} s of training CPU time per run",
            "epochs": f"equal epochs: {a['epochs']} epochs (passes over the DFT frames) per run"}  # fmt: skip


def _gap(row, base, k) -> str:
    if base is None or row[k][0] is None or base[k][0] is None:
        return "n/a"
    return f"{100.0 * (row[k][0] / base[k][0] - 1.0):+.0f} %"


def table(rows: list[dict], caption: str) -> list[str]:
    """One view of one DFT size: the errors, the gap to DFT only, the place against the
    joint weighted-sum sweep's front (DFT energy and force MAE)."""
    labels = LABELS
    st = R.classify(rows, M.MF_SWEEP, (E, F))
    base = next((r for r in rows if r["method"] == "mf_dft_only"), None)

    def short(m):
        return labels[m].replace("joint, weighted sum DFT:xTB ", "")

    head = ["strategy", *R.header(METRICS), "energy vs DFT only", "force vs DFT only", "steps",
            "epochs", "vs joint sweep front", "seeds"]  # fmt: skip
    body = [[f"**{labels[m]}**" if m in M.MF_SWEEP else labels[m], *c[:2], _gap(r, base, E),
             _gap(r, base, F), *c[2:], R.place(st[m], short, m in M.MF_SWEEP), r["n_reached"]]
            for r in R.sorted_by(rows, F) for m, c in [(r["method"], R.cells(r, METRICS))]]  # fmt: skip
    return [caption, "", *R.md_table(head, body)]  # fmt: skip


def reduction_table(data: dict, key: str) -> list[str]:
    """Every method run at more than one size: force and energy MAE per DFT size, and the
    gap to DFT only at that size."""
    sizes, labels = sizes_of(data), LABELS
    rows = {n: {r["method"]: r for r in summaries(data, n)[key]} for n in sizes}

    def pm(r, k):
        return R.pm(r[k], P.KCAL_MOL_TO_MEV) if r else "not run"

    return R.md_table(
        ["strategy", *(c for n in sizes for c in (f"force MAE, {n} DFT (meV/Å)", f"vs DFT only ({n})")),
         *(f"energy MAE, {n} DFT (meV/atom)" for n in sizes)],
        [[labels[m],
          *(c for n in sizes for r in [rows[n].get(m)]
            for c in (pm(r, F), _gap(r, rows[n].get("mf_dft_only"), F) if r else "")),
          *(pm(rows[n].get(m), E) for n in sizes)]
         for m in M.MF_METHODS if sum(m in rows[n] for n in sizes) > 1],
    )  # fmt: skip


def cosine_lines(data: dict) -> list[str]:
    """The table of the DFT-xTB gradient cosines: median, extremes, fraction negative."""
    import statistics

    if not (cos := data.get("cosines")):
        return []
    a = data["meta"]["args"]
    names = {"references": "per-dataset references", "one_shift": "one shared shift"}
    states = {"init": "at initialisation", "pretrained": "xTB-pretrained"}
    rows = []
    for state in COSINE_STATES:
        for variant in COSINE_VARIANTS:
            if xs := [x for c in cos for x in c[f"{state}/{variant}"]]:
                neg = sum(x < 0 for x in xs) / len(xs)
                rows.append([states[state], names[variant], f"{statistics.median(xs):+.2f}",
                             f"{min(xs):+.2f}", f"{max(xs):+.2f}", f"{100 * neg:.0f} %", len(xs)])  # fmt: skip
    return [
        "**Gradient cosine between the DFT and xTB dataset tasks** (per-atom energy + force "
        f"MSE of each dataset, 1:1) on the first {a['cosine_steps']} balanced batches of the "
        f"{cos[0]['n_dft']} DFT training frames, the model held fixed, over batches and seeds: "
        "with per-dataset energy references (the joint runs' model) or one shared shift (the "
        "plain model, as a concatenation of the two files would train).",
        "",
        *R.md_table(["model", "energy zeros", "median cosine", "min", "max", "negative", "batches"],
                    rows),
        "",
    ]  # fmt: skip


def markdown(data: dict) -> str:
    meta = data["meta"]
    a = meta["args"]
    runs = data["runs"]
    sizes = sizes_of(data)
    pre = data.get("pretrain") or []
    k = a["batch_size"]
    command = R.command("multifidelity", a["argv"], omp=False) + "".join(
        f"`; resumed with `{R.command('multifidelity', v, omp=False)}" for v in a.get("resumed_argv", []))  # fmt: skip
    lines = R.preamble(
        "Multi-fidelity benchmark", meta, 1, command,
        f"High fidelity: DFT ethanol, {N_DFT_TEST} test frames, training sets of "
        f"{', '.join(str(n) for n in a['dft_train'])} frames (nested); low fidelity: "
        f"{N_XTB_TRAIN} GFN2-xTB ethanol MD frames. "
        f"{P.model_text(a, runs[0]['params'] if runs else None)}, Adam at constant lr {a['lr']}, "
        f"per-atom energy and force MSE 1:1 within a dataset, model constants from the DFT "
        f"training frames; an epoch is ceil(n_DFT / {k}) batches of {k} DFT frames (joint: plus "
        f"{k} xTB frames each). Joint runs: fixed least-squares per-dataset energy references, "
        "the DFT:xTB ratio as named (dataset tasks, calibrate-then-freeze: 1:1; calibration "
        f"{a['calibration_steps']} steps), scored as the deployed DFT model (`select_fidelity`).",
        f"**Budget split**: the xTB pretraining is *not* counted in the fine-tune's budget: "
        f"{a['pretrain_s']:g} s of training CPU time (lr {a['pretrain_lr']}; "
        + (f"{R.mean_sd([r['steps'] for r in pre])[0]:.0f} steps, "
           f"{R.mean_sd([r['wall_s'] for r in pre])[0]:.0f} s wall" if pre else "not run")
        + "), once per seed; the fine-tune starts with DFT's energy zero and a fresh Adam.",
        f"DFT test errors, mean ± sample standard deviation over seeds {a['seeds']}; sorted by "
        "force MAE; the joint weighted-sum sweep in bold; *vs DFT only*: the change of the mean "
        "error against DFT only at that size; the place against the sweep's front on DFT energy "
        f"and force MAE (means). {P.units_text('ethanol')}",
    )  # fmt: skip
    if (expected := a.get("expected_runs")) is not None and len(runs) < expected:
        lines += [f"**Incomplete**: {len(runs)} of {expected} runs finished.", ""]
    if diffs := [r["deployed_rel_diff"] for r in runs if "deployed_rel_diff" in r]:
        lines += [f"Deployed DFT model against the training model on the DFT test frames: largest "
                  f"relative difference of an MAE {max(diffs):.1e} over {len(diffs)} joint runs.", ""]  # fmt: skip
    lines += cosine_lines(data)
    if len(sizes) > 1:
        for key, cap in captions(a).items():
            lines += [f"**Reducing the DFT frames ({cap})**: the methods run at several sizes", ""]
            lines += reduction_table(data, key) + [""]
    for n in sizes:
        rows = summaries(data, n)
        for key, cap in captions(a).items():
            lines += table(rows[key], f"**{n} DFT training frames, {cap}**") + [""]
    if pre:
        pre_mae = {d: R.pm(R.mean_sd([r["budget"][f"{d}/forces_mae"] for r in pre]), P.KCAL_MOL_TO_MEV)
                   for d in ("dft", "xtb")}  # fmt: skip
        lines += [f"**The xTB-pretrained model** (before fine-tuning; forces only: its energy zero "
                  f"is xTB's): DFT test force MAE {pre_mae['dft']} meV/Å, xTB test force MAE "
                  f"{pre_mae['xtb']} meV/Å.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    """DFT test force and energy MAE (equal time) against the number of DFT frames."""
    plt = R.pyplot()
    sizes = sizes_of(data)
    labels = LABELS
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = {n: {r["method"]: r for r in summaries(data, n)["budget"]} for n in sizes}
    for m in M.MF_METHODS:
        pts = [(n, rows[n][m]) for n in sizes if m in rows[n]]
        if not pts:
            continue
        for ax, k in zip(axes, (F, E)):
            xs = [n for n, _ in pts]
            ys = [r[k][0] * P.KCAL_MOL_TO_MEV for _, r in pts]
            sd = [r[k][1] * P.KCAL_MOL_TO_MEV for _, r in pts]
            style = "o-" if len(pts) > 1 else "o"
            ax.errorbar(xs, ys, yerr=sd, fmt=style, capsize=3, label=labels[m], alpha=0.8)
    for ax, k in zip(axes, (F, E)):
        ax.set_xlabel("DFT training frames")
        ax.set_ylabel(f"{METRICS[k][0]} ({METRICS[k][2]})")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Multi-fidelity ethanol: DFT test error at equal training time "
                 f"({data['meta']['args']['budget_s']:g} s), mean ± sd over seeds")  # fmt: skip
    fig.tight_layout()
    return R.save(fig, path)


def report(data: dict, out: Path) -> None:
    """``out``.json (raw runs, meta, the summaries), .md and .png."""
    meta = {k: v for k, v in data["meta"].items() if k != "partial"}
    views = {str(n): summaries(data, n) for n in sizes_of(data)}
    R.write_json(out.with_suffix(".json"), {"meta": meta, "views": views, "pretrain": data["pretrain"],
                                            "cosines": data["cosines"], "runs": data["runs"]})  # fmt: skip
    R.write_text(out.with_suffix(".md"), markdown(data))
    plot(data, out.parent / (out.name + ".png"))


def parse(argv):
    p = P.study_parser(__doc__, jobs=False)
    p.add_argument("--methods", nargs="+", default=None, choices=M.MF_METHODS,
                   help="at the largest DFT size (default: all)")  # fmt: skip
    p.add_argument("--reduction-methods", nargs="+", default=None, choices=M.MF_METHODS,
                   help=f"at the smaller DFT sizes (default: {' '.join(REDUCTION_METHODS)})")  # fmt: skip
    p.add_argument("--dft-train", type=int, nargs="+", default=None, help="default 80 40 20")
    P.add_budget_arguments(p)
    p.add_argument("--pretrain-s", type=float, default=None, help="xTB pretraining clock (s)")
    p.add_argument("--pretrain-lr", type=float, default=5e-3)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--calibration-steps", type=int, default=None)
    p.add_argument("--cosine-steps", type=int, default=None, help="batches of the cosines")
    P.add_run_arguments(p, batch_size=4, lr=None)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.from_json:
        return args
    quick = {"pretrain_s": 3.0, "budget_s": 2.0, "epochs": 1, "seeds": [0], "val_every": 1,
             "calibration_steps": 3, "cosine_steps": 2, "dft_train": [20, 8]}  # fmt: skip
    full = {"pretrain_s": 45.0, "budget_s": 15.0, "epochs": 10, "seeds": [0, 1, 2],
            "val_every": 10, "calibration_steps": 20, "cosine_steps": 8,
            "dft_train": [80, 40, 20]}  # fmt: skip
    P.fill_defaults(args, quick, full)
    if args.epochs % args.val_every:
        p.error(f"--epochs {args.epochs} must be a multiple of --val-every {args.val_every}")
    if args.quick:
        args.methods = args.methods or list(QUICK_METHODS)
        args.reduction_methods = args.reduction_methods or ["mf_dft_only", "mf_joint_1"]
        args.num_features, args.radial_width = 8, 8
    args.methods = args.methods or list(M.MF_METHODS)
    args.reduction_methods = args.reduction_methods or list(REDUCTION_METHODS)
    args.dft_train = sorted(set(args.dft_train), reverse=True)
    args.type_names = list(TYPES)
    args.out = P.out_path(args, "multifidelity")
    return args


def plan(args) -> list[tuple[int, int, str]]:
    """``(n_dft, seed, method)`` of every run, seed by seed (so that a partial json holds
    whole seeds), each seed the largest size first; the methods' order rotated per seed."""
    out = []
    for i, seed in enumerate(args.seeds):
        for j, n in enumerate(args.dft_train):
            methods = list(args.methods if j == 0 else args.reduction_methods)
            k = (3 * i) % len(methods)
            out += [(n, seed, m) for m in methods[k:] + methods[:k]]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    if missing := M.missing_methods(
        [*args.methods, *args.reduction_methods], M.multifidelity_methods()
    ):
        raise SystemExit(f"cannot import {missing}")
    out = Path(args.out)
    files = data_files(args.dft_train)
    stats = statistics(files, args.dft_train, args.r_max)
    a = {k: v for k, v in vars(args).items() if k not in ("out",)}
    todo = plan(args)
    a["expected_runs"] = len(todo)
    base = {"args": a, "stats": stats, "files": files}

    def task(seed, n=None, method=None):
        return {**base, "seed": seed, "n": n, "method": method,
                "cache": str(pretrained_path(a, stats, seed))}  # fmt: skip

    results = P.Results(out, "multifidelity", argv, a, {"files": files, "statistics": stats},
                        pretrain=[], cosines=[], runs=[])  # fmt: skip
    pre, cosines, runs = (results.lists[k] for k in ("pretrain", "cosines", "runs"))

    def done(key: str) -> set[int]:
        return {x["seed"] for x in results.lists[key]}

    for n, seed, method in todo:
        needs_pre = method == "mf_pretrain_ft" or seed not in done("cosines")
        if needs_pre and seed not in done("pretrain"):
            r = pretrain_run(task(seed))
            results.add("pretrain", r)
            print(f"pretrained seed {seed}{' (cached)' if r['cached'] else ''}: {r['steps']} "
                  f"steps, DFT force {r['budget']['dft/forces_mae']:.4g}", flush=True)  # fmt: skip
        if seed not in done("cosines"):
            c = cosine_run(task(seed, max(args.dft_train)))
            results.add("cosines", c)
            print(f"cosines seed {seed}: " + ", ".join(
                f"{k} {sorted(v)[len(v) // 2]:+.2f}" for k, v in c.items() if isinstance(v, list)), flush=True)  # fmt: skip
        r = mf_run(task(seed, n, method))
        results.add("runs", r)
        b = r["budget"]
        print(f"[{len(runs)}/{a['expected_runs']} {time.perf_counter() - results.t0:.0f} s] "
              f"{method} n={n} seed {seed}: {r['steps']} steps, force {b[F]:.4g}, energy "
              f"{b[E]:.4g} (run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    pre.sort(key=lambda r: r["seed"])
    cosines.sort(key=lambda c: c["seed"])
    report(results.data(), out)


if __name__ == "__main__":
    main()

"""Fine-tuning with replay: what each strategy gains on new data and forgets of the old.

A small NequIP model is pretrained on dataset **A** (nequip's plain module and data module,
a fixed training-clock budget, once per seed, cached in ``benchmarks/results/_tmp``), then
fine-tuned from those weights on dataset **B** (a fresh Adam at a constant learning rate)
under these strategies (:func:`benchmarks.methods.finetune_methods`):

- ``ft_naive``: B alone, nequip's weighted sum on nequip's plain data module;
- ``ft_replay_<w>``: replay of A, nequip's weighted sum of a
  :class:`~nequip_mtl.train.PerDatasetLoss` on a
  :class:`~nequip_mtl.data.MultiDatasetDataModule` with balanced batches (``batch_size``
  frames of each dataset), the ``pretrain`` coefficients ``w`` x the ``new`` ones, ``w`` in
  0.1, 0.3, 1, 3: the replay sweep, the baseline a user has today;
- ``ft_upgrad``, ``ft_pcgrad``, ``ft_primary``: the same replay batches and 1:1 loss, the two
  datasets as tasks (``MultitaskLightningModule``, ``tasks: datasets``) under UPGrad, PCGrad
  and ``PrimaryConstrained`` (primary ``new``);
- ``ft_calib``: the same, calibrate-then-freeze (UPGrad weights) on nequip's module.

Every loss is per-atom energy and force MSE at 1:1 within a dataset. An epoch is
``ceil(n_B / batch_size)`` batches for every strategy (one pass over B; the replay
sampler reads A in passes across epochs). After every ``--val-every`` epochs the model is
evaluated on A's and B's held-out test frames (never used for any choice; they are the
two validation loaders of the data modules, ``val0`` = A, ``val1`` = B).

Two views from the same runs: equal training time (``--budget-s`` of the CPU-time clock
of ``benchmarks/protocol.py``) and equal epochs (``--epochs``). Each strategy is placed
against the replay sweep's front on the two objectives **B force MAE** (gain) and **A
force MAE** (forgetting) exactly as ``benchmarks/pareto.py`` places methods against its
weighted-sum sweep (:func:`benchmarks.pareto.classify`); the energy front is stated too.

Data pairs (both offline, written once into ``_tmp``):

- ``--pair alloy``: A = EMT Cu-Ni-Pd bulk cells, B = slabs and vacancy cells
  (``nequip_mtl.data.generate_frames(kind=...)``), eV;
- ``--pair ethanol``: GFN2-xTB ethanol MD (``benchmarks/data/ethanol_xtb_1200.xyz``),
  A = the 300 K frames, B = the 900 K frames, kcal/mol (reported in meV).

    OMP_NUM_THREADS=1 python -m benchmarks.finetune --pair alloy
    OMP_NUM_THREADS=1 python -m benchmarks.finetune --pair ethanol
    OMP_NUM_THREADS=1 python -m benchmarks.finetune --quick            # about a minute
    python -m benchmarks.finetune --from-json benchmarks/results/finetune_alloy.json

Writes ``benchmarks/results/finetune_<pair>.{json,md,png}`` (``--out`` to choose); the json
is rewritten after every finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from benchmarks import accuracy as A
from benchmarks import methods as M
from benchmarks import pareto
from benchmarks import protocol as P
from benchmarks import report as R

XTB_ETHANOL = P.XTB_ETHANOL


@dataclasses.dataclass(frozen=True)
class Pair:
    """A pretraining dataset A and a fine-tuning dataset B, and their split sizes."""

    units: str  # the key of protocol.DATASETS with these units and type names
    a: str
    b: str
    n_a_train: int
    n_a_test: int
    n_b_train: int
    n_b_test: int
    shifts: str  # protocol.data_statistics: per-type shifts "fit" or "mean"


PAIRS = {
    "alloy": Pair("alloy", "EMT alloy bulk cells", "EMT alloy slabs and vacancy cells",
                  150, 40, 40, 40, "fit"),
    "ethanol": Pair("ethanol", "GFN2-xTB ethanol MD at 300 K", "GFN2-xTB ethanol MD at 900 K",
                    150, 50, 40, 50, "mean"),
}  # fmt: skip

#: the data modules' validation loaders: val0 = A's test frames, val1 = B's
LOADERS = {"val0_epoch": "A/", "val1_epoch": "B/"}
BF, AF, BE, AE = "B/forces_mae", "A/forces_mae", "B/per_atom_energy_mae", "A/per_atom_energy_mae"
FORCE, ENERGY = (BF, AF), (BE, AE)  # the two fronts' objectives (gain, forgetting)
DEFAULT_METHODS = M.FT_METHODS
QUICK_METHODS = ["ft_naive", "ft_replay_0.1", "ft_replay_1", "ft_upgrad", "ft_calib"]


def metrics_of(pair: str) -> dict[str, tuple[str, float, str]]:
    """Metric name -> (column, factor to meV, unit), B first."""
    to_mev = P.DATASETS[PAIRS[pair].units].to_mev
    out = {}
    for side in ("B", "A"):
        out[f"{side}/forces_mae"] = (f"{side} force MAE", to_mev, "meV/Å")
        out[f"{side}/per_atom_energy_mae"] = (f"{side} energy MAE", to_mev, "meV/atom")
    return out


# ----------------------------------------------------------------------------- data


def pair_files(pair: str) -> dict[str, str]:
    """The four extxyz files of ``pair`` (A and B, train and test), written once."""
    import numpy as np

    p = PAIRS[pair]
    folder = P.TMP / f"finetune_{pair}_data"
    files = {k: folder / f"{k}.xyz" for k in ("A_train", "A_test", "B_train", "B_test")}
    if not all(f.exists() for f in files.values()):
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        if pair == "alloy":
            from nequip_mtl.tools.emt_alloy import generate_frames

            kw = {"elements": P.TYPE_NAMES}
            a = generate_frames(num_frames=p.n_a_train + p.n_a_test, seed=0, kind="bulk", **kw)
            n_b = p.n_b_train + p.n_b_test
            b = generate_frames(num_frames=n_b // 2, seed=1, kind="slab", **kw)
            b += generate_frames(num_frames=n_b - n_b // 2, seed=2, kind="vacancy", **kw)
        else:
            import ase.io

            frames = ase.io.read(XTB_ETHANOL, index=":")
            a = [f for f in frames if f.info["temperature_K"] == 300.0]
            b = [f for f in frames if f.info["temperature_K"] == 900.0]
        a = [a[i] for i in rng.permutation(len(a))]
        b = [b[i] for i in rng.permutation(len(b))]
        P.write_frames(files["A_train"], a[: p.n_a_train])
        P.write_frames(files["A_test"], a[p.n_a_train : p.n_a_train + p.n_a_test])
        P.write_frames(files["B_train"], b[: p.n_b_train])
        P.write_frames(files["B_test"], b[p.n_b_train : p.n_b_train + p.n_b_test])
    return {k: str(v) for k, v in files.items()}


def datamodule(files: dict, a: dict, seed: int, train: str, replay: bool = False):
    """nequip's plain data module training on ``train`` (``A`` or ``B``), or with
    ``replay`` a ``MultiDatasetDataModule`` of ``pretrain`` (A) and ``new`` (B) with
    balanced batches; validation loaders A's and B's test frames, in that order."""
    r, types = a["r_max"], a["type_names"]

    def ds(key):
        return P.ase_dataset(Path(files[key]), r, types)

    val = P.loader_config(10)
    if not replay:
        from nequip.data.datamodule import NequIPDataModule

        return NequIPDataModule(
            seed=seed,
            train_dataset=ds(f"{train}_train"),
            val_dataset=[ds("A_test"), ds("B_test")],
            train_dataloader=P.loader_config(a["batch_size"], shuffle=True),
            val_dataloader=val,
        )
    from nequip_mtl.data import MultiDatasetDataModule

    k = a["batch_size"]
    return MultiDatasetDataModule(
        seed=seed,
        datasets={
            "pretrain": {"train_dataset": ds("A_train"), "val_dataset": ds("A_test")},
            "new": {"train_dataset": ds("B_train"), "val_dataset": ds("B_test")},
        },
        sampling={
            "mode": "balanced",
            "frames_per_batch": {"pretrain": k, "new": k},
            "batches_per_epoch": math.ceil(a["n_b_train"] / k),
        },
        train_dataloader=P.loader_config(),
        val_dataloader=val,
    )


def finetune_loss(method: M.Method) -> dict | None:
    """The per-dataset loss of a replay strategy (``pretrain`` at ``replay`` x ``new``'s
    1:1); ``None`` (nequip's 1:1 energy-force loss) without replay."""
    if method.replay is None:
        return None
    w = float(method.replay)
    return {
        "_target_": "nequip_mtl.train.PerDatasetLoss",
        "datasets": ["pretrain", "new"],
        "coeffs": {
            "pretrain": {"total_energy": w, "forces": w},
            "new": {"total_energy": 1.0, "forces": 1.0},
        },
    }


# ----------------------------------------------------------------------------- runs


def pretrain_args(a: dict) -> dict:
    """The pretraining run's arguments: its own budget and learning rate, no epoch target."""
    return {**a, "budget_s": a["pretrain_s"], "lr": a["pretrain_lr"], "epochs": 0,
            "val_every": 10_000}  # fmt: skip


def pretrained_path(a: dict, stats: dict, seed: int) -> Path:
    """The cache file of the pretrained model of ``seed`` (keyed by everything it depends on)."""
    keys = ("pair", "pretrain_s", "pretrain_lr", "batch_size", "clock", "type_names")
    return P.cache_path(f"finetune_{a['pair']}_pretrained", a, keys, stats, seed=seed)


def pretrain_run(task: dict) -> dict:
    """Pretrain on A for ``pretrain_s`` s of training clock (once: cached); its result."""
    import lightning
    import torch

    path = Path(task["cache"])
    if path.exists():
        return {**torch.load(path, weights_only=False)["result"], "cached": True}
    P.init_torch()
    a, seed = pretrain_args(task["args"]), task["seed"]
    lightning.seed_everything(seed, workers=True, verbose=False)
    method = M.finetune_methods()["ft_naive"]  # nequip's plain weighted sum
    model = P.run_model(a, task["stats"], seed, a["type_names"])
    module = P.build_module(method, model, 2, lr=a["lr"], num_val=2)
    dm = datamodule(task["files"], a, seed, train="A")
    per_epoch = math.ceil(a["n_a_train"] / a["batch_size"])
    result = {
        "method": "pretrained",
        "seed": seed,
        **P.fit_on_clock(module, dm, a, per_epoch, task["metrics"], LOADERS),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part")
    torch.save({"model": module.model.state_dict(), "result": result}, part)
    part.replace(path)
    return {**result, "cached": False}


def finetune_run(task: dict) -> dict:
    """Fine-tune the pretrained model of the task's seed on B under ``task["method"]``."""
    import lightning
    import torch

    P.init_torch()
    a, seed = task["args"], task["seed"]
    method = M.finetune_methods(a["calibration_steps"])[task["method"]]
    lightning.seed_everything(seed, workers=True, verbose=False)
    model = P.run_model(a, task["stats"], seed, a["type_names"])
    module = P.build_module(method, model, 2, lr=a["lr"], loss=finetune_loss(method), num_val=2)
    module.model.load_state_dict(torch.load(task["cache"], weights_only=False)["model"])
    dm = datamodule(task["files"], a, seed, train="B", replay=method.replay is not None)
    per_epoch = math.ceil(a["n_b_train"] / a["batch_size"])
    out = P.fit_on_clock(
        module, dm, a, per_epoch, task["metrics"], LOADERS, P.build_callbacks(method)
    )
    coeffs = {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()}
    return {"method": task["method"], "seed": seed, **out, "final_coeffs": coeffs}


# ----------------------------------------------------------------------------- report


def summaries(data: dict) -> dict[str, list[dict]]:
    """Per view (``budget``, ``epochs``): the strategies' rows (mean, sd over seeds), and
    the pretrained model's (``pretrained``: the same for both views)."""
    metrics = metrics_of(data["meta"]["args"]["pair"])
    methods = A.ran_methods(data)
    out = {key: A.summarize(data["runs"], methods, key, metrics) for key in ("budget", "epochs")}
    out["pretrained"] = A.summarize(data["pretrain"], ["pretrained"], "budget", metrics)
    return out


def statuses(rows: list[dict]) -> dict[str, dict]:
    """Each row against the replay sweep's front: ``force`` (B and A force MAE) and
    ``energy`` (B and A energy MAE)."""
    return {
        "force": pareto.classify(rows, M.FT_SWEEP, FORCE),
        "energy": pareto.classify(rows, M.FT_SWEEP, ENERGY),
    }


def _where(s: dict, labels: dict, baseline: bool) -> str:
    def short(m):
        return labels[m].replace("replay, weighted sum ", "")

    out = s["status"]
    if s["by"]:
        out += " by " + ", ".join(short(m) for m in s["by"])
    elif s["beats"] and not baseline:
        out += " (beats " + ", ".join(short(m) for m in s["beats"]) + ")"
    return out


def table(rows, pretrained, labels, caption, metrics) -> list[str]:
    st = statuses(rows)
    lines = [
        caption,
        "",
        R.md_row(
            [
                "strategy",
                *A.header(metrics),
                "steps",
                "epochs",
                "vs replay front (force)",
                "vs replay front (energy)",
                "seeds",
            ]
        ),
        R.md_rule(len(metrics) + 6),
    ]
    for r in sorted(rows, key=lambda r: (r[BF][0] is None, r[BF][0] or 0)):
        m = r["method"]
        base = m in M.FT_SWEEP
        name = f"**{labels[m]}**" if base else labels[m]
        wf, we = _where(st["force"][m], labels, base), _where(st["energy"][m], labels, base)
        lines.append(R.md_row([name, *A.cells(r, metrics), wf, we, r["n_reached"]]))
    for r in pretrained:
        lines.append(
            R.md_row([f"*{labels['pretrained']}*", *A.cells(r, metrics), "", "", r["n_reached"]])
        )
    return lines


def labels_of(methods) -> dict[str, str]:
    table_ = M.finetune_methods()
    return {m: table_[m].label for m in methods} | {"pretrained": "pretrained on A (before)"}


def captions(a: dict) -> dict[str, str]:
    return {
        "budget": f"equal training time: {a['budget_s']:g} s of training CPU time per fine-tune",
        "epochs": f"equal epochs: {a['epochs']} epochs (passes over B) per fine-tune",
    }


def markdown(data: dict) -> str:
    meta = data["meta"]
    a = meta["args"]
    p = PAIRS[a["pair"]]
    metrics = metrics_of(a["pair"])
    labels = labels_of(A.ran_methods(data))
    rows = summaries(data)
    params = data["runs"][0]["params"] if data["runs"] else None
    pre_steps = R.mean_sd([r["steps"] for r in data["pretrain"]])[0]
    units = (
        "Errors in meV (the data is in eV)."
        if p.units == "alloy"
        else f"Errors converted from kcal/mol to meV (1 kcal/mol = {P.KCAL_MOL_TO_MEV} meV); "
        "the json keeps kcal/mol."
    )
    lines = [
        f"Fine-tuning benchmark on {R.machine_line(meta['machine'])}; {meta['time']}; "
        f"total {meta['elapsed_s'] / 60:.1f} min ({a['jobs']} run(s) at a time).",
        "",
        f"Command: `{R.command('finetune', a['argv'], omp=False)}`",
        "",
        f"A = {p.a} ({a['n_a_train']} training / {a['n_a_test']} test frames), B = {p.b} "
        f"({a['n_b_train']} training / {a['n_b_test']} test frames). NequIP model with "
        f"{params} parameters (l_max={a['l_max']}, {a['num_layers']} layers, "
        f"{a['num_features']} features), float32, per-atom energy and force MSE 1:1. "
        f"Pretraining on A: {a['pretrain_s']:g} s of training CPU time (Adam, lr "
        f"{a['pretrain_lr']}, batch {a['batch_size']}; {pre_steps:.0f} steps), once per seed. "
        f"Fine-tuning from it: a fresh Adam at constant lr {a['lr']}; an epoch is "
        f"{math.ceil(a['n_b_train'] / a['batch_size'])} batches of {a['batch_size']} B frames "
        f"(replay: plus {a['batch_size']} A frames each, balanced batches); calibrate-then-"
        f"freeze calibrates for {a['calibration_steps']} steps. Errors on the held-out test "
        f"frames of A (forgetting) and B (gain); mean ± sample standard deviation over seeds "
        f"{a['seeds']}; sorted by B force MAE; the replay sweep (the front) in bold. {units}",
        "",
        "Place against the replay sweep's front (as `benchmarks/pareto.py`): *beyond* = no "
        "sweep point is better on both objectives and it is better on both than a front "
        "point; *on* = no sweep point is better on both; *dominated by* = these sweep points "
        "are better on both. Objectives: B and A force MAE (force), B and A energy MAE "
        "(energy); means over seeds, so a place says nothing about the seed spread.",
        "",
    ]
    expected = len(a["methods"]) * len(a["seeds"])
    if len(data["runs"]) < expected or len(data["pretrain"]) < len(a["seeds"]):
        done = sorted({(r["seed"], r["method"]) for r in data["runs"]})
        lines += [
            f"**Incomplete**: {len(data['pretrain'])} of {len(a['seeds'])} pretrainings and "
            f"{len(data['runs'])} of {expected} fine-tunes finished (the `seeds` column counts "
            f"each row's runs; a row of one seed shows ± 0.0). Finished: "
            + ", ".join(f"{m} seed {sd}" for sd, m in done)
            + ".",
            "",
        ]
    for key, cap in captions(a).items():
        lines += table(rows[key], rows["pretrained"], labels, f"**{cap[0].upper()}{cap[1:]}**",
                       metrics)  # fmt: skip
        lines += [""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    """One panel per view: A force MAE (forgetting) against B force MAE (gain)."""
    a = data["meta"]["args"]
    metrics = metrics_of(a["pair"])
    rows = summaries(data)
    caps = captions(a)
    fig = pareto.plot_pareto(
        [(caps[k], rows[k]) for k in ("budget", "epochs")],
        labels_of(A.ran_methods(data)),
        f"Fine-tuning {PAIRS[a['pair']].a} -> {PAIRS[a['pair']].b}: test error on A and B "
        f"(mean ± sd over {len(a['seeds'])} seeds; star: the pretrained model)",
        metrics,
        x=AF,
        y=BF,
        sweep=M.FT_SWEEP,
        baselines=M.FT_SWEEP,
        what="test",
    )
    for ax in fig.axes:
        for p in pareto.pareto_points(rows["pretrained"], metrics, AF, BF):
            ax.plot(p["energy"], p["force"], "*", color="k", ms=12)
    return R.save(fig, path)


def report(data: dict, out: Path) -> None:
    """``out``.json (raw runs, meta, the summaries and places), .md and .png."""
    rows = summaries(data)
    meta = {k: v for k, v in data["meta"].items() if k != "partial"}
    views = {
        key: {"caption": cap, "rows": rows[key], "status": statuses(rows[key])}
        for key, cap in captions(meta["args"]).items()
    }
    R.write_json(
        out.with_suffix(".json"),
        {"meta": meta, "views": views, "pretrained": rows["pretrained"],
         "pretrain": data["pretrain"], "runs": data["runs"]},
    )  # fmt: skip
    R.write_text(out.with_suffix(".md"), markdown(data))
    plot(data, out.parent / (out.name + ".png"))


# ----------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="about a minute: tiny budgets, 1 seed")
    p.add_argument("--pair", choices=list(PAIRS), default="alloy")
    p.add_argument("--methods", nargs="+", default=None, choices=M.FT_METHODS)
    P.add_budget_arguments(p)
    p.add_argument("--pretrain-s", type=float, default=None, help="pretraining clock (s)")
    p.add_argument("--pretrain-lr", type=float, default=5e-3)
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--calibration-steps", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    P.add_run_arguments(p, batch_size=4, lr=None)
    p.add_argument("--out", default=None, help="default results/finetune_<pair>")
    R.add_from_json(p)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.from_json:
        return args
    quick = {"pretrain_s": 3.0, "budget_s": 1.5, "epochs": 1, "seeds": [0], "val_every": 1,
             "calibration_steps": 3}  # fmt: skip
    full = {"pretrain_s": 30.0, "budget_s": 8.0, "epochs": 4, "seeds": [0, 1, 2],
            "val_every": 4, "calibration_steps": 20}  # fmt: skip
    P.fill_defaults(args, quick, full)
    if args.epochs % args.val_every:
        p.error(f"--epochs {args.epochs} must be a multiple of --val-every {args.val_every}")
    if args.quick:
        args.methods = args.methods or list(QUICK_METHODS)
        args.num_features, args.radial_width = 8, 8
    args.methods = args.methods or list(DEFAULT_METHODS)
    pair = PAIRS[args.pair]
    for k in ("n_a_train", "n_a_test", "n_b_train", "n_b_test"):
        setattr(args, k, getattr(pair, k))
    args.type_names = P.DATASETS[pair.units].type_names
    args.out = args.out or str(
        (P.TMP if args.quick else P.RESULTS)
        / f"finetune_{args.pair}{'_quick' if args.quick else ''}"
    )
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    missing = M.missing_methods(args.methods, M.finetune_methods())
    if missing:
        raise SystemExit(f"cannot import {missing}")
    files = pair_files(args.pair)
    stats = P.data_statistics(
        Path(files["A_train"]), args.r_max, args.type_names, PAIRS[args.pair].shifts
    )
    a = {k: v for k, v in vars(args).items() if k not in ("methods", "seeds", "out", "argv")}
    metrics = metrics_of(args.pair)
    base = {"args": a, "stats": stats, "files": files, "metrics": list(metrics)}

    def task(seed, method=None):
        cache = str(pretrained_path(a, stats, seed))
        return {**base, "seed": seed, "method": method, "cache": cache}

    import torch  # noqa: F401  (after OMP_NUM_THREADS)

    info = {**P.machine_info(), "date": P.now()}
    t0 = time.perf_counter()
    pre, runs = [], []
    fine = [task(s, m) for s, m in P.rotated(args.methods, args.seeds, shift=3)]

    def meta():
        return {"machine": info, "args": vars(args), "command": R.command("finetune", argv, omp=False),
                "data": {"files": files, "statistics": stats}, "time": info["date"],
                "elapsed_s": time.perf_counter() - t0}  # fmt: skip

    def save():
        partial = {**meta(), "partial": len(runs) < len(fine)}
        R.write_json(Path(args.out).with_suffix(".json"),
                     {"meta": partial, "pretrain": pre, "runs": runs})  # fmt: skip

    def pre_done(r):
        pre.append(r)
        print(f"pretrained seed {r['seed']}{' (cached)' if r['cached'] else ''}: {r['steps']} steps, "
              f"A force MAE {r['budget'][AF]:.4g}, B force MAE {r['budget'][BF]:.4g}", flush=True)  # fmt: skip
        save()

    def done(r):
        runs.append(r)
        b = r["budget"]
        print(f"[{len(runs)}/{len(fine)} {time.perf_counter() - t0:.0f} s] {r['method']} seed "
              f"{r['seed']}: {r['steps']} steps, B force {b[BF]:.4g}, A force {b[AF]:.4g} "
              f"(run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        save()

    if args.jobs > 1:  # every pretraining, then every fine-tune
        P.run_all(pretrain_run, [task(s) for s in args.seeds], args.jobs, pre_done)
        P.run_all(finetune_run, fine, args.jobs, done)
    else:  # seed by seed: each finished seed is complete in the json
        for seed in args.seeds:
            P.run_all(pretrain_run, [task(seed)], 1, pre_done)
            P.run_all(finetune_run, [t for t in fine if t["seed"] == seed], 1, done)
    pre.sort(key=lambda r: r["seed"])
    data = {"meta": meta(), "pretrain": pre, "runs": runs}
    data["meta"]["machine"] = {"loadavg_end": os.getloadavg(), **info}
    report(data, Path(args.out))


if __name__ == "__main__":
    main()

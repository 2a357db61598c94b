"""Fine-tuning with replay: what each strategy gains on new data and forgets of the old.

The protocol's model is pretrained on dataset **A** (nequip's plain module, ``--pretrain-s``
of training clock, once per seed, cached: :func:`benchmarks.protocol.pretrain`), then
fine-tuned on **B** with a fresh Adam under the strategies of
:func:`benchmarks.methods.finetune_methods`: B alone (``ft_naive``); replay of A with
nequip's weighted sum of a ``PerDatasetLoss`` on a ``MultiDatasetDataModule`` with balanced
batches, A's coefficients ``w`` x B's (``ft_replay_<w>``, the sweep: the front); the same
batches at 1:1 with the datasets as tasks under UPGrad, PCGrad, ``PrimaryConstrained``
(primary ``new``), or calibrate-then-freeze. An epoch is one pass over B for every strategy.
A's and B's held-out test frames are the two validation loaders (forgetting and gain);
each strategy is placed against the replay sweep's front on B and A force MAE, and on B
and A energy MAE (:func:`benchmarks.report.classify`), at equal time and equal epochs.
Pairs: ``alloy`` (EMT bulk cells, then slabs and vacancy cells; eV) and ``ethanol``
(GFN2-xTB MD at 300 K, then 900 K, ``benchmarks/data/ethanol_xtb_1200.xyz``; kcal/mol).

    OMP_NUM_THREADS=1 python -m benchmarks.finetune --pair alloy
    OMP_NUM_THREADS=1 python -m benchmarks.finetune --quick            # about a minute
    python -m benchmarks.finetune --from-json benchmarks/results/finetune_alloy.json

Writes ``benchmarks/results/finetune_<pair>.{json,md,png}`` (``--out`` to choose); the json
is rewritten after every finished run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R


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
QUICK_METHODS = ["ft_naive", "ft_replay_0.1", "ft_replay_1", "ft_upgrad", "ft_calib",
                 "ft_budget_0.05"]  # fmt: skip


def metrics_of(pair: str) -> dict[str, tuple[str, float, str]]:
    """Metric name -> (column, factor to meV, unit), B first."""
    to_mev = P.DATASETS[PAIRS[pair].units].to_mev
    out = {}
    for side in ("B", "A"):
        out[f"{side}/forces_mae"] = (f"{side} force MAE", to_mev, "meV/Å")
        out[f"{side}/per_atom_energy_mae"] = (f"{side} energy MAE", to_mev, "meV/atom")
    return out


def pair_files(pair: str) -> dict[str, str]:
    """The four extxyz files of ``pair`` (A and B, train and test), written once."""
    p = PAIRS[pair]

    def make():
        import numpy as np

        if pair == "alloy":
            from nequip_mtl.tools.emt_alloy import generate_frames

            kw = {"elements": P.TYPE_NAMES}
            a = generate_frames(num_frames=p.n_a_train + p.n_a_test, seed=0, kind="bulk", **kw)
            n_b = p.n_b_train + p.n_b_test
            b = generate_frames(num_frames=n_b // 2, seed=1, kind="slab", **kw)
            b += generate_frames(num_frames=n_b - n_b // 2, seed=2, kind="vacancy", **kw)
        else:
            import ase.io

            frames = ase.io.read(P.XTB_ETHANOL, index=":")
            a = [f for f in frames if f.info["temperature_K"] == 300.0]
            b = [f for f in frames if f.info["temperature_K"] == 900.0]
        rng = np.random.default_rng(0)
        a, b = P.shuffled(a, rng), P.shuffled(b, rng)
        return {"A_train": a[: p.n_a_train], "A_test": a[p.n_a_train : p.n_a_train + p.n_a_test],
                "B_train": b[: p.n_b_train], "B_test": b[p.n_b_train : p.n_b_train + p.n_b_test]}  # fmt: skip

    return P.write_splits(f"finetune_{pair}_data", ("A_train", "A_test", "B_train", "B_test"), make)


def datamodule(files: dict, a: dict, seed: int, train: str, replay: bool = False):
    """nequip's plain data module training on ``train`` (``A`` or ``B``), or with
    ``replay`` a ``MultiDatasetDataModule`` of ``pretrain`` (A) and ``new`` (B) with
    balanced batches; validation loaders A's and B's test frames, in that order."""
    if not replay:
        return P.files_datamodule(files, a, seed, f"{train}_train", ["A_test", "B_test"])
    datasets = {
        name: {"train_dataset": P.file_dataset(files, a, f"{side}_train"),
               "val_dataset": P.file_dataset(files, a, f"{side}_test")}
        for name, side in (("pretrain", "A"), ("new", "B"))
    }  # fmt: skip
    k = a["batch_size"]
    return P.balanced_datamodule(datasets, k, seed, math.ceil(a["n_b_train"] / k))


def pretrained_path(a: dict, stats: dict, seed: int) -> Path:
    """The cache file of the pretrained model of ``seed`` (keyed by everything it depends on)."""
    keys = ("pair", "pretrain_s", "pretrain_lr", "batch_size", "clock", "type_names")
    return P.cache_path(f"finetune_{a['pair']}_pretrained", a, keys, stats, seed=seed)


def pretrain_run(task: dict) -> dict:
    """Pretrain on A for ``pretrain_s`` s of training clock (once: cached); its result."""
    a = task["args"]
    return P.pretrain(task, lambda: datamodule(task["files"], a, task["seed"], train="A"),
                      math.ceil(a["n_a_train"] / a["batch_size"]), task["stats"],
                      task["metrics"], LOADERS)  # fmt: skip


def finetune_run(task: dict) -> dict:
    """Fine-tune the pretrained model of the task's seed on B under ``task["method"]``."""
    import lightning
    import torch

    P.init_torch()
    a, seed = task["args"], task["seed"]
    method = M.finetune_methods(a["calibration_steps"])[task["method"]]
    lightning.seed_everything(seed, workers=True, verbose=False)
    model = P.run_model(a, task["stats"], seed, a["type_names"])
    loss = None if method.replay is None else P.per_dataset_loss({"pretrain": method.replay,
                                                                    "new": 1.0})  # fmt: skip
    module = P.build_module(method, model, 2, lr=a["lr"], loss=loss, num_val=2)
    module.model.load_state_dict(torch.load(task["cache"], weights_only=False)["model"])
    dm = datamodule(task["files"], a, seed, train="B", replay=method.replay is not None)
    per_epoch = math.ceil(a["n_b_train"] / a["batch_size"])
    callbacks = P.build_callbacks(method)
    run_args = {**a, "budget_s": a["budget_s"] * method.budget_factor}
    out = P.fit_on_clock(module, dm, run_args, per_epoch, task["metrics"], LOADERS, callbacks)
    coeffs = {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()}
    budget = [cb for cb in callbacks if hasattr(cb, "dual")]
    if budget:  # what the forgetting budget asked for and reached (training batches)
        (cb,) = budget
        out["budget_state"] = {"bound": cb.dual.bound, "ratio": cb.dual.last_ratio,
                               "final_ratio": cb.final_ratio,
                               "multiplier": cb.dual.multiplier, "updates": cb.dual.updates}  # fmt: skip
    return {"method": task["method"], "seed": seed, **out, "final_coeffs": coeffs}


def summaries(data: dict) -> dict[str, list[dict]]:
    """Per view (``budget``, ``epochs``): the strategies' rows (mean, sd over seeds), and
    the pretrained model's (``pretrained``: the same for both views)."""
    metrics = metrics_of(data["meta"]["args"]["pair"])
    methods = P.ran_methods(data)
    out = {key: R.summarize(data["runs"], methods, key, metrics) for key in ("budget", "epochs")}
    out["pretrained"] = R.summarize(data["pretrain"], ["pretrained"], "budget", metrics)
    return out


def statuses(rows: list[dict]) -> dict[str, dict]:
    """Each row against the replay sweep's front: ``force`` (B and A force MAE) and
    ``energy`` (B and A energy MAE)."""
    return {"force": R.classify(rows, M.FT_SWEEP, FORCE),
            "energy": R.classify(rows, M.FT_SWEEP, ENERGY)}  # fmt: skip


def table(rows, pretrained, labels, caption, metrics) -> list[str]:
    """One view: every strategy by B force MAE, the replay sweep in bold, its places
    against the sweep's force and energy fronts; the pretrained model last."""
    st = statuses(rows)

    def short(m):
        return labels[m].replace("replay, weighted sum ", "")

    head = ["strategy", *R.header(metrics), "steps", "epochs", "vs replay front (force)",
            "vs replay front (energy)", "seeds"]  # fmt: skip
    body = [[f"**{labels[m]}**" if m in M.FT_SWEEP else labels[m], *R.cells(r, metrics),
             *(R.place(st[k][m], short, m in M.FT_SWEEP) for k in ("force", "energy")), r["n_reached"]]
            for r in R.sorted_by(rows, BF) for m in [r["method"]]]  # fmt: skip
    body += [[f"*{labels['pretrained']}*", *R.cells(r, metrics), "", "", r["n_reached"]]
             for r in pretrained]  # fmt: skip
    return [caption, "", *R.md_table(head, body)]  # fmt: skip


def labels_of(methods) -> dict[str, str]:
    table_ = M.finetune_methods()
    return {m: table_[m].label for m in methods} | {"pretrained": "pretrained on A (before)"}


def captions(a: dict) -> dict[str, str]:
    return {"budget": f"equal training time: {a['budget_s']:g} s of training CPU time per fine-tune",
            "epochs": f"equal epochs: {a['epochs']} epochs (passes over B) per fine-tune"}  # fmt: skip


def markdown(data: dict) -> str:
    meta = data["meta"]
    a = meta["args"]
    p = PAIRS[a["pair"]]
    metrics = metrics_of(a["pair"])
    labels = labels_of(P.ran_methods(data))
    rows = summaries(data)
    params = data["runs"][0]["params"] if data["runs"] else None
    pre_steps = R.mean_sd([r["steps"] for r in data["pretrain"]])[0]
    k = a["batch_size"]
    lines = R.preamble(
        "Fine-tuning benchmark", meta, a["jobs"], R.command("finetune", a["argv"], omp=False),
        f"A = {p.a} ({a['n_a_train']} training / {a['n_a_test']} test frames), B = {p.b} "
        f"({a['n_b_train']} training / {a['n_b_test']} test frames). {P.model_text(a, params)}, "
        f"per-atom energy and force MSE 1:1. Pretraining on A: {a['pretrain_s']:g} s of "
        f"training CPU time (Adam, lr {a['pretrain_lr']}, batch {k}; {pre_steps:.0f} steps), "
        f"once per seed. Fine-tuning: a fresh Adam at constant lr {a['lr']}; an epoch is "
        f"{math.ceil(a['n_b_train'] / k)} batches of {k} B frames (replay: plus {k} A frames "
        f"each); calibrate-then-freeze calibrates for {a['calibration_steps']} steps. Test "
        f"errors on A (forgetting) and B (gain); mean ± sample standard deviation over seeds "
        f"{a['seeds']}; sorted by B force MAE; the replay sweep in bold; each strategy's place "
        "against the sweep's front on B and A force MAE, and on B and A energy MAE (means). "
        + P.units_text(p.units),
    )  # fmt: skip
    expected = len(a["methods"]) * len(a["seeds"])
    if len(data["runs"]) < expected or len(data["pretrain"]) < len(a["seeds"]):
        lines += [f"**Incomplete**: {len(data['pretrain'])} of {len(a['seeds'])} pretrainings "
                  f"and {len(data['runs'])} of {expected} fine-tunes finished.", ""]  # fmt: skip
    for key, cap in captions(a).items():
        lines += table(rows[key], rows["pretrained"], labels, f"**{cap[0].upper()}{cap[1:]}**",
                       metrics)  # fmt: skip
        lines += [""]
    lines += budget_lines(data, labels)
    return "\n".join(lines)


def budget_lines(data: dict, labels: dict) -> list[str]:
    """Each forgetting budget's bound on the replayed loss ratio, the ratio of its last
    update (training batches), the ratio measured when training ended (the trained model on
    the reference's frames; runs that recorded it) and how many seeds ended within 2
    percentage points over the bound, and its multiplier."""
    states: dict[str, list[dict]] = {}
    for r in data["runs"]:
        states.setdefault(r["method"], []).append(r.get("budget_state"))

    def final(s: list[dict]) -> list[str]:
        if any(x.get("final_ratio") is None for x in s):
            return ["—", "—"]
        held = sum(x["final_ratio"] <= x["bound"] + 0.02 for x in s)
        return ["{:.3g} ± {:.2g}".format(*R.mean_sd([x["final_ratio"] for x in s])),
                f"{held}/{len(s)}"]  # fmt: skip

    body = [[labels[m], f"{s[0]['bound']:.3g}",
             *("{:.3g} ± {:.2g}".format(*R.mean_sd([x[k] for x in s])) for k in ("ratio",)),
             *final(s), "{:.3g} ± {:.2g}".format(*R.mean_sd([x["multiplier"] for x in s])),
             len(s)] for m, s in sorted(states.items()) if s[0]]  # fmt: skip
    head = ["strategy", "requested ratio", "last update's ratio", "final ratio",
            "held (≤ bound + 0.02)", "multiplier", "seeds"]  # fmt: skip
    return ["**Forgetting budgets**: the replayed training loss over the pretrained model's, "
            "against its bound: the mean of the budget's last update (training batches), and "
            "measured when training ended on the reference's frames", "",
            *R.md_table(head, body), ""] if body else []  # fmt: skip


def plot(data: dict, path: Path) -> Path:
    """One panel per view: A force MAE (forgetting) against B force MAE (gain)."""
    a = data["meta"]["args"]
    metrics = metrics_of(a["pair"])
    rows = summaries(data)
    caps = captions(a)
    fig = R.plot_front(
        [(caps[k], rows[k]) for k in ("budget", "epochs")],
        labels_of(P.ran_methods(data)),
        f"Fine-tuning {PAIRS[a['pair']].a} -> {PAIRS[a['pair']].b}: test error on A and B "
        f"(mean ± sd over {len(a['seeds'])} seeds; star: the pretrained model)",
        metrics, x=AF, y=BF, sweep=M.FT_SWEEP, baselines=M.FT_SWEEP, what="test",
    )  # fmt: skip
    for ax in fig.axes:
        for p in R.front_points(rows["pretrained"], metrics, AF, BF):
            ax.plot(p["energy"], p["force"], "*", color="k", ms=12)
    return R.save(fig, path)


def report(data: dict, out: Path) -> None:
    """``out``.json (raw runs, meta, the summaries and places), .md and .png."""
    rows = summaries(data)
    meta = {k: v for k, v in data["meta"].items() if k != "partial"}
    views = {key: {"caption": cap, "rows": rows[key], "status": statuses(rows[key])}
             for key, cap in captions(meta["args"]).items()}  # fmt: skip
    R.write_json(out.with_suffix(".json"), {"meta": meta, "views": views, "pretrained": rows["pretrained"],
                                            "pretrain": data["pretrain"], "runs": data["runs"]})  # fmt: skip
    R.write_text(out.with_suffix(".md"), markdown(data))
    plot(data, out.parent / (out.name + ".png"))


def parse(argv):
    p = P.study_parser(__doc__)
    p.add_argument("--pair", choices=list(PAIRS), default="alloy")
    p.add_argument("--methods", nargs="+", default=None, choices=M.FT_METHODS)
    P.add_budget_arguments(p)
    p.add_argument("--pretrain-s", type=float, default=None, help="pretraining clock (s)")
    p.add_argument("--pretrain-lr", type=float, default=5e-3)
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--calibration-steps", type=int, default=None)
    P.add_run_arguments(p, batch_size=4, lr=None)
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
    args.methods = args.methods or list(M.FT_METHODS)
    pair = PAIRS[args.pair]
    for k in ("n_a_train", "n_a_test", "n_b_train", "n_b_test"):
        setattr(args, k, getattr(pair, k))
    args.type_names = P.DATASETS[pair.units].type_names
    args.out = P.out_path(args, f"finetune_{args.pair}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    if missing := M.missing_methods(args.methods, M.finetune_methods()):
        raise SystemExit(f"cannot import {missing}")
    files = pair_files(args.pair)
    stats = P.data_statistics(Path(files["A_train"]), args.r_max, args.type_names,
                              PAIRS[args.pair].shifts)  # fmt: skip
    a = {k: v for k, v in vars(args).items() if k not in ("methods", "seeds", "out", "argv")}
    base = {"args": a, "stats": stats, "files": files, "metrics": list(metrics_of(args.pair))}

    def task(seed, method=None):
        cache = str(pretrained_path(a, stats, seed))
        return {**base, "seed": seed, "method": method, "cache": cache}

    results = P.Results(args.out, "finetune", argv, vars(args),
                        {"files": files, "statistics": stats}, pretrain=[], runs=[])  # fmt: skip
    fine = [task(s, m) for s, m in P.rotated(args.methods, args.seeds, shift=3)]

    def pre_done(r):
        results.add("pretrain", r)
        print(f"pretrained seed {r['seed']}{' (cached)' if r['cached'] else ''}: {r['steps']} steps, "
              f"A force MAE {r['budget'][AF]:.4g}, B force MAE {r['budget'][BF]:.4g}", flush=True)  # fmt: skip

    def done(r):
        results.add("runs", r)
        b = r["budget"]
        print(f"[{len(results.lists['runs'])}/{len(fine)} {time.perf_counter() - results.t0:.0f} s] "
              f"{r['method']} seed {r['seed']}: {r['steps']} steps, B force {b[BF]:.4g}, A force "
              f"{b[AF]:.4g} (run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip

    if args.jobs > 1:  # every pretraining, then every fine-tune
        P.run_all(pretrain_run, [task(s) for s in args.seeds], args.jobs, pre_done)
        P.run_all(finetune_run, fine, args.jobs, done)
    else:  # seed by seed: each finished seed is complete in the json
        for seed in args.seeds:
            P.run_all(pretrain_run, [task(seed)], 1, pre_done)
            P.run_all(finetune_run, [t for t in fine if t["seed"] == seed], 1, done)
    results.lists["pretrain"].sort(key=lambda r: r["seed"])
    report(results.data(), Path(args.out))


if __name__ == "__main__":
    main()

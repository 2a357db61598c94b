"""Per-dataset readout heads: do they help over per-dataset energy references alone?

One model trained jointly on DFT ethanol (80 training, 20 test frames) and GFN2-xTB ethanol
(600 training, 100 test) on balanced batches, a 1:1 ``PerDatasetLoss`` and nequip's weighted
sum, with fixed per-dataset energy references, in two variants: ``shifts`` (one shared
readout) and ``heads`` (``readout_heads: true``). Both get the same seeds and training-clock
budget (the learning rate annealed to 0 over it, cosine); heads help only if their DFT test
error is lower by more than the seed spread (:func:`verdicts`).

    OMP_NUM_THREADS=1 python -m benchmarks.readout_heads [--quick]

Writes ``benchmarks/results/readout_heads.{json,md}`` (``--out`` to choose).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

VARIANTS = {"shifts": "per-dataset energy references only",
            "heads": "per-dataset energy references + readout heads"}  # fmt: skip
NAMES = ["dft", "xtb"]  # dataset_index order
#: the data module's validation loaders: val0 = the DFT test frames, val1 = xTB's
LOADERS = {"val0_epoch": "dft/", "val1_epoch": "xtb/"}
#: metric -> (column, factor to meV, unit), the DFT test set first
METRICS = {
    f"{d}/{m}": (f"{d.upper() if d == 'dft' else 'xTB'} {what}", P.KCAL_MOL_TO_MEV, unit)
    for d in NAMES
    for m, what, unit in (("per_atom_energy_mae", "energy MAE", "meV/atom"),
                          ("forces_mae", "force MAE", "meV/Å"))
}  # fmt: skip
DFT_METRICS = ["dft/per_atom_energy_mae", "dft/forces_mae"]
SPLITS = {"dft_train": 80, "dft_test": 20, "xtb_train": 600, "xtb_test": 100}


def split_files(splits: dict[str, int]) -> dict[str, str]:
    """The DFT and xTB frames, each file shuffled once (seed 0) and cut into training and
    test files, written once into ``_tmp``."""

    def make():
        import ase.io
        import numpy as np

        out = {}
        for name, path in (("dft", P.ETHANOL), ("xtb", P.XTB_ETHANOL)):
            frames = P.shuffled(ase.io.read(path, index=":"), np.random.default_rng(0))
            n_train, n_test = splits[f"{name}_train"], splits[f"{name}_test"]
            if n_train + n_test > len(frames):
                raise SystemExit(f"{path} has {len(frames)} frames, fewer than {n_train + n_test}")
            out[f"{name}_train"] = frames[:n_train]
            out[f"{name}_test"] = frames[n_train : n_train + n_test]
        return out

    tag = "_".join(f"{splits[k]}" for k in SPLITS)
    return P.write_splits(f"readout_heads_data_{tag}", SPLITS, make)


def datamodule(files: dict, a: dict, seed: int):
    """Balanced batches of ``batch_size`` frames of each dataset, an epoch one pass over the
    DFT training frames; validation loaders the DFT and xTB test frames."""
    datasets = {
        name: {"train_dataset": P.file_dataset(files, a, f"{name}_train"),
               "val_dataset": P.file_dataset(files, a, f"{name}_test")}
        for name in NAMES
    }  # fmt: skip
    stats = {"_target_": "nequip.data.CommonDataStatisticsManager",
             "type_names": list(a["type_names"])}  # fmt: skip
    return P.balanced_datamodule(datasets, a["batch_size"], seed, per_epoch(a), val_batch=20,
                                 stats_manager=stats)  # fmt: skip


def per_epoch(a: dict) -> int:
    return math.ceil(a["dft_train"] / a["batch_size"])


def run(task: dict) -> dict:
    """Train one (variant, seed) on the training clock; its results (picklable)."""
    import lightning

    P.init_torch()
    a, seed, variant = task["args"], task["seed"], task["variant"]
    lightning.seed_everything(seed, workers=True, verbose=False)
    model = P.run_model(a, task["stats"], seed, a["type_names"])
    model = P.with_references(model, task["references"], heads=variant == "heads")
    loss = P.per_dataset_loss(dict.fromkeys(NAMES, 1.0))
    module = P.build_module(M.methods()["ws"], model, 2, lr=a["lr"], loss=loss, num_val=2)
    dm = datamodule(task["files"], a, seed)
    clock_a = {**a, "epochs": 0, "lr_schedule": "cosine"}  # the budget alone ends a run
    out = P.fit_on_clock(module, dm, clock_a, per_epoch(a), list(METRICS), LOADERS)
    return {"variant": variant, "seed": seed, **out}


def summary(data: dict) -> list[dict]:
    """Per variant: mean and sd over seeds of every metric at the budget, the mean steps."""
    rows = []
    for v in VARIANTS:
        rs = [r for r in data["runs"] if r["variant"] == v]
        row = {"variant": v, "n": len(rs), "steps": R.mean_sd([r["steps"] for r in rs])[0]}
        for metric in METRICS:
            row[metric] = R.mean_sd([r["budget"][metric] for r in rs])
        rows.append(row)
    return rows


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """Per DFT metric: the gain of ``heads`` over ``shifts`` (difference of the means) against
    the seed spread (the larger sample sd): ``better`` / ``worse`` beyond it."""
    by = {r["variant"]: r for r in rows}
    out = {}
    for metric in DFT_METRICS:
        (ms, ss), (mh, sh) = by["shifts"][metric], by["heads"][metric]
        if ms is None or mh is None:
            out[metric] = {"gain": None, "spread": None, "verdict": "n/a"}
            continue
        gain, spread = ms - mh, max(ss, sh)
        if min(by["shifts"]["n"], by["heads"]["n"]) < 2:
            verdict = "one seed: no spread to judge by"
        elif gain > spread:
            verdict = "better"
        elif -gain > spread:
            verdict = "worse"
        else:
            verdict = "within the seed spread"
        out[metric] = {"gain": gain, "spread": spread, "verdict": verdict}
    return out


def markdown(data: dict) -> str:
    meta = data["meta"]
    a = meta["args"]
    rows = summary(data)
    verdict = verdicts(rows)
    params = {r["variant"]: r["params"] for r in data["runs"]}
    lines = [
        *R.preamble(
            "Readout-heads benchmark", meta, None, R.command("readout_heads", a["argv"]),
            f"Joint training on DFT ethanol ({a['dft_train']} training / {a['dft_test']} test "
            f"frames) and GFN2-xTB ethanol ({a['xtb_train']} / {a['xtb_test']}): balanced batches "
            f"of {a['batch_size']} frames of each (an epoch = {per_epoch(a)} batches), per-dataset "
            "loss 1:1, nequip's weighted sum, fixed least-squares per-dataset energy references. "
            f"{P.model_text(a, params.get('shifts'))} ({params.get('heads')} with heads), Adam "
            f"at lr {a['lr']} annealed to 0 (cosine) over {a['budget_s']:g} s of training CPU "
            f"time per run. Test errors at the end of the budget, mean ± sample standard "
            f"deviation over seeds {a['seeds']}. {P.units_text('ethanol')}",
        ),
        *R.md_table(["variant", *(f"{c} ({u})" for c, _, u in METRICS.values()), "steps", "seeds"],
                    [[VARIANTS[r["variant"]], *(R.pm(r[m], METRICS[m][1]) for m in METRICS),
                      R.fmt(r["steps"], ".0f"), r["n"]] for r in rows]),
    ]  # fmt: skip
    lines += [
        "",
        "Heads against references only on the DFT test set (gain = mean without heads - "
        "mean with heads, positive when heads are better; spread = the larger sample sd): "
        "*better* or *worse* only beyond the seed spread.",
        "",
    ]
    for metric in DFT_METRICS:
        v, (col, f, unit) = verdict[metric], METRICS[metric]
        if v["gain"] is None:
            lines.append(f"- {col}: n/a")
            continue
        lines.append(f"- {col}: gain {v['gain'] * f:+.2f} {unit}, spread {v['spread'] * f:.2f} "
                     f"{unit}: **{v['verdict']}**")  # fmt: skip
    return "\n".join(lines) + "\n"


def report(data: dict, out: Path) -> None:
    meta = {k: v for k, v in data["meta"].items() if k != "partial"}
    rows = summary(data)
    R.write_json(out.with_suffix(".json"),
                 {"meta": meta, "rows": rows, "verdicts": verdicts(rows), "runs": data["runs"]})  # fmt: skip
    R.write_text(out.with_suffix(".md"), markdown(data))


def parse(argv):
    p = P.study_parser(__doc__, jobs=False)
    P.add_budget_arguments(p, epochs=False)
    for key, n in SPLITS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=n)
    P.add_run_arguments(p, batch_size=4)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.from_json:
        return args
    quick = {"budget_s": 2.0, "seeds": [0], "val_every": 1}
    P.fill_defaults(args, quick, {"budget_s": 60.0, "seeds": [0, 1, 2], "val_every": 10})
    if args.quick:
        args.num_features, args.radial_width, args.num_layers = 8, 8, 1
    args.type_names = list(P.ETHANOL_TYPE_NAMES)
    args.out = P.out_path(args, "readout_heads")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    files = split_files({k: getattr(args, k) for k in SPLITS})
    stats = P.data_statistics(Path(files["dft_train"]), args.r_max, args.type_names, "mean")
    a = {k: v for k, v in vars(args).items() if k not in ("seeds", "out", "argv")}
    P.init_torch()  # nequip's float64 data, as nequip-train has when it fits them
    references = datamodule(files, a, seed=0).energy_references()
    base = {"args": a, "stats": stats, "files": files, "references": references}
    tasks = [{**base, "seed": s, "variant": v} for s, v in P.rotated(list(VARIANTS), args.seeds)]
    data = {"files": files, "statistics": stats, "references": references}
    results = P.Results(args.out, "readout_heads", argv, vars(args), data, runs=[])

    def done(r):
        results.add("runs", r)
        b = r["budget"]
        print(f"[{len(results.lists['runs'])}/{len(tasks)} {time.perf_counter() - results.t0:.0f} s] "
              f"{r['variant']} seed {r['seed']}: {r['steps']} steps, DFT force "
              f"{b['dft/forces_mae']:.4g}, DFT energy {b['dft/per_atom_energy_mae']:.4g} kcal/mol "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip

    P.run_all(run, tasks, 1, done)
    results.lists["runs"].sort(key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
    report(results.data(), Path(args.out))


if __name__ == "__main__":
    main()

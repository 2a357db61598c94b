"""Fine-tuning with replay: what each strategy gains on new data and forgets of the old.

The protocol's model is pretrained on dataset **A** (nequip's plain module, ``--pretrain-s``
of training clock, once per seed, cached: :func:`benchmarks.protocol.pretrain`), then
fine-tuned on **B** with a fresh Adam under the strategies of
:func:`benchmarks.methods.finetune_methods`: B alone (``ft_naive``); replay of A with
nequip's weighted sum of a ``PerDatasetLoss`` on a ``MultiDatasetDataModule`` with balanced
batches, A's coefficients ``w`` x B's (``ft_replay_<w>``, the sweep: the front); the same
with A's training structures labelled by the pretrained model itself
(``PseudolabelledDataset``, ``ft_pseudo_<w>``; A's test frames keep their true labels); the
same batches at 1:1 with the datasets as tasks under UPGrad, PCGrad, ``PrimaryConstrained``
(primary ``new``), or calibrate-then-freeze; or a ``ForgettingBudget`` (at one run's time,
and at the sweep's total time, ``_sweep``). An epoch is one pass over B for every strategy.
The fine-tunes' learning rate is constant, or annealed to 0 over each one's training clock
(``--lr-schedule cosine``); the pretraining's likewise (``--pretrain-lr-schedule``). A's
and B's held-out test frames are the two validation loaders (forgetting and gain); each
strategy is placed against the replay sweep's front on B and A force MAE, and on B
and A energy MAE (:func:`benchmarks.report.classify`), at equal time and equal epochs; every
table gives each strategy's change of B's force and energy MAE against the pretrained
model (%), and the budgets given the sweep's total time stand beside the sweep's best run
(equal total compute). Pairs: ``alloy`` (EMT bulk cells, then slabs and vacancy cells; eV),
``ethanol`` (GFN2-xTB MD at 300 K, then 900 K, ``benchmarks/data/ethanol_xtb_1200.xyz``;
kcal/mol) and ``ethanol_levels`` (GFN2-xTB MD at every temperature, then DFT ethanol,
``benchmarks/data/ethanol_reduced_100.xyz``: B at another level of theory, so every
fine-tuned model carries per-dataset energy references, :class:`Pair`).

    OMP_NUM_THREADS=1 python -m benchmarks.finetune --pair alloy
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

from benchmarks import methods as M
from benchmarks import multifidelity as MF
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
    #: B at another level of theory than A (another energy zero): every fine-tuned model
    #: carries per-dataset energy references, A's test frames scored at A's, B's at B's
    other_level: bool = False


PAIRS = {
    "alloy": Pair("alloy", "EMT alloy bulk cells", "EMT alloy slabs and vacancy cells",
                  150, 40, 40, 40, "fit"),
    "ethanol": Pair("ethanol", "GFN2-xTB ethanol MD at 300 K", "GFN2-xTB ethanol MD at 900 K",
                    150, 50, 120, 50, "mean"),
    "ethanol_levels": Pair("ethanol", "GFN2-xTB ethanol MD at 300, 600 and 900 K",
                           "DFT ethanol, 90 of the 100 rMD17-style frames", 300, 50, 40, 50,
                           "mean", other_level=True),
}  # fmt: skip

#: the datasets of the replay data module and of the energy references, in dataset_index order
DATASET_NAMES = {"A": "pretrain", "B": "new"}
#: the data modules' validation loaders: val0 = A's test frames, val1 = B's
LOADERS = {"val0_epoch": "A/", "val1_epoch": "B/"}
BF, AF, BE, AE = "B/forces_mae", "A/forces_mae", "B/per_atom_energy_mae", "A/per_atom_energy_mae"
FORCE, ENERGY = (BF, AF), (BE, AE)  # the two fronts' objectives (gain, forgetting)
QUICK_METHODS = ["ft_naive", "ft_replay_0.3", "ft_replay_1", "ft_pseudo_1", "ft_upgrad",
                 "ft_calib", "ft_budget_0.05"]  # fmt: skip
#: the B metrics whose change against the pretrained model every table gives, and their names
CHANGES = {BF: "B force", BE: "B energy"}


def metrics_of(pair: str) -> dict[str, tuple[str, float, str]]:
    """Metric name -> (column, factor to meV, unit), B first."""
    to_mev = P.DATASETS[PAIRS[pair].units].to_mev
    out = {}
    for side in ("B", "A"):
        out[f"{side}/forces_mae"] = (f"{side} force MAE", to_mev, "meV/Å")
        out[f"{side}/per_atom_energy_mae"] = (f"{side} energy MAE", to_mev, "meV/atom")
    return out


def _alloy_frames(p: Pair) -> tuple[list, list]:
    from nequip_mtl.tools.emt_alloy import generate_frames

    kw = {"elements": P.TYPE_NAMES}
    a = generate_frames(num_frames=p.n_a_train + p.n_a_test, seed=0, kind="bulk", **kw)
    n_b = p.n_b_train + p.n_b_test
    b = generate_frames(num_frames=n_b // 2, seed=1, kind="slab", **kw)
    b += generate_frames(num_frames=n_b - n_b // 2, seed=2, kind="vacancy", **kw)
    return a, b


def _xtb_temperature_frames(p: Pair) -> tuple[list, list]:
    import ase.io

    frames = ase.io.read(P.XTB_ETHANOL, index=":")
    return ([f for f in frames if f.info["temperature_K"] == 300.0],
            [f for f in frames if f.info["temperature_K"] == 900.0])  # fmt: skip


def _level_frames(p: Pair) -> tuple[list, list]:
    import ase.io

    return ase.io.read(P.XTB_ETHANOL, index=":"), ase.io.read(P.ETHANOL, index=":")


#: each pair's A and B frames, before the split
SOURCES = {"alloy": _alloy_frames, "ethanol": _xtb_temperature_frames,
           "ethanol_levels": _level_frames}  # fmt: skip


def pair_files(pair: str) -> dict[str, str]:
    """The four extxyz files of ``pair`` (A and B, train and test, each drawn at random from
    its frames; the rest unused), written once per split sizes."""
    p = PAIRS[pair]

    def make():
        import numpy as np

        a, b = SOURCES[pair](p)
        rng = np.random.default_rng(0)
        a, b = P.shuffled(a, rng), P.shuffled(b, rng)
        return {"A_train": a[: p.n_a_train], "A_test": a[p.n_a_train : p.n_a_train + p.n_a_test],
                "B_train": b[: p.n_b_train], "B_test": b[p.n_b_train : p.n_b_train + p.n_b_test]}  # fmt: skip

    sizes = f"{p.n_a_train}-{p.n_a_test}-{p.n_b_train}-{p.n_b_test}"
    return P.write_splits(f"finetune_{pair}_data_{sizes}", ("A_train", "A_test", "B_train", "B_test"),
                          make)  # fmt: skip


def datamodule(files: dict, a: dict, seed: int, train: str, replay: bool = False,
               pseudo: dict | None = None):  # fmt: skip
    """nequip's plain data module training on ``train`` (``A`` or ``B``; B on a pair with B
    at another level: :func:`tagged_datamodule`), or with ``replay`` a
    ``MultiDatasetDataModule`` of ``pretrain`` (A; with ``pseudo``, :func:`pseudolabel_files`,
    its training structures labelled by the pretrained model) and ``new`` (B) with balanced
    batches; validation loaders A's and B's test frames (true labels), in that order."""
    if not replay:
        if train == "B" and PAIRS[a["pair"]].other_level:
            return tagged_datamodule(files, a, seed)
        return P.files_datamodule(files, a, seed, f"{train}_train", ["A_test", "B_test"])

    def train_dataset(side):
        config = P.file_dataset(files, a, f"{side}_train")
        return pseudolabelled(config, pseudo) if side == "A" and pseudo else config

    datasets = {
        name: {"train_dataset": train_dataset(side),
               "val_dataset": P.file_dataset(files, a, f"{side}_test")}
        for side, name in DATASET_NAMES.items()
    }  # fmt: skip
    k = a["batch_size"]
    return P.balanced_datamodule(datasets, k, seed, math.ceil(a["n_b_train"] / k))


def tagged(config: dict, side: str) -> dict:
    """The dataset config ``config`` with every frame carrying the ``dataset_index`` of
    ``side``'s dataset (nequip_mtl's ``TaggedDataset``; :data:`DATASET_NAMES` order)."""
    index = list(DATASET_NAMES).index(side)
    return {"_target_": "nequip_mtl.data.TaggedDataset", "dataset": config, "index": index}


def tagged_datamodule(files: dict, a: dict, seed: int):
    """nequip's plain data module training on B alone (shuffled batches, as the plain pairs'
    naive fine-tune), every frame carrying its dataset's index: a model with per-dataset
    energy references fine-tunes on B's and is scored on A's test frames at A's references,
    as under replay, without a forward pass on A's training frames."""
    from nequip.data.datamodule import NequIPDataModule

    def dataset(key):
        return tagged(P.file_dataset(files, a, key), key[0])

    return NequIPDataModule(
        seed=seed, train_dataset=dataset("B_train"),
        val_dataset=[dataset("A_test"), dataset("B_test")],
        train_dataloader=P.loader_config(a["batch_size"], shuffle=True),
        val_dataloader=P.loader_config(10),
    )  # fmt: skip


def pretrained_path(a: dict, stats: dict, seed: int) -> Path:
    """The cache file of the pretrained model of ``seed`` (keyed by everything it depends on)."""
    keys = ("pair", "pretrain_s", "pretrain_lr", "batch_size", "clock", "type_names")
    if a.get("pretrain_lr_schedule", "constant") != "constant":  # (earlier caches: constant)
        keys = (*keys, "pretrain_lr_schedule")
    return P.cache_path(f"finetune_{a['pair']}_pretrained", a, keys, stats, seed=seed)


def pretrain_run(task: dict) -> dict:
    """Pretrain on A for ``pretrain_s`` s of training clock (once: cached); its result. With
    ``task["pseudolabels"]`` A's training structures are labelled by it (once, cached). On a
    pair with B at another level the result's test errors (``budget``) are those of the
    fine-tunes' start, the pretrained model with the energy references (:func:`start_errors`);
    the plain model's are kept as ``plain``."""
    a = task["args"]
    out = P.pretrain(task, lambda: datamodule(task["files"], a, task["seed"], train="A"),
                     math.ceil(a["n_a_train"] / a["batch_size"]), task["stats"],
                     task["metrics"], LOADERS)  # fmt: skip
    if task.get("pseudolabels"):
        write_pseudolabels(task)
    if PAIRS[a["pair"]].other_level:
        out = {**out, "plain": out["budget"], "budget": {**out["budget"], **start_errors(task)}}
    return out


# ----------------------------------------------------------------------------- the model


def pretrained_shifts(cache: str, type_names: list[str]) -> dict[str, float]:
    """The per-type energy shift of the pretrained model in the cache file ``cache``."""
    import torch

    state = torch.load(cache, weights_only=False)["model"]
    shifts = state[MF._shift_key(state)].to(torch.float64).reshape(-1)
    if shifts.numel() == 1:  # nequip's one value for every type
        shifts = shifts.expand(len(type_names))
    return {t: float(x) for t, x in zip(type_names, shifts)}


def b_references(files: dict, a: dict) -> dict[str, dict[str, float]]:
    """``{"new": B's per-type energy references}``: nequip_mtl's least-squares fit
    (``fit_energy_references``, minimum norm) on B's training frames."""
    from hydra.utils import instantiate

    from nequip_mtl.model.reference_fit import fit_energy_references

    P.init_torch()
    frames = instantiate(P.file_dataset(files, a, "B_train"))
    return fit_energy_references([(DATASET_NAMES["B"], frames)], a["type_names"])


def references(task: dict) -> dict[str, dict[str, float]]:
    """The per-dataset energy references of a pair with B at another level: A's the
    pretrained model's own per-type shift, B's :func:`b_references` (``task["references"]``)."""
    own = pretrained_shifts(task["cache"], task["args"]["type_names"])
    return {DATASET_NAMES["A"]: own, **task["references"]}


def pretrained_module(task: dict, method: M.Method, loss: dict | None = None):
    """``method``'s training module of the task's model, holding the pretrained weights of its
    seed; on a pair with B at another level the model is wrapped with per-dataset energy
    references (:func:`references`, ``PerDatasetEnergyReferences`` as
    :func:`benchmarks.protocol.with_references` builds it) and the weights are loaded under
    the wrapper's names, its own shift kept (:func:`benchmarks.multifidelity.load_pretrained`):
    A's frames are predicted exactly as by the pretrained model."""
    import torch

    a = task["args"]
    model = P.run_model(a, task["stats"], task["seed"], a["type_names"])
    levels = PAIRS[a["pair"]].other_level
    if levels:
        model = P.with_references(model, references(task))
    module = P.build_module(method, model, 2, lr=a["lr"], loss=loss, num_val=2)
    if levels:
        MF.load_pretrained(module, task["cache"], keep_shift=True)
    else:
        module.model.load_state_dict(torch.load(task["cache"], weights_only=False)["model"])
    return module


def start_errors(task: dict) -> dict[str, float]:
    """The test errors of the fine-tunes' start (:func:`pretrained_module`) on the loaders
    every fine-tune is scored on."""
    P.init_torch()
    module = pretrained_module(task, M.finetune_methods()["ft_naive"])
    dm = datamodule(task["files"], task["args"], task["seed"], train="B")
    return {k: v for k, v in P.validate(module, dm, LOADERS).items() if k in task["metrics"]}


# ----------------------------------------------------------------------------- pseudolabels


def pseudolabel_files(cache: str) -> dict[str, str]:
    """``PseudolabelledDataset``'s ``model`` (the pretrained model of the cache file
    ``cache`` as a checkpoint, :func:`write_checkpoint`) and ``cache`` (its labels), beside
    the cache file."""
    path = Path(cache)
    return {"model": str(path.with_suffix(".ckpt")), "cache": str(path.with_suffix(".pseudolabels.pt"))}  # fmt: skip


def pseudolabelled(config: dict, files: dict[str, str]) -> dict:
    """The dataset config ``config`` labelled by the model of :func:`pseudolabel_files`
    ``files``: nequip_mtl's ``PseudolabelledDataset`` (energies, forces, and stresses of
    periodic frames: a batch's frames must have the same fields as B's)."""
    return {"_target_": "nequip_mtl.data.PseudolabelledDataset", "dataset": config, **files}


def write_checkpoint(task: dict) -> str:
    """The pretrained model of the task's seed as a Lightning checkpoint of nequip's plain
    module, what nequip's loader (``ModelFromCheckpoint``) reads: written once."""
    path = Path(pseudolabel_files(task["cache"])["model"])
    if path.exists():
        return str(path)
    import torch
    from nequip.train import NequIPLightningModule
    from nequip.utils import get_current_code_versions

    P.init_torch()
    a = task["args"]
    info = {"versions": get_current_code_versions(verbose=False),
            "training_module": {"_target_": M.PLAIN}}  # fmt: skip
    module = NequIPLightningModule(
        model=P.run_model(a, task["stats"], task["seed"], a["type_names"]),
        num_datasets={"train": 1, "val": 0, "test": 0, "predict": 0}, loss=P.loss_config(2),
        info_dict=info,
    )  # fmt: skip
    module.model.load_state_dict(torch.load(task["cache"], weights_only=False)["model"])
    trainer = P.trainer()
    trainer.strategy.connect(module)
    part = path.with_suffix(f".{os.getpid()}.part")
    trainer.save_checkpoint(part)
    part.replace(path)
    return str(path)


def write_pseudolabels(task: dict) -> dict[str, str]:
    """Label A's training structures with the pretrained model of the task's seed (once:
    ``PseudolabelledDataset`` caches the labels); :func:`pseudolabel_files`."""
    from hydra.utils import instantiate

    P.init_torch()
    write_checkpoint(task)
    files = pseudolabel_files(task["cache"])
    instantiate(pseudolabelled(P.file_dataset(task["files"], task["args"], "A_train"), files))
    return files


# ----------------------------------------------------------------------------- fine-tuning


def finetune_run(task: dict) -> dict:
    """Fine-tune the pretrained model of the task's seed on B under ``task["method"]``."""
    import lightning
    import torch

    P.init_torch()
    a, seed = task["args"], task["seed"]
    method = M.finetune_methods(a["calibration_steps"])[task["method"]]
    lightning.seed_everything(seed, workers=True, verbose=False)
    loss = None if method.replay is None else P.per_dataset_loss(
        {DATASET_NAMES["A"]: method.replay, DATASET_NAMES["B"]: 1.0})  # fmt: skip
    module = pretrained_module(task, method, loss)
    # labelled once per seed by pretrain_run
    pseudo = pseudolabel_files(task["cache"]) if method.pseudolabels else None
    dm = datamodule(task["files"], a, seed, train="B", replay=method.replay is not None,
                    pseudo=pseudo)  # fmt: skip
    per_epoch = math.ceil(a["n_b_train"] / a["batch_size"])
    callbacks = P.build_callbacks(method)
    run_args = {**a, "budget_s": a["budget_s"] * method.budget_factor}
    out = P.fit_on_clock(module, dm, run_args, per_epoch, task["metrics"], LOADERS, callbacks)
    if task.get("state_dir"):  # the final model, for independent checks (tests)
        torch.save(module.model.state_dict(), Path(task["state_dir"]) / f"{task['method']}_seed{seed}.pt")  # fmt: skip
    coeffs = {k: float(e.coeff or 0.0) for k, e in module.loss.entries.items()}
    budget = [cb for cb in callbacks if hasattr(cb, "duals")]
    if budget:  # what the forgetting budget asked for and reached (each component: the
        (cb,) = budget  # largest ratios and multiplier; each one's in `constraints`)
        duals = cb.duals.values()
        out["budget_state"] = {
            "bound": cb.bound, "ratio": max(d.last_ratio for d in duals),
            "final_ratio": cb.final_ratio, "multiplier": max(d.multiplier for d in duals),
            "updates": max(d.updates for d in duals),
            "constraints": {g: {"ratio": d.last_ratio, "final_ratio": cb.final_ratios.get(g),
                                "multiplier": d.multiplier} for g, d in cb.duals.items()},
        }  # fmt: skip
    if PAIRS[a["pair"]].other_level:
        out["references"] = references(task)
    return {"method": task["method"], "seed": seed, **out, "final_coeffs": coeffs}


# ----------------------------------------------------------------------------- the report


def sweep_of(methods) -> list[str]:
    """The replay sweep among ``methods``: every ``ft_replay_<w>`` (the registry's
    :data:`benchmarks.methods.FT_SWEEP`, or the weights an earlier result ran), by weight."""
    table_ = M.finetune_methods()
    return sorted(
        (m for m in methods if m.startswith("ft_replay_")), key=lambda m: table_[m].replay
    )


def change_key(metric: str) -> str:
    """The summary row's key of the change of ``metric`` against the pretrained model."""
    return f"{metric}_vs_pretrained_pct"


def changes(runs: list[dict], pretrain: list[dict], view: str, metric: str) -> list[float]:
    """Each run's ``metric`` in ``view`` against that of the pretrained model of its seed, in %
    (negative: a lower error)."""
    before = {r["seed"]: r["budget"][metric] for r in pretrain}
    return [100.0 * (r[view][metric] / before[r["seed"]] - 1.0)
            for r in runs if r[view] is not None and r["seed"] in before]  # fmt: skip


def summaries(data: dict) -> dict[str, list[dict]]:
    """Per view (``budget``, ``epochs``): the strategies' rows (mean, sd over seeds; with
    the :func:`changes` of the :data:`CHANGES` metrics), and the pretrained model's
    (``pretrained``: the same for both views)."""
    metrics = metrics_of(data["meta"]["args"]["pair"])
    methods = P.ran_methods(data)
    out = {}
    for key in ("budget", "epochs"):
        out[key] = R.summarize(data["runs"], methods, key, metrics)
        for row in out[key]:
            runs = [r for r in data["runs"] if r["method"] == row["method"]]
            for metric in CHANGES:
                row[change_key(metric)] = R.mean_sd(changes(runs, data["pretrain"], key, metric))
    out["pretrained"] = R.summarize(data["pretrain"], ["pretrained"], "budget", metrics)
    return out


def statuses(rows: list[dict], sweep: list[str] | None = None) -> dict[str, dict]:
    """Each row against the replay sweep's front (``sweep``; default :func:`sweep_of` the
    rows): ``force`` (B and A force MAE) and ``energy`` (B and A energy MAE)."""
    sweep = sweep_of(r["method"] for r in rows) if sweep is None else sweep
    return {"force": R.classify(rows, sweep, FORCE), "energy": R.classify(rows, sweep, ENERGY)}


def change_header(metrics) -> list[str]:
    return [f"{metrics[m][0]} vs pretrained (%)" for m in CHANGES]


def change_cells(r: dict) -> list[str]:
    """The :data:`CHANGES` cells of a summary row: mean ± sd over seeds, in %."""
    return [R.pm(r[change_key(m)]) for m in CHANGES]


def metric_cells(r: dict, metrics) -> list[str]:
    """The error cells of a summary row, then its :func:`change_cells`."""
    return [*R.cells(r, metrics)[: len(metrics)], *change_cells(r)]


def table(rows, pretrained, labels, caption, metrics) -> list[str]:
    """One view: every strategy by B force MAE with its change of B's errors against the
    pretrained model, the replay sweep in bold, its places against the sweep's force and
    energy fronts; the pretrained model last."""
    sweep = sweep_of(r["method"] for r in rows)
    st = statuses(rows, sweep)

    def short(m):
        return labels[m].replace("replay, weighted sum ", "")

    n = len(metrics)
    head = ["strategy", *R.header(metrics), *change_header(metrics), "steps", "epochs",
            "vs replay front (force)", "vs replay front (energy)", "seeds"]  # fmt: skip
    body = [[f"**{labels[m]}**" if m in sweep else labels[m], *metric_cells(r, metrics),
             *R.cells(r, metrics)[n:],
             *(R.place(st[k][m], short, m in sweep) for k in ("force", "energy")), r["n_reached"]]
            for r in R.sorted_by(rows, BF) for m in [r["method"]]]  # fmt: skip
    body += [[f"*{labels['pretrained']}*", *R.cells(r, metrics)[:n], *([""] * len(CHANGES)),
              *R.cells(r, metrics)[n:], "", "", r["n_reached"]] for r in pretrained]  # fmt: skip
    return [caption, "", *R.md_table(head, body)]  # fmt: skip


def best_line(rows: dict[str, list[dict]], labels: dict) -> list[str]:
    """One line: the lowest mean change of B's force and energy MAE against the pretrained
    model, and whose, in each view."""
    views = []
    for key, view in (("budget", "equal time"), ("epochs", "equal epochs")):
        each = []
        for metric, what in CHANGES.items():
            have = [r for r in rows[key] if r[change_key(metric)][0] is not None]
            if have:
                best = min(have, key=lambda r: r[change_key(metric)][0])
                each.append(f"{what} MAE {R.pm(best[change_key(metric)])} % "
                            f"({labels[best['method']]})")  # fmt: skip
        views.append(f"at {view} {', '.join(each)}")
    return ["**Best B improvement over the pretrained model** (each seed's change of the test "
            f"MAE against its pretrained model, mean ± sd; negative: lower): {'; '.join(views)}.",
            ""]  # fmt: skip


def total_compute_lines(data: dict, rows: list[dict], labels: dict, metrics) -> list[str]:
    """Equal total compute: each forgetting budget given the sweep's total time (``_sweep``)
    beside the sweep's best run by B force and by B energy MAE (means; each run given one
    run's time), at equal time; nothing where either did not run."""
    table_ = M.finetune_methods()
    t = data["meta"]["args"]["budget_s"]
    budgets = [r for r in rows if table_[r["method"]].budget_factor != 1.0]
    sweep = [r for r in rows if r["method"] in sweep_of(r["method"] for r in rows)]
    if not budgets or not sweep:
        return []
    body = [[labels[r["method"]], f"one run of {table_[r['method']].budget_factor:g} × {t:g} s",
             *metric_cells(r, metrics)] for r in budgets]  # fmt: skip
    for metric, what in CHANGES.items():
        have = [r for r in sweep if r[metric][0] is not None]
        best = min(have, key=lambda r: r[metric][0])
        body.append([f"the sweep's best by {what} MAE: {labels[best['method']]}",
                     f"{len(sweep)} runs of {t:g} s", *metric_cells(best, metrics)])  # fmt: skip
    head = ["strategy", "training time", *R.header(metrics), *change_header(metrics)]
    k = ", ".join(sorted({f"{table_[r['method']].budget_factor:g}" for r in budgets}))
    other = "" if k == f"{len(sweep)}" else f"; here the sweep ran {len(sweep)} weights, not K"
    return [f"**Equal total compute**: a sweep of K replay weights costs K fine-tunes of {t:g} s; "
            f"a forgetting budget given K × {t:g} s runs once (K = {k}{other}). The budgets "
            "beside the sweep's best run by B force and by B energy MAE (means over seeds), at "
            "equal time", "", *R.md_table(head, body), ""]  # fmt: skip


def labels_of(methods) -> dict[str, str]:
    table_ = M.finetune_methods()
    return {m: table_[m].label for m in methods} | {"pretrained": "pretrained on A (before)"}


def captions(a: dict) -> dict[str, str]:
    mid = "; the learning rate still annealing" if a.get("lr_schedule") == "cosine" else ""
    return {"budget": f"equal training time: {a['budget_s']:g} s of training CPU time per fine-tune",
            "epochs": f"equal epochs: {a['epochs']} epochs (passes over B) per fine-tune{mid}"}  # fmt: skip


def pretrain_lr_text(a: dict) -> str:
    """How the pretraining's learning rate was set."""
    if a.get("pretrain_lr_schedule", "constant") == "constant":
        return f"lr {a['pretrain_lr']}"
    return f"lr {a['pretrain_lr']} annealed to 0 (cosine)"


def lr_text(a: dict) -> str:
    """How the fine-tunes' learning rate was set."""
    if a.get("lr_schedule", "constant") == "constant":
        return f"constant lr {a['lr']}"
    return f"lr {a['lr']} annealed to 0 (cosine) over each fine-tune's training clock"


def markdown(data: dict) -> str:
    meta = data["meta"]
    a = meta["args"]
    p = PAIRS[a["pair"]]
    metrics = metrics_of(a["pair"])
    ran = P.ran_methods(data)
    labels = labels_of(ran)
    rows = summaries(data)
    params = data["runs"][0]["params"] if data["runs"] else None
    pre_steps = R.mean_sd([r["steps"] for r in data["pretrain"]])[0]
    k = a["batch_size"]
    lines = R.preamble(
        "Fine-tuning benchmark", meta, a["jobs"], R.commands("finetune", a),
        f"A = {p.a} ({a['n_a_train']} training / {a['n_a_test']} test frames), B = {p.b} "
        f"({a['n_b_train']} training / {a['n_b_test']} test frames). {P.model_text(a, params)}, "
        f"per-atom energy and force MSE 1:1. Pretraining on A: {a['pretrain_s']:g} s of "
        f"training CPU time (Adam, {pretrain_lr_text(a)}, batch {k}; {pre_steps:.0f} steps), "
        f"once per seed. Fine-tuning: a fresh Adam at {lr_text(a)}; an epoch is "
        f"{math.ceil(a['n_b_train'] / k)} batches of {k} B frames (replay: plus {k} A frames "
        f"each); calibrate-then-freeze calibrates for {a['calibration_steps']} steps. Test "
        f"errors on A (forgetting) and B (gain); mean ± sample standard deviation over seeds "
        f"{a['seeds']}; sorted by B force MAE; the replay sweep in bold; each strategy's change "
        "of B's force and energy MAE against the pretrained model of the same seed (%, "
        "negative: lower), and its place against the sweep's front on B and A force MAE, and "
        "on B and A energy MAE (means). " + P.units_text(p.units),
        *pseudolabel_text(ran), *levels_text(data),
    )  # fmt: skip
    lines += best_line(rows, labels)
    expected = len(a["methods"]) * len(a["seeds"])
    if len(data["runs"]) < expected or len(data["pretrain"]) < len(a["seeds"]):
        lines += [f"**Incomplete**: {len(data['pretrain'])} of {len(a['seeds'])} pretrainings "
                  f"and {len(data['runs'])} of {expected} fine-tunes finished.", ""]  # fmt: skip
    for key, cap in captions(a).items():
        lines += table(rows[key], rows["pretrained"], labels, f"**{cap[0].upper()}{cap[1:]}**",
                       metrics)  # fmt: skip
        lines += [""]
    lines += total_compute_lines(data, rows["budget"], labels, metrics)
    lines += budget_lines(data, labels)
    return "\n".join(lines)


def pseudolabel_text(methods) -> list[str]:
    """What pseudolabel replay is, where it ran."""
    table_ = M.finetune_methods()
    if not any(table_[m].pseudolabels for m in methods):
        return []
    return ["Pseudolabel replay: the replay batches and loss, A's training structures labelled "
            "(energies and forces) by the pretrained model of the seed itself (nequip_mtl's "
            "`PseudolabelledDataset` on its checkpoint, labelled once per seed); A's test frames "
            "keep their true labels."]  # fmt: skip


def levels_text(data: dict) -> list[str]:
    """How a pair with B at another level of theory is trained and scored."""
    a = data["meta"]["args"]
    if not PAIRS[a["pair"]].other_level:
        return []
    unit = P.DATASETS[PAIRS[a["pair"]].units].energy_unit
    (b,) = data["meta"]["data"]["references"].values()
    fit = ", ".join(f"{t} {v:.1f}" for t, v in b.items())
    return ["B is at another level of theory than A (another energy zero): every fine-tuned "
            "model carries fixed per-dataset energy references (nequip_mtl's "
            "`PerDatasetEnergyReferences`), A's the pretrained model's own per-type energy "
            f"shift, B's the least-squares fit on B's training frames ({fit} {unit}). A's test "
            "frames are scored at A's references, B's at B's; the pretrained row is the "
            "pretrained model with these references, where every fine-tune starts. Naive "
            "fine-tuning trains the same model on B alone (nequip's data module, every frame "
            "carrying its dataset's index)."]  # fmt: skip


def budget_lines(data: dict, labels: dict) -> list[str]:
    """Each forgetting budget's bound on the replayed loss ratio, the ratio of its last
    update (training batches, or its fixed frames), the ratio measured when training ended (the trained model on
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
            "against its bound: the mean of the budget's last update (training batches, or its "
            "fixed frames with `ratio_frames`), and "
            "measured when training ended on the reference's frames", "",
            *R.md_table(head, body), ""] if body else []  # fmt: skip


def plot(data: dict, path: Path) -> Path:
    """One panel per view: A force MAE (forgetting) against B force MAE (gain)."""
    a = data["meta"]["args"]
    metrics = metrics_of(a["pair"])
    rows = summaries(data)
    caps = captions(a)
    sweep = sweep_of(P.ran_methods(data))
    fig = R.plot_front(
        [(caps[k], rows[k]) for k in ("budget", "epochs")],
        labels_of(P.ran_methods(data)),
        f"Fine-tuning {PAIRS[a['pair']].a} -> {PAIRS[a['pair']].b}: test error on A and B "
        f"(mean ± sd over {len(a['seeds'])} seeds; star: the pretrained model)",
        metrics, x=AF, y=BF, sweep=sweep, baselines=sweep, what="test",
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
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=M.FT_METHODS,
        help="default: every one but ft_replay_0.1 (a weight of earlier results)",
    )
    P.add_budget_arguments(p)
    p.add_argument("--pretrain-s", type=float, default=None, help="pretraining clock (s)")
    p.add_argument("--pretrain-lr", type=float, default=5e-3)
    p.add_argument("--pretrain-lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="the pretraining's learning rate: constant, or annealed to 0 (cosine) "
                        "over its clock (a model trained to the end of its schedule, as a "
                        "released one is)")  # fmt: skip
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="the fine-tunes' learning rate: constant, or annealed to 0 (cosine) over "
                        "each fine-tune's training clock (the pretraining's: "
                        "--pretrain-lr-schedule)")  # fmt: skip
    p.add_argument("--calibration-steps", type=int, default=None)
    P.add_run_arguments(p, batch_size=4, lr=None)
    p.add_argument("--save-states", help=argparse.SUPPRESS)  # final models (tests)
    p.add_argument("--resume", action="store_true",
                   help="continue the results json at --out: run only the (seed, method) pairs "
                        "of the union of its and these --seeds and --methods that it lacks; "
                        "every other setting must equal its")  # fmt: skip
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
    args.methods = args.methods or list(M.FT_DEFAULT)
    pair = PAIRS[args.pair]
    for k in ("n_a_train", "n_a_test", "n_b_train", "n_b_test"):
        setattr(args, k, getattr(pair, k))
    args.type_names = P.DATASETS[pair.units].type_names
    args.out = P.out_path(args, f"finetune_{args.pair}")
    return args


#: the settings added since the first studies, as those studies ran
ARG_DEFAULTS = {"lr_schedule": "constant", "pretrain_lr_schedule": "constant"}

#: the arguments a resumed study may change (what to run, where its results go)
RESUMABLE = ("argv", "methods", "seeds", "resumed_argv", "out", "jobs", "from_json")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    earlier = P.earlier_study(args.out) if args.resume else None
    if earlier is not None:
        e = earlier["meta"]["args"]
        for k, v in ARG_DEFAULTS.items():  # settings earlier studies did not record
            e.setdefault(k, v)
        args.methods = list(dict.fromkeys([*e["methods"], *args.methods]))
        args.seeds = sorted({*e["seeds"], *args.seeds})
    if missing := M.missing_methods(args.methods, M.finetune_methods()):
        raise SystemExit(f"cannot import {missing}")
    files = pair_files(args.pair)
    pair = PAIRS[args.pair]
    stats = P.data_statistics(Path(files["A_train"]), args.r_max, args.type_names, pair.shifts)
    a = {k: v for k, v in vars(args).items()
         if k not in ("methods", "seeds", "out", "argv", "save_states")}  # fmt: skip
    refs = b_references(files, a) if pair.other_level else None
    table_ = M.finetune_methods()
    base = {"args": a, "stats": stats, "files": files, "metrics": list(metrics_of(args.pair)),
            "references": refs, "state_dir": args.save_states,
            "pseudolabels": any(table_[m].pseudolabels for m in args.methods)}  # fmt: skip

    def task(seed, method=None):
        cache = str(pretrained_path(a, stats, seed))
        return {**base, "seed": seed, "method": method, "cache": cache}

    meta_args = {k: v for k, v in vars(args).items() if k != "resume"}
    lists = {"pretrain": [], "runs": []}
    if earlier is not None:
        meta_args, stats, lists = P.merge_resumed(earlier, meta_args, stats, args.out,
                                                  RESUMABLE, lists)  # fmt: skip
    about = {"files": files, "statistics": stats, **({"references": refs} if refs else {})}
    results = P.Results(args.out, "finetune", meta_args["argv"], meta_args, about, **lists)
    if earlier is not None:  # the elapsed time counts every part
        results.t0 -= earlier["meta"].get("elapsed_s", 0.0)
    finished = {(r["seed"], r["method"]) for r in lists["runs"]}
    planned = P.rotated(args.methods, args.seeds, shift=3)
    fine = [task(s, m) for s, m in planned if (s, m) not in finished]
    expected = len(planned)

    def pretrained(seeds):
        """The seeds to pretrain: those without a record or whose cache is gone (a resumed
        study pretrains those again, same settings, and keeps the new record)."""
        return [task(s) for s in seeds
                if s not in {x["seed"] for x in results.lists["pretrain"]}
                or not Path(task(s)["cache"]).exists()]  # fmt: skip

    def pre_done(r):
        results.lists["pretrain"] = [x for x in results.lists["pretrain"] if x["seed"] != r["seed"]]
        results.add("pretrain", r)
        print(f"pretrained seed {r['seed']}{' (cached)' if r['cached'] else ''}: {r['steps']} steps, "
              f"A force MAE {r['budget'][AF]:.4g}, B force MAE {r['budget'][BF]:.4g}", flush=True)  # fmt: skip

    def done(r):
        results.add("runs", r)
        b = r["budget"]
        print(f"[{len(results.lists['runs'])}/{expected} {time.perf_counter() - results.t0:.0f} s] "
              f"{r['method']} seed {r['seed']}: {r['steps']} steps, B force {b[BF]:.4g}, A force "
              f"{b[AF]:.4g} (run {r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip

    if args.jobs > 1:  # every pretraining, then every fine-tune
        P.run_all(pretrain_run, pretrained(args.seeds), args.jobs, pre_done)
        P.run_all(finetune_run, fine, args.jobs, done)
    else:  # seed by seed: each finished seed is complete in the json
        for seed in args.seeds:
            P.run_all(pretrain_run, pretrained([seed]), 1, pre_done)
            P.run_all(finetune_run, [t for t in fine if t["seed"] == seed], 1, done)
    results.lists["pretrain"].sort(key=lambda r: r["seed"])
    report(results.data(), Path(args.out))


if __name__ == "__main__":
    main()

"""Per-step time of the dataset tasks on several training datasets, against nequip's step.

EMT alloy datasets of different frame mixes (:data:`DATASETS`; ``--datasets 2`` or ``3``)
in a ``MultiDatasetDataModule`` with balanced batches of ``--frames-per-dataset`` k frames
of each dataset, a ``PerDatasetLoss`` (per-atom energy and forces MSE per dataset), and the
methods of :func:`benchmarks.methods.dataset_task_methods`: nequip's weighted sum (the
reference) and UPGrad with ``tasks: datasets`` (one forward per dataset's sub-batch, or
``forward_per_dataset: false``) or ``tasks: components``. The methods are interleaved step by
step, once per k, exactly as in ``benchmarks/step_cost.py`` (:func:`protocol.interleaved`:
step ``i`` of every method on the same batch, in a fresh random order per step; the first
``--warmup`` steps discarded; CPU time of the compute thread and wall-clock time). The table
is computed from the raw step times in the json.

    OMP_NUM_THREADS=1 python -m benchmarks.step_cost_datasets --datasets 2 --steps 30 --dtypes float32
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost_datasets --quick             # ~30 s
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost_datasets --compile --frames-per-dataset 4 8

``python -m benchmarks.step_cost --datasets 2 ...`` (the command the committed results
record) runs this study. Writes ``benchmarks/results/step_cost_datasets.{json,md,png}``
(``--out`` to change).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

#: the training datasets of ``--datasets``, by name: arguments of the seeded EMT alloy
#: generator (:func:`nequip_mtl.tools.generate_frames`, Cu/Ni/Pd; by default 70 % strained
#: bulk cells, 15 % with a vacancy, 15 % surface slabs): the first is the primary dataset
#: (model statistics), the others shift the mix of frames and the compositions
DATASETS = {"bulk": {"seed": 0},
            "surfaces": {"seed": 1, "slab_fraction": 0.6, "vacancy_fraction": 0.1},
            "vacancies": {"seed": 2, "slab_fraction": 0.1, "vacancy_fraction": 0.6}}  # fmt: skip
#: nequip's loss components of every dataset (per-atom energy and forces MSE)
COMPONENTS = 2


class Setup:
    """The EMT alloy datasets in balanced batches of ``frames_per_dataset`` frames of each,
    a ``PerDatasetLoss``: what :class:`protocol.Worker` trains."""

    def __init__(self, args, frames_per_dataset: int):
        self.args = args
        self.k = int(frames_per_dataset)
        self.names = list(DATASETS)[: args.datasets]
        # one file per dataset, for every k: enough frames for the largest k without repeats
        self.n_train = max(args.frames_per_dataset) * (args.warmup + args.steps)
        # (+ the 2 validation frames nequip's data module requires; validation is off)
        self.paths = {n: P.alloy_data(self.n_train + 2, **DATASETS[n]) for n in self.names}
        self.stats = _primary_statistics(self.paths[self.names[0]], args.r_max)
        self._dm = None

    def datamodule(self, fresh: bool = False):
        if self._dm is None or fresh:
            # the sampler's law is a function of the seed: the same batches for every method
            datasets = {
                name: {"split_dataset": {"dataset": P.ase_dataset(path, self.args.r_max),
                                         "train": self.n_train, "val": 2}}
                for name, path in self.paths.items()
            }  # fmt: skip
            self._dm = P.balanced_datamodule(datasets, self.k, seed=1, val_batch=None)
        return self._dm

    def module(self, method: M.Method, dtype: str, num_tasks: int):
        """A fresh training module (the same initial weights every time)."""
        import torch

        torch.manual_seed(0)
        loss = P.per_dataset_loss(dict.fromkeys(self.names, 1.0))
        model = P.step_model(self.args, self.stats, dtype)
        return P.build_module(method, model, num_tasks, lr=self.args.lr, loss=loss, num_val=0)

    def atoms_per_sub_batch(self) -> dict[str, float]:
        """Mean number of atoms of each dataset's part of the timed batches."""
        from nequip.data import AtomicDataDict

        from nequip_mtl.data.keys import DATASET_INDEX_KEY

        dm = self.datamodule(fresh=True)
        dm.setup("fit")
        counts = dict.fromkeys(self.names, 0)
        warmup, total = self.args.warmup, self.args.warmup + self.args.steps
        for i, batch in zip(range(total), dm.train_dataloader()):
            if i < warmup:
                continue
            per_frame = batch[AtomicDataDict.NUM_NODES_KEY].reshape(-1)
            index = batch[DATASET_INDEX_KEY].reshape(-1)
            for d, n in enumerate(self.names):
                counts[n] += int(per_frame[index == d].sum())
        self._dm = None
        return {n: c / self.args.steps for n, c in counts.items()}


@functools.lru_cache(maxsize=2)
def _primary_statistics(path: Path, r_max: float) -> dict:
    return P.data_statistics(path, r_max)


def run(args, table) -> list[dict]:
    """The methods on several datasets, interleaved step by step, for every dtype and
    number of frames per dataset."""
    results = []
    for dtype in args.dtypes:
        for k in args.frames_per_dataset:
            setup = Setup(args, k)
            atoms = setup.atoms_per_sub_batch()
            tasks = len(setup.names) * COMPONENTS
            what = f"{dtype} {len(setup.names)} datasets x {k} frames"
            times, n_params, load = P.interleaved(args, table, setup, dtype, tasks, what)
            results += P.timing_rows(
                args, table, times, n_params, dtype=dtype, tasks=tasks, datasets=setup.names,
                frames_per_dataset=k, atoms_per_sub_batch=atoms, loadavg=load,
            )  # fmt: skip
    return results


def ratios(r: dict, ref: dict) -> dict[str, float]:
    """From the raw step times: the median CPU step, the ratios of medians (CPU, wall) and
    means (CPU) to the reference row ``ref``, the quartiles of the per-step CPU ratios."""
    cpu, ref_cpu = r["raw_cpu_s"], ref["raw_cpu_s"]
    paired = [a / b for a, b in zip(cpu, ref_cpu)]
    q1, _, q3 = statistics.quantiles(paired, n=4)
    return {"median_s": statistics.median(cpu),
            "ratio": statistics.median(cpu) / statistics.median(ref_cpu),
            "mean_ratio": statistics.fmean(cpu) / statistics.fmean(ref_cpu),
            "wall_ratio": statistics.median(r["raw_wall_s"]) / statistics.median(ref["raw_wall_s"]),
            "paired_median": statistics.median(paired), "paired_q1": q1, "paired_q3": q3}  # fmt: skip


def _ci_text(r: dict, key: str) -> str:
    ci = r.get(f"{key}_ci95")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _mix_text(generator: dict) -> str:
    slab = generator.get("slab_fraction", 0.15)
    vac = generator.get("vacancy_fraction", 0.15)
    return f"seed {generator['seed']}, {100 * (1 - slab - vac):.0f}/{100 * vac:.0f}/{100 * slab:.0f} % bulk/vacancy/slab"


def markdown(data: dict) -> str:
    """Per dtype and frames per dataset, every method's CPU time per step and its ratios to
    the weighted-sum step of the same batches."""
    meta = data["meta"]
    args, info = argparse.Namespace(**meta["args"]), meta["machine"]
    results = R.with_intervals(data["results"])
    names = results[0]["datasets"] if results else list(DATASETS)[: args.datasets]
    load = [x for r in results for x in r.get("loadavg", [])]
    compiled = " under nequip's train-time compile" if getattr(args, "compile", False) else ""
    lines = R.preamble(
        f"Step cost with {len(names)} training datasets", meta, None, meta.get("command", "n/a"),
        "Load average (1 min), sampled every 10 interleaved steps and after the last: "
        f"{f'{min(load):.2f}-{max(load):.2f}' if load else 'n/a'}; at the end "
        f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_end', []))}.",
        f"NequIP model with {results[0]['params'] if results else '?'} parameters "
        f"(l_max={args.l_max}, {args.num_layers} layers, {args.num_features} features, radial "
        f"MLP 2x{args.radial_width}), {', '.join(args.dtypes)}{compiled}; {len(names)} EMT "
        "alloy datasets ("
        + "; ".join(f"`{n}`: {_mix_text(DATASETS[n])}" for n in names)
        + ") in balanced batches of k frames of each, a `PerDatasetLoss` (per-atom energy and "
        f"forces MSE of each dataset); {args.steps} timed steps per method after {args.warmup} "
        "warm-up steps, interleaved step by step. CPU time of the compute thread; *vs weighted "
        "sum*: ratio of median steps, 95% bootstrap interval; *paired*: median and interquartile "
        "range of the per-step ratios (the same batch); *mean*: ratio of mean steps; *wall*: "
        "ratio of median wall-clock steps; *atoms per sub-batch*: each dataset's part of a batch.",
    )  # fmt: skip
    refs = {R.config_key(r, r["method"]): r for r in results if r["method"] == M.WS}
    rows = []
    for r in results:
        x = ratios(r, refs[R.config_key(r, M.WS)])
        rows.append([
            r["dtype"], r["frames_per_dataset"],
            " / ".join(f"{r['atoms_per_sub_batch'][n]:.0f}" for n in names), r["label"],
            f"{1e3 * x['median_s']:.0f}", f"{x['ratio']:.2f}" + _ci_text(r, "cpu_vs_weighted_sum"),
            f"{x['paired_median']:.2f} [{x['paired_q1']:.2f}, {x['paired_q3']:.2f}]",
            f"{x['mean_ratio']:.2f}" + _ci_text(r, "cpu_mean_vs_weighted_sum"),
            f"{x['wall_ratio']:.2f}",
        ])  # fmt: skip
    head = ["dtype", "frames per dataset", "atoms per sub-batch", "method", "CPU ms/step",
            "vs weighted sum", "paired", "vs weighted sum (mean)", "wall vs weighted sum"]  # fmt: skip
    return "\n".join(lines + R.md_table(head, rows)) + "\n"


def report(data: dict, out: Path) -> None:
    """``out``.json (meta data, the timing rows with their intervals), .md and .png."""
    results = R.with_intervals(data["results"])
    R.write_json(out.with_suffix(".json"), {**data, "results": results})
    R.write_text(out.with_suffix(".md"), markdown(data))
    if results:
        R.plot_step_ratios(out.with_suffix(".png"), results,
                           lambda r: f"{r['dtype']}, {r['frames_per_dataset']} frames/dataset",
                           title=f"Dataset tasks vs nequip's weighted sum, {len(results[0]['datasets'])} datasets")  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = P.study_parser(__doc__, jobs=False)
    parser.add_argument("--datasets", type=int, default=2, choices=[2, 3])
    parser.add_argument("--frames-per-dataset", type=int, nargs="+", default=[4, 8, 16],
                        help="frames of each dataset per batch, one configuration each")  # fmt: skip
    P.add_step_arguments(parser)
    table = M.dataset_task_methods()
    parser.add_argument("--methods", nargs="+", default=None, choices=list(table))
    parser.add_argument("--compile", action="store_true",
                        help="train-time compile (`compile_mode: compile`), during the warm-up")  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    if args.quick:
        P.quick_steps(args)
        args.frames_per_dataset = [2, 4]
    args.out = P.out_path(args, "step_cost_datasets")
    # the reference first, whatever was asked for
    args.methods = list(dict.fromkeys([M.WS, *(args.methods or table)]))
    P.init_torch()
    info = P.machine_info()
    t0 = time.perf_counter()
    results = run(args, table)
    date = P.now()
    meta = {"machine": {**info, "loadavg_end": os.getloadavg(), "date": date}, "args": vars(args),
            "command": R.command("step_cost_datasets", argv), "time": date,
            "elapsed_s": time.perf_counter() - t0}  # fmt: skip
    report({"meta": meta, "results": results, "memory": []}, Path(args.out))


if __name__ == "__main__":
    main()

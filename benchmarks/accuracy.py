"""Validation accuracy of every multitask method at equal compute and at equal epochs.

Each (method, seed) trains the same NequIP model on the same data with the same optimizer
settings (:func:`benchmarks.protocol.train_run`): ``--dataset alloy`` (default), the offline
EMT alloy (energies, forces, stresses in eV), or ``--dataset ethanol``, the DFT ethanol
frames of ``benchmarks/data/`` (kcal/mol, reported in meV; 80 training / 20 validation). A
run trains until its *training clock* (the CPU time of the compute thread over the training
steps, ``--clock cpu``; or wall-clock time) reaches ``--budget-s``, then is validated once
more: the **equal-time** view. Every epoch is validated, and with the constant learning
rate the validation after ``--epochs`` epochs is the **equal-epochs** view (a method too slow
to finish them within the budget trains on until it has). Runs go seed by seed, the method
order rotated per seed; seeds set the initialisation and batch order, the split is fixed.

    OMP_NUM_THREADS=1 python -m benchmarks.accuracy                   # full (< 1 h on 2 cores)
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --quick           # a few minutes
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy --dataset ethanol --methods ws upgrad --jobs 2

Each method is placed against the weighted sums that ran (:mod:`benchmarks.pareto`, whose
tables and figures these are; there the weighted sum is swept). Writes
``benchmarks/results/accuracy.{json,md,png}`` and ``accuracy_curves.png`` (``--out`` to
choose); ``--from-json`` rewrites them from a results json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import methods as M
from benchmarks import pareto
from benchmarks import protocol as P
from benchmarks import report as R

DEFAULT_METHODS = [m for m in M.DEFAULT_METHODS if m != "mean"]  # Mean == Sum for equal coeffs
QUICK_METHODS = ["ws", "config_nequip", "softadapt_nequip", "config", "mconfig_adam", "famo"]


def markdown(data: dict) -> str:
    return pareto.render(data, "Accuracy")


def report(data: dict, out: Path) -> None:
    pareto.report(data, out, "Accuracy")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = P.study_parser(__doc__)
    parser.add_argument("--dataset", choices=list(P.DATASETS), default="alloy")
    parser.add_argument("--methods", nargs="+", default=None, choices=M.ALL_METHODS)
    P.add_budget_arguments(parser)
    parser.add_argument("--frames", type=int, default=None,
                        help="alloy: 200 (generated); ethanol: 100 (all)")  # fmt: skip
    parser.add_argument("--n-train", type=int, default=None, help="alloy: 150; ethanol: 80")
    P.add_run_arguments(parser)
    parser.add_argument("--save-states", help=argparse.SUPPRESS)  # final models (tests)
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    dataset = P.DATASETS[args.dataset]
    quick = {"budget_s": 8.0, "epochs": 1, "seeds": [0, 1], "val_every": 1}
    P.fill_defaults(args, quick, {**quick, "budget_s": 30.0, "epochs": 8, "seeds": [0, 1, 2]})
    args.frames = args.frames or dataset.frames
    args.n_train = args.n_train or dataset.n_train
    if args.dataset == "ethanol" and args.frames > dataset.frames:
        parser.error(f"the ethanol file has {dataset.frames} frames")
    args.lr_schedule = "constant"
    args.out = P.out_path(args, "accuracy_ethanol" if args.dataset == "ethanol" else "accuracy")
    args.methods = args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    pareto.run(args, argv, args.methods, "accuracy", report)


if __name__ == "__main__":
    main()

"""Per-step time and peak memory of every multitask method, relative to nequip's steps.

Time: every method trains the same model on the same batches in **one process**,
interleaved step by step (:func:`benchmarks.protocol.interleaved`: step ``i`` of every
method on batch ``i``, in a fresh random order for every ``i``), so load from other
processes hits every method alike and step ``i`` pairs with the reference's step ``i``.
The first ``--warmup`` steps are discarded. A step runs from the first
``on_train_batch_start`` to the last ``on_train_batch_end`` callback (forward, losses,
backward passes, aggregation, optimizer step, ``interval: batch`` weighting callbacks), on
two clocks: the compute thread's CPU time and wall-clock time. Memory: per method, in a
separate run of ``--mem-steps`` steps, the peak of live torch tensor memory above its level
at ``on_train_start`` (torch.profiler's memory events; deterministic).

    OMP_NUM_THREADS=1 python -m benchmarks.step_cost                    # the full run
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --quick            # ~1 minute

Writes ``benchmarks/results/step_cost.{json,md,png}`` (``--out``); several training
datasets (``--datasets 2``) are :mod:`benchmarks.step_cost_datasets`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R
from benchmarks.methods import NEQUIP_CONFIG, WS


class Setup:
    """Data, statistics and model configuration shared by every run of one invocation; what
    :class:`protocol.Worker` trains."""

    def __init__(self, args):
        self.args = args
        n = args.batch_size * max(args.warmup + args.steps, args.mem_steps)
        self.frames = max(n + 1, args.frames)
        self.path = P.alloy_data(self.frames, seed=0)
        self.stats = P.data_statistics(self.path, args.r_max)
        self.n_train = n
        self._dm = None

    def datamodule(self, fresh: bool = False):
        if self._dm is None or fresh:
            # the same batches, in the same order, for every method
            a = self.args
            self._dm = P.datamodule(self.path, self.n_train, self.frames - self.n_train,
                                    a.batch_size, a.r_max, shuffle=False)  # fmt: skip
        return self._dm

    def module(self, method: M.Method, dtype: str, num_tasks: int):
        """A fresh training module (the same initial weights every time)."""
        import torch

        torch.manual_seed(0)
        model = P.step_model(self.args, self.stats, dtype)
        return P.build_module(method, model, num_tasks, lr=self.args.lr)


def time_methods(args, table) -> list[dict]:
    """Every method, interleaved step by step, for every dtype and number of tasks."""
    setup = Setup(args)
    results = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            what = f"{dtype} {num_tasks} tasks"
            times, n_params, _ = P.interleaved(args, table, setup, dtype, num_tasks, what)
            results += P.timing_rows(args, table, times, n_params, dtype=dtype, tasks=num_tasks)
    return results


def peak_memory(setup: Setup, method: M.Method, dtype: str, num_tasks: int, steps: int) -> dict:
    """Train ``steps`` batches with a fresh module; the peak of live torch tensor bytes
    (torch.profiler memory events) between ``on_train_start`` and ``on_train_end``, above
    the level at ``on_train_start``, in kB, and the parameters."""
    import lightning
    from torch.profiler import ProfilerActivity, profile

    class Peak(lightning.Callback):
        result: dict = {}

        def on_train_start(self, trainer, pl_module):
            # no collection of earlier runs' garbage inside the window (its frees would
            # offset this run's allocations)
            gc.collect()
            gc.disable()
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

        def on_train_end(self, trainer, pl_module):
            self.prof.__exit__(None, None, None)
            events = [
                e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"
            ]
            cur = peak = 0
            for e in sorted(events, key=lambda e: e.start_ns()):
                cur += e.nbytes()
                peak = max(peak, cur)
            self.result = {"torch_peak_kb": peak / 1024, "torch_end_kb": cur / 1024}
            gc.enable()

    module = setup.module(method, dtype, num_tasks)
    peak = Peak()
    callbacks = [peak, *P.build_callbacks(method)]
    P.step_trainer(callbacks, steps).fit(module, datamodule=setup.datamodule())
    return {**peak.result, "params": P.num_params(module)}


def measure_memory(args, table) -> list[dict]:
    """The torch peak of every method, dtype and number of tasks (deterministic), and its
    ratios to the references'."""
    setup = Setup(args)
    out = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            rows = []
            for m in args.methods:
                res = peak_memory(setup, table[m], dtype, num_tasks, args.mem_steps)
                rows.append({"method": m, "dtype": dtype, "tasks": num_tasks, **res})
                print(f"[memory {dtype} {num_tasks} tasks] {m}: torch peak "
                      f"{res['torch_peak_kb'] / 1024:.1f} MiB", flush=True)  # fmt: skip
            by = {r["method"]: r["torch_peak_kb"] for r in rows}
            for r in rows:
                for key, ref in R.REFERENCES.items():
                    r[f"torch_mem_{key}"] = r["torch_peak_kb"] / by[ref] if by.get(ref) else None
            out += rows
    return out


def _with_ci(r, key) -> str:
    v, ci = r.get(key), r.get(f"{key}_ci95")
    if v is None:
        return "n/a"
    return f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown(data: dict) -> str:
    if data["meta"]["args"].get("datasets"):  # a result of the several-datasets study
        return _datasets().markdown(data)
    meta, memory = data["meta"], data["memory"]
    args = argparse.Namespace(**meta["args"])
    results = R.with_intervals(data["results"])
    mem = {(r["method"], r["dtype"], r["tasks"]): r for r in memory}
    lines = R.preamble(
        "Step cost", meta, None, None,
        f"NequIP model with {results[0]['params']} parameters (l_max={args.l_max}, "
        f"{args.num_layers} layers, {args.num_features} features, radial MLP "
        f"2x{args.radial_width}), batches of {args.batch_size} EMT alloy frames; {args.steps} "
        f"timed steps per method after {args.warmup} warm-up steps, interleaved step by step. "
        "CPU time of the compute thread; ratios of median step times with a 95% bootstrap "
        "interval (paired resampling of steps); *mean*: ratio of mean step times (the cost per "
        "step of methods whose work varies from step to step, e.g. M-ConFIG's round-robin "
        "backward pass); *wall*: ratio of median wall-clock steps; *mem*: peak of live torch "
        f"tensor memory over {args.mem_steps} training steps above its level at the start.",
    )  # fmt: skip
    head = ["dtype", "tasks", "method", "CPU ms/step", "vs weighted sum", "vs nequip ConFIG",
            "vs weighted sum (mean)", "wall vs weighted sum", "mem (MiB)", "mem vs weighted sum",
            "mem vs nequip ConFIG"]  # fmt: skip
    rows = []
    for r in results:
        mm = mem.get((r["method"], r["dtype"], r["tasks"])) or {}
        rows.append([
            r["dtype"], r["tasks"], r["label"], f"{1e3 * r['cpu_median_s']:.0f}",
            *(_with_ci(r, f"cpu_{k}") for k in ("vs_weighted_sum", "vs_nequip_config",
                                                "mean_vs_weighted_sum")),
            R.fmt(r.get("wall_vs_weighted_sum")),
            R.fmt(mm.get("torch_peak_kb") and mm["torch_peak_kb"] / 1024, ".1f"),
            R.fmt(mm.get("torch_mem_vs_weighted_sum")), R.fmt(mm.get("torch_mem_vs_nequip_config")),
        ])  # fmt: skip
    return "\n".join(lines + R.md_table(head, rows)) + "\n"


def _datasets():
    from benchmarks import step_cost_datasets

    return step_cost_datasets


def report(data: dict, out: Path) -> None:
    """``out``.json (meta data, the timing rows with their intervals, the memory rows),
    .md and .png."""
    if data["meta"]["args"].get("datasets"):
        return _datasets().report(data, out)
    results = R.with_intervals(data["results"])
    R.write_json(out.with_suffix(".json"), {**data, "results": results})
    R.write_text(out.with_suffix(".md"), markdown(data))
    if results:
        R.plot_step_ratios(out.with_suffix(".png"), results, lambda r: f"{r['dtype']}, {r['tasks']} tasks",
                           data["memory"], "Per-step cost relative to nequip's weighted-sum step")  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--datasets" in argv:  # the several-datasets study
        return _datasets().main(argv)
    parser = P.study_parser(__doc__, jobs=False)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3], choices=[2, 3])
    P.add_step_arguments(parser, frames=200, frames_help="frames generated (>= batch*(steps+1)+1)")
    parser.add_argument("--methods", nargs="+", default=None, choices=M.ALL_METHODS,
                        help=f"default: {' '.join(M.DEFAULT_METHODS)}")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--mem-steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    if args.quick:
        P.quick_steps(args)
    args.out = P.out_path(args, "step_cost")
    # calibrate-then-freeze calibrates during the warm-up: the timed steps are after it
    table = M.methods(interval="batch", calibration_steps=max(args.warmup, 1))
    # the two references first, whatever was asked for
    args.methods = list(dict.fromkeys([WS, NEQUIP_CONFIG, *(args.methods or M.DEFAULT_METHODS)]))
    if missing := M.missing_methods(args.methods, table):
        raise SystemExit(f"cannot import {missing}")
    P.init_torch()
    info = P.machine_info()
    t0 = time.perf_counter()
    results = time_methods(args, table)
    memory = [] if args.no_memory else measure_memory(args, table)
    date = P.now()
    meta = {"machine": {**info, "loadavg_end": os.getloadavg(), "date": date}, "args": vars(args),
            "time": date, "elapsed_s": time.perf_counter() - t0}  # fmt: skip
    report({"meta": meta, "results": results, "memory": memory}, Path(args.out))


if __name__ == "__main__":
    main()

"""Per-step time and peak memory of every multitask method, relative to nequip's steps.

Time: every method trains the same NequIP model (same initial weights, same batches in
the same order, same data) inside **one process**, and the methods are interleaved
*step by step*: each method runs its own ordinary ``trainer.fit`` in a thread, and a
scheduler lets exactly one of them run one training step at a time -- step ``i`` of
every method, on the same batch ``i``, in a fresh seeded random order for every ``i``
(so that no method always follows the same other method). Slow drifts and
bursts of load from other processes therefore hit every method alike, and step ``i`` of
a method can be compared with step ``i`` of the reference a few seconds apart (the
*paired* ratios). The first ``--warmup`` steps of every method are discarded. A step is
timed from the first ``on_train_batch_start`` callback to the last ``on_train_batch_end``
callback: forward, losses, every backward pass, aggregation, optimizer step and the
per-step work of the loss-weighting callbacks (run with ``interval: batch`` here, their
worst case). Two clocks: the CPU time of the compute thread (``time.thread_time``; with
``OMP_NUM_THREADS=1`` all of a step's work runs on it) and wall-clock time.

Memory: per method, in a separate (not timed) run of ``--mem-steps`` steps: the peak of
live torch tensor memory from ``on_train_start`` to ``on_train_end`` above its level at
``on_train_start`` (from torch.profiler's memory events: activations, retained graphs,
gradients, task-gradient buffers, optimizer state; deterministic). With ``--rss``, also
the OS view in a fresh process per method: ``VmHWM - VmRSS`` with the high-water mark
reset at ``on_train_start`` (``/proc/self/clear_refs``).

Several training datasets (``--datasets 2`` or ``3``): EMT alloy datasets of
different frame mixes (:data:`DATASETS`) in a ``MultiDatasetDataModule`` with balanced
batches of ``--frames-per-dataset`` k frames of each dataset, a ``PerDatasetLoss``
(per-atom energy and forces MSE per dataset), and the methods of
:func:`benchmarks.methods.dataset_task_methods`: nequip's weighted sum (the reference) and
UPGrad with ``tasks: datasets`` (one forward per dataset's sub-batch, or
``forward_per_dataset: false``) or ``tasks: components``, interleaved as above, once per k
(timing only). The table is computed from the raw step times in the json.

    OMP_NUM_THREADS=1 python -m benchmarks.step_cost                    # the full run
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --quick            # ~1 minute
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --profile --methods config --dtypes float64
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --datasets 2 --steps 30 --dtypes float32
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --datasets 2 --quick  # ~30 s

Writes ``benchmarks/results/step_cost.{json,md,png}`` (with ``--datasets``:
``step_cost_datasets.*``; ``--out`` to change).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R
from benchmarks.methods import NEQUIP_CONFIG, WS

# ----------------------------------------------------------------------------- timing


def _trainer(callbacks, steps: int):
    return P.trainer(
        callbacks,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


class Setup:
    """Data, statistics and model configuration shared by every run of one invocation."""

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
            self._dm = P.datamodule(
                self.path,
                self.n_train,
                self.frames - self.n_train,
                self.args.batch_size,
                self.args.r_max,
                shuffle=False,
            )
        return self._dm

    def model(self, dtype: str) -> dict:
        model = P.model_config(dtype, self.stats, **P.model_arguments(self.args))
        if getattr(self.args, "compile", False):
            model["compile_mode"] = "compile"  # nequip's train-time compile
        return model

    def module(self, method: M.Method, dtype: str, num_tasks: int):
        """A fresh training module (the same initial weights every time)."""
        import torch

        torch.manual_seed(0)
        return P.build_module(method, self.model(dtype), num_tasks, lr=self.args.lr)


def _run(
    setup: Setup, method: M.Method, dtype: str, num_tasks: int, steps: int, extra_callbacks=()
):
    """Train ``steps`` batches with a fresh module; per-step wall and CPU times (s)."""
    module = setup.module(method, dtype, num_tasks)
    times = P.StepTimes()
    start, end = P.step_timers(times)
    callbacks = [start, *extra_callbacks, *P.build_callbacks(method), end]
    _trainer(callbacks, steps).fit(module, datamodule=setup.datamodule())
    return {"wall": times.wall, "cpu": times.cpu}, P.num_params(module)


CLOCKS = ("wall", "cpu")


class _Worker:
    """One method training in its own thread, one step per turn.

    The thread runs a normal ``trainer.fit``; callbacks hand control back to the
    scheduler after every step (inside ``on_train_batch_end``, after the clock stopped)
    and wait for the next turn, so exactly one method computes at any time and the
    untimed Lightning bookkeeping between steps never overlaps another method's step.
    """

    def __init__(
        self, setup: Setup, key: str, method: M.Method, dtype: str, num_tasks: int, total_steps: int
    ):
        import threading

        self.key = key
        self.go = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.times = P.StepTimes()
        self.params = 0

        def before_start(batch_idx):
            if batch_idx == 0:  # setup finished: report, wait for the first turn
                self._yield()

        # after the clock stopped, also after the last step: teardown waits for its turn
        start, end = P.step_timers(self.times, before_start, self._yield)

        def body():
            try:
                module = setup.module(method, dtype, num_tasks)
                self.params = P.num_params(module)
                # first at batch start and last at batch end: the method's callbacks are timed
                callbacks = [start, *P.build_callbacks(method), end]
                trainer = _trainer(callbacks, total_steps)
                trainer.fit(module, datamodule=setup.datamodule(fresh=True))
            except BaseException as e:  # noqa: BLE001 - reported by the scheduler
                self.error = e
            finally:
                self.done.set()

        self.thread = threading.Thread(target=body, name=f"bench-{key}", daemon=True)

    def _yield(self) -> None:
        self.done.set()
        self.go.wait()
        self.go.clear()

    def turn(self) -> None:
        """Let the thread run until it yields again (one step, or setup, or teardown)."""
        self.done.clear()
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()
        else:
            self.go.set()
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"{self.key} failed") from self.error


def _interleaved(args, table, setup, dtype: str, num_tasks: int, what: str):
    """Step-level interleaving of ``args.methods`` on ``setup``: step i of every method, in
    a random order per step. Returns ``({clock: {method: step times}}, parameters, load)``
    (the timed steps only; ``load``: the 1-minute load average every 10 steps and at the
    end)."""
    import gc

    total = args.warmup + args.steps
    t_cfg = time.perf_counter()
    workers = {m: _Worker(setup, m, table[m], dtype, num_tasks, total) for m in args.methods}
    for w in workers.values():  # setups, one after the other, up to step 0
        w.turn()
    gc.collect()
    gc.freeze()  # setup objects out of the collector's way during the steps
    rng = random.Random(0)
    load = []
    for i in range(total):
        order = list(args.methods)
        rng.shuffle(order)  # a fresh order per step: no fixed predecessor
        for m in order:
            workers[m].turn()
        if (i + 1) % 10 == 0 or i + 1 == total:
            load.append(round(os.getloadavg()[0], 2))
            print(
                f"[{what}] step {i + 1}/{total} ({time.perf_counter() - t_cfg:.0f} s, "
                f"load {load[-1]:.2f})",
                flush=True,
            )
    for w in workers.values():  # teardown, one after the other
        w.turn()
        w.thread.join()
    gc.unfreeze()
    n_params = workers[args.methods[0]].params
    times = {
        c: {m: getattr(workers[m].times, c)[args.warmup :] for m in args.methods} for c in CLOCKS
    }
    del workers
    gc.collect()
    return times, n_params, load


def _timing_rows(args, table, times, n_params, **fields) -> list[dict]:
    """One result row per method: raw step times, medians, means and the ratios to the
    references (``fields``: the configuration, e.g. ``dtype`` and ``tasks``)."""
    rows = []
    for m in args.methods:
        row = {
            "raw_cpu_s": [round(x, 5) for x in times["cpu"][m]],
            "raw_wall_s": [round(x, 5) for x in times["wall"][m]],
            "method": m,
            "label": table[m].label,
            "family": table[m].family,
            **fields,
            "params": n_params,
            "n_steps": len(times["cpu"][m]),
        }
        for c in CLOCKS:
            ts = times[c][m]
            med = statistics.median(ts)
            row[f"{c}_median_s"] = med
            row[f"{c}_mean_s"] = statistics.fmean(ts)
            for ref, key in ((WS, "vs_weighted_sum"), (NEQUIP_CONFIG, "vs_nequip_config")):
                if ref not in args.methods:
                    continue
                row[f"{c}_{key}"] = med / statistics.median(times[c][ref])
                row[f"{c}_mean_{key}"] = row[f"{c}_mean_s"] / statistics.fmean(times[c][ref])
                # the same batch, a few seconds apart: per-step paired ratios
                paired = [a / b for a, b in zip(ts, times[c][ref])]
                q = statistics.quantiles(paired, n=4)
                row[f"{c}_{key}_paired_iqr"] = [q[0], q[2]]
                row[f"{c}_{key}_paired_median"] = statistics.median(paired)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("raw")}), flush=True)
    return rows


def time_methods(args, table) -> list[dict]:
    """Every method, interleaved step by step, for every dtype and number of tasks."""
    setup = Setup(args)
    results = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            what = f"{dtype} {num_tasks} tasks"
            times, n_params, _ = _interleaved(args, table, setup, dtype, num_tasks, what)
            results += _timing_rows(args, table, times, n_params, dtype=dtype, tasks=num_tasks)
    return results


# ----------------------------------------------------------------------------- datasets

#: the training datasets of ``--datasets``, by name: arguments of the seeded EMT alloy
#: generator (:func:`nequip_mtl.data.generate_frames`, Cu/Ni/Pd; by default 70 % strained
#: bulk cells, 15 % with a vacancy, 15 % surface slabs): the first is the primary dataset
#: (model statistics), the others shift the mix of frames and the compositions
DATASETS = {
    "bulk": {"seed": 0},
    "surfaces": {"seed": 1, "slab_fraction": 0.6, "vacancy_fraction": 0.1},
    "vacancies": {"seed": 2, "slab_fraction": 0.1, "vacancy_fraction": 0.6},
}
#: nequip's per-atom energy and forces MSE for every dataset, coefficient 1 each
DATASET_COEFFS = {"total_energy": 1.0, "forces": 1.0}


class DatasetSetup(Setup):
    """Several EMT alloy training datasets in a ``MultiDatasetDataModule`` with balanced
    batches of ``frames_per_dataset`` frames of each, and a ``PerDatasetLoss``."""

    def __init__(self, args, frames_per_dataset: int):
        self.args = args
        self.k = int(frames_per_dataset)
        self.names = list(DATASETS)[: args.datasets]
        # one file per dataset, for every k: enough frames for the largest k without repeats
        total = args.warmup + args.steps
        self.n_train = max(args.frames_per_dataset) * max(total, args.mem_steps)
        # (+ the 2 validation frames nequip's data module requires; validation is off)
        n = self.n_train + 2
        self.paths = {name: P.alloy_data(n, **DATASETS[name]) for name in self.names}
        self.stats = _primary_statistics(self.paths[self.names[0]], args.r_max)
        self._dm = None

    def datamodule(self, fresh: bool = False):
        from nequip_mtl.data import MultiDatasetDataModule

        if self._dm is None or fresh:
            # the sampler's law is a function of the seed: the same batches for every method
            self._dm = MultiDatasetDataModule(
                seed=1,
                datasets={
                    name: {
                        "split_dataset": {
                            "dataset": P.ase_dataset(path, self.args.r_max),
                            "train": self.n_train,
                            "val": 2,
                        }
                    }
                    for name, path in self.paths.items()
                },
                sampling={
                    "mode": "balanced",
                    "frames_per_batch": {n: self.k for n in self.names},
                },
                train_dataloader={"_target_": "torch.utils.data.DataLoader"},
            )
        return self._dm

    def loss(self) -> dict:
        return {
            "_target_": "nequip_mtl.train.PerDatasetLoss",
            "datasets": list(self.names),
            "coeffs": dict(DATASET_COEFFS),
        }

    def module(self, method: M.Method, dtype: str, num_tasks: int):
        import torch

        torch.manual_seed(0)
        model = self.model(dtype)
        return P.build_module(
            method, model, num_tasks, lr=self.args.lr, loss=self.loss(), num_val=0
        )

    def atoms_per_sub_batch(self) -> dict[str, float]:
        """Mean number of atoms of each dataset's part of the timed batches."""
        from nequip.data import AtomicDataDict

        from nequip_mtl.data.keys import DATASET_INDEX_KEY

        dm = self.datamodule(fresh=True)
        dm.setup("fit")
        counts = {n: 0 for n in self.names}
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


def time_datasets(args, table) -> list[dict]:
    """The dataset-task methods on several datasets, interleaved step by step, for every
    dtype and number of frames per dataset."""
    results = []
    for dtype in args.dtypes:
        for k in args.frames_per_dataset:
            setup = DatasetSetup(args, k)
            atoms = setup.atoms_per_sub_batch()
            tasks = len(setup.names) * len(DATASET_COEFFS)
            what = f"{dtype} {len(setup.names)} datasets x {k} frames"
            times, n_params, load = _interleaved(args, table, setup, dtype, tasks, what)
            results += _timing_rows(
                args,
                table,
                times,
                n_params,
                dtype=dtype,
                tasks=tasks,
                datasets=setup.names,
                frames_per_dataset=k,
                atoms_per_sub_batch=atoms,
                loadavg=load,
            )
    return results


# ----------------------------------------------------------------------------- memory


def _memory_callback(rss: bool):
    """Peak of live torch tensor bytes (torch.profiler memory events) between
    ``on_train_start`` and ``on_train_end``, relative to the level at ``on_train_start``;
    with ``rss``, also the OS view (VmHWM - VmRSS at start, HWM reset at start)."""
    import gc

    import lightning
    from torch.profiler import ProfilerActivity, profile

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
        raise KeyError(key)

    class Peak(lightning.Callback):
        def __init__(self):
            self.result: dict = {}
            self._prof = None

        def on_train_start(self, trainer, pl_module):
            # no collection of earlier runs' garbage inside the window (its frees would
            # offset this run's allocations)
            gc.collect()
            gc.disable()
            if rss:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.result["rss_start_kb"] = status("VmRSS")
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

        def on_train_end(self, trainer, pl_module):
            if rss:
                self.result["rss_hwm_kb"] = status("VmHWM")
                self.result["rss_peak_delta_kb"] = (
                    self.result["rss_hwm_kb"] - self.result["rss_start_kb"]
                )
            self._prof.__exit__(None, None, None)
            events = [
                e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"
            ]
            events.sort(key=lambda e: e.start_ns())
            cur = peak = 0
            for e in events:
                cur += e.nbytes()
                peak = max(peak, cur)
            self.result["torch_peak_kb"] = peak / 1024
            self.result["torch_end_kb"] = cur / 1024
            self._prof = None
            gc.enable()

    return Peak()


def _memory_child(args, table) -> None:
    """Run in a fresh process: one method, one dtype, one task count; print JSON."""
    P.init_torch()
    setup = Setup(args)
    peak = _memory_callback(rss=True)
    _, n_params = _run(
        setup, table[args.method], args.dtypes[0], args.tasks[0], args.mem_steps, [peak]
    )
    print("MEMORY " + json.dumps({**peak.result, "params": n_params}))


def measure_memory(args, table) -> list[dict]:
    """Torch peak in this process (deterministic); RSS high-water marks in fresh
    subprocesses with ``--rss``."""
    setup = Setup(args)
    out = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            rows = []
            for m in args.methods:
                if args.rss:
                    cmd = [
                        sys.executable,
                        "-m",
                        "benchmarks.step_cost",
                        "--_memory-child",
                        "--method",
                        m,
                        "--dtypes",
                        dtype,
                    ]
                    cmd += ["--tasks", str(num_tasks), *_model_argv(args)]
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, env={**os.environ}, cwd=P.ROOT.parent
                    )
                    line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
                    if proc.returncode != 0 or not line:
                        raise RuntimeError(f"memory run of {m} failed:\n{proc.stderr[-3000:]}")
                    res = json.loads(line[0][len("MEMORY ") :])
                else:
                    peak = _memory_callback(rss=False)
                    _, n_params = _run(setup, table[m], dtype, num_tasks, args.mem_steps, [peak])
                    res = {**peak.result, "params": n_params}
                rows.append({"method": m, "dtype": dtype, "tasks": num_tasks, **res})
                print(
                    f"[memory {dtype} {num_tasks} tasks] {m}: torch peak {res['torch_peak_kb'] / 1024:.1f} MiB"
                    + (
                        f", RSS peak {res['rss_peak_delta_kb'] / 1024:.1f} MiB"
                        if "rss_peak_delta_kb" in res
                        else ""
                    ),
                    flush=True,
                )
            for key in ("torch_peak_kb", "rss_peak_delta_kb"):
                by = {r["method"]: r.get(key) for r in rows}
                for r in rows:
                    if r.get(key) is None:
                        continue
                    short = key.split("_")[0]
                    r[f"{short}_mem_vs_weighted_sum"] = r[key] / by[WS] if by.get(WS) else None
                    r[f"{short}_mem_vs_nequip_config"] = (
                        r[key] / by[NEQUIP_CONFIG] if by.get(NEQUIP_CONFIG) else None
                    )
            out += rows
    return out


def _model_argv(args) -> list[str]:
    return [
        "--batch-size",
        str(args.batch_size),
        "--frames",
        str(args.frames),
        "--num-features",
        str(args.num_features),
        "--num-layers",
        str(args.num_layers),
        "--l-max",
        str(args.l_max),
        "--radial-width",
        str(args.radial_width),
        "--r-max",
        str(args.r_max),
        "--steps",
        str(args.steps),
        "--mem-steps",
        str(args.mem_steps),
        "--lr",
        str(args.lr),
    ]


# ----------------------------------------------------------------------------- profile


# regions labelled in --profile mode: (class path, method, label)
_REGIONS = (
    ("nequip.train.NequIPLightningModule", "training_step", "forward + losses"),
    ("nequip.train.ConFIGLightningModule", "_ConFIG_backwards", "backward passes + aggregation"),
    ("nequip.train.ConFIGLightningModule", "_ConFIG_training_step", "step"),
    ("nequip_mtl.train.MultitaskLightningModule", "training_step", "forward + losses"),
    ("nequip_mtl.train.MultitaskLightningModule", "backward", "backward passes"),
    ("nequip_mtl.step.StepEngine", "finish", "aggregation"),
    ("nequip_mtl.train.UncertaintyWeightingLightningModule", "training_step", "forward + losses"),
    ("nequip_mtl.train.FAMOLightningModule", "training_step", "forward + losses"),
    ("lightning.LightningModule", "backward", "backward passes"),
)


def _label_regions() -> None:
    """Wrap the methods in ``_REGIONS`` in ``record_function`` (profiling only)."""
    import functools

    from hydra.utils import get_class
    from torch.profiler import record_function

    for cls_path, name, label in _REGIONS:
        cls = get_class(cls_path)
        if name not in vars(cls):
            continue
        orig = vars(cls)[name]

        def wrapped(*a, __orig=orig, __label=label, **k):
            with record_function(f"region: {__label}"):
                return __orig(*a, **k)

        setattr(cls, name, functools.wraps(orig)(wrapped))


def profile(args, table) -> None:
    """torch.profiler over ``--steps`` training steps of each method (after ``--warmup``
    steps); writes the per-step CPU time of the labelled regions and the top operators."""
    import lightning
    from torch.profiler import ProfilerActivity, profile

    _label_regions()
    setup = DatasetSetup(args, args.frames_per_dataset[0]) if args.datasets else Setup(args)
    dtype, num_tasks = args.dtypes[0], args.tasks[0]
    summary = []
    for m in args.methods:

        class Window(lightning.Callback):
            prof = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == args.warmup:
                    self.prof = profile(activities=[ProfilerActivity.CPU])
                    self.prof.__enter__()

            def on_train_end(self, trainer, pl_module):
                self.prof.__exit__(None, None, None)

        window = Window()
        t, _ = _run(setup, table[m], dtype, num_tasks, args.warmup + args.steps, [window])
        steps = len(t["cpu"]) - args.warmup
        avg = window.prof.key_averages()
        regions = {
            e.key[len("region: ") :]: e.cpu_time_total / 1e3 / steps
            for e in avg
            if e.key.startswith("region: ")
        }
        step_ms = 1e3 * statistics.fmean(t["cpu"][args.warmup :])
        if "backward passes + aggregation" in regions:  # nequip's ConFIG: split its regions
            both = regions.pop("backward passes + aggregation")
            regions["aggregation"] = both - regions["backward passes"]
            # its training_step is the whole step: forward = step - backward/aggregation - update
            update = sum(e.cpu_time_total for e in avg if e.key.startswith("Optimizer.step#"))
            whole = regions.pop("step")
            regions["forward + losses"] = whole - both - update / 1e3 / steps
        keys = ("forward + losses", "backward passes", "aggregation")
        regions = {k: regions.get(k, 0.0) for k in keys}
        regions["rest (optimizer update, Lightning, logging, callbacks)"] = step_ms - sum(
            regions.values()
        )
        summary.append(
            {
                "method": m,
                "label": table[m].label,
                "step_ms_profiled": step_ms,
                "regions_ms": regions,
            }
        )
        txt = avg.table(sort_by="self_cpu_time_total", row_limit=30)
        path = Path(args.out).parent / f"profile_{m}_{dtype}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = f"{m} ({table[m].label}) {dtype} {num_tasks} tasks, {steps} profiled steps; regions (ms/step): "
        path.write_text(head + json.dumps(regions) + "\n" + txt)
        print(
            head + ", ".join(f"{k} {v:.1f}" for k, v in regions.items()) + f"; step {step_ms:.1f}",
            flush=True,
        )
    R.write_json(Path(args.out).parent / f"profile_{dtype}.json", summary)


# ----------------------------------------------------------------------------- output


@functools.lru_cache(maxsize=4)
def _resamples(k: int, n: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """``n`` seeded resamples (with replacement) of ``k`` step indices: the same for every
    pair of series of ``k`` steps."""
    rng = random.Random(seed)
    return tuple(tuple(rng.randrange(k) for _ in range(k)) for _ in range(n))


def _bootstrap(xs, ys, stat, n=2000, seed=0):
    """95% percentile interval of ``stat(xs)/stat(ys)``, resampling paired steps."""
    vals = []
    for idx in _resamples(len(xs), n, seed):
        vals.append(stat([xs[i] for i in idx]) / stat([ys[i] for i in idx]))
    vals.sort()
    return [vals[int(0.025 * n)], vals[int(0.975 * n) - 1]]


def _config(row: dict, method: str) -> tuple:
    """The key of ``method``'s row in the configuration of ``row``."""
    return (method, row["dtype"], row["tasks"], row.get("frames_per_dataset"))


def with_intervals(results: list[dict]) -> list[dict]:
    """Copies of the result rows with bootstrap intervals of the CPU ratios (median and
    mean) from the raw step times."""
    results = [dict(r) for r in results]
    raw = {_config(r, r["method"]): r["raw_cpu_s"] for r in results if "raw_cpu_s" in r}
    for r in results:
        xs = raw.get(_config(r, r["method"]))
        for ref, key in ((WS, "vs_weighted_sum"), (NEQUIP_CONFIG, "vs_nequip_config")):
            ys = raw.get(_config(r, ref))
            if xs and ys and len(xs) == len(ys):
                r[f"cpu_{key}_ci95"] = _bootstrap(xs, ys, statistics.median)
                r[f"cpu_mean_{key}_ci95"] = _bootstrap(xs, ys, statistics.fmean)
    return results


def _with_ci(r, key) -> str:
    v, ci = r.get(key), r.get(f"{key}_ci95")
    if v is None:
        return "n/a"
    return f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


TARGETS = (
    # (methods, reference key, bound, statistic) -- the targets of issue #8
    (("config",), "vs_nequip_config", 1.00, "our ConFIG step <= nequip's ConFIG step"),
    (
        ("mconfig_adam", "mconfig_sgd"),
        "vs_weighted_sum",
        1.15,
        "M-ConFIG step <= 1.15x weighted sum",
    ),
    (
        ("uncertainty", "famo", "softadapt", "dwa", "rlw"),
        "vs_weighted_sum",
        1.05,
        "loss weighting step <= 1.05x weighted sum",
    ),
)


def targets_lines(results) -> list[str]:
    by = {(r["method"], r["dtype"], r["tasks"]): r for r in results}
    configs = sorted({(r["dtype"], r["tasks"]) for r in results})
    lines = [
        "Targets (CPU time; *met* if the ratio of medians is within the bound, *within noise* "
        "if only the 95% interval reaches it; for M-ConFIG, whose step cost alternates between "
        "tasks, the ratio of means is its cost per step):",
        "",
    ]
    for methods, key, bound, text in TARGETS:
        cells = []
        for dtype, tasks in configs:
            for m in methods:
                r = by.get((m, dtype, tasks))
                if r is None or r.get(f"cpu_{key}") is None:
                    continue
                stat = f"cpu_mean_{key}" if m.startswith("mconfig") else f"cpu_{key}"
                v, ci = r[stat], r.get(f"{stat}_ci95")
                verdict = (
                    "met" if v <= bound else ("within noise" if ci and ci[0] <= bound else "MISSED")
                )
                cells.append(f"{r['label']} {dtype}: {_with_ci(r, stat)} ({verdict})")
        if cells:
            lines.append(f"- {text}: " + "; ".join(cells))
    return lines


def markdown(data: dict) -> str:
    if data["meta"]["args"].get("datasets"):
        return datasets_markdown(data)
    meta, memory = data["meta"], data["memory"]
    args, info, elapsed = argparse.Namespace(**meta["args"]), meta["machine"], meta["elapsed_s"]
    results = with_intervals(data["results"])
    mem = {(r["method"], r["dtype"], r["tasks"]): r for r in memory}
    rss = any("rss_peak_delta_kb" in r for r in memory)
    params = results[0]["params"] if results else (memory[0]["params"] if memory else None)
    lines = [
        f"Step cost on {R.machine_line(info)}; {meta['time']}; total {elapsed / 60:.1f} min.",
        "",
        f"NequIP model with {params} parameters (l_max={args.l_max}, {args.num_layers} layers, "
        f"{args.num_features} features, radial MLP 2x{args.radial_width}), batches of "
        f"{args.batch_size} EMT alloy frames (Cu/Ni/Pd, 8-32 atoms); {args.steps} timed steps "
        f"per method after {args.warmup} warm-up steps, interleaved step by step (step i of "
        "every method, on the same batch, in a fresh random order for every i). "
        "Times are CPU time of the (single) compute thread; ratios are ratios of median step "
        "times with a 95% bootstrap interval (paired resampling of steps) in brackets; "
        "*mean* = ratio of mean step times (the cost per step of methods whose work varies "
        "from step to step by design, e.g. M-ConFIG's round-robin backward pass); *wall* = "
        "ratio of median wall-clock step times. "
        f"*Mem* = peak of live torch tensor memory over {args.mem_steps} training steps, above "
        "the level at the start of training (torch.profiler memory events)"
        + (
            "; *RSS* = peak resident-set increase over the same steps in a fresh process."
            if rss
            else "."
        ),
        "",
    ]
    if results:
        lines += [
            "| dtype | tasks | method | CPU ms/step | vs weighted sum | vs nequip ConFIG "
            "| vs weighted sum (mean) | wall vs weighted sum "
            "| mem (MiB) | mem vs weighted sum | mem vs nequip ConFIG"
            + (" | RSS (MiB) | RSS vs weighted sum |" if rss else " |"),
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if rss else ""),
        ]
        for r in results:
            mm = mem.get((r["method"], r["dtype"], r["tasks"]))
            lines.append(
                f"| {r['dtype']} | {r['tasks']} | {r['label']} | {1e3 * r['cpu_median_s']:.0f} "
                f"| {_with_ci(r, 'cpu_vs_weighted_sum')} | {_with_ci(r, 'cpu_vs_nequip_config')} "
                f"| {_with_ci(r, 'cpu_mean_vs_weighted_sum')} | {R.fmt(r.get('wall_vs_weighted_sum'))} "
                + _mem_cells(mm, rss)
            )
        lines += [""] + targets_lines(results)
    else:
        lines += [
            "| dtype | tasks | method | mem (MiB) | mem vs weighted sum | mem vs nequip ConFIG"
            + (" | RSS (MiB) | RSS vs weighted sum |" if rss else " |"),
            "|---|---|---|---|---|---|" + ("---|---|" if rss else ""),
        ]
        for m in memory:
            lines.append(f"| {m['dtype']} | {m['tasks']} | {m['method']} " + _mem_cells(m, rss))
    return "\n".join(lines) + "\n"


def _mem_cells(mm, rss: bool) -> str:
    mm = mm or {}
    cells = (
        f"| {R.fmt(mm.get('torch_peak_kb') and mm['torch_peak_kb'] / 1024, '.1f')} "
        f"| {R.fmt(mm.get('torch_mem_vs_weighted_sum'))} | {R.fmt(mm.get('torch_mem_vs_nequip_config'))} |"
    )
    if rss:
        cells += (
            f" {R.fmt(mm.get('rss_peak_delta_kb') and mm['rss_peak_delta_kb'] / 1024, '.0f')} "
            f"| {R.fmt(mm.get('rss_mem_vs_weighted_sum'))} |"
        )
    return cells


def report(data: dict, out: Path) -> None:
    """``out``.json (meta data, the timing rows with their intervals, the memory rows),
    .md and .png (with timing rows)."""
    results = with_intervals(data["results"])
    R.write_json(out.with_suffix(".json"), {**data, "results": results})
    R.write_text(out.with_suffix(".md"), markdown(data))
    if results and data["meta"]["args"].get("datasets"):
        _plot_datasets(out.with_suffix(".png"), results)
    elif results:
        mem = {(r["method"], r["dtype"], r["tasks"]): r for r in data["memory"]}
        _plot(out.with_suffix(".png"), results, mem)


def _plot(path: Path, results, mem) -> None:
    plt = R.pyplot()
    configs = sorted({(r["dtype"], r["tasks"]) for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    labels = {r["method"]: r["label"] for r in results}
    by = {(r["method"], r["dtype"], r["tasks"]): r for r in results}
    params = results[0]["params"]
    have_mem = bool(mem)
    ncols = 2 if have_mem else 1
    fig, axes = plt.subplots(
        1, ncols, figsize=(7 * ncols, 0.42 * len(methods) + 1.8), squeeze=False
    )
    axes = axes[0]
    h = 0.8 / len(configs)
    for j, cfg in enumerate(configs):
        ys = [i + (j - (len(configs) - 1) / 2) * h for i in range(len(methods))]
        vals = [by[(m, *cfg)].get("cpu_vs_weighted_sum") or 0 for m in methods]
        lo = [
            max(0.0, v - by[(m, *cfg)].get("cpu_vs_weighted_sum_ci95", [v, v])[0])
            for m, v in zip(methods, vals)
        ]
        hi = [
            max(0.0, by[(m, *cfg)].get("cpu_vs_weighted_sum_ci95", [v, v])[1] - v)
            for m, v in zip(methods, vals)
        ]
        axes[0].barh(
            ys,
            vals,
            height=h,
            xerr=[lo, hi],
            error_kw={"lw": 0.6},
            label=f"{cfg[0]}, {cfg[1]} tasks",
        )
        if have_mem:
            mv = [(mem.get((m, *cfg)) or {}).get("torch_mem_vs_weighted_sum") or 0 for m in methods]
            axes[1].barh(ys, mv, height=h, label=f"{cfg[0]}, {cfg[1]} tasks")
    titles = [
        "median step CPU time / weighted-sum step",
        "peak torch training memory / weighted sum",
    ]
    for ax, title in zip(axes, titles):
        ax.set_yticks(range(len(methods)), [labels[m] for m in methods])
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].axvline(1.15, color="tab:red", ls="--", lw=0.8, label="1.15x (M-ConFIG target)")
    axes[0].axvline(1.05, color="tab:orange", ls=":", lw=0.8, label="1.05x (weighting target)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Per-step cost relative to nequip's weighted-sum step ({params} parameters, CPU, 1 thread)"
    )
    fig.tight_layout()
    R.save(fig, path, dpi=110)


# ----------------------------------------------------------------------------- datasets output

#: the target: with 2 datasets and balanced batches, the dataset-task step (sub-batch
#: forwards) is at most this many times the weighted-sum step of the same frames
DATASET_TASK_BOUND = 1.15
DATASET_TASK_METHOD = "upgrad_datasets"


def _raw_ratios(r: dict, ref: dict) -> dict[str, float]:
    """From the raw step times of the json (what the table shows): the median CPU step (s),
    the ratios of medians (CPU, wall) and means (CPU) to the reference row ``ref``, and the
    median and quartiles of the per-step CPU ratios."""
    cpu, ref_cpu = r["raw_cpu_s"], ref["raw_cpu_s"]
    paired = [a / b for a, b in zip(cpu, ref_cpu)]
    q1, _, q3 = statistics.quantiles(paired, n=4)
    return {
        "median_s": statistics.median(cpu),
        "ratio": statistics.median(cpu) / statistics.median(ref_cpu),
        "mean_ratio": statistics.fmean(cpu) / statistics.fmean(ref_cpu),
        "wall_ratio": statistics.median(r["raw_wall_s"]) / statistics.median(ref["raw_wall_s"]),
        "paired_median": statistics.median(paired),
        "paired_q1": q1,
        "paired_q3": q3,
    }


def _ci_text(r: dict, key: str) -> str:
    ci = r.get(f"{key}_ci95")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _load_range(results) -> str:
    load = [x for r in results for x in r.get("loadavg", [])]
    return f"{min(load):.2f}-{max(load):.2f}" if load else "n/a"


def datasets_markdown(data: dict) -> str:
    """The several-datasets table: per dtype and frames per dataset, every method's CPU
    time per step and its ratios to the weighted-sum step of the same batches."""
    meta = data["meta"]
    args, info, elapsed = argparse.Namespace(**meta["args"]), meta["machine"], meta["elapsed_s"]
    results = with_intervals(data["results"])
    names = results[0]["datasets"] if results else list(DATASETS)[: args.datasets]
    mixes = "; ".join(f"`{n}` ({_mix_text(DATASETS[n])})" for n in names)
    lines = [
        f"Step cost with {len(names)} training datasets on {R.machine_line(info)}; "
        f"{meta['time']}; total {elapsed / 60:.1f} min.",
        "",
        f"Command: `{meta.get('command', 'n/a')}`",
        "",
        "Load average (1 min) of the machine, shared with other work, sampled every 10 "
        f"interleaved steps and after the last: {_load_range(results)}; at the end "
        f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_end', []))}. The clock is the "
        "CPU time of the compute thread, which other processes on the machine slow only "
        "through shared caches and memory bandwidth.",
        "",
        f"NequIP model with {results[0]['params'] if results else '?'} parameters "
        f"(l_max={args.l_max}, {args.num_layers} layers, {args.num_features} features, radial "
        f"MLP 2x{args.radial_width}), {args.dtypes and ', '.join(args.dtypes)}"
        f"{_compile_text(args)}. Training data: "
        f"{len(names)} EMT alloy datasets (Cu/Ni/Pd, 8-32 atoms per frame; {mixes}) in a "
        "`MultiDatasetDataModule` with balanced batches (k frames of every dataset in every "
        "batch) and a `PerDatasetLoss` (per-atom energy and forces MSE of every dataset, "
        f"coefficient 1: {len(names) * len(DATASET_COEFFS)} components). {args.steps} timed "
        f"steps per method after {args.warmup} warm-up steps, interleaved step by step (step i "
        "of every method, on the same batch, in a fresh random order for every i). *vs weighted "
        "sum* = ratio of median CPU step times with a 95% bootstrap interval (paired "
        "resampling of steps); *paired* = median and interquartile range of the per-step "
        "ratios (step i of the method over step i of the weighted sum, the same batch); "
        "*mean* = ratio of mean step times; *wall* = ratio of median wall-clock step times. "
        "*Atoms per sub-batch*: the mean number of atoms of each dataset's part of a batch.",
        "",
        "| dtype | frames per dataset | atoms per sub-batch | method | CPU ms/step "
        "| vs weighted sum | paired | vs weighted sum (mean) | wall vs weighted sum |",
        R.md_rule(9),
    ]
    refs = {_config(r, r["method"]): r for r in results if r["method"] == WS}
    cells = []
    for r in results:
        x = _raw_ratios(r, refs[_config(r, WS)])
        atoms = " / ".join(f"{r['atoms_per_sub_batch'][n]:.0f}" for n in names)
        lines.append(
            R.md_row(
                [
                    r["dtype"],
                    r["frames_per_dataset"],
                    atoms,
                    r["label"],
                    f"{1e3 * x['median_s']:.0f}",
                    f"{x['ratio']:.2f}" + _ci_text(r, "cpu_vs_weighted_sum"),
                    f"{x['paired_median']:.2f} [{x['paired_q1']:.2f}, {x['paired_q3']:.2f}]",
                    f"{x['mean_ratio']:.2f}" + _ci_text(r, "cpu_mean_vs_weighted_sum"),
                    f"{x['wall_ratio']:.2f}",
                ]
            )
        )
        if r["method"] == DATASET_TASK_METHOD:
            v, ci, bound = x["ratio"], r.get("cpu_vs_weighted_sum_ci95"), DATASET_TASK_BOUND
            verdict = (
                "met" if v <= bound else ("within noise" if ci and ci[0] <= bound else "MISSED")
            )
            cells.append(
                f"{r['dtype']}, k = {r['frames_per_dataset']}: {v:.2f}"
                f"{_ci_text(r, 'cpu_vs_weighted_sum')} ({verdict})"
            )
    if cells:
        lines += [
            "",
            f"Target (issue 18 item 5; with {len(names)} datasets): the dataset-task step "
            f"(UPGrad, `tasks: datasets`, sub-batch forwards) <= {DATASET_TASK_BOUND}x the "
            "weighted-sum step of the same frames (*met* if the ratio of medians is within the "
            "bound, *within noise* if only the 95% interval reaches it): " + "; ".join(cells),
        ]
    return "\n".join(lines) + "\n"


def _compile_text(args) -> str:
    if not getattr(args, "compile", False):
        return ", eager (no train-time compile)"
    return (
        ", under nequip's train-time compile (`compile_mode: compile`; each method's model "
        "compiled during its warm-up steps)"
    )


def _mix_text(generator: dict) -> str:
    slab = generator.get("slab_fraction", 0.15)
    vac = generator.get("vacancy_fraction", 0.15)
    return (
        f"seed {generator['seed']}, {100 * (1 - slab - vac):.0f} % bulk, "
        f"{100 * vac:.0f} % vacancy, {100 * slab:.0f} % slab frames"
    )


def _plot_datasets(path: Path, results) -> None:
    """Ratio to the weighted-sum step per method, grouped by frames per dataset."""
    plt = R.pyplot()
    groups = list(dict.fromkeys((r["dtype"], r["frames_per_dataset"]) for r in results))
    methods = [m for m in dict.fromkeys(r["method"] for r in results) if m != WS]
    labels = {r["method"]: r["label"] for r in results}
    by = {(r["method"], r["dtype"], r["frames_per_dataset"]): r for r in results}
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) * len(methods) / 2 + 3, 4.2))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * w for i in range(len(groups))]
        rows = [by[(m, *g)] for g in groups]
        vals = [r["cpu_vs_weighted_sum"] for r in rows]
        cis = [r.get("cpu_vs_weighted_sum_ci95", [v, v]) for r, v in zip(rows, vals)]
        err = [
            [max(0.0, v - c[0]) for v, c in zip(vals, cis)],
            [max(0.0, c[1] - v) for v, c in zip(vals, cis)],
        ]
        ax.bar(xs, vals, width=w, yerr=err, error_kw={"lw": 0.8}, label=labels[m])
    ax.set_xticks(
        range(len(groups)),
        [f"{d}, {k} frames/dataset\n({len(results[0]['datasets'])} datasets)" for d, k in groups],
    )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(DATASET_TASK_BOUND, color="tab:red", ls="--", lw=0.8, label="1.15x (target)")
    top = max(r["cpu_vs_weighted_sum_ci95"][1] for r in results if "cpu_vs_weighted_sum_ci95" in r)
    ax.set_ylim(0, 1.45 * top)  # room for the legend above the bars
    ax.set_ylabel("median step CPU time / weighted-sum step")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(
        f"Dataset tasks vs nequip's weighted sum ({results[0]['params']} parameters, CPU, 1 thread)"
    )
    fig.tight_layout()
    R.save(fig, path, dpi=110)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small model, 6 timed steps, float32 only"
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[3], choices=[2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    P.add_run_arguments(
        parser,
        frames=200,
        frames_help="frames generated (>= batch*(steps+1)+1)",
        num_layers=3,
        radial_width=64,
        lr=1e-3,
    )
    dataset_methods = list(M.dataset_task_methods())
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(dict.fromkeys(M.ALL_METHODS + dataset_methods)),
        help=f"default: {' '.join(M.DEFAULT_METHODS)}; with --datasets: {' '.join(dataset_methods)}",
    )
    parser.add_argument(
        "--datasets",
        type=int,
        default=None,
        choices=[2, 3],
        help="several training datasets (balanced batches, per-dataset loss): the dataset-task "
        "methods against nequip's weighted sum; writes results/step_cost_datasets by default",
    )
    parser.add_argument(
        "--frames-per-dataset",
        type=int,
        nargs="+",
        default=[4, 8, 16],
        help="with --datasets: frames of each dataset per batch, one configuration each",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train-time compile (the model's `compile_mode: compile`); compiled during the "
        "warm-up steps, which are not timed",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurements")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument(
        "--rss", action="store_true", help="also RSS high-water marks, one fresh process each"
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler table per method instead"
    )
    parser.add_argument("--out", default=None, help="default results/step_cost")
    R.add_from_json(parser)
    parser.add_argument(
        "--_memory-child", dest="_memory_child", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument("--method", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    if args.datasets:
        return _main_datasets(parser, args, argv)
    args.methods = args.methods or M.DEFAULT_METHODS
    args.out = args.out or str(P.RESULTS / "step_cost")
    if args.quick:
        args.num_features, args.l_max, args.num_layers, args.radial_width = 16, 1, 2, 32
        args.steps, args.dtypes, args.mem_steps = 6, ["float32"], 3
        if args.out == str(P.RESULTS / "step_cost"):
            args.out = str(P.TMP / "step_cost_quick")
    # calibrate-then-freeze calibrates during the warm-up: the timed steps are after it
    table = M.methods(interval="batch", calibration_steps=max(args.warmup, 1))
    if args._memory_child:
        _memory_child(args, table)
        return
    # the two references first, whatever was asked for
    args.methods = [WS, NEQUIP_CONFIG] + [
        m for m in dict.fromkeys(args.methods) if m not in (WS, NEQUIP_CONFIG)
    ]
    missing = M.missing_methods(args.methods, table)
    for m, bad in missing.items():
        print(f"SKIPPING {m}: cannot import {bad}", flush=True)
    args.methods = [m for m in args.methods if m not in missing]

    P.init_torch()
    if args.profile:
        profile(args, table)
        return
    info = P.machine_info()
    t0 = time.perf_counter()
    results = [] if args.memory_only else time_methods(args, table)
    memory = [] if args.no_memory else measure_memory(args, table)
    elapsed = time.perf_counter() - t0
    date = P.now()
    info = {**info, "loadavg_end": os.getloadavg(), "missing_methods": missing, "date": date}
    meta = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "time": date,
        "elapsed_s": elapsed,
    }
    report({"meta": meta, "results": results, "memory": memory}, Path(args.out))


def _main_datasets(parser, args, argv: list[str]) -> None:
    """``--datasets``: the dataset-task methods on several training datasets."""
    for flag in ("memory_only", "rss", "_memory_child"):
        if getattr(args, flag):
            parser.error(f"--{flag.strip('_').replace('_', '-')} does not apply with --datasets")
    table = M.dataset_task_methods()
    wrong = [m for m in args.methods or [] if m not in table]
    if wrong:
        parser.error(
            f"--methods {wrong} are not dataset-task methods; with --datasets: {list(table)}"
        )
    # the reference first, whatever was asked for
    args.methods = [WS] + [m for m in dict.fromkeys(args.methods or table) if m != WS]
    args.no_memory = True  # the timing only (the memory study is the single-dataset one)
    default_out = str(P.RESULTS / "step_cost_datasets")
    args.out = args.out or default_out
    if args.quick:
        args.num_features, args.l_max, args.num_layers, args.radial_width = 16, 1, 2, 32
        args.steps, args.dtypes, args.frames_per_dataset = 6, ["float32"], [2, 4]
        if args.out == default_out:
            args.out = str(P.TMP / "step_cost_datasets_quick")
    P.init_torch()
    if args.profile:
        profile(args, table)
        return
    info = P.machine_info()
    t0 = time.perf_counter()
    results = time_datasets(args, table)
    elapsed = time.perf_counter() - t0
    date = P.now()
    meta = {
        "machine": {**info, "loadavg_end": os.getloadavg(), "date": date},
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "command": R.command("step_cost", argv),
        "time": date,
        "elapsed_s": elapsed,
    }
    report({"meta": meta, "results": results, "memory": []}, Path(args.out))


if __name__ == "__main__":
    main()

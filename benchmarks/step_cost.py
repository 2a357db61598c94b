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

    OMP_NUM_THREADS=1 python -m benchmarks.step_cost                    # the full run
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --quick            # ~1 minute
    OMP_NUM_THREADS=1 python -m benchmarks.step_cost --profile --methods config --dtypes float64

Writes ``benchmarks/results/step_cost.{json,md,png}`` (``--out`` to change).
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
        return P.model_config(dtype, self.stats, **P.model_arguments(self.args))

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


def time_methods(args, table) -> list[dict]:
    """Step-level interleaving: step i of every method, in a random order per step."""
    import gc

    setup = Setup(args)
    total = args.warmup + args.steps
    results = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            t_cfg = time.perf_counter()
            workers = {
                m: _Worker(setup, m, table[m], dtype, num_tasks, total) for m in args.methods
            }
            for w in workers.values():  # setups, one after the other, up to step 0
                w.turn()
            gc.collect()
            gc.freeze()  # setup objects out of the collector's way during the steps
            rng = random.Random(0)
            for i in range(total):
                order = list(args.methods)
                rng.shuffle(order)  # a fresh order per step: no fixed predecessor
                for m in order:
                    workers[m].turn()
                if (i + 1) % 10 == 0:
                    print(
                        f"[{dtype} {num_tasks} tasks] step {i + 1}/{total} ({time.perf_counter() - t_cfg:.0f} s, "
                        f"load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
            for w in workers.values():  # teardown, one after the other
                w.turn()
                w.thread.join()
            gc.unfreeze()
            n_params = workers[args.methods[0]].params
            times = {
                c: {m: getattr(workers[m].times, c)[args.warmup :] for m in args.methods}
                for c in CLOCKS
            }
            del workers
            gc.collect()
            for m in args.methods:
                row = {
                    "raw_cpu_s": [round(x, 5) for x in times["cpu"][m]],
                    "raw_wall_s": [round(x, 5) for x in times["wall"][m]],
                    "method": m,
                    "label": table[m].label,
                    "family": table[m].family,
                    "dtype": dtype,
                    "tasks": num_tasks,
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
                        row[f"{c}_mean_{key}"] = row[f"{c}_mean_s"] / statistics.fmean(
                            times[c][ref]
                        )
                        # the same batch, a few seconds apart: per-step paired ratios
                        paired = [a / b for a, b in zip(ts, times[c][ref])]
                        q = statistics.quantiles(paired, n=4)
                        row[f"{c}_{key}_paired_iqr"] = [q[0], q[2]]
                        row[f"{c}_{key}_paired_median"] = statistics.median(paired)
                results.append(row)
                print(
                    json.dumps({k: v for k, v in row.items() if not k.startswith("raw")}),
                    flush=True,
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
    ("nequip_mtl.train.MultitaskLightningModule", "_apply_aggregated_update", "aggregation"),
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
    setup = Setup(args)
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


def with_intervals(results: list[dict]) -> list[dict]:
    """Copies of the result rows with bootstrap intervals of the CPU ratios (median and
    mean) from the raw step times."""
    results = [dict(r) for r in results]
    raw = {
        (r["method"], r["dtype"], r["tasks"]): r["raw_cpu_s"] for r in results if "raw_cpu_s" in r
    }
    for r in results:
        xs = raw.get((r["method"], r["dtype"], r["tasks"]))
        for ref, key in ((WS, "vs_weighted_sum"), (NEQUIP_CONFIG, "vs_nequip_config")):
            ys = raw.get((ref, r["dtype"], r["tasks"]))
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
    if results:
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
    parser.add_argument("--methods", nargs="+", default=M.DEFAULT_METHODS, choices=M.ALL_METHODS)
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
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
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


if __name__ == "__main__":
    main()

"""Cost of the aggregation math alone (no backward passes), per training step.

What a gradient-aggregation step adds on top of its backward passes: zeroing the task
rows, the m x m Gram matrix, the aggregator's weights, and writing the combined update,
for every aggregator, 2 and 3 tasks, float32 and float64, 1e5 and 1e6 parameters.
Compare with the step times in ``step_cost.md`` (issue target: < 5% of a step).

    OMP_NUM_THREADS=1 python benchmarks/aggregation_cost.py

Writes ``benchmarks/results/aggregation_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import nequip_mtl.aggregators as aggregators  # noqa: E402
from nequip_mtl.step import TaskGradients  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _aggregators() -> list[type]:
    return [
        getattr(aggregators, n)
        for n in aggregators.__all__
        if inspect.isclass(getattr(aggregators, n))
        and issubclass(getattr(aggregators, n), aggregators.Aggregator)
        and n not in ("Aggregator", "GramAggregator")
    ]


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _one_step(cls, storage: TaskGradients, tasks: list[int], coeffs: torch.Tensor):
    """What the training module does per step besides the backward passes."""
    agg = cls()

    def step():
        if isinstance(agg, aggregators.GramAggregator):
            gram = storage.gram(tasks)
            storage.apply_weights(tasks, agg.weights(gram, coeffs, source_dtype=storage.dtype))
        else:
            selected = agg.select_tasks(len(tasks)) or list(range(len(tasks)))
            computed = [tasks[j] for j in selected]
            storage.gram(computed)  # the module's fault check
            matrix = storage.matrix(computed)
            storage.apply_update(agg.aggregate_subset(matrix, coeffs.to(matrix), selected))

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(RESULTS / "aggregation_cost"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    rows = []
    for n in args.params:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            params = [torch.nn.Parameter(torch.zeros(n // 8, dtype=dtype)) for _ in range(8)]
            for m in args.tasks:
                storage = TaskGradients(params, m)
                gen = torch.Generator().manual_seed(0)
                tasks = list(range(m))
                coeffs = torch.full((m,), 1.0 / m, dtype=torch.float64)
                zero_ms = _median_ms(storage.zero_, args.repeats)  # once per step, any method
                for g in storage.groups:
                    g.rows.copy_(torch.randn(g.rows.shape, generator=gen, dtype=dtype))
                for cls in _aggregators():
                    ms = zero_ms + _median_ms(_one_step(cls, storage, tasks, coeffs), args.repeats)
                    row = {
                        "params": n,
                        "dtype": dtype_name,
                        "tasks": m,
                        "aggregator": cls.__name__,
                        "ms": ms,
                    }
                    rows.append(row)
                    print(json.dumps(row))

    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    names = [c.__name__ for c in _aggregators()]
    header = "| params | dtype | tasks | " + " | ".join(names) + " |"
    lines = [
        f"Aggregation math per step (ms, median of {args.repeats}; zero rows + Gram + weights + "
        f"combined update), {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
        f"{meta['time']}",
        "",
        header,
        "|" + "---|" * (3 + len(names)),
    ]
    for n in args.params:
        for d in args.dtypes:
            for m in args.tasks:
                cells = [
                    f"{r['ms']:.2f}"
                    for name in names
                    for r in rows
                    if (r["params"], r["dtype"], r["tasks"], r["aggregator"]) == (n, d, m, name)
                ]
                lines.append(f"| {n:.0e} | {d} | {m} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

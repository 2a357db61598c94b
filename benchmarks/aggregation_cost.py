"""Cost of the aggregation math alone (no backward passes), per training step.

What a gradient-aggregation step adds on top of its backward passes: zeroing the task
rows, the m x m Gram matrix, the aggregator's weights, and writing the combined update,
for every aggregator, 2 and 3 tasks, float32 and float64, 1e5 and 1e6 parameters.
Compare with the step times in ``step_cost.md`` (target: < 5% of a step).

    OMP_NUM_THREADS=1 python -m benchmarks.aggregation_cost

Writes ``benchmarks/results/aggregation_cost.{json,md}``; ``--from-json`` rewrites the md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _one_step(cls, storage, num_tasks: int, coeffs):
    """What the training module does per step besides the backward passes (the rows of
    the tasks back-propagated are rows ``0 ..`` of the storage)."""
    import nequip_mtl.aggregators as aggregators

    agg = cls()

    def step():
        if isinstance(agg, aggregators.GramAggregator):
            gram = storage.gram(num_tasks)
            storage.apply_weights(agg.weights(gram, coeffs, source_dtype=storage.dtype))
        else:
            selected = agg.select_tasks(num_tasks) or list(range(num_tasks))
            storage.gram(len(selected))  # the module's fault check
            matrix = storage.matrix(len(selected))
            storage.apply_update(agg.aggregate_subset(matrix, coeffs.to(matrix), selected))

    return step


def run(args) -> dict:
    """The median time of one aggregation step per (parameters, dtype, tasks, aggregator)."""
    import torch

    from nequip_mtl.step import TaskGradients

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rows = []
    for n in args.params:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            params = [torch.nn.Parameter(torch.zeros(n // 8, dtype=dtype)) for _ in range(8)]
            for m in args.tasks:
                storage = TaskGradients(params, m)
                gen = torch.Generator().manual_seed(0)
                coeffs = torch.full((m,), 1.0 / m, dtype=torch.float64)
                zero_ms = _median_ms(storage.zero_, args.repeats)  # once per step, any method
                for g in storage.groups:
                    g.rows.copy_(torch.randn(g.rows.shape, generator=gen, dtype=dtype))
                for cls in M.aggregator_classes():
                    ms = zero_ms + _median_ms(_one_step(cls, storage, m, coeffs), args.repeats)
                    row = {"params": n, "dtype": dtype_name, "tasks": m,
                           "aggregator": cls.__name__, "ms": ms}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row))
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "time": P.now(), "repeats": args.repeats}  # fmt: skip
    return {"meta": meta, "results": rows}


def markdown(data: dict) -> str:
    meta, rows = data["meta"], data["results"]

    def values(key):
        return list(dict.fromkeys(r[key] for r in rows))

    names = values("aggregator")
    ms = {(r["params"], r["dtype"], r["tasks"], r["aggregator"]): r["ms"] for r in rows}
    table = R.md_table(
        ["params", "dtype", "tasks", *names],
        [[f"{n:.0e}", d, m, *(f"{ms[(n, d, m, a)]:.2f}" for a in names if (n, d, m, a) in ms)]
         for n in values("params") for d in values("dtype") for m in values("tasks")],
    )  # fmt: skip
    return "\n".join([
        f"Aggregation math per step (ms, median of {meta['repeats']}; zero rows + Gram + weights + "
        f"combined update), {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
        f"{meta['time']}", "", *table,
    ]) + "\n"  # fmt: skip


def report(data: dict, out: Path) -> None:
    R.write_text(out.with_suffix(".md"), markdown(data))


def main(argv=None):
    parser = P.study_parser(__doc__, jobs=False)
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    if args.quick:
        args.params, args.repeats = [10_000], 3
    out = Path(P.out_path(args, "aggregation_cost"))
    data = run(args)
    R.write_json(out.with_suffix(".json"), data)
    report(data, out)


if __name__ == "__main__":
    main()

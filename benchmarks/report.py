"""The benchmarks' reports: statistics, tables, fronts, figures, JSON, and the results' renderer.

Every study writes its raw runs and meta data to ``<out>.json`` and renders its Markdown
tables and figures from that json alone, so a committed result is rewritten without
training by the study's ``--from-json`` (one implementation: :func:`add_from_json`,
:func:`from_json`)::

    python -m benchmarks.pareto --from-json benchmarks/results/pareto_ethanol.json \\
        --out /tmp/pareto_ethanol

The committed results are rendered once more, into ``docs/benchmarks.md``, between
``<!-- generated: <name> -->`` and ``<!-- end generated -->`` (``<name>``: a results json's
stem); this module's command checks and rewrites them::

    python -m benchmarks.report --check    # every results .md and docs section is its json's
    python -m benchmarks.report --write    # rewrite every results .md from its json
    python -m benchmarks.report --docs     # rewrite the generated sections of the docs

No torch or Lightning import here; matplotlib only inside :func:`pyplot`.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import random
import re
import shlex
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- statistics


def mean_sd(xs) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (0 for one value)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(v: tuple[float | None, float | None], factor: float = 1.0, spec: str = ".1f") -> str:
    """``mean ± sd`` of a :func:`mean_sd` pair times ``factor``; ``n/a`` without values."""
    mean, sd = v
    if mean is None:
        return "n/a"
    return f"{mean * factor:{spec}} ± {sd * factor:{spec}}"


def fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def mean_curve(runs: list[dict], metric: str, grid):
    """The geometric mean over runs of ``metric`` along their ``curve`` against the training
    clock, interpolated on ``grid`` (NaN where some run has no point yet)."""
    import numpy as np

    ys = []
    for r in runs:
        pts = sorted((p["clock_s"], p[metric]) for p in r["curve"] if p.get(metric) is not None)
        if pts:
            x, y = np.array(pts).T
            ys.append(np.interp(grid, x, np.log(y), left=np.nan))
    if not ys:
        return None
    ys = np.array(ys)
    ok = ~np.isnan(ys).any(axis=0)  # only where every seed has a point
    out = np.full(grid.shape, np.nan)
    out[ok] = np.exp(ys[:, ok].mean(axis=0))
    return out


@functools.lru_cache(maxsize=4)
def _resamples(k: int, n: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """``n`` seeded resamples (with replacement) of ``k`` indices: the same for every pair
    of series of ``k`` values."""
    rng = random.Random(seed)
    return tuple(tuple(rng.randrange(k) for _ in range(k)) for _ in range(n))


def bootstrap(xs, ys, stat, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of ``stat(xs) / stat(ys)``, resampling paired values."""
    vals = sorted(stat([xs[i] for i in idx]) / stat([ys[i] for i in idx])
                  for idx in _resamples(len(xs), n, seed))  # fmt: skip
    return [vals[int(0.025 * n)], vals[int(0.975 * n) - 1]]


#: the step-cost studies' references: ratio name -> the reference method
REFERENCES = {"vs_weighted_sum": "ws", "vs_nequip_config": "config_nequip"}


def config_key(row: dict, method: str) -> tuple:
    """The key of ``method``'s step-cost row in the configuration of ``row``."""
    return (method, row["dtype"], row["tasks"], row.get("frames_per_dataset"))


def with_intervals(results: list[dict]) -> list[dict]:
    """Copies of step-cost result rows with bootstrap intervals of their CPU-time ratios to
    the :data:`REFERENCES` (ratio of medians and of means), from the raw step times."""
    results = [dict(r) for r in results]
    raw = {config_key(r, r["method"]): r["raw_cpu_s"] for r in results if "raw_cpu_s" in r}
    for r in results:
        xs = raw.get(config_key(r, r["method"]))
        for key, ref in REFERENCES.items():
            ys = raw.get(config_key(r, ref))
            if xs and ys and len(xs) == len(ys):
                r[f"cpu_{key}_ci95"] = bootstrap(xs, ys, statistics.median)
                r[f"cpu_mean_{key}_ci95"] = bootstrap(xs, ys, statistics.fmean)
    return results


# ----------------------------------------------------------------------------- summaries


def summarize(runs, methods, key, metrics) -> list[dict]:
    """Per method: mean and sd over seeds of every metric at ``key`` (``budget`` or
    ``epochs``), the mean steps and epochs, and how many runs reached it."""
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {"method": m, "n": len(rs), "n_reached": sum(r[key] is not None for r in rs)}
        for metric in metrics:
            row[metric] = mean_sd([r[key][metric] if r[key] else None for r in rs])
        row["steps"] = mean_sd([r[key]["step"] if r[key] else None for r in rs])[0]
        row["epoch"] = mean_sd([r[key]["epoch"] if r[key] else None for r in rs])[0]
        rows.append(row)
    return rows


def sorted_by(rows, metric: str = "forces_mae") -> list[dict]:
    """The rows sorted by their mean ``metric`` (rows without one last)."""
    return sorted(rows, key=lambda r: (r[metric][0] is None, r[metric][0] or 0))


def cells(r, metrics) -> list[str]:
    """The metric cells (mean ± sd in meV), the steps and the epochs of a summary row."""
    return [
        *(pm(r[k], metrics[k][1]) for k in metrics),
        "n/a" if r["steps"] is None else f"{r['steps']:.0f}",
        "n/a" if r["epoch"] is None else f"{r['epoch']:.1f}",
    ]


def header(metrics) -> list[str]:
    """The metric columns' titles: ``name (unit)``."""
    return [f"{name} ({unit})" for name, _, unit in metrics.values()]


# ----------------------------------------------------------------------------- fronts


def classify(rows: list[dict], baselines, objectives) -> dict[str, dict]:
    """Every row against the front of the ``baselines`` (the swept weighted sums no other
    beats on both ``objectives``, means): ``{"status": front|beyond|on|dominated, "by":
    baselines better on both, "beats": front points it is better on both than}``."""

    def better(a, b):
        return all(a[k][0] < b[k][0] for k in objectives)

    ws = [r for r in rows if r["method"] in baselines and r[objectives[0]][0] is not None]
    front = [w for w in ws if not any(better(v, w) for v in ws if v is not w)]
    out = {}
    for r in rows:
        if any(r[k][0] is None for k in objectives):
            out[r["method"]] = {"status": "n/a", "by": [], "beats": []}
            continue
        by = [w["method"] for w in ws if w is not r and better(w, r)]
        beats = [w["method"] for w in front if w is not r and better(r, w)]
        if r["method"] in baselines:
            status = "dominated" if by else "front"
        else:
            status = "dominated" if by else ("beyond" if beats else "on")
        out[r["method"]] = {"status": status, "by": by, "beats": beats}
    return out


def place(s: dict, short: Callable[[str], str], baseline: bool) -> str:
    """A row's place against the front, as a table cell: ``dominated by <short names>``,
    ``beyond (beats <...>)``, ``on``, ``front``."""
    out = s["status"]
    if s["by"]:
        out += " by " + ", ".join(short(m) for m in s["by"])
    elif s["beats"] and not baseline:
        out += " (beats " + ", ".join(short(m) for m in s["beats"]) + ")"
    return out


def front_points(rows: list[dict], metrics, x: str, y: str) -> list[dict]:
    """The plotted points, in display units: mean and sd per method of the ``x`` (as
    ``energy``) and ``y`` (as ``force``) metrics."""
    fx, fy = metrics[x][1], metrics[y][1]
    return [{"method": r["method"], "energy": r[x][0] * fx, "energy_sd": r[x][1] * fx,
             "force": r[y][0] * fy, "force_sd": r[y][1] * fy}
            for r in rows if r[x][0] is not None and r[y][0] is not None]  # fmt: skip


# ----------------------------------------------------------------------------- Markdown


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_rule(n: int) -> str:
    return "|---" * n + "|"


def md_table(head, rows) -> list[str]:
    """A Markdown table: the header row, the rule, one line per row of cells."""
    return [md_row(head), md_rule(len(head)), *(md_row(r) for r in rows)]


def machine_line(info: dict) -> str:
    return (
        f"{info.get('Model name', platform.machine())}, {info.get('CPU(s)', info['cpu_count'])} vCPU "
        f"({info.get('Hypervisor vendor', 'bare metal')} VM), {info.get('mem_total_gib', '?')} GiB RAM, "
        f"torch {info['torch']}, nequip {info.get('nequip', '?')}, lightning {info['lightning']}, "
        f"{info['torch_threads']} torch thread(s), load avg at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
    )


def preamble(what: str, meta: dict, jobs, command: str | None, *paragraphs: str) -> list[str]:
    """The lines before a study's tables: what ran on which machine, when, for how long
    (``jobs`` runs at a time, if given), its command line, then ``paragraphs``."""
    at = "" if jobs is None else f" ({jobs} run(s) at a time)"
    lines = [f"{what} on {machine_line(meta['machine'])}; {meta['time']}; total "
             f"{meta['elapsed_s'] / 60:.1f} min{at}.", ""]  # fmt: skip
    if command:
        lines += [f"Command: `{command}`", ""]
    for text in paragraphs:
        lines += [text, ""]
    return lines


def command(study: str, argv: list[str], omp: bool = True) -> str:
    """The command line of a study run from the repository root."""
    prefix = "OMP_NUM_THREADS=1 " if omp else ""
    return f"{prefix}python -m benchmarks.{study} {shlex.join(argv)}".rstrip()


def commands(study: str, a: dict) -> str:
    """The command line of a study (``a["argv"]``), and of each part that resumed it
    (``a["resumed_argv"]``), for a report's ``Command:`` line."""
    return command(study, a["argv"], omp=False) + "".join(
        f"`; resumed with `{command(study, v, omp=False)}" for v in a.get("resumed_argv", [])
    )


def write_text(path: Path, text: str, echo: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if echo:
        print(text)


# ----------------------------------------------------------------------------- JSON


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def add_from_json(parser, many: bool = False, what: str = "the md/png outputs") -> None:
    """``--from-json``: no run, only the report from a saved json (``many``: several)."""
    parser.add_argument("--from-json", nargs="+" if many else None,
                        help=f"only rewrite {what} from {'these json files' if many else 'this json'}")  # fmt: skip


def from_json(paths: str | list[str], out: str | None, report: Callable[[dict, Path], None],
              out_is_dir: bool = False) -> None:  # fmt: skip
    """``report(data, out)`` for every saved json: ``out`` is ``--out`` (a path without
    suffix, or with ``out_is_dir`` a folder for ``<stem>.*``), by default beside the json."""
    for path in [paths] if isinstance(paths, str) else paths:
        if out is None:
            dest = Path(path).with_suffix("")
        elif out_is_dir:
            dest = Path(out) / Path(path).stem
        else:
            dest = Path(out).with_suffix("")
        report(read_json(path), dest)


# ----------------------------------------------------------------------------- figures


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 100) -> Path:
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_front(
    views: list[tuple[str, list[dict]]], labels: dict[str, str], title: str, metrics, *, x: str,
    y: str, sweep: list[str], baselines: list[str], what: str = "validation",
):  # fmt: skip
    """One log-log panel per view: mean ± sd of ``x`` and ``y`` per method (the marker's
    ``gid``: the method key), the ``sweep`` joined by a line; the figure, not saved."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(views), figsize=(8 * len(views), 6.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (view, rows) in zip(axes[0], views):
        status = classify(rows, baselines, (x, y))
        points = {p["method"]: p for p in front_points(rows, metrics, x, y)}
        line = [points[m] for m in sweep if m in points]
        ax.plot([p["energy"] for p in line], [p["force"] for p in line], "-", color="0.6", lw=1)
        ours = [m for m in points if m not in baselines]
        for m, p in points.items():
            if m in baselines:
                style = {"fmt": "s" if m in sweep else "D", "color": "k", "ms": 7}
            else:
                style = {"fmt": "o", "color": cmap(ours.index(m) % 10), "ms": 7}
            container = ax.errorbar(
                p["energy"], p["force"], xerr=p["energy_sd"], yerr=p["force_sd"], capsize=3,
                label=f"{labels[m]} ({status[m]['status']})", **style,
            )  # fmt: skip
            container[0].set_gid(m)  # the data marker's line
            ax.annotate(labels[m].replace("weighted sum ", ""), (p["energy"], p["force"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{what} {metrics[x][0]} ({metrics[x][2]})")
        ax.set_ylabel(f"{what} {metrics[y][0]} ({metrics[y][2]})")
        ax.set_title(view)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    path: Path, runs: list[dict], panels: list[tuple[str, list[str]]], labels: dict[str, str],
    metrics, budget_s: float, style: Callable[[str, int], tuple], *, clock: str = "cpu",
    lr_run: dict | None = None, title: str | None = None,
) -> None:  # fmt: skip
    """Validation error against training time (geometric mean over seeds): a row per
    ``(title, methods)`` of ``panels``, a column per metric, ``style(method, j)`` its
    ``(colour, line style, width)``; ``lr_run``'s learning rate in a last column."""
    import numpy as np

    plt = pyplot()
    ncol = len(metrics) + (lr_run is not None)
    fig, axes = plt.subplots(len(panels), ncol, figsize=(6.3 * ncol, 5.3 * len(panels)),
                             squeeze=False)  # fmt: skip
    grid = np.linspace(0, budget_s, 100)
    xlabel = f"training {'CPU' if clock == 'cpu' else 'wall-clock'} time (s)"
    for (name, methods), row in zip(panels, axes):
        for j, m in enumerate(methods):
            color, line, lw = style(m, j)
            for ax, metric in zip(row, metrics):
                y = mean_curve([r for r in runs if r["method"] == m], metric, grid)
                if y is not None:
                    ax.plot(grid, y * metrics[metric][1], line, color=color, lw=lw,
                            label=labels[m])  # fmt: skip
        for ax, metric in zip(row, metrics):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"validation {metrics[metric][0]} ({metrics[metric][2]})")
            ax.set_title(name)
            ax.grid(alpha=0.3, which="both")
        row[len(metrics) - 1].legend(fontsize=7, loc="upper right")
    if lr_run is not None:
        for row in axes[1:]:  # the learning rate in the first row only
            row[-1].set_visible(False)
        pts = [(p["clock_s"], p["lr"]) for p in lr_run["curve"] if p.get("lr") is not None]
        ax = axes[0][-1]
        if pts:
            ax.plot(*zip(*pts), "k.-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"learning rate ({labels[lr_run['method']]}, seed {lr_run['seed']})")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def plot_step_ratios(path: Path, results: list[dict], config, memory=(), title: str = "") -> None:
    """Per method (a row) its median step CPU time over the weighted sum's with its 95%
    interval, one bar per configuration (``config(row)``: its label); with ``memory`` rows,
    their peak memory over the weighted sum's beside."""
    plt = pyplot()
    configs = list(dict.fromkeys(config(r) for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    by = {(r["method"], config(r)): r for r in results}
    mem_by = {(r["method"], config(r)): r for r in memory}
    ncols = 2 if memory else 1
    fig, axes = plt.subplots(
        1, ncols, figsize=(3 + 7 * ncols, 0.42 * len(methods) + 1.8), squeeze=False
    )
    h = 0.8 / len(configs)
    for j, cfg in enumerate(configs):
        ys = [i + (j - (len(configs) - 1) / 2) * h for i in range(len(methods))]
        vals = [by[(m, cfg)].get("cpu_vs_weighted_sum") or 0 for m in methods]
        cis = [by[(m, cfg)].get("cpu_vs_weighted_sum_ci95", [v, v]) for m, v in zip(methods, vals)]
        err = [[max(0.0, v - c[0]) for v, c in zip(vals, cis)],
               [max(0.0, c[1] - v) for v, c in zip(vals, cis)]]  # fmt: skip
        axes[0][0].barh(ys, vals, height=h, xerr=err, error_kw={"lw": 0.6}, label=cfg)
        if memory:
            mem = [mem_by.get((m, cfg), {}).get("torch_mem_vs_weighted_sum") or 0 for m in methods]
            axes[0][1].barh(ys, mem, height=h, label=cfg)
    names = [
        "median step CPU time / weighted-sum step",
        "peak torch training memory / weighted sum",
    ]
    for ax, name in zip(axes[0], names):
        ax.set_yticks(range(len(methods)), [by[(m, configs[0])]["label"] for m in methods])
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title} ({results[0]['params']} parameters, CPU, 1 thread)", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=110)


# ----------------------------------------------------------------------------- results

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = RESULTS.parents[1] / "docs" / "benchmarks.md"
#: the studies, by the start of their results' file names (the longest match wins)
STUDIES = (
    "accuracy", "aggregation_cost", "conflicts", "finetune", "multifidelity", "pareto",
    "readout_heads", "step_cost", "step_cost_datasets",
)  # fmt: skip
#: a generated section of the docs: its results json's stem, its text
SECTION = re.compile(r"<!-- generated: (\S+) -->\n(.*?)<!-- end generated -->", re.S)


def study_of(path: str | Path):
    """The study module that renders the results json ``path``."""
    import importlib

    stem = Path(path).stem
    name = max((s for s in STUDIES if stem.startswith(s)), key=len, default=None)
    if name is None:
        raise ValueError(f"{path}: no study renders it (known: {', '.join(STUDIES)})")
    return importlib.import_module(f"benchmarks.{name}")


def render(path: str | Path) -> str:
    """The Markdown of the results json ``path``, as its study writes it."""
    return study_of(path).markdown(read_json(path))


def docs_section(path: str | Path) -> str:
    """The generated docs section of the results json ``path``: where it comes from, then
    its Markdown with its title lines in bold (the page keeps its own headings)."""
    path = Path(path)
    md = re.sub(r"^# (.*)$", r"**\1**", render(path), flags=re.M)
    return f"From `benchmarks/results/{path.name}` ({path.stem}.md beside it):\n\n{md.rstrip()}\n"


def stale(results: Path = RESULTS) -> list[str]:
    """The results whose committed ``.md`` is not what their json renders to."""
    return [
        p.stem for p in sorted(results.glob("*.json"))
        if render(p) != p.with_suffix(".md").read_text()
    ]  # fmt: skip


def generated_docs(text: str, results: Path = RESULTS) -> str:
    """``text`` (a docs page) with every generated section rendered from its json."""

    def section(m):
        return f"<!-- generated: {m[1]} -->\n{docs_section(results / f'{m[1]}.json')}<!-- end generated -->"

    return SECTION.sub(section, text)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Render the committed benchmark results.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true",
                      help="fail if a results .md or a docs section is not what its json renders to")  # fmt: skip
    what.add_argument("--write", action="store_true", help="rewrite every results .md")
    what.add_argument("--docs", action="store_true", help="rewrite the docs' generated sections")
    args = parser.parse_args(argv)
    if args.write:
        for p in sorted(RESULTS.glob("*.json")):
            p.with_suffix(".md").write_text(render(p))
        return 0
    page = DOCS.read_text()
    if args.docs:
        DOCS.write_text(generated_docs(page))
        return 0
    bad = [f"benchmarks/results/{name}.md" for name in stale()]
    if generated_docs(page) != page:
        bad.append(f"{DOCS.relative_to(RESULTS.parents[1])} (run --docs)")
    missing = {p.stem for p in RESULTS.glob("*.json")} - {m[1] for m in SECTION.finditer(page)}
    bad += [f"{name}: no generated section in docs/benchmarks.md" for name in sorted(missing)]
    for line in bad:
        print(f"not what the results json renders to: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

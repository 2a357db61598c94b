"""The benchmarks' reports: statistics, Markdown and JSON, figures, ``--from-json``.

Every study writes its raw runs and meta data to ``<out>.json`` and renders its Markdown
tables and figures from that json alone, so a committed result is rewritten without
training by the study's ``--from-json`` (one implementation: :func:`add_from_json`,
:func:`from_json`)::

    python -m benchmarks.pareto --from-json benchmarks/results/pareto_ethanol.json \\
        --out /tmp/pareto_ethanol

No torch or Lightning import here; matplotlib only inside :func:`pyplot`.
"""

from __future__ import annotations

import json
import math
import platform
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


# ----------------------------------------------------------------------------- Markdown


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_rule(n: int) -> str:
    return "|---" * n + "|"


def machine_line(info: dict) -> str:
    return (
        f"{info.get('Model name', platform.machine())}, {info.get('CPU(s)', info['cpu_count'])} vCPU "
        f"({info.get('Hypervisor vendor', 'bare metal')} VM), {info.get('mem_total_gib', '?')} GiB RAM, "
        f"torch {info['torch']}, nequip {info.get('nequip', '?')}, lightning {info['lightning']}, "
        f"{info['torch_threads']} torch thread(s), load avg at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
    )


def command(study: str, argv: list[str], omp: bool = True) -> str:
    """The command line of a study run from the repository root."""
    prefix = "OMP_NUM_THREADS=1 " if omp else ""
    return f"{prefix}python -m benchmarks.{study} {shlex.join(argv)}".rstrip()


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
    parser.add_argument(
        "--from-json",
        nargs="+" if many else None,
        help=f"only rewrite {what} from {'these json files' if many else 'this json'}",
    )


def from_json(
    paths: str | list[str],
    out: str | None,
    report: Callable[[dict, Path], None],
    out_is_dir: bool = False,
) -> None:
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


# ----------------------------------------------------------------------------- results

RESULTS = Path(__file__).resolve().parent / "results"
#: the studies, by the start of their results' file names (the longest match wins)
STUDIES = (
    "accuracy", "aggregation_cost", "conflicts", "finetune", "multifidelity", "pareto",
    "readout_heads", "step_cost",
)  # fmt: skip


def study_of(path: str | Path):
    """The study module that renders the results json ``path``."""
    import importlib

    stem = Path(path).stem
    name = max((s for s in STUDIES if stem.startswith(s)), key=len, default=None)
    if name is None:
        raise ValueError(f"{path}: no study renders it (known: {', '.join(STUDIES)})")
    return importlib.import_module(f"benchmarks.{name}")


def render(path: str | Path) -> str:
    """The Markdown table of the results json ``path``, as its study writes it."""
    return study_of(path).markdown(read_json(path))


def stale(results: Path = RESULTS) -> list[str]:
    """The results whose committed ``.md`` is not what their json renders to."""
    return [
        p.stem for p in sorted(results.glob("*.json"))
        if render(p) != p.with_suffix(".md").read_text()
    ]  # fmt: skip


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Re-render the committed benchmark results.")
    parser.add_argument(
        "--check", action="store_true", help="fail if a results .md differs from its json's"
    )
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"{name}.md differs from what {name}.json renders to")
        return 1 if bad else 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

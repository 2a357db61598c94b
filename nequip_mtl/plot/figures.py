"""Figures of a training run's logs: losses per task, loss coefficients, gradient
conflict, and a one-page summary.

Every function takes a :class:`~nequip_mtl.plot.logs.RunLogs`, returns a matplotlib
:class:`~matplotlib.figure.Figure` (``None`` when the run logged nothing it could show)
and appends a human-readable note to ``notes`` for every series it had to skip.
Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot`` state, no display
needed).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from .logs import OPTIMIZER_STEPS, RunLogs, Series, load_run
from .names import (
    KINDS,
    Units,
    axis_label,
    parse_metric,
    parse_prefix,
    quantity_label,
    unit,
)
from .shares import SHARE, UpdateShares, update_shares

__all__ = [
    "PlotResult",
    "make_plots",
    "build_figures",
    "losses_figure",
    "coefficients_figure",
    "conflict_figure",
    "summary_figure",
    "FIGURES",
]

STEP_LABEL = "optimizer step"
SHARE_TITLE = "share of each task in the update: |w_i|‖g_i‖ / Σ_j |w_j|‖g_j‖"
NORMALISED_TITLE = "normalised task weights w_i / Σ_j |w_j| (no gradient norms logged)"
CONFLICT_HINT = (
    "add `- _target_: nequip_mtl.train.callbacks.GradientConflictMonitor` to "
    "`trainer.callbacks` to log them"
)
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


# ---------------------------------------------------------------- helpers


def _figure(nrows: int, ncols: int, width: float = 11.0, row_height: float = 2.9):
    fig = Figure(figsize=(width, row_height * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _task_label(name: str) -> str:
    """``forces_mse`` -> ``forces``; names nequip does not use are kept."""
    parsed = parse_metric(name)
    if parsed.kind is None:
        return name
    label = quantity_label(parsed.field)
    details = [d for d in (parsed.dataset, parsed.type_name) if d is not None]
    return label if not details else f"{label} ({', '.join(details)})"


def _pair_label(pair: str) -> str:
    a, _, b = pair.partition("~")
    return f"{_task_label(a)} ↔ {_task_label(b)}"


def _other_colors(dataset_colors: dict[str, str]) -> list[str]:
    """The palette less the datasets' colors (for lines that are not a dataset)."""
    used = set(dataset_colors.values())
    return [c for c in _COLORS if c not in used] or _COLORS


def _task_colors(
    names: Sequence[str], dataset_colors: dict[str, str] | None = None
) -> dict[str, str]:
    """One color per physical quantity, stable across figures of a run; a task that is a
    dataset (``tasks: datasets``) has its dataset's color, and other tasks take the colors
    no dataset has."""
    dataset_colors = dataset_colors or {}
    palette = _other_colors(dataset_colors)
    colors: dict[str, str] = {}
    n = 0
    for name in names:
        group = parse_metric(name).group
        if group in colors:
            continue
        if name in dataset_colors:
            colors[group] = dataset_colors[name]
        else:
            colors[group] = palette[n % len(palette)]
            n += 1
    return colors


def _run_dataset_colors(logs: RunLogs) -> dict[str, str]:
    return _dataset_colors(_datasets(logs, _metric_groups(logs)[1]))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average that skips NaNs."""
    if window <= 1 or len(values) < 3:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _window(n: int) -> int:
    return max(1, n // 20) if n >= 20 else 1


def _log_scale(ax, series: Sequence[np.ndarray]) -> None:
    """Log y axis when there is positive data (non-positive values are masked). Tick
    labels are plain numbers (``0.03``), on minor ticks too when the data span less than
    two decades."""
    values = np.concatenate([np.asarray(s, float) for s in series]) if series else np.array([])
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if len(positive) == 0:
        return
    ax.set_yscale("log", nonpositive="mask")
    fmt = FuncFormatter(lambda v, _: _num(v))
    ax.yaxis.set_major_formatter(fmt)
    if np.log10(positive.max() / positive.min()) < 2:
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _minor_label(value: float, _pos=None) -> str:
    """Label the minor log ticks at 2x, 3x and 5x a power of ten only."""
    if not value > 0:
        return ""
    mantissa = value / 10 ** np.floor(np.log10(value))
    return _num(value) if round(mantissa) in (2, 3, 5) else ""


def _num(value: float) -> str:
    """Tick label: ``0.02``, ``300``, ``1e-05``."""
    return f"{value:g}" if 1e-4 <= abs(value) < 1e5 else f"{value:.0e}"


def _empty(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        wrap=True,
        color="0.4",
        fontsize=9,
        transform=ax.transAxes,
    )


def _finish(ax, title: str, ylabel: str, legend: str = "best") -> None:
    """Title, labels, grid and legend (``legend``: a matplotlib location, ``"outside"``
    (right of the axes) or ``""`` for none)."""
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(STEP_LABEL)
    ax.grid(True, alpha=0.3, which="both")
    if legend and ax.get_legend_handles_labels()[0]:
        if legend == "outside":
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8, loc=legend)


EQUAL_COSINES_WHY = (
    "; ConFIG with equal loss coefficients (and IMTL-G) gives every task the same cosine"
)
#: largest difference between series that are drawn as "one line" (coinciding)
COINCIDE_TOL = 1e-6


def coinciding(group: dict[str, Series], tol: float = COINCIDE_TOL) -> float | None:
    """The largest difference between the series of ``group`` at the steps they share,
    if there are at least two series, they share a step, and it is at most ``tol``
    (their lines lie on top of each other); ``None`` otherwise."""
    series = [s for s in group.values() if len(s)]
    if len(series) < 2:
        return None
    common = series[0].step
    for s in series[1:]:
        common = np.intersect1d(common, s.step)
    if len(common) == 0:
        return None
    values = np.stack([s.value[np.searchsorted(s.step, common)] for s in series])
    finite = np.isfinite(values).all(axis=0)
    if not finite.any():
        return None
    spread = float((values[:, finite].max(axis=0) - values[:, finite].min(axis=0)).max())
    return spread if spread <= tol else None


def _note_coinciding(
    ax, group: dict[str, Series], what: str, why: str = "", where: str = "top"
) -> str | None:
    """Say on the axes (at its ``top`` or ``bottom``) that the lines of ``group``
    coincide, when they do; return the text."""
    spread = coinciding(group)
    if spread is None:
        return None
    diff = "identical" if spread == 0 else f"largest difference {spread:.0e}"
    text = (
        f"all {len(group)} {what} are equal at every logged step ({diff}): "
        f"their {len(group)} lines lie on top of each other{why}"
    )
    # wrap to the axes' width (matplotlib's own wrapping uses the figure's)
    fig = ax.get_figure()
    ncols = ax.get_subplotspec().get_gridspec().ncols
    chars = max(30, int(fig.get_figwidth() / ncols * 0.72 * 72 / (8 * 0.6)))
    ax.text(
        0.5,
        0.97 if where == "top" else 0.1,
        textwrap.fill(text, chars),
        transform=ax.transAxes,
        ha="center",
        va="top" if where == "top" else "bottom",
        fontsize=8,
        bbox=dict(boxstyle="round", facecolor="white", alpha=0.9, edgecolor="0.6"),
    )
    return text


def _plot_held(ax, s: Series, **style) -> None:
    """A value that holds between logged points (a loss coefficient): drawn as steps. The
    value logged at step ``x_i`` is the one the steps since ``x_{i-1}`` used, so the
    jump to it is drawn at ``x_{i-1}`` (``drawstyle="steps-pre"``), not as a ramp."""
    ax.plot(s.step, s.value, drawstyle="steps-pre", **style)


def _splits(names: Sequence[str]) -> str:
    """``["training", "validation"]`` -> ``"training and validation"``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 2 else names)


def _metric_groups(logs: RunLogs) -> tuple[dict[str, str], dict[str, dict[str, Series]]]:
    """``loss``: ``{loss name: kind}`` of the training loss components, in logged order;
    ``by_prefix``: ``{prefix: {metric: series}}`` of the per-task series."""
    by_prefix: dict[str, dict[str, Series]] = {}
    for key, series in logs.series.items():
        prefix, sep, metric = key.partition("/")
        if not sep or metric.count("/") > 1 or parse_prefix(prefix) is None:
            continue
        by_prefix.setdefault(prefix, {})[metric] = series
    losses: dict[str, str] = {}
    for prefix in ("train_loss_step", "train_loss_epoch"):
        for metric in by_prefix.get(prefix, {}):
            parsed = parse_metric(metric)
            if parsed.kind is not None and parsed.type_name is None:
                losses.setdefault(metric, parsed.kind)
    return losses, by_prefix


def _is_task_metric(metric: str) -> bool:
    parsed = parse_metric(metric)
    return parsed.kind is not None and parsed.type_name is None


# ---------------------------------------------------------------- datasets


def _datasets(logs: RunLogs, by_prefix: dict[str, dict[str, Series]]) -> list[str]:
    """The training/validation datasets the logs name: ``val_<name>_epoch/*`` (and test)
    prefixes, per-dataset components (``<name>/forces_mse``) and dataset tasks
    (``mtl/weight/<name>`` where ``<name>`` is one of those). In the data module's order
    when the run's config gives it, else sorted."""
    found: set[str] = set()
    for prefix, metrics in by_prefix.items():
        parsed = parse_prefix(prefix)
        if parsed.dataset is not None:
            found.add(parsed.dataset)
        for metric in metrics:
            dataset = parse_metric(metric).dataset
            if dataset is not None:
                found.add(dataset)
    order = [d for d in logs.dataset_order if d in found]
    return order + sorted(found - set(order))


def _dataset_colors(datasets: Sequence[str]) -> dict[str, str]:
    """One color per dataset, the same in every panel and figure of a run."""
    return {d: _COLORS[i % len(_COLORS)] for i, d in enumerate(datasets)}


@dataclasses.dataclass
class _Val:
    """One validation series of one task: ``who`` names it in legends (the dataset, or the
    loader ``val0`` when no dataset is known), ``dataset`` is its dataset if known."""

    who: str
    dataset: str | None
    loader: int
    field: str
    kind: str
    metric: str
    series: Series


def _val_prefixes(
    by_prefix: dict[str, dict[str, Series]], split: str = "val", order: Sequence[str] = ()
) -> list[str]:
    """The validation prefixes to draw: by dataset name if logged so (in ``order``, then
    alphabetical), else by loader."""
    named = sorted(
        (p for p in by_prefix if parse_prefix(p).split == split and parse_prefix(p).dataset),
        key=lambda p: (
            list(order).index(parse_prefix(p).dataset)
            if parse_prefix(p).dataset in order
            else len(order),
            parse_prefix(p).dataset,
        ),
    )
    indexed = sorted(
        (
            p
            for p in by_prefix
            if parse_prefix(p).split == split and parse_prefix(p).index is not None
        ),
        key=lambda p: parse_prefix(p).index,
    )
    return named or indexed


def _val_entries(
    by_prefix: dict[str, dict[str, Series]],
    notes: list[str],
    figure: str,
    split: str = "val",
    order: Sequence[str] = (),
) -> list[_Val]:
    """The per-task validation series, by dataset when the run logged them under dataset
    names (``val_<name>_epoch/*``, :class:`~nequip_mtl.train.callbacks.DatasetMetricNames`: the same
    values as nequip's ``val<j>_epoch/*``, which are then not drawn twice), else by loader
    (``val<j>_epoch/*``; a per-dataset metric ``<name>/forces_mae`` there is dataset
    ``<name>``), datasets in ``order``. Series without a finite value are left out with a
    note."""
    out: list[_Val] = []
    empty: list[str] = []
    for loader, prefix in enumerate(_val_prefixes(by_prefix, split, order)):
        parsed = parse_prefix(prefix)
        for metric, series in by_prefix[prefix].items():
            name = parse_metric(metric)
            if not _is_task_metric(metric):
                continue
            if not np.isfinite(series.value).any():
                empty.append(f"{prefix}/{metric}")
                continue
            dataset = parsed.dataset or name.dataset
            who = dataset if dataset is not None else prefix.split("_")[0]
            index = parsed.index if parsed.index is not None else loader
            out.append(_Val(who, dataset, index, name.field, name.kind, metric, series))
    if empty:
        notes.append(
            f"{figure}: {len(empty)} validation series without a finite value not drawn "
            f"({', '.join(empty[:4])}{', ...' if len(empty) > 4 else ''})"
        )
    return out


def _units_line(units: Units) -> str:
    """The figure's statement of its units."""
    if units.assumed:
        return (
            f"units assumed: {units.energy} and {units.length} (neither the run's config nor "
            "--units gives them)"
        )
    return f"units: {units.energy} and {units.length} (from {units.source})"


# ---------------------------------------------------------------- losses


def losses_figure(logs: RunLogs, notes: list[str] | None = None) -> Figure | None:
    """Training loss and validation error of every task, on log axes.

    One row per physical quantity (energy, forces, stress, ...). Left column: the
    training loss component (per step, thin; per epoch, markers) and the same metric on
    the validation set(s) if it is logged there. Right column: validation errors in the
    quantity's units (MAE, RMSE) and the same training metrics, if logged.

    With several datasets, each dataset has one color in every panel (its training loss
    components, its validation errors), and legends name the datasets.
    """
    notes = notes if notes is not None else []
    units = logs.units
    losses, by_prefix = _metric_groups(logs)
    datasets = _datasets(logs, by_prefix)
    vals = _val_entries(by_prefix, notes, "losses.png", order=datasets)
    dcolors = _dataset_colors(datasets)
    error_kinds = ("mae", "rmse")
    train_metrics = {
        m: s for m, s in by_prefix.get("train_metric_epoch", {}).items() if _is_task_metric(m)
    }

    fields: list[str] = []
    for metric in losses:
        if parse_metric(metric).field not in fields:
            fields.append(parse_metric(metric).field)
    for field in [v.field for v in vals if v.kind in error_kinds] + [
        parse_metric(m).field for m in train_metrics if parse_metric(m).kind in error_kinds
    ]:
        if field not in fields:
            fields.append(field)
    if not fields:
        notes.append(
            "losses.png: skipped, no per-task series (train_loss_*/<name>, val<k>_epoch/<name>)"
        )
        return None
    if not losses:
        notes.append("losses.png: no training loss series (train_loss_step/*, train_loss_epoch/*)")
    if not vals:
        notes.append("losses.png: no validation series (val<k>_epoch/*)")
    skipped_kinds = sorted(
        {v.kind for v in vals if v.kind not in error_kinds + tuple(losses.values())}
    )
    if skipped_kinds:
        notes.append(
            f"losses.png: {', '.join(skipped_kinds)} metrics are not plotted (MAE, RMSE and the loss are)"
        )

    has_errors = any(v.kind in error_kinds for v in vals) or any(
        parse_metric(m).kind in error_kinds for m in train_metrics
    )
    ncols = (1 if losses else 0) + (1 if has_errors else 0)
    fig, axes = _figure(len(fields), ncols, width=5.6 * ncols)
    fig.suptitle(f"Loss and error per task: {logs.run_dir.name}\n{_units_line(units)}", fontsize=11)

    def val_color(v: _Val) -> str:
        return dcolors[v.dataset] if v.dataset in dcolors else _COLORS[v.loader % len(_COLORS)]

    def label(who: str | None, what: str) -> str:
        return what if who is None else f"{who}: {what}"

    for row, field in enumerate(fields):
        col = 0
        if losses:
            ax = axes[row][col]
            col += 1
            names = sorted(
                (m for m in losses if parse_metric(m).field == field),
                key=lambda m: (
                    datasets.index(parse_metric(m).dataset)
                    if parse_metric(m).dataset in datasets
                    else -1
                ),
            )
            if not names:
                _empty(ax, f"{quantity_label(field)}: not a training loss component")
            else:
                plotted = []
                shown_val = False
                for name in names:
                    step = by_prefix.get("train_loss_step", {}).get(name)
                    epoch = by_prefix.get("train_loss_epoch", {}).get(name)
                    # per-dataset components (`new/forces_mse`): the dataset's color
                    dataset = parse_metric(name).dataset
                    shade = dcolors.get(dataset)
                    if step is not None:
                        ax.plot(
                            step.step,
                            step.value,
                            lw=0.8,
                            alpha=0.35,
                            color=shade or "0.35",
                            label=label(dataset, "train (per step)"),
                        )
                        plotted.append(step.value)
                    if epoch is not None:
                        ax.plot(
                            epoch.step,
                            epoch.value,
                            "o-",
                            ms=3,
                            lw=1.5,
                            color=shade or "0.1",
                            label=label(dataset, "train (epoch mean)"),
                        )
                        plotted.append(epoch.value)
                kind = losses[names[0]]
                for v in vals:
                    if v.field == field and v.kind == kind:
                        ax.plot(
                            v.series.step,
                            v.series.value,
                            "s--",
                            ms=3,
                            lw=1.5,
                            color=val_color(v),
                            label=label(v.who, "validation") if v.dataset else v.who,
                        )
                        plotted.append(v.series.value)
                        shown_val = True
                _log_scale(ax, plotted)
                title = f"{quantity_label(field)}: training loss ({KINDS[kind][0]})"
                if shown_val:
                    title += f" and validation {KINDS[kind][0]}"
                _finish(ax, title, axis_label(field, kind, units))
        if has_errors:
            ax = axes[row][col]
            plotted = []
            shown: list[str] = []
            styles = {"mae": "-", "rmse": "--"}
            for kind in error_kinds:
                for v in vals:
                    if v.field != field or v.kind != kind:
                        continue
                    ax.plot(
                        v.series.step,
                        v.series.value,
                        styles[kind],
                        marker="s",
                        ms=3,
                        color=val_color(v),
                        label=(
                            f"{v.who}: validation {KINDS[kind][0]}"
                            if v.dataset
                            else f"{v.who} {KINDS[kind][0]}"
                        ),
                    )
                    plotted.append(v.series.value)
                    shown.append("validation")
                for metric, tr in train_metrics.items():
                    parsed = parse_metric(metric)
                    if parsed.field != field or parsed.kind != kind:
                        continue
                    ax.plot(
                        tr.step,
                        tr.value,
                        styles[kind],
                        marker="o",
                        ms=3,
                        alpha=0.6 if parsed.dataset else 1.0,
                        color=dcolors.get(parsed.dataset, "0.2"),
                        label=label(parsed.dataset, f"train {KINDS[kind][0]}"),
                    )
                    plotted.append(tr.value)
                    shown.append("training")
            if not plotted:
                _empty(ax, f"{quantity_label(field)}: no validation MAE/RMSE logged")
            else:
                _log_scale(ax, plotted)
                u = unit(field, "mae", units)
                splits = [x for x in ("validation", "training") if x in shown]
                _finish(
                    ax,
                    f"{quantity_label(field)}: {_splits(splits)} error",
                    f"{quantity_label(field)} error" + (f" [{u}]" if u else ""),
                )
    return fig


# ---------------------------------------------------------------- coefficients


def _update_shares(logs: RunLogs) -> UpdateShares | None:
    """Each task's share of the update from ``mtl/weight/*`` and ``mtl/grad_norm/*``
    (logged together, at the same step, by the aggregation modules); without those, the
    normalised ``task_weight/*`` of ``LossCoefficientMonitor`` (their steps are not those
    of any logged gradient norm). ``None`` if neither was logged."""
    weights = logs.with_prefix("mtl/weight/")
    if weights:
        return update_shares(weights, logs.with_prefix("mtl/grad_norm/"))
    task_weights = logs.with_prefix("task_weight/")
    if task_weights:
        return update_shares(task_weights, {})
    return None


def _share_title(shares: UpdateShares) -> tuple[str, str]:
    """(title, y label) of a shares panel: which quantity it shows."""
    if shares.kind == SHARE:
        return SHARE_TITLE, "share of the update"
    return NORMALISED_TITLE, "normalised weight"


def _plot_shares(ax, shares: UpdateShares, colors: dict[str, str], filename: str, notes) -> None:
    """One marker per logged record and task (no lines: records are sparse, and nothing
    is known between them): filled for a positive weight, × for a negative one (the
    update subtracts that task's gradient)."""
    n = len(shares.step)
    ms = 4 if n < 100 else 2.5 if n < 1000 else 1.5
    for name, values in shares.value.items():
        color = colors[parse_metric(name).group]
        neg = shares.negative[name]
        pos = np.isfinite(values) & ~neg
        ax.plot(
            shares.step[pos],
            values[pos],
            linestyle="none",
            marker="o",
            ms=ms,
            color=color,
            label=_task_label(name),
        )
        if neg.any():
            ax.plot(
                shares.step[neg],
                values[neg],
                linestyle="none",
                marker="x",
                ms=ms + 2,
                color=color,
                label=f"{_task_label(name)} (weight < 0)",
            )
    if shares.kind == SHARE:
        ax.set_ylim(-0.03, 1.03)
    else:
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        notes.append(
            f"{filename}: the task weights were logged without gradient norms at the same "
            "step (mtl/grad_norm/*), so the normalised weights w_i / sum_j |w_j| are shown "
            "instead of each task's share of the update"
        )
    if len(shares.left_out):
        notes.append(
            f"{filename}: {len(shares.left_out)} weight record(s) without gradient norms "
            "of every task at the same step are not shown"
        )


def coefficients_figure(logs: RunLogs, notes: list[str] | None = None) -> Figure | None:
    """Loss coefficients (``loss_coeff/*``), and each task's share of the applied update
    (``|w_i| |g_i| / sum_j |w_j| |g_j|``, from ``mtl/weight/*`` and ``mtl/grad_norm/*``;
    the normalised weights ``w_i / sum_j |w_j|`` where the norms are not logged, e.g.
    ``task_weight/*``), over training. See :mod:`nequip_mtl.plot.shares`."""
    notes = notes if notes is not None else []
    coeffs = logs.with_prefix("loss_coeff/")
    shares = _update_shares(logs)
    budget = logs.with_prefix("budget/")
    panels = []
    if coeffs:
        panels.append("coeffs")
    else:
        notes.append(
            "loss_coefficients.png: no loss_coeff/* series (add "
            "nequip_mtl.train.callbacks.LossCoefficientMonitor to log them)"
        )
    if shares is not None:
        panels.append("shares")
    if budget:
        panels += ["multiplier", "ratio"]
    if not panels:
        notes[-1] = (
            "loss_coefficients.png: skipped, no loss_coeff/*, mtl/weight/* or task_weight/* "
            "series (add nequip_mtl.train.callbacks.LossCoefficientMonitor to log coefficients)"
        )
        return None
    fig, axes = _figure(1, len(panels), width=5.6 * len(panels), row_height=3.6)
    fig.suptitle(f"Loss coefficients: {logs.run_dir.name}", fontsize=12)
    colors = _task_colors(
        list(coeffs) + (list(shares.value) if shares else []), _run_dataset_colors(logs)
    )
    for ax, panel in zip(axes[0], panels):
        if panel == "coeffs":
            for name, s in coeffs.items():
                # coefficients hold between updates: steps, not ramps between logged points
                _plot_held(
                    ax,
                    s,
                    marker="." if len(s) < 50 else None,
                    lw=1.5,
                    color=colors[parse_metric(name).group],
                    label=_task_label(name),
                )
            _note_coinciding(ax, coeffs, "loss coefficients")
            _finish(ax, "loss coefficients (normalised to sum to 1)", "coefficient", "outside")
        elif panel == "shares":
            _plot_shares(ax, shares, colors, "loss_coefficients.png", notes)
            _finish(ax, *_share_title(shares), legend="outside")
        else:
            _budget_panel(ax, budget, panel, _run_dataset_colors(logs))
    return fig


def _budget_panel(ax, budget: dict[str, Series], panel: str, colors: dict[str, str]) -> None:
    """The forgetting budget (``budget/<dataset>/*``, or ``budget/<dataset>/<component>/*``
    with a bound on each component): its multiplier (the replay weight's factor), or the
    replayed loss over the pretrained model's against its limit. A dataset's color; its
    components' line styles."""
    fallback, own = iter(_other_colors(colors)), {}
    styles: dict[str, list[str]] = {}
    for name, s in budget.items():
        constraint, _, what = name.rpartition("/")
        if what not in ("multiplier", "ratio", "limit", "final_ratio"):
            continue  # e.g. `budget/<dataset>/replay_probability`: not a constraint's
        dataset = constraint.split("/")[0]
        if dataset not in own:
            own[dataset] = colors.get(dataset) or next(fallback, "black")
        kinds = styles.setdefault(dataset, [])
        if constraint not in kinds:
            kinds.append(constraint)
        style = ("-", ":", "-.", (0, (5, 1)))[kinds.index(constraint) % 4]
        if what == panel:
            _plot_held(ax, s, lw=1.5, color=own[dataset], ls=style, label=constraint)
        elif panel == "ratio" and what == "limit":
            ax.axhline(float(s.value[-1]), ls="--", lw=1, color=own[dataset],
                       label=f"{constraint}: limit")  # fmt: skip
    if panel == "multiplier":
        ax.set_yscale("log")
        _finish(ax, "forgetting budget: replay-weight multiplier", "multiplier", "outside")
    else:
        _finish(ax, "replayed loss / pretrained model's", "ratio", "outside")


# ---------------------------------------------------------------- conflict


def _conflict_series(logs: RunLogs) -> dict[str, dict[str, Series]]:
    cos = logs.with_prefix("grad_conflict/cos/")
    cos_update = logs.with_prefix("grad_conflict/cos_update/") or logs.with_prefix(
        "mtl/cos_update/"
    )
    norms = logs.with_prefix("grad_conflict/norm/") or logs.with_prefix("mtl/grad_norm/")
    return {"cos": cos, "cos_update": cos_update, "norm": norms}


def _plot_noisy(ax, s: Series, color: str, label: str) -> tuple[int, float]:
    """Every logged value (thin) and, for long series, a centred moving average over
    ``window`` consecutive logged values (thick). Returns ``(window, steps)``: the window
    (1: none) and the number of optimizer steps it spans (window x the median spacing of
    the records)."""
    window = _window(len(s))
    if window > 1:
        ax.plot(s.step, s.value, lw=0.5, alpha=0.3 if len(s) < 200 else 0.15, color=color)
        ax.plot(s.step, _smooth(s.value, window), lw=1.8, color=color, label=label)
        return window, window * float(np.median(np.diff(s.step)))
    ax.plot(s.step, s.value, "-", marker=".", lw=1.5, color=color, label=label)
    return 1, 1.0


def _smoothing_note(windows: Sequence[tuple[int, float]]) -> str:
    """A second title line, ``(thin: logged values; thick: moving average over 44 logged
    values, about 44 optimizer steps)``, saying what the thick lines average; ``""``
    without smoothing."""
    used = [w for w in windows if w[0] > 1]
    if not used:
        return ""
    sizes = sorted({w for w, _ in used})
    spans = sorted({round(span) for _, span in used})
    size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    span = f"{spans[0]:g}" if len(spans) == 1 else f"{spans[0]:g}-{spans[-1]:g}"
    return (
        f"\n(thin: logged values; thick: moving average over {size} logged values, "
        f"about {span} optimizer steps)"
    )


def _cos_axes(ax) -> None:
    ax.axhspan(-1.05, 0.0, color="#d62728", alpha=0.06, lw=0)
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.text(0.01, 0.03, "conflict (cos < 0)", transform=ax.transAxes, fontsize=8, color="#d62728")


def conflict_stats(s: Series) -> tuple[float, float]:
    """(mean cosine, fraction of logged steps with a negative cosine)."""
    v = s.value[np.isfinite(s.value)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float((v < 0).mean())


def conflict_figure(logs: RunLogs, notes: list[str] | None = None) -> Figure | None:
    """Pairwise task-gradient cosines, cosines with the applied update, and gradient
    norms over training (from ``GradientConflictMonitor``; the norms and update cosines
    fall back to ``MultitaskLightningModule``'s ``mtl/*`` logs)."""
    notes = notes if notes is not None else []
    groups = _conflict_series(logs)
    panels = []
    if groups["cos"]:
        panels.append("cos")
    else:
        notes.append(
            f"gradient_conflict.png: no pairwise cosines (grad_conflict/cos/*); {CONFLICT_HINT}"
        )
    if groups["cos_update"]:
        panels.append("cos_update")
    else:
        notes.append("gradient_conflict.png: no task-update cosines (grad_conflict/cos_update/*)")
    if groups["norm"]:
        panels.append("norm")
    else:
        notes.append("gradient_conflict.png: no gradient norms (grad_conflict/norm/*)")
    if not panels:
        del notes[-3:]
        notes.append(
            f"gradient_conflict.png: skipped, no gradient-conflict series; {CONFLICT_HINT}"
        )
        return None
    fig, axes = _figure(len(panels), 1, width=9.0, row_height=3.0)
    fig.suptitle(f"Gradient conflict between tasks: {logs.run_dir.name}", fontsize=12)
    tasks = list(groups["norm"]) + list(groups["cos_update"])
    dataset_colors = _run_dataset_colors(logs)
    colors = _task_colors(tasks, dataset_colors)
    pair_colors = _other_colors(dataset_colors)
    for ax, kind in zip(axes[:, 0], panels):
        group = groups[kind]
        if kind == "cos":
            windows = []
            for i, (pair, s) in enumerate(group.items()):
                mean, frac = conflict_stats(s)
                label = f"{_pair_label(pair)}\nmean {mean:+.2f}, < 0 on {frac:.0%} of steps"
                windows.append(_plot_noisy(ax, s, pair_colors[i % len(pair_colors)], label))
            _cos_axes(ax)
            _finish(
                ax,
                "cosine similarity of the task gradients (each pair)" + _smoothing_note(windows),
                "cos(∇L_i, ∇L_j)",
                legend="outside",
            )
        elif kind == "cos_update":
            windows = [
                _plot_noisy(ax, s, colors[parse_metric(name).group], _task_label(name))
                for name, s in group.items()
            ]
            _cos_axes(ax)
            _note_coinciding(ax, group, "task-update cosines", EQUAL_COSINES_WHY, "bottom")
            _finish(
                ax,
                "cosine of each task gradient with the applied update" + _smoothing_note(windows),
                "cos(∇L_i, update)",
                legend="outside",
            )
        else:
            windows = []
            for name, s in group.items():
                windows.append(
                    _plot_noisy(ax, s, colors[parse_metric(name).group], _task_label(name))
                )
            upd = logs.get("grad_conflict/update_norm")
            if upd is not None:
                ax.plot(
                    upd.step, upd.value, "--", lw=1.0, color="k", alpha=0.7, label="applied update"
                )
            _log_scale(ax, [s.value for s in group.values()] + ([upd.value] if upd else []))
            _finish(
                ax,
                "gradient norm of each (unweighted) loss component" + _smoothing_note(windows),
                "‖∇L_i‖",
                legend="outside",
            )
    return fig


# ---------------------------------------------------------------- summary


#: what the line of a quantity looks like when colors stand for datasets
_FIELD_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1)))]


def _before_training(logs: RunLogs) -> tuple[bool, float | None]:
    """Whether the run logged a validation before its first optimizer step
    (``val_optimizer_steps`` 0 at its first validation, from
    :class:`~nequip_mtl.train.callbacks.DatasetMetricNames`), and the logged step of that validation."""
    steps = logs.get(OPTIMIZER_STEPS)
    if steps is None or not len(steps) or steps.value[0] != 0:
        return False, None
    return True, float(steps.step[0])


def _relative_panel(ax, logs: RunLogs, losses, by_prefix, notes: list[str]) -> None:
    """Each task's validation error (per dataset and quantity) divided by its value
    before training, or by its first logged value where no validation before training
    was logged (the title says which)."""
    units = logs.units
    datasets = _datasets(logs, by_prefix)
    vals = _val_entries(by_prefix, [], "summary.png", order=datasets)
    dcolors = _dataset_colors(datasets)
    several = len({v.who for v in vals}) > 1 or len(dcolors) > 1
    fields: list[str] = []
    for metric in losses:
        field = parse_metric(metric).field
        if field not in fields:
            fields.append(field)
    field_colors = _task_colors(list(losses))
    before, before_step = _before_training(logs)
    headline = ("mae", "rmse", *losses.values())

    # (who, dataset, loader, field) -> (series, kind, source)
    chosen: dict[tuple, tuple[Series, str, str]] = {}
    for field in fields:
        for v in vals:
            if v.field != field or v.kind not in headline:
                continue
            key = (v.who, v.dataset, v.loader, field)
            if key not in chosen or headline.index(v.kind) < headline.index(chosen[key][1]):
                chosen[key] = (v.series, v.kind, "val")
        if not any(k[3] == field for k in chosen):  # not validated: the epoch training loss
            for metric, kind in losses.items():
                name = parse_metric(metric)
                s = by_prefix.get("train_loss_epoch", {}).get(metric)
                if name.field == field and s is not None:
                    key = (name.dataset or "", name.dataset, 0, field)
                    chosen.setdefault(key, (s, kind, "train"))

    plotted, firsts, reference_before = [], [], []

    def legend_order(key: tuple) -> tuple:
        who, dataset, loader, field = key
        rank = datasets.index(dataset) if dataset in datasets else len(datasets)
        return (rank, loader, fields.index(field))

    for (who, dataset, loader, field), (s, kind, source) in sorted(
        chosen.items(), key=lambda item: legend_order(item[0])
    ):
        finite = np.isfinite(s.value)
        if not finite.any():
            continue
        first = int(np.argmax(finite))
        ref = s.value[first]
        if ref == 0:
            continue
        is_before = source == "val" and before and first == 0 and s.step[0] == before_step
        reference_before.append(is_before)
        firsts.append((source, float(s.step[first])))
        u = unit(field, kind, units)
        label = (
            f"{who + ': ' if who and several else ''}{quantity_label(field)} {source} "
            f"{KINDS[kind][0]}: {ref:.3g} → {s.last:.3g}{' ' + u if u else ''}"
        )
        if before and not is_before:  # not logged before training: says its reference
            label += f" (relative to step {_num(float(s.step[first]))})"
        if dataset in dcolors and several:
            marker, linestyle = _FIELD_STYLES[fields.index(field) % len(_FIELD_STYLES)]
            style = dict(color=dcolors[dataset], marker=marker, linestyle=linestyle)
        elif several:
            marker, linestyle = _FIELD_STYLES[fields.index(field) % len(_FIELD_STYLES)]
            style = dict(color=_COLORS[loader % len(_COLORS)], marker=marker, linestyle=linestyle)
        else:
            style = dict(color=field_colors.get(field), marker="o", linestyle="-")
        values = s.value / ref
        ax.plot(s.step, values, ms=3, label=label, **style)
        plotted.append(values)
    if not plotted:
        _empty(ax, "no per-task validation or epoch loss series")
        notes.append("summary.png: no per-task validation or epoch loss series")
        return
    _log_scale(ax, plotted + [np.array([1.0])])
    if all(reference_before):
        title = (
            "validation error per dataset and quantity, relative to before training"
            if several
            else "validation error per task, relative to before training"
        )
        title += "\n(1 = the validation at step 0, before any optimizer step; above 1: worse)"
        ylabel = "error / error before training"
        ax.axhline(1.0, color="0.3", lw=0.8, ls=":", label="before training")
    elif before:
        title = (
            "validation error per task, relative to before training (step 0) where it was "
            "logged,\nelse to its first logged value (the legend says from which step)"
        )
        ylabel = "error / reference value"
        ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
    else:
        val_steps = sorted({step for source, step in firsts if source == "val"})
        what = (
            "its first validation"
            + (f" (step {_num(val_steps[0])}, after training began)" if val_steps else "")
            if any(source == "val" for source, _ in firsts)
            else "its first epoch"
        )
        title = f"error per task, relative to {what}"
        title += "\n(no validation before training was logged; 1 = that first value)"
        ylabel = "error / first logged value"
        ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
        if any(source == "val" for source, _ in firsts):
            notes.append(
                "summary.png: the run logged no validation before training, so each error "
                "is relative to its first validation, after training began (with a "
                "MultiDatasetDataModule, the nequip_mtl.train.callbacks.DatasetMetricNames callback "
                "logs one at step 0)"
            )
    _finish(ax, title, ylabel, legend="best")


def summary_figure(logs: RunLogs, notes: list[str] | None = None) -> Figure:
    """One page: relative validation error per task (per dataset and quantity with
    several datasets), the total loss, the pairwise gradient cosines and the loss
    coefficients / task weights, with a text summary of how often each pair of tasks
    conflicted."""
    notes = notes if notes is not None else []
    losses, by_prefix = _metric_groups(logs)
    fig, axes = _figure(2, 2, width=12.0, row_height=3.8)
    fig.suptitle(f"Training summary: {logs.run_dir.name}\n{_units_line(logs.units)}", fontsize=12)
    (a, b), (c, d) = axes
    dcolors = _dataset_colors(_datasets(logs, by_prefix))
    groups = _conflict_series(logs)
    shares = _update_shares(logs)
    tasks = list(groups["norm"]) + list(groups["cos_update"])
    tasks += list(shares.value) if shares is not None else []
    colors = _task_colors(list(losses) + tasks, dcolors)

    # (a) validation error per task, relative to its value before training
    _relative_panel(a, logs, losses, by_prefix, notes)

    # (b) total loss
    plotted = []
    for key, style, label in (
        (
            "train_loss_step/weighted_sum",
            dict(lw=0.7, alpha=0.35, color="0.35"),
            "train (per step)",
        ),
        (
            "train_loss_epoch/weighted_sum",
            dict(marker="o", ms=3, color="0.1"),
            "train (epoch mean)",
        ),
    ):
        s = logs.get(key)
        if s is not None:
            b.plot(s.step, s.value, label=label, **style)
            plotted.append(s.value)
    for i, prefix in enumerate(_val_prefixes(by_prefix, order=list(dcolors))):
        s = by_prefix[prefix].get("weighted_sum")
        if s is None:
            continue
        dataset = parse_prefix(prefix).dataset
        b.plot(
            s.step,
            s.value,
            marker="s",
            ms=3,
            color=dcolors.get(dataset, _COLORS[i % len(_COLORS)]),
            label=(
                f"{dataset}: validation (weighted metrics)"
                if dataset
                else f"{prefix.split('_')[0]} (weighted metrics)"
            ),
        )
        plotted.append(s.value)
    if plotted:
        _log_scale(b, plotted)
        _finish(b, "weighted sum of the loss components", "weighted sum (mixed units)")
    else:
        _empty(b, "no weighted_sum series")

    # (c) gradient conflict
    lines = []
    if groups["cos"]:
        windows = []
        for i, (pair, s) in enumerate(groups["cos"].items()):
            mean, frac = conflict_stats(s)
            pair_colors = _other_colors(dcolors)
            windows.append(_plot_noisy(c, s, pair_colors[i % len(pair_colors)], _pair_label(pair)))
            lines.append(
                f"{_pair_label(pair)}: mean cos {mean:+.2f}, conflicting (cos < 0) on "
                f"{frac:.0%} of {np.isfinite(s.value).sum()} monitored steps"
            )
        _cos_axes(c)
        _finish(
            c,
            "cosine similarity of the task gradients" + _smoothing_note(windows),
            "cos(∇L_i, ∇L_j)",
            legend="lower right",
        )
    elif groups["cos_update"]:
        windows = [
            _plot_noisy(c, s, colors.get(parse_metric(name).group, "k"), _task_label(name))
            for name, s in groups["cos_update"].items()
        ]
        _cos_axes(c)
        _note_coinciding(
            c, groups["cos_update"], "task-update cosines", EQUAL_COSINES_WHY, "bottom"
        )
        _finish(
            c,
            "cosine of each task gradient with the update" + _smoothing_note(windows),
            "cos(∇L_i, update)",
            legend="lower right",
        )
    else:
        _empty(c, "no gradient-conflict logs:\n" + CONFLICT_HINT.replace("` to", "`\nto"))

    # (d) each task's share of the update, or the loss coefficients
    coeffs = logs.with_prefix("loss_coeff/")
    if shares is not None:
        _plot_shares(d, shares, colors, "summary.png", notes)
        _finish(d, *_share_title(shares), legend="best")
    elif coeffs:
        for name, s in coeffs.items():
            _plot_held(
                d, s, lw=1.5, color=colors.get(parse_metric(name).group), label=_task_label(name)
            )
        _note_coinciding(d, coeffs, "loss coefficients")
        _finish(d, "loss coefficients", "coefficient")
    else:
        _empty(d, "no loss-coefficient or task-weight logs")

    if lines:
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=8.5, va="bottom", family="monospace")
        fig.get_layout_engine().set(
            rect=(0, 0.02 + 0.022 * len(lines), 1, 0.98 - 0.022 * len(lines))
        )
    return fig


# ---------------------------------------------------------------- all figures

#: file name -> figure function, in the order they are written
FIGURES = {
    "losses.png": losses_figure,
    "loss_coefficients.png": coefficients_figure,
    "gradient_conflict.png": conflict_figure,
    "summary.png": summary_figure,
}


@dataclasses.dataclass
class PlotResult:
    """Figures made (file name -> Figure), files written, and notes on what was skipped."""

    logs: RunLogs
    figures: dict[str, Figure]
    files: dict[str, Path]
    notes: list[str]


def make_plots(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    dpi: int = 90,
    units: Units | str | dict | None = None,
) -> PlotResult:
    """Read ``run_dir``'s logs and write every figure that has data to ``out_dir``
    (default ``run_dir/plots``). ``units``: the data's units (see
    :func:`~nequip_mtl.plot.logs.load_run`; default: from the run's config, else eV and Å,
    assumed).

    Raises:
        NoLogsError: ``run_dir`` holds no logs
    """
    logs = load_run(run_dir, units=units)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    notes = list(logs.notes)
    figures = build_figures(logs, notes)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for filename, fig in figures.items():
        files[filename] = out / filename
        fig.savefig(files[filename], dpi=dpi)
    return PlotResult(logs, figures, files, notes)


def build_figures(logs: RunLogs, notes: list[str] | None = None) -> dict[str, Figure]:
    """Every figure that has data (file name -> Figure), without drawing or saving."""
    notes = notes if notes is not None else []
    figures = {}
    for filename, make in FIGURES.items():
        fig = make(logs, notes)
        if fig is not None:
            figures[filename] = fig
    return figures

"""Figures of a training run from its logs (``nequip-mtl-plot``): losses per task, loss
coefficients, gradient conflict and a one-page summary. Pure matplotlib (Agg canvas) and
CSV reading; TensorBoard event files are read with the ``tensorboard`` package (the
``tensorboard`` extra) when present. No Lightning or nequip imports."""

from .figures import (
    FIGURES,
    PlotResult,
    build_figures,
    coefficients_figure,
    conflict_figure,
    losses_figure,
    make_plots,
    summary_figure,
)
from .logs import NoLogsError, RunLogs, Series, load_run
from .names import Units, parse_units
from .shares import UpdateShares, update_shares

__all__ = [
    "make_plots",
    "PlotResult",
    "build_figures",
    "FIGURES",
    "losses_figure",
    "coefficients_figure",
    "conflict_figure",
    "summary_figure",
    "load_run",
    "RunLogs",
    "Series",
    "NoLogsError",
    "Units",
    "parse_units",
    "update_shares",
    "UpdateShares",
]

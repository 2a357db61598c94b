"""Load the logged metrics of a training run: Lightning ``CSVLogger`` files
(``metrics.csv``) and TensorBoard event files (``events.out.tfevents.*``); and from the
run's config as Hydra saved it (``.hydra/config.yaml``, which ``nequip-train`` writes to
the run directory), the units of its data and the order of its datasets."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import yaml

from .names import DEFAULT_UNITS, Units, parse_units
from .tfevents import INSTALL_HINT, EventFileError, TensorBoardMissingError, read_scalars

__all__ = ["Series", "RunLogs", "NoLogsError", "load_run", "OPTIMIZER_STEPS"]

CSV_NAME = "metrics.csv"
#: logged with every validation of a fit by nequip_mtl.train.callbacks.DatasetMetricNames: the
#: optimizer steps taken before it (0: the validation before training); the same string as
#: ``nequip_mtl.train.callbacks.dataset_metric_names.OPTIMIZER_STEPS``, written out so that the plots import no
#: Lightning (a test keeps the two equal)
OPTIMIZER_STEPS = "val_optimizer_steps"
#: the run's config as Hydra saves it in the run directory
CONFIG_NAME = ".hydra/config.yaml"
#: how many directories above a log file are searched for the run's config
_CONFIG_LEVELS = 4
EVENTS_GLOB = "events.out.tfevents.*"
# columns / tags that are bookkeeping, not metrics
_META = {"step", "epoch", "created_at", "wall_time"}


class NoLogsError(FileNotFoundError):
    """The run directory holds no readable training logs."""


@dataclasses.dataclass
class Series:
    """One logged metric: values at optimizer steps (sorted by step)."""

    name: str
    step: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return len(self.step)

    @property
    def last(self) -> float:
        return float(self.value[-1])


@dataclasses.dataclass
class RunLogs:
    """Every metric series of one run, and where they were read from."""

    run_dir: Path
    sources: list[Path]
    series: dict[str, Series]
    notes: list[str] = dataclasses.field(default_factory=list)
    #: the energy and length units of the data (``units.assumed``: nothing said)
    units: Units = DEFAULT_UNITS
    #: the run's Hydra config file, if found
    config_path: Path | None = None
    #: the data module's dataset names in its order, if the config gives them
    dataset_order: list[str] = dataclasses.field(default_factory=list)

    def get(self, name: str) -> Series | None:
        return self.series.get(name)

    def with_prefix(self, prefix: str) -> dict[str, Series]:
        """``{name without prefix: series}`` of every series whose name starts with
        ``prefix`` (in first-logged order)."""
        return {k[len(prefix) :]: s for k, s in self.series.items() if k.startswith(prefix)}


def load_run(run_dir: str | Path, units: Units | str | dict | None = None) -> RunLogs:
    """Read a run's logs from ``run_dir`` (searched recursively).

    The units of the data are ``units`` if given (a :class:`~nequip_mtl.plot.names.Units`,
    or what :func:`~nequip_mtl.plot.names.parse_units` reads, e.g. ``"kcal/mol"``), else the
    top-level ``units`` key of the run's config (``.hydra/config.yaml`` in the directory of
    the log file or up to three above it), e.g. ``units: {energy: kcal/mol, length: Å}``;
    else eV and Å are assumed, and ``units.assumed`` says so.

    Uses the newest ``metrics.csv``; TensorBoard event files in the newest directory that
    holds some add the series the CSV lacks (or all series, without a CSV). Several runs
    below ``run_dir``: the newest is used, and a note says so.

    Event files are read with TensorBoard's reader (the ``tensorboard`` extra), which
    checks every record's CRCs. A truncated or corrupt file contributes only its intact
    records before the damage, and a note says so; without ``tensorboard`` installed,
    event files are ignored with a note (an error if there is no CSV).

    Raises:
        NoLogsError: ``run_dir`` does not exist or holds neither kind of log
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoLogsError(f"run directory {str(run_dir)!r} does not exist")
    notes: list[str] = []
    csvs = sorted(run_dir.rglob(CSV_NAME), key=_mtime)
    events = sorted((p for p in run_dir.rglob(EVENTS_GLOB) if p.is_file()), key=_mtime)

    series: dict[str, Series] = {}
    sources: list[Path] = []
    if csvs:
        chosen = csvs[-1]
        if len(csvs) > 1:
            notes.append(
                f"found {len(csvs)} metrics.csv files; using the newest, {chosen} "
                "(pass that run's own directory to choose another)"
            )
        series.update(_read_csv(chosen, notes))
        sources.append(chosen)
    if events:
        newest_dir = events[-1].parent
        tb_files = [p for p in events if p.parent == newest_dir]
        try:
            tb = _read_events(tb_files, notes)
        except TensorBoardMissingError:
            if not sources:
                raise NoLogsError(
                    f"{str(run_dir)!r} holds TensorBoard event files ('{EVENTS_GLOB}') and "
                    f"no '{CSV_NAME}'; {INSTALL_HINT}"
                ) from None
            notes.append(f"ignored {len(tb_files)} TensorBoard event file(s): {INSTALL_HINT}")
            tb = {}
        if tb:
            added = {k: s for k, s in tb.items() if k not in series}
            series.update(added)
            sources.extend(tb_files)
    if not sources:
        raise NoLogsError(
            f"no training logs in {str(run_dir)!r}: expected a Lightning CSVLogger "
            f"'{CSV_NAME}' or TensorBoard event files ('{EVENTS_GLOB}') in it or below it "
            "(add `logger: [{_target_: lightning.pytorch.loggers.CSVLogger, ...}]` to the "
            "trainer config)"
        )
    if not series:
        raise NoLogsError(f"the logs in {str(run_dir)!r} contain no metric values: {sources}")
    config_path = _find_config(sources[0])
    config = _read_config(config_path, notes) if config_path is not None else {}
    if units is None:
        units = _config_units(config, config_path, notes)
    elif not isinstance(units, Units):
        units = parse_units(units, source="the `units` argument")
    return RunLogs(
        run_dir,
        sources,
        series,
        notes,
        units=units,
        config_path=config_path,
        dataset_order=_dataset_order(config),
    )


def _find_config(log_file: Path) -> Path | None:
    for directory in [log_file.parent, *log_file.parent.parents][:_CONFIG_LEVELS]:
        path = directory / CONFIG_NAME
        if path.is_file():
            return path
    return None


def _read_config(path: Path, notes: list[str]) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        notes.append(f"could not read the run's config {path}: {err}")
        return {}
    return config if isinstance(config, dict) else {}


def _config_units(config: dict, path: Path | None, notes: list[str]) -> Units:
    spec = config.get("units")
    if spec is None:
        return DEFAULT_UNITS
    if (
        isinstance(spec, str)
        and "${" in spec
        or isinstance(spec, dict)
        and any(isinstance(v, str) and "${" in v for v in spec.values())
    ):
        notes.append(
            f"the `units` of {path} are an interpolation ({spec!r}), not read: eV and Å are "
            "assumed (give them as plain values, or pass --units)"
        )
        return DEFAULT_UNITS
    try:
        return parse_units(spec, source="`units` in the run's .hydra/config.yaml")
    except ValueError as err:
        notes.append(f"{err} ({path}): eV and Å are assumed")
        return DEFAULT_UNITS


def _dataset_order(config: dict) -> list[str]:
    """The dataset names of a ``MultiDatasetDataModule`` config, in its order."""
    data = config.get("data")
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if isinstance(datasets, dict):
        return [str(k) for k in datasets]
    if isinstance(datasets, list):
        return [str(d["name"]) for d in datasets if isinstance(d, dict) and "name" in d]
    return []


def _mtime(path: Path) -> tuple[float, str]:
    return (path.stat().st_mtime, str(path))


def _read_csv(path: Path, notes: list[str]) -> dict[str, Series]:
    points: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            notes.append(f"{path} is empty")
            return {}
        for row_index, row in enumerate(reader):
            step = _number(row.get("step"))
            if step is None:
                step = float(row_index)
            for key, text in row.items():
                if key is None or key in _META:
                    continue
                value = _number(text)
                if value is not None:
                    points.setdefault(key, []).append((step, value))
    return {k: _series(k, v) for k, v in points.items()}


def _read_events(files: list[Path], notes: list[str]) -> dict[str, Series]:
    points: dict[str, list[tuple[float, float]]] = {}
    for path in files:
        try:
            scalars, problem = read_scalars(path, partial_ok=True)
        except (EventFileError, OSError) as err:
            notes.append(f"skipped unreadable TensorBoard file {path}: {err}")
            continue
        if problem is not None:
            notes.append(f"TensorBoard file damaged, plotted only its intact part: {problem}")
        for tag, values in scalars.items():
            if tag in _META:
                continue
            points.setdefault(tag, []).extend((float(s), v) for s, v in values)
    return {k: _series(k, v) for k, v in points.items() if v}


def _series(name: str, points: list[tuple[float, float]]) -> Series:
    arr = np.asarray(points, dtype=float).reshape(-1, 2)
    order = np.argsort(arr[:, 0], kind="stable")
    arr = arr[order]
    return Series(name, arr[:, 0], arr[:, 1])


def _number(text) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None

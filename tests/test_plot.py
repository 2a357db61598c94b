"""nequip-mtl-plot: figures from the logs of real short training runs, checked through
the figure objects (panels, titles, units, plotted data = logged data, steps for held
values, notes on coinciding lines), skipped series with notes, TensorBoard event files of
a real run (intact, truncated, corrupt, without tensorboard), and a clear error for a
directory without logs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.cbook import STEP_LOOKUP_MAP
from matplotlib.image import imread
from nequip.train import NequIPLightningModule

from nequip_mtl.plot import (
    FIGURES,
    NoLogsError,
    Series,
    build_figures,
    load_run,
    make_plots,
    update_shares,
)
from nequip_mtl.plot.cli import main
from nequip_mtl.plot.figures import NORMALISED_TITLE, SHARE_TITLE, coinciding
from nequip_mtl.plot.names import Units, axis_label, parse_metric, parse_units, unit
from nequip_mtl.plot.tfevents import EventFileError, read_scalars
from nequip_mtl.train import MultitaskLightningModule
from nequip_mtl.train.callbacks import LossCoefficientMonitor, LossCoefficientScheduler
from nequip_mtl.train.callbacks.gradient_conflict import GradientConflictMonitor
from tests._harness import CoeffRecorder, datamodule, metrics_config, module_kwargs, trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _train(run_dir: Path, module_cls, callbacks, epochs=3, **module_kw) -> Path:
    torch.manual_seed(0)
    module = module_cls(**module_kwargs(**module_kw))
    tr = trainer(
        run_dir,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=CSVLogger(str(run_dir), name="logs", version=""),
        log_every_n_steps=1,
    )
    tr.fit(module, datamodule=datamodule(batch_size=2))  # 4 steps per epoch
    return run_dir


@pytest.fixture(scope="module")
def mtl_run(tmp_path_factory) -> Path:
    """ConFIG (the default aggregator, equal coefficients) with both monitors and
    training metrics: every series the plots can show."""
    run = tmp_path_factory.mktemp("mtl_run")
    return _train(
        run,
        MultitaskLightningModule,
        [GradientConflictMonitor("batch", 1), LossCoefficientMonitor("epoch", 1)],
        train_metrics=metrics_config(),
    )


@pytest.fixture(scope="module")
def mtl_figures(mtl_run):
    """The figures of ``mtl_run``, as make_plots builds them (not drawn: fast)."""
    return build_figures(load_run(mtl_run))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """nequip's own module, no monitors: no coefficients, no conflict series."""
    return _train(tmp_path_factory.mktemp("plain_run"), NequIPLightningModule, [], epochs=2)


def _csv_column(run: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    with open(run / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(column):
                steps.append(float(row["step"]))
                values.append(float(row[column]))
    return np.array(steps), np.array(values)


def _axes_by_title(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.axison}


def _line(ax, label_part: str):
    found = [ln for ln in ax.get_lines() if label_part in ln.get_label()]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


def _same_data(line, steps, values):
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    np.testing.assert_array_equal(x, steps)
    np.testing.assert_allclose(y, values, rtol=1e-12)


# ---------------------------------------------------------------- real runs


def test_cli_writes_every_png_of_a_real_run(mtl_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main([str(mtl_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 4 figure(s) to {out}" in printed
    for name in FIGURES:
        path = out / name
        assert path.is_file() and str(path) in printed
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        image = imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500
        # not a blank canvas: a good share of the pixels is ink, in several colors
        rgb = image[..., :3]
        ink = rgb.min(axis=-1) < 0.9
        assert ink.mean() > 0.02
        colored = np.ptp(rgb, axis=-1) > 0.3  # saturated (red, blue, green lines)
        assert colored.sum() > 500


def test_loss_figure_panels_units_and_data(mtl_run, mtl_figures):
    axes = _axes_by_title(mtl_figures["losses.png"])
    for title, ylabel in [
        ("forces: training loss (MSE)", "forces MSE [(eV/Å)²]"),
        ("energy per atom: training loss (MSE)", "energy per atom MSE [(eV/atom)²]"),
        ("stress: training loss (MSE)", "stress MSE [(eV/Å³)²]"),
        # these panels show validation *and* training metrics, and say so
        ("forces: validation and training error", "forces error [eV/Å]"),
        ("stress: validation and training error", "stress error [eV/Å³]"),
        ("total energy: validation and training error", "total energy error [eV]"),
    ]:
        ax = axes[title]
        assert ax.get_ylabel() == ylabel
        assert ax.get_yscale() == "log"
        assert ax.get_xlabel() == "optimizer step"
    # total energy is validated but not a loss component: that panel is empty and says so
    assert "total energy: training loss (MSE)" not in axes
    # what is drawn is what was logged
    loss_ax = axes["forces: training loss (MSE)"]
    _same_data(
        _line(loss_ax, "train (epoch mean)"), *_csv_column(mtl_run, "train_loss_epoch/forces_mse")
    )
    _same_data(
        _line(loss_ax, "train (per step)"), *_csv_column(mtl_run, "train_loss_step/forces_mse")
    )
    val_ax = axes["stress: validation and training error"]
    _same_data(_line(val_ax, "val0 MAE"), *_csv_column(mtl_run, "val0_epoch/stress_mae"))
    _same_data(_line(val_ax, "val0 RMSE"), *_csv_column(mtl_run, "val0_epoch/stress_rmse"))
    _same_data(_line(val_ax, "train MAE"), *_csv_column(mtl_run, "train_metric_epoch/stress_mae"))
    assert len(_csv_column(mtl_run, "val0_epoch/stress_mae")[0]) == 3  # one per epoch


def test_conflict_figure_panels_and_data(mtl_run, mtl_figures):
    fig = mtl_figures["gradient_conflict.png"]
    axes = _axes_by_title(fig)
    assert len(axes) == 3
    cos_ax = next(ax for t, ax in axes.items() if t.startswith("cosine similarity"))
    upd_ax = next(ax for t, ax in axes.items() if t.startswith("cosine of each task"))
    norm_ax = next(ax for t, ax in axes.items() if t.startswith("gradient norm"))
    assert cos_ax.get_ylim() == (-1.05, 1.05) and upd_ax.get_ylim() == (-1.05, 1.05)
    assert norm_ax.get_yscale() == "log"
    # one labelled line per pair / per task, with the logged values (12 steps: no smoothing)
    pairs = {
        "energy per atom ↔ forces": "per_atom_energy_mse~forces_mse",
        "energy per atom ↔ stress": "per_atom_energy_mse~stress_mse",
        "forces ↔ stress": "forces_mse~stress_mse",
    }
    labelled = [ln for ln in cos_ax.get_lines() if not ln.get_label().startswith("_")]
    assert len(labelled) == 3
    for label, pair in pairs.items():
        steps, values = _csv_column(mtl_run, f"grad_conflict/cos/{pair}")
        assert len(steps) == 12
        line = _line(cos_ax, label)
        _same_data(line, steps, values)
        mean = values.mean()
        assert f"mean {mean:+.2f}" in line.get_label()
    for task, label in [("forces_mse", "forces"), ("stress_mse", "stress")]:
        _same_data(_line(norm_ax, label), *_csv_column(mtl_run, f"grad_conflict/norm/{task}"))
        _same_data(_line(upd_ax, label), *_csv_column(mtl_run, f"grad_conflict/cos_update/{task}"))
    _same_data(_line(norm_ax, "applied update"), *_csv_column(mtl_run, "grad_conflict/update_norm"))


def test_coefficient_and_summary_figures(mtl_run, mtl_figures):
    coeff = _axes_by_title(mtl_figures["loss_coefficients.png"])
    assert set(coeff) == {"loss coefficients (normalised to sum to 1)", SHARE_TITLE}
    ax = coeff["loss coefficients (normalised to sum to 1)"]
    assert sorted(ln.get_label() for ln in ax.get_lines()) == [
        "energy per atom",
        "forces",
        "stress",
    ]
    _same_data(_line(ax, "forces"), *_csv_column(mtl_run, "loss_coeff/forces_mse"))

    summary = mtl_figures["summary.png"]
    axes = _axes_by_title(summary)
    assert len(axes) == 4
    # no validation before training in a plain run: the reference is said to be the first
    # validation, after the first epoch's 4 steps (logged at the last batch's step, 3)
    (rel_title,) = [t for t in axes if t.startswith("error per task, relative to")]
    assert rel_title == (
        "error per task, relative to its first validation (step 3, after training began)\n"
        "(no validation before training was logged; 1 = that first value)"
    )
    assert "weighted sum of the loss components" in axes
    assert any(t.startswith("cosine similarity of the task gradients") for t in axes)
    assert SHARE_TITLE in axes
    rel = axes[rel_title]
    line = _line(rel, "forces val MAE")
    steps, values = _csv_column(mtl_run, "val0_epoch/forces_mae")
    _same_data(line, steps, values / values[0])
    assert "eV/Å" in line.get_label()
    footer = "\n".join(t.get_text() for t in summary.texts)
    assert "forces ↔ stress: mean cos" in footer and "of 12 monitored steps" in footer


def test_missing_series_are_skipped_with_a_note(plain_run, tmp_path, capsys):
    assert main([str(plain_run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["losses.png", "summary.png"]
    assert "note: loss_coefficients.png: skipped" in printed
    assert (
        "note: gradient_conflict.png: skipped" in printed and "GradientConflictMonitor" in printed
    )
    figures = build_figures(load_run(plain_run))
    assert set(figures) == {"losses.png", "summary.png"}
    # no training metrics logged: the error panels show validation only, and say so
    assert "forces: validation error" in _axes_by_title(figures["losses.png"])
    summary = _axes_by_title(figures["summary.png"])
    assert len(summary) == 2  # the conflict and weight panels only hold a note
    notes = [t.get_text() for ax in figures["summary.png"].axes for t in ax.texts]
    assert any("no gradient-conflict logs" in n for n in notes)


def test_partial_and_odd_logs_do_not_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,step,val0_epoch/forces_mae,val0_epoch/my_custom_thing,train_loss_step/weighted_sum,"
        "grad_conflict/norm/forces_mse,empty_col\n"
        "0,3,0.5,7,nan,0.1,\n"
        "1,7,0.25,,2.0,,\n"
        "1,8,,,1.0,0.0,\n"
    )
    result = make_plots(run, tmp_path / "out")
    assert set(result.figures) == {"losses.png", "gradient_conflict.png", "summary.png"}
    axes = _axes_by_title(result.figures["losses.png"])
    assert list(axes) == ["forces: validation error"]
    assert any("no training loss" in n for n in result.notes)
    assert any("no pairwise cosines" in n for n in result.notes)
    logs = load_run(run)
    assert "empty_col" not in logs.series
    np.testing.assert_array_equal(logs.series["grad_conflict/norm/forces_mse"].step, [3, 8])


# ---------------------------------------------------------------- several datasets


def _forgetting_run(run: Path, **callback_kw) -> Path:
    """A fine-tuning that forgets, through the real data module and callback: dataset `old`
    (EMT Cu as is) and `new` (the same kind of frames, energies 1 eV/atom lower), a model
    whose energy shift fits `old`, trained on `new` alone (`old`'s component has no
    coefficient), both validated (before training too). `old`'s energy error rises."""
    from nequip_mtl.data import MultiDatasetDataModule
    from nequip_mtl.train.callbacks import DatasetMetricNames
    from tests._harness import STATS, emt, model_config

    new = emt(22, 6)
    new["transforms"].append({"_target_": "tests._mfid.ShiftEnergy", "per_atom": -1.0})
    dm = MultiDatasetDataModule(
        seed=5,
        datasets={
            "old": {"split_dataset": {"dataset": emt(11, 8), "train": 6, "val": 2}},
            "new": {"split_dataset": {"dataset": new, "train": 4, "val": 2}},
        },
        sampling={"mode": "balanced", "frames_per_batch": {"old": 1, "new": 1}},
        val_dataloader={"batch_size": 4},
        stats_manager=STATS,
    )
    model = dict(model_config(), per_type_energy_shifts={"Cu": 0.0})
    loss = {
        "_target_": "nequip_mtl.train.PerDatasetLoss",
        "datasets": ["old", "new"],
        "coeffs": {"old": {"total_energy": None}, "new": {"total_energy": 1.0, "forces": 1.0}},
    }
    torch.manual_seed(0)
    module = NequIPLightningModule(
        **module_kwargs(
            num_datasets=dm.num_datasets,
            model=model,
            loss=loss,
            optimizer={"_target_": "torch.optim.Adam", "lr": 0.05},
        )
    )
    tr = trainer(
        run,
        max_epochs=3,
        callbacks=[DatasetMetricNames(**callback_kw)],
        logger=CSVLogger(str(run), name="logs", version=""),
        log_every_n_steps=1,
    )
    tr.fit(module, datamodule=dm)
    return run


def _hydra_config(run: Path, config) -> None:
    """``config`` saved as Hydra saves a run's config (``OmegaConf.save``)."""
    from omegaconf import OmegaConf

    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, run / ".hydra" / "config.yaml")


@pytest.fixture(scope="module")
def forget_run(tmp_path_factory) -> Path:
    run = _forgetting_run(tmp_path_factory.mktemp("forget_run"))
    # the data module's order as the run's config gives it: `old` first (alphabetically
    # it comes second)
    _hydra_config(run, {"data": {"datasets": {"old": {}, "new": {}}}})
    return run


@pytest.fixture(scope="module")
def forget_figures(forget_run):
    return build_figures(load_run(forget_run))


def _labelled(fig) -> list:
    return [ln for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def test_summary_shows_every_dataset_against_its_value_before_training(forget_run, forget_figures):
    """Each dataset's validation error of each quantity, divided by its value at the
    validation before training (step 0, `val_optimizer_steps` 0): what fine-tuning
    forgets is a rise above 1, what it gains a fall. Legends name the datasets.

    Fails if the reference is the first validation after training began (the old data's
    energy error would read as a smaller rise: it had already risen 10x by then), or if
    the lines do not name their datasets."""
    (title,) = [t for t in _axes_by_title(forget_figures["summary.png"]) if "relative to" in t]
    assert title == (
        "validation error per dataset and quantity, relative to before training\n"
        "(1 = the validation at step 0, before any optimizer step; above 1: worse)"
    )
    ax = _axes_by_title(forget_figures["summary.png"])[title]
    steps, optimizer_steps = _csv_column(forget_run, "val_optimizer_steps")
    assert steps[0] == 0 and optimizer_steps[0] == 0  # the first validation: before training
    ratios = {}
    for dataset in ("old", "new"):
        for field, label, unit_str in [
            ("per_atom_energy", "energy per atom", "eV/atom"),
            ("forces", "forces", "eV/Å"),
        ]:
            x, values = _csv_column(forget_run, f"val_{dataset}_epoch/{field}_mae")
            assert x[0] == 0 and len(x) == 4  # before training, and after each epoch
            line = _line(ax, f"{dataset}: {label} val MAE")
            assert line.get_label() == (
                f"{dataset}: {label} val MAE: {values[0]:.3g} → {values[-1]:.3g} {unit_str}"
            )
            _same_data(line, x, values / values[0])
            ratios[dataset, field] = values[-1] / values[0]
    assert ratios["old", "per_atom_energy"] > 5  # forgotten: a rise
    assert ratios["new", "per_atom_energy"] < 1  # learnt: a fall
    # first validation after training began: old's energy error had already risen
    _, energy = _csv_column(forget_run, "val_old_epoch/per_atom_energy_mae")
    assert energy[1] / energy[0] > 5


def test_losses_and_summary_have_one_color_per_dataset(forget_run, forget_figures):
    """Every labelled line of losses.png and of the summary's error panels names its
    dataset, and a dataset has one color in all of them, in the data module's order of the
    run's config (`old` first: blue); what is drawn is what was logged under the dataset's
    name (nequip's `val<j>_epoch/*` copies are not drawn again).

    Fails if validation lines take the color of their loader or of the sorted names
    (`new` would be blue in one panel, red in another) or are labelled `val0`/`val1`."""
    losses = forget_figures["losses.png"]
    summary_axes = _axes_by_title(forget_figures["summary.png"])
    summary_lines = [
        ln
        for title, ax in summary_axes.items()
        if "relative to" in title or title.startswith("weighted sum")
        for ln in ax.get_lines()
        if not ln.get_label().startswith("_") and ":" in ln.get_label()
    ]
    colors: dict[str, set] = {}
    for line in _labelled(losses) + summary_lines:
        dataset, sep, _ = line.get_label().partition(": ")
        assert sep and dataset in ("old", "new"), line.get_label()
        colors.setdefault(dataset, set()).add(line.get_color())
    assert colors == {"old": {"#1f77b4"}, "new": {"#d62728"}}
    axes = _axes_by_title(losses)
    assert set(axes) == {
        "forces: training loss (MSE)",
        "forces: validation error",
        "energy per atom: training loss (MSE)",
        "energy per atom: validation error",
        "total energy: validation error",
        "stress: validation error",
    }
    errors = axes["forces: validation error"]
    for dataset in ("old", "new"):
        for kind, label in (("mae", "MAE"), ("rmse", "RMSE")):
            _same_data(
                _line(errors, f"{dataset}: validation {label}"),
                *_csv_column(forget_run, f"val_{dataset}_epoch/forces_{kind}"),
            )
    assert len(errors.get_lines()) == 4  # not again as val0/val1
    loss_ax = axes["energy per atom: training loss (MSE)"]
    for dataset in ("old", "new"):
        _same_data(
            _line(loss_ax, f"{dataset}: train (per step)"),
            *_csv_column(forget_run, f"train_loss_step/{dataset}/per_atom_energy_mse"),
        )
    # alphabetical without the run's config: `new` first
    bare = forget_run.parent / "forget_bare"
    (bare / "logs").mkdir(parents=True)
    (bare / "logs" / "metrics.csv").write_bytes((forget_run / "logs" / "metrics.csv").read_bytes())
    fig = build_figures(load_run(bare))["losses.png"]
    line = _line(_axes_by_title(fig)["forces: validation error"], "new: validation MAE")
    assert line.get_color() == "#1f77b4"


def test_several_loaders_without_dataset_names(tmp_path):
    """Logs without `DatasetMetricNames` (nequip's names only): each loader is drawn as
    `val0`, `val1` in its own color; a per-dataset metric there (`b/forces_mae`) is that
    dataset's, and a series without a finite value (another dataset's component on a
    loader, always NaN) is left out with a note; the summary says its reference is the
    first validation, after training began."""
    _write_csv(
        tmp_path / "run" / "metrics.csv",
        ["train_loss_epoch/a/forces_mse", "val0_epoch/a/forces_mae", "val0_epoch/b/forces_mae",
         "val1_epoch/a/forces_mae", "val1_epoch/b/forces_mae"],
        [[3, 1.0, 0.5, "nan", "nan", 0.8], [7, 0.5, 0.25, "nan", "nan", 0.4]],
    )  # fmt: skip
    notes: list[str] = []
    figures = build_figures(load_run(tmp_path / "run"), notes)
    ax = _axes_by_title(figures["losses.png"])["forces: validation error"]
    assert sorted(ln.get_label() for ln in ax.get_lines()) == [
        "a: validation MAE",
        "b: validation MAE",
    ]
    _same_data(_line(ax, "a: validation MAE"), [3, 7], [0.5, 0.25])
    _same_data(_line(ax, "b: validation MAE"), [3, 7], [0.8, 0.4])
    assert any("2 validation series without a finite value" in n for n in notes), notes
    summary = _axes_by_title(figures["summary.png"])
    (title,) = [t for t in summary if "relative to" in t]
    assert title.startswith("error per task, relative to its first validation (step 3")
    assert any("no validation before training" in n for n in notes), notes


def test_a_series_without_a_value_before_training_says_its_reference(tmp_path):
    """A run that validated before training, but one dataset's metric was first logged
    later: that line is relative to its first value, and its label and the title say so;
    the others stay relative to before training."""
    _write_csv(
        tmp_path / "run" / "metrics.csv",
        ["train_loss_epoch/a/forces_mse", "val_optimizer_steps", "val_a_epoch/forces_mae",
         "val_b_epoch/forces_mae"],
        [[0, None, 0, 0.5, None], [3, 1.0, 4, 0.25, 0.8], [7, 0.5, 8, 1.0, 0.4]],
    )  # fmt: skip
    fig = build_figures(load_run(tmp_path / "run"))["summary.png"]
    (title,) = [t for t in _axes_by_title(fig) if "relative to" in t]
    assert title.startswith("validation error per task, relative to before training (step 0)")
    ax = _axes_by_title(fig)[title]
    a, b = _line(ax, "a: forces"), _line(ax, "b: forces")
    assert a.get_label() == "a: forces val MAE: 0.5 → 1 eV/Å"
    assert b.get_label() == "b: forces val MAE: 0.8 → 0.4 eV/Å (relative to step 3)"
    _same_data(a, [0, 3, 7], [1.0, 0.5, 2.0])
    _same_data(b, [3, 7], [1.0, 0.5])


# ---------------------------------------------------------------- units


def _copy_logs(run: Path, to: Path) -> Path:
    (to / "logs").mkdir(parents=True)
    (to / "logs" / "metrics.csv").write_bytes((run / "logs" / "metrics.csv").read_bytes())
    return to


def test_units_come_from_the_run_config_or_the_command_line(forget_run, tmp_path, capsys):
    """The ethanol config's `units` (kcal/mol, Å), saved in the run directory as Hydra
    saves the composed config, label every axis; `--units` overrides them; without
    either, the figures say that eV and Å are assumed.

    Fails if the run's config is not read (the labels say eV)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        config = compose(config_name="ethanol")
    assert dict(config.units) == {"energy": "kcal/mol", "length": "Å"}
    run = _copy_logs(forget_run, tmp_path / "ethanol_run")
    _hydra_config(run, config)
    logs = load_run(run)
    assert (logs.units.energy, logs.units.length, logs.units.assumed) == ("kcal/mol", "Å", False)
    assert logs.config_path == run / ".hydra" / "config.yaml"
    figures = build_figures(logs)
    axes = _axes_by_title(figures["losses.png"])
    assert axes["forces: validation error"].get_ylabel() == "forces error [kcal/mol/Å]"
    assert axes["energy per atom: training loss (MSE)"].get_ylabel() == (
        "energy per atom MSE [(kcal/mol/atom)²]"
    )
    for name in ("losses.png", "summary.png"):
        assert (
            figures[name]
            .get_suptitle()
            .endswith("units: kcal/mol and Å (from `units` in the run's .hydra/config.yaml)")
        )
    (title,) = [t for t in _axes_by_title(figures["summary.png"]) if "relative to" in t]
    labels = [ln.get_label() for ln in _axes_by_title(figures["summary.png"])[title].get_lines()]
    assert any(lb.startswith("old: forces val MAE") and lb.endswith(" kcal/mol/Å") for lb in labels)

    assert main([str(run), "--out", str(tmp_path / "a"), "--units", "energy=eV,length=nm"]) == 0
    assert "units: eV and nm (from --units)" in capsys.readouterr().out
    fig = build_figures(load_run(run, units="meV"))["losses.png"]
    assert _axes_by_title(fig)["forces: validation error"].get_ylabel() == "forces error [meV/Å]"

    bare = build_figures(load_run(_copy_logs(forget_run, tmp_path / "bare")))
    for name in ("losses.png", "summary.png"):
        assert (
            bare[name]
            .get_suptitle()
            .endswith("units assumed: eV and Å (neither the run's config nor --units gives them)")
        )
    assert _axes_by_title(bare["losses.png"])["forces: validation error"].get_ylabel() == (
        "forces error [eV/Å]"
    )


@pytest.mark.parametrize(
    "spec, energy, length",
    [
        ("kcal/mol", "kcal/mol", "Å"),
        ("energy=kcal/mol,length=Å", "kcal/mol", "Å"),
        ("length=A", "eV", "Å"),
        (" energy = meV ; length = Bohr ", "meV", "Bohr"),
        ({"energy": "Ha", "length": "angstrom"}, "Ha", "Å"),
    ],
)
def test_units_are_parsed(spec, energy, length):
    units = parse_units(spec, source="test")
    assert (units.energy, units.length, units.source) == (energy, length, "test")
    assert units.of("forces") == f"{energy}/{length}"
    assert units.of("stress") == f"{energy}/{length}³"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty units"),
        ("energy=", "non-empty string"),
        ("mass=kg", r"unknown unit key\(s\) \['mass'\]"),
        ("energy=eV,oops", "is not `key=unit`"),
        (3, "must be a mapping"),
    ],
)
def test_bad_units_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_units(spec)


def test_bad_units_option_is_a_usage_error(plain_run, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(plain_run), "--units", "mass=kg"])
    assert info.value.code == 2
    assert "unknown unit key(s) ['mass']" in capsys.readouterr().err


# ---------------------------------------------------------------- share of the update


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _share_points(ax, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) drawn for one task in a shares panel: its positive-weight and
    negative-weight (×) markers together, sorted by step."""
    lines = [ln for ln in ax.get_lines() if ln.get_label() in (label, f"{label} (weight < 0)")]
    assert lines, [ln.get_label() for ln in ax.get_lines()]
    for line in lines:
        # sparse records: markers only, no line suggesting values between them
        assert line.get_linestyle() == "None" and line.get_marker() in ("o", "x")
    x = np.concatenate([np.asarray(ln.get_xdata(), float) for ln in lines])
    y = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in lines])
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def test_update_share_panel_of_a_real_run(mtl_run, mtl_figures):
    """Both weight panels show each task's share of the update, |w_i| |g_i| / sum_j
    |w_j| |g_j|, computed here row by row from the logged mtl/weight/* and
    mtl/grad_norm/* (the raw weights stay in the logs); at every record the shares sum
    to one."""
    tasks = {
        "per_atom_energy_mse": "energy per atom",
        "forces_mse": "forces",
        "stress_mse": "stress",
    }
    expected: dict[str, tuple[list, list]] = {t: ([], []) for t in tasks}
    for row in _csv_rows(mtl_run):
        if not row.get("mtl/weight/forces_mse"):
            continue
        terms = {
            t: abs(float(row[f"mtl/weight/{t}"])) * abs(float(row[f"mtl/grad_norm/{t}"]))
            for t in tasks
        }
        for t in tasks:
            expected[t][0].append(float(row["step"]))
            expected[t][1].append(terms[t] / sum(terms.values()))
    assert len(expected["forces_mse"][0]) == 12  # every step of 3 epochs x 4 batches
    raw = np.array(
        [
            float(r["mtl/weight/stress_mse"])
            for r in _csv_rows(mtl_run)
            if r.get("mtl/weight/stress_mse")
        ]
    )
    assert raw.max() > 1.5  # raw weights are not shares: a weak stress gradient gets a large one
    for fig in ("loss_coefficients.png", "summary.png"):
        ax = _axes_by_title(mtl_figures[fig])[SHARE_TITLE]
        assert ax.get_ylabel() == "share of the update"
        drawn = {}
        for task, label in tasks.items():
            x, y = _share_points(ax, label)
            np.testing.assert_array_equal(x, expected[task][0])
            np.testing.assert_allclose(y, expected[task][1], rtol=1e-12)
            drawn[task] = y
        np.testing.assert_allclose(sum(drawn.values()), 1.0, rtol=1e-12)
        assert ax.get_yscale() == "linear" and ax.get_ylim() == (-0.03, 1.03)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", *header])
        for row in rows:
            writer.writerow(["0", *["" if v is None else v for v in row]])


def test_negative_weight_share_and_missing_norms(tmp_path):
    """A negative weight: the share is the size of its term, |w_i| |g_i| (the update
    subtracts that gradient), drawn with × and labelled; a record without the norms of
    every task is left out with a note."""
    cols = ["mtl/weight/forces_mse", "mtl/weight/stress_mse"]
    cols += ["mtl/grad_norm/forces_mse", "mtl/grad_norm/stress_mse"]
    _write_csv(
        tmp_path / "run" / "metrics.csv",
        cols,
        [
            [0, 1.0, 200.0, 0.2, 0.001],  # terms 0.2, 0.2
            [1, 1.0, -100.0, 0.3, 0.001],  # terms 0.3, 0.1 (stress subtracted)
            [2, 2.0, 300.0, 0.1, None],  # no stress norm: not shown
            [3, 0.5, 600.0, 0.4, 0.0005],  # terms 0.2, 0.3
        ],
    )
    notes: list[str] = []
    fig = build_figures(load_run(tmp_path / "run"), notes)["loss_coefficients.png"]
    ax = _axes_by_title(fig)[SHARE_TITLE]
    x, y = _share_points(ax, "forces")
    np.testing.assert_array_equal(x, [0, 1, 3])
    np.testing.assert_allclose(y, [0.5, 0.75, 0.4], rtol=1e-12)
    x, y = _share_points(ax, "stress")
    np.testing.assert_allclose(y, [0.5, 0.25, 0.6], rtol=1e-12)
    (neg,) = [ln for ln in ax.get_lines() if ln.get_label() == "stress (weight < 0)"]
    assert neg.get_marker() == "x"
    np.testing.assert_array_equal(neg.get_xdata(), [1])
    assert any("1 weight record(s) without gradient norms" in n for n in notes), notes


def test_update_shares_with_an_inactive_task():
    """A task missing from a record (inactive, or dropped that step) has no share there,
    and the shares of the others sum to one; all-zero terms give no record."""
    steps = np.array([0.0, 1.0, 2.0])
    weights = {
        "a": Series("a", steps, np.array([1.0, 2.0, 1.0])),
        "b": Series("b", steps[[0, 2]], np.array([3.0, 0.0])),
    }
    norms = {
        "a": Series("a", steps, np.array([1.0, 0.5, 0.0])),
        "b": Series("b", steps[[0, 2]], np.array([1.0, 4.0])),
    }
    shares = update_shares(weights, norms)
    assert shares.kind == "share"
    np.testing.assert_array_equal(shares.step, [0.0, 1.0])
    np.testing.assert_allclose(shares.value["a"], [0.25, 1.0])
    assert shares.value["b"][0] == 0.75 and np.isnan(shares.value["b"][1])
    np.testing.assert_array_equal(shares.left_out, [2.0])


def test_weights_without_norms_fall_back_to_normalised_weights(tmp_path):
    """task_weight/* (LossCoefficientMonitor; no gradient norms at their steps): the
    panel shows w_i / sum_j |w_j|, with its sign, and its title and a note say so."""
    _write_csv(
        tmp_path / "run" / "metrics.csv",
        ["task_weight/forces_mse", "task_weight/stress_mse"],
        [[3, 1.0, 3.0], [7, -1.0, 4.0]],
    )
    notes: list[str] = []
    figures = build_figures(load_run(tmp_path / "run"), notes)
    for name in ("loss_coefficients.png", "summary.png"):
        ax = _axes_by_title(figures[name])[NORMALISED_TITLE]
        assert "no gradient norms logged" in ax.get_title()
        assert ax.get_ylabel() == "normalised weight"
        x, y = _share_points(ax, "forces")
        np.testing.assert_array_equal(x, [3, 7])
        np.testing.assert_allclose(y, [0.25, -0.2], rtol=1e-12)
        np.testing.assert_allclose(_share_points(ax, "stress")[1], [0.75, 0.8], rtol=1e-12)
        assert any(n.startswith(name) and "normalised weights" in n for n in notes), notes


def test_moving_average_says_what_it_averages(tmp_path):
    """The title of a smoothed panel gives the window in logged values and in optimizer
    steps (records every 2 steps here), and the thick line is that centred average."""
    steps = np.arange(0, 200, 2)
    values = np.cos(steps / 7.0)
    _write_csv(
        tmp_path / "run" / "metrics.csv",
        ["grad_conflict/cos/forces_mse~stress_mse"],
        [[int(s), v] for s, v in zip(steps, values)],
    )
    fig = build_figures(load_run(tmp_path / "run"))["gradient_conflict.png"]
    (ax,) = _axes_by_title(fig).values()
    assert ax.get_title().endswith(
        "(thin: logged values; thick: moving average over 5 logged values, about 10 "
        "optimizer steps)"
    )
    thick = _line(ax, "forces ↔ stress")
    expected = [values[max(0, i - 2) : i + 3].mean() for i in range(len(values))]
    _same_data(thick, steps, expected)


# ---------------------------------------------------------------- honest drawing


def _drawn_y(line, x: np.ndarray) -> np.ndarray:
    """The y of the curve as matplotlib draws ``line`` (its drawstyle applied) at ``x``."""
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    style = line.get_drawstyle()
    if style != "default":
        xs, ys = STEP_LOOKUP_MAP[style](xs, ys)
    return np.interp(x, xs, ys)


def test_coefficient_jumps_are_drawn_as_steps(tmp_path):
    """A schedule that jumps at an epoch is drawn as a step at the epoch boundary: at
    every optimizer step between the first and last logged points, the drawn curve is
    the coefficient that step's loss was computed with (recorded during the run), not a
    ramp between the logged points."""
    recorder = CoeffRecorder()
    run = _train(
        tmp_path / "run",
        NequIPLightningModule,
        [
            LossCoefficientScheduler({1: {"forces_mse": 8.0}, 2: {"stress_mse": 4.0}}),
            LossCoefficientMonitor("epoch", 1),
            recorder,
        ],
        epochs=3,
    )
    figures = build_figures(load_run(run))
    coeff_ax = _axes_by_title(figures["loss_coefficients.png"])[
        "loss coefficients (normalised to sum to 1)"
    ]
    summary_ax = _axes_by_title(figures["summary.png"])["loss coefficients"]
    used = recorder.by_step()  # global step before the update -> coefficients
    assert len({tuple(c.values()) for c in used.values()}) == 3  # two jumps happened
    for name, label in [("forces_mse", "forces"), ("stress_mse", "stress")]:
        for ax in (coeff_ax, summary_ax):
            line = _line(ax, label)
            _same_data(line, *_csv_column(run, f"loss_coeff/{name}"))
            first, last = line.get_xdata()[0], line.get_xdata()[-1]
            # optimizer step g (0-based) is drawn over (g, g + 1] on the step axis
            steps = [g for g in used if first <= g < last]
            assert len(steps) == 8
            np.testing.assert_allclose(
                _drawn_y(line, np.array(steps) + 0.5),
                [used[g][name] for g in steps],
                rtol=1e-12,
            )


def test_equal_cosines_are_said_on_the_figure(mtl_run, mtl_figures, tmp_path):
    """ConFIG with equal coefficients makes the task-update cosines equal, so their
    lines are one: the figure says so. The weighted sum's cosines differ: no note."""
    axes = _axes_by_title(mtl_figures["gradient_conflict.png"])
    upd_ax = next(ax for t, ax in axes.items() if t.startswith("cosine of each task"))
    notes = [t.get_text().replace("\n", " ") for t in upd_ax.texts]
    assert any(
        "all 3 task-update cosines are equal at every logged step" in n
        and "lines lie on top of each other" in n
        and "ConFIG" in n
        for n in notes
    ), notes
    coeff_ax = _axes_by_title(mtl_figures["loss_coefficients.png"])[
        "loss coefficients (normalised to sum to 1)"
    ]
    assert any("all 3 loss coefficients are equal" in t.get_text() for t in coeff_ax.texts)

    run = _train(
        tmp_path / "sum",
        MultitaskLightningModule,
        [GradientConflictMonitor("batch", 1)],
        epochs=1,
        aggregator={"_target_": "nequip_mtl.aggregators.Sum"},
    )
    fig = build_figures(load_run(run))["gradient_conflict.png"]
    axes = _axes_by_title(fig)
    upd_ax = next(ax for t, ax in axes.items() if t.startswith("cosine of each task"))
    assert not any("equal at every logged step" in t.get_text() for t in upd_ax.texts)


def test_coinciding_tolerance():
    steps = np.arange(5.0)
    a = Series("a", steps, np.full(5, 0.5))
    assert coinciding({"a": a, "b": Series("b", steps, a.value + 1e-9)}) == pytest.approx(1e-9)
    assert coinciding({"a": a, "b": Series("b", steps, a.value + 1e-3)}) is None
    assert coinciding({"a": a}) is None  # one line is not "lines on top of each other"
    # compared at the shared steps only
    assert coinciding({"a": a, "b": Series("b", steps[::2], np.full(3, 0.5))}) == 0.0


# ---------------------------------------------------------------- errors


def test_empty_directory_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "nequip-mtl-plot: error: no training logs in" in err and "metrics.csv" in err
    with pytest.raises(NoLogsError, match="does not exist"):
        make_plots(tmp_path / "missing")
    assert not (tmp_path / "plots").exists()


def test_module_entry_point_reports_the_error(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "nequip_mtl.plot.cli", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no training logs" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- TensorBoard


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    """A real short run logged by Lightning's TensorBoardLogger and CSVLogger at once."""
    run = tmp_path_factory.mktemp("tb_run")
    torch.manual_seed(0)
    module = MultitaskLightningModule(**module_kwargs())
    tr = trainer(
        run,
        max_epochs=2,
        callbacks=[GradientConflictMonitor("batch", 1), LossCoefficientMonitor("epoch", 1)],
        logger=[
            CSVLogger(str(run), name="logs", version=""),
            TensorBoardLogger(str(run), name="tb", version="", default_hp_metric=False),
        ],
        log_every_n_steps=1,
    )
    tr.fit(module, datamodule=datamodule(batch_size=2))
    return run


def _event_file(run: Path) -> Path:
    (path,) = (run / "tb").glob("events.out.tfevents.*")
    return path


def test_tensorboard_event_files_of_a_real_run(tb_run):
    """TensorBoard's reader gives the values the CSV logger wrote (float32 in the event
    file), and load_run on the TensorBoard directory alone gives every metric series."""
    scalars, problem = read_scalars(_event_file(tb_run))
    assert problem is None
    columns = [
        "train_loss_step/forces_mse",
        "val0_epoch/stress_mae",
        "grad_conflict/cos/forces_mse~stress_mse",
        "loss_coeff/forces_mse",
        "mtl/cos_update/forces_mse",
    ]
    for column in columns:
        steps, values = _csv_column(tb_run, column)
        assert len(steps) > 0
        tb_steps, tb_values = np.array(scalars[column]).T
        np.testing.assert_array_equal(tb_steps, steps)
        np.testing.assert_allclose(tb_values, values, rtol=1e-6, atol=1e-30)
    logs = load_run(tb_run / "tb")
    assert logs.sources == [_event_file(tb_run)] and not logs.notes
    csv_logs = load_run(tb_run / "logs")
    assert set(logs.series) == set(csv_logs.series)
    result = make_plots(tb_run / "tb", tb_run / "tb_plots")
    assert set(result.files) == set(FIGURES)


def test_truncated_event_file_is_not_read_silently(tb_run, tmp_path):
    """A copy cut off mid-record: reading it raises an error naming the problem; plots
    use the intact records before the cut (exactly those of the original) with a note."""
    data = _event_file(tb_run).read_bytes()
    full, _ = read_scalars(_event_file(tb_run))
    cut = tmp_path / "cut" / "events.out.tfevents.1.host.1.0"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(EventFileError, match=r"is truncated after \d+ intact record"):
        read_scalars(cut)
    partial, problem = read_scalars(cut, partial_ok=True)
    assert "truncated" in problem
    assert 0 < sum(map(len, partial.values())) < sum(map(len, full.values()))
    for tag, points in partial.items():
        assert points == full[tag][: len(points)]  # a prefix of the real data, not garbage
    logs = load_run(cut.parent)
    assert any("damaged" in n and "truncated" in n for n in logs.notes), logs.notes


def test_corrupt_event_file_fails_its_crc_check(tb_run, tmp_path):
    data = bytearray(_event_file(tb_run).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a record
    bad = tmp_path / "bad" / "events.out.tfevents.1.host.1.0"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(EventFileError, match="is corrupt after .* crc32 check"):
        read_scalars(bad)
    logs = load_run(bad.parent)
    assert any("damaged" in n and "corrupt" in n for n in logs.notes), logs.notes


def test_missing_tensorboard_is_a_clear_error(tb_run, tmp_path):
    """Without the `tensorboard` package: a TensorBoard-only run is a clear error naming
    the extra to install; with a CSV next to it, the event files are skipped with a note."""
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from nequip_mtl.plot.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", code, str(tb_run / "tb"), "--out", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert 'pip install -e ".[tensorboard]"' in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-c", code, str(tb_run), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "note: ignored 1 TensorBoard event file(s)" in res.stdout
    assert 'pip install -e ".[tensorboard]"' in res.stdout


def test_new_style_tensorboard_scalars_are_read(tmp_path):
    """Scalars that torch's SummaryWriter writes in the tensor encoding (new_style=True,
    float32 and float64) are read back with the values written, next to classic
    simple_value scalars; a one-element tensor of another plugin is not a scalar, and a
    tag's plugin is known from its first value's metadata (writers may omit it later)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.util.tensor_util import make_tensor_proto
    from torch.utils.tensorboard import SummaryWriter

    values = [0.1 * k + 1 / 3 for k in range(6)]
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step, v in enumerate(values):
        writer.add_scalar("train_loss_step/forces_mse", v, step, new_style=True)
        writer.add_scalar("val0_epoch/forces_mae", v, step, new_style=True, double_precision=True)
        writer.add_scalar("train_loss_step/stress_mse", 2 * v, step)
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom"))
        other = Summary.Value(tag="custom/thing", tensor=make_tensor_proto(np.float32(v)))
        if step == 0:
            other.metadata.CopyFrom(meta)
        writer._get_file_writer().add_summary(Summary(value=[other]), step)
    writer.close()
    scalars, problem = read_scalars(_event_file(tmp_path))
    assert problem is None
    assert set(scalars) == {
        "train_loss_step/forces_mse",
        "val0_epoch/forces_mae",
        "train_loss_step/stress_mse",
    }
    steps = list(range(6))
    assert scalars["train_loss_step/forces_mse"] == [
        (k, float(np.float32(v))) for k, v in zip(steps, values)
    ]
    assert scalars["val0_epoch/forces_mae"] == list(zip(steps, values))  # float64: exact
    logs = load_run(tmp_path / "tb")
    np.testing.assert_array_equal(logs.series["val0_epoch/forces_mae"].value, values)
    np.testing.assert_array_equal(logs.series["train_loss_step/forces_mse"].step, steps)


# ---------------------------------------------------------------- names and units


@pytest.mark.parametrize(
    "name, field, kind, type_name, unit_str, label",
    [
        ("forces_mse", "forces", "mse", None, "(eV/Å)²", "forces MSE [(eV/Å)²]"),
        (
            "per_atom_energy_mae",
            "per_atom_energy",
            "mae",
            None,
            "eV/atom",
            "energy per atom MAE [eV/atom]",
        ),
        ("total_energy_rmse", "total_energy", "rmse", None, "eV", "total energy RMSE [eV]"),
        ("total_energy_mse", "total_energy", "mse", None, "eV²", "total energy MSE [eV²]"),
        ("stress_mae", "stress", "mae", None, "eV/Å³", "stress MAE [eV/Å³]"),
        ("forces_mae_Cu", "forces", "mae", "Cu", "eV/Å", "forces MAE [eV/Å]"),
        ("dipole_thing", "dipole_thing", None, None, "", "dipole thing value"),
    ],
)
def test_metric_names_and_units(name, field, kind, type_name, unit_str, label):
    parsed = parse_metric(name)
    assert (parsed.field, parsed.kind, parsed.type_name) == (field, kind, type_name)
    assert unit(field, kind) == unit_str
    assert axis_label(field, kind) == label


@pytest.mark.parametrize(
    "field, kind, unit_str",
    [
        ("forces", "mae", "kcal/mol/Å"),
        ("forces", "mse", "(kcal/mol/Å)²"),
        ("per_atom_energy", "rmse", "kcal/mol/atom"),
        ("total_energy", "mse", "(kcal/mol)²"),
        ("stress", "mae", "kcal/mol/Å³"),
    ],
)
def test_units_of_kcal_per_mol_data(field, kind, unit_str):
    assert unit(field, kind, Units("kcal/mol", "Å", "test")) == unit_str

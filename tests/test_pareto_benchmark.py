"""``python -m benchmarks.pareto`` end to end on a tiny budget: files, plotted points == the raw runs,
units, the two-stage switch through nequip's LossCoefficientScheduler, the front rules."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import methods as M
from benchmarks import pareto as P
from benchmarks import protocol
from benchmarks import report as R

REPO = Path(__file__).resolve().parents[1]

KCAL = 43.364  # meV per kcal/mol
#: the real ethanol data shipped in ``benchmarks/data/`` (the generated alloy, were it absent)
DATASET = "ethanol" if protocol.ETHANOL.exists() else "alloy"
#: reported meV per unit of the json's raw values (kcal/mol, or eV)
FACTOR = {"ethanol": KCAL, "alloy": 1000.0}[DATASET]
UNITS_LINE = {
    "ethanol": "1 kcal/mol = 43.364 meV",
    "alloy": "Errors in meV (the data is in eV)",
}[DATASET]


#: the benchmark's training clock (``protocol.TICKS``), replaced by one that advances by
#: half of ``TICK_S`` at every reading: the ``Clock`` callback reads it at the start and at
#: the end of every training step and its tail once more after the other callbacks, so
#: each step costs exactly ``TICK_S`` of training clock (a power of two: the sums are
#: exact), whatever the machine and its load. The quick budget of 2 s is then 128 steps, 8
#: epochs of ethanol (16 steps each), 4.3 of the alloy (30 each)
TICK_S = 1 / 64
FAKE_CLOCK = (
    "import itertools, sys\n"
    "from benchmarks import pareto, protocol\n"
    "readings = itertools.count()\n"
    f"protocol.TICKS['cpu'] = lambda: next(readings) * {TICK_S / 2!r}\n"
    "pareto.main(sys.argv[1:])\n"
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python -m benchmarks.pareto --quick`` (its ``main``, in one process: ``--jobs 1``)
    on the step-counting clock ``FAKE_CLOCK``."""
    out = tmp_path_factory.mktemp("pareto") / "pareto"
    subprocess.run(
        [
            sys.executable,
            "-c",
            FAKE_CLOCK,
            "--quick",
            "--dataset",
            DATASET,
            "--out",
            str(out),
        ],  # fmt: skip
        check=True,
        cwd=REPO,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return out, json.loads(out.with_suffix(".json").read_text())


def _raw_mean(runs, method, key, metric):
    return statistics.fmean(r[key][metric] for r in runs if r["method"] == method)


@pytest.mark.slow
def test_quick_writes_every_file_and_runs_every_method(quick):
    out, data = quick
    for path in (
        out.with_suffix(".md"),
        out.parent / "pareto.png",
        out.parent / "pareto_curves.png",
    ):
        assert path.stat().st_size > 0, path
    methods = {r["method"] for r in data["runs"]}
    assert methods == set(P.BASELINES) | {"upgrad"}
    # five energy:force ratios spanning 100:1 to 1:100, on nequip's plain module
    ratios = {M.methods()[m].coeffs["total_energy"] / M.methods()[m].coeffs["forces"]
              for m in P.SWEEP if M.methods()[m].coeffs} | {1.0}  # fmt: skip
    assert len(ratios) == 5 and min(ratios) == 0.01 and max(ratios) == 100


@pytest.mark.slow
def test_plotted_points_equal_the_raw_runs_in_mev(quick):
    """The figure's markers sit at the seed means of the json's raw per-run MAEs (kcal/mol
    on ethanol, eV on the alloy) converted to meV; its axes say meV."""
    _, data = quick
    labels = {m: m for m in P.BASELINES + ["upgrad"]}
    views = [(v["caption"], v["rows"]) for v in data["views"].values()]
    fig = R.plot_front(views, labels, "t", protocol.reported_metrics(DATASET), x=P.E, y=P.F,
                       sweep=P.SWEEP, baselines=P.BASELINES)  # fmt: skip
    for ax, key in zip(fig.axes, data["views"]):
        drawn = {ln.get_gid(): ln.get_xydata()[0] for ln in ax.lines if ln.get_gid()}
        expected = {r["method"] for r in data["views"][key]["rows"]}
        assert set(drawn) == expected
        for method, (x, y) in drawn.items():
            e = _raw_mean(data["runs"], method, key, "per_atom_energy_mae") * FACTOR
            f = _raw_mean(data["runs"], method, key, "forces_mae") * FACTOR
            assert x == pytest.approx(e, rel=1e-9) and y == pytest.approx(f, rel=1e-9)
        assert "meV/atom" in ax.get_xlabel() and "meV/Å" in ax.get_ylabel()


@pytest.mark.slow
def test_markdown_cells_are_the_raw_runs_in_mev(quick):
    out, data = quick
    md = out.with_suffix(".md").read_text()
    for method, label in (("ws", "weighted sum 1:1"), ("upgrad", "UPGrad")):
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} ") or
                   ln.startswith(f"| **{label}** "))  # fmt: skip
        energy, force = row.split(" | ")[1:3]
        e = _raw_mean(data["runs"], method, "budget", "per_atom_energy_mae") * FACTOR
        f = _raw_mean(data["runs"], method, "budget", "forces_mae") * FACTOR
        assert energy.startswith(f"{e:.1f} ± ") and force.startswith(f"{f:.1f} ± ")
    assert "meV/atom" in md and "meV/Å" in md and UNITS_LINE in md


@pytest.mark.slow
def test_two_stage_switches_in_the_last_quarter_through_nequips_scheduler(quick):
    """On the step-counting clock every run takes ``budget / TICK_S`` steps, and the
    two-stage run switches at the first epoch that starts in the last quarter."""
    _, data = quick
    args = data["meta"]["args"]
    budget = args["budget_s"]
    per_epoch = math.ceil(args["n_train"] / args["batch_size"])
    switch_epoch = math.ceil(0.75 * budget / (per_epoch * TICK_S))
    assert switch_epoch * per_epoch * TICK_S < budget  # an epoch starts in the last quarter
    assert {r["steps"] for r in data["runs"]} == {round(budget / TICK_S)}
    for r in (r for r in data["runs"] if r["method"] == P.TWO_STAGE):
        assert r["switch"] == {"epoch": switch_epoch, "clock_s": switch_epoch * per_epoch * TICK_S}
        assert r["switch"]["clock_s"] >= 0.75 * budget
        # nequip's LossCoefficientScheduler normalises the second stage's 10:1 (alloy:
        # 10:1:10, stress following energy)
        total = 11 if DATASET == "ethanol" else 21
        assert r["final_coeffs"]["per_atom_energy_mse"] == pytest.approx(10 / total)
        assert r["final_coeffs"]["forces_mse"] == pytest.approx(1 / total)
    for r in (r for r in data["runs"] if r["method"] == "ws_f100"):
        assert r["switch"] is None
        total = 101 if DATASET == "ethanol" else 102
        assert r["final_coeffs"]["forces_mse"] == pytest.approx(100 / total)


def _row(name, e, f):
    return {"method": name, "per_atom_energy_mae": (e, 0.0), "forces_mae": (f, 0.0)}


def test_front_classification():
    """The weighted-sum points beaten on both MAEs by another weighted sum leave the
    front; a method is beyond (beats a front point on both), on (beats no front point,
    beaten by no weighted sum) or dominated (beaten on both by one)."""
    rows = [
        _row("ws_e100", 1.0, 10.0),
        _row("ws", 5.0, 5.0),
        _row("ws_f100", 10.0, 1.0),
        _row("ws_e10", 6.0, 6.0),  # beaten by ws
        _row("beyond", 4.0, 4.0),
        _row("on", 2.0, 8.0),
        _row("on_beats_off_front", 4.5, 5.8),  # beats only ws_e10, which is off the front
        _row("dominated", 7.0, 7.0),
    ]
    s = P.classify(rows)
    assert [s[m]["status"] for m in ("ws_e100", "ws", "ws_f100", "ws_e10")] == [
        "front", "front", "front", "dominated"
    ]  # fmt: skip
    assert s["ws_e10"]["by"] == ["ws"]
    assert s["beyond"]["status"] == "beyond" and s["beyond"]["beats"] == ["ws"]
    assert s["on"]["status"] == "on" and s["on"]["beats"] == []
    assert s["on_beats_off_front"]["status"] == "on" and s["on_beats_off_front"]["beats"] == []
    assert s["dominated"]["status"] == "dominated" and set(s["dominated"]["by"]) == {"ws", "ws_e10"}


def test_cosine_on_clock_anneals_over_the_budget():
    clock = SimpleNamespace(elapsed=0.0)
    cb = protocol.cosine_on_clock(clock, budget_s=10.0, lr=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer = SimpleNamespace(optimizers=[opt])
    for t, expected in ((0.0, 0.2), (2.5, 0.1 * (1 + math.cos(math.pi / 4))), (5.0, 0.1),
                        (10.0, 0.0), (12.0, 0.0)):  # fmt: skip
        clock.elapsed = t
        cb.on_train_batch_start(trainer, None, None, 0)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-15)


def test_the_training_clock_counts_the_callbacks_batch_end_work():
    """A callback burning 0.2 s of CPU time at every batch end, between the clock and its
    tail, adds its time to the clock: three steps with it read at least 0.54 s more than
    three without (thread CPU time: the burn is a busy loop on this thread). Mutation:
    a tail that does not add the time since the clock's own end fails."""
    import time

    import lightning
    from nequip.train import NequIPLightningModule

    from tests._harness import datamodule, module_kwargs

    class Burn(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            start = time.thread_time()
            while time.thread_time() - start < 0.2:
                pass

    def elapsed(extra):
        a = {"clock": "cpu", "budget_s": 1e9, "epochs": 1}
        clock, record = protocol.budget_callbacks(a, 2, [])
        lightning.seed_everything(0)
        module = NequIPLightningModule(**module_kwargs())
        fit = protocol.trainer([clock, *extra, clock.tail], max_steps=3, max_epochs=10,
                               limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
        fit.fit(module, datamodule=datamodule())
        assert clock.steps == 3
        return clock.elapsed

    assert elapsed([Burn()]) - elapsed([]) >= 3 * 0.2 * 0.9


def test_from_json_command_rewrites_the_committed_table(tmp_path):
    """The documented ``--from-json`` command (a subprocess, from the repository root)
    writes the committed Markdown of the committed raw runs, and the figures beside it;
    every committed table is checked in-process by tests/test_benchmark_results.py."""
    results = REPO / "benchmarks" / "results"
    out = tmp_path / "pareto_alloy_long"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.pareto",
         "--from-json", str(results / "pareto_alloy_long.json"), "--out", str(out)],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    assert out.with_suffix(".md").read_text() == (results / "pareto_alloy_long.md").read_text()
    for png in (out.with_suffix(".png"), tmp_path / "pareto_alloy_long_curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

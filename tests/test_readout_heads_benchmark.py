"""``python -m benchmarks.readout_heads --quick`` end to end: every table cell equals the raw
runs (recomputed here), the two variants differ by exactly one readout layer, the references
are the least-squares fit of each training file, the verdict follows the stated rule, and
``--from-json`` rewrites the same report. Skipped without the DFT ethanol file."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import protocol as P
from benchmarks import readout_heads as H

REPO = Path(__file__).resolve().parents[1]
LABELS = {
    "shifts": "per-dataset energy references only",
    "heads": "per-dataset energy references + readout heads",
}
COLUMNS = {"dft/per_atom_energy_mae": 1, "dft/forces_mae": 2, "xtb/per_atom_energy_mae": 3,
           "xtb/forces_mae": 4}  # fmt: skip

pytestmark = pytest.mark.skipif(not P.ETHANOL.exists(), reason=f"no DFT file at {P.ETHANOL}")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "rh"
    cmd = [sys.executable, "-m", "benchmarks.readout_heads", "--quick", "--budget-s", "1",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    return out, json.loads(out.with_suffix(".json").read_text())


def _rows(md: str) -> dict[str, list[str]]:
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


def _pm(values) -> str:
    values = [P.KCAL_MOL_TO_MEV * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def test_table_cells_equal_the_raw_runs(quick):
    out, data = quick
    rows = _rows(out.with_suffix(".md").read_text())
    assert set(rows) == set(LABELS.values())
    for variant, label in LABELS.items():
        runs = [r for r in data["runs"] if r["variant"] == variant]
        assert [r["seed"] for r in runs] == [0]
        for metric, col in COLUMNS.items():
            assert rows[label][col] == _pm([r["budget"][metric] for r in runs]), metric
        assert rows[label][5] == f"{statistics.fmean(r['steps'] for r in runs):.0f}"
        assert all(r["steps"] > 0 and r["clock_s"] >= 1.0 for r in runs)


def test_heads_add_one_readout_layer_per_extra_dataset(quick):
    """The readout's last layer is num_features x 1; two datasets: one more copy."""
    _, data = quick
    params = {r["variant"]: r["params"] for r in data["runs"]}
    assert params["heads"] - params["shifts"] == data["meta"]["args"]["num_features"] == 8


def test_references_are_each_training_files_least_squares_fit(quick):
    """Every frame is C2H6O: the minimum-norm fit is mean(E) * (2, 6, 1) / 41 per file."""
    import ase.io

    _, data = quick
    refs, files = data["meta"]["data"]["references"], data["meta"]["data"]["files"]
    for name in ("dft", "xtb"):
        frames = ase.io.read(files[f"{name}_train"], index=":")
        assert len(frames) == data["meta"]["args"][f"{name}_train"]
        mean = statistics.fmean(a.get_potential_energy() for a in frames)
        for t, c in {"C": 2, "H": 6, "O": 1}.items():
            assert refs[name][t] == pytest.approx(mean * c / 41, rel=1e-9)
    test = ase.io.read(files["dft_test"], index=":")
    train = ase.io.read(files["dft_train"], index=":")
    assert not {a.get_potential_energy() for a in test} & {a.get_potential_energy() for a in train}


def test_verdict_rule():
    """Against sd-sized spreads: beyond it better/worse, within it no claim."""

    def rows(shift_mean, heads_mean, sd, n=3):
        def row(v, m):
            return {"variant": v, "n": n, **{k: (m, sd) for k in H.DFT_METRICS}}

        return [row("shifts", shift_mean), row("heads", heads_mean)]

    verdict = H.verdicts(rows(1.0, 0.8, 0.1))["dft/forces_mae"]
    assert verdict["verdict"] == "better" and verdict["gain"] == pytest.approx(0.2)
    assert H.verdicts(rows(1.0, 1.2, 0.1))["dft/forces_mae"]["verdict"] == "worse"
    assert H.verdicts(rows(1.0, 0.95, 0.1))["dft/forces_mae"]["verdict"] == (
        "within the seed spread"
    )
    assert H.verdicts(rows(1.0, 0.5, 0.0, n=1))["dft/forces_mae"]["verdict"].startswith("one")


def test_from_json_rewrites_the_same_report(quick, tmp_path):
    out, _ = quick
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.readout_heads", "--from-json",
           str(out.with_suffix(".json")), "--out", str(tmp_path / "again")]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    assert (tmp_path / "again.md").read_text() == out.with_suffix(".md").read_text()

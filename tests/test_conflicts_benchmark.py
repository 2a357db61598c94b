"""``python -m benchmarks.conflicts`` end to end on a tiny budget: it writes its files, every
number its tables and figures show is what the raw per-step measurements in its json
give (recomputed here independently), the measurements are valid cosines and norms, and
the units are stated. The committed results' tables are checked against their json too."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import conflicts
from benchmarks import protocol as C
from benchmarks.methods import variant_label

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ["ws_100", "ws_1", "ws_0.01", "upgrad", "config"]


def _rows(md: str, first_cell: str | None = None) -> list[list[str]]:
    """The cells of every Markdown table row (header and rule rows excluded)."""
    out = []
    for line in md.splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if first_cell is None or cells[0] == first_cell:
            out.append(cells)
    return out


def _quartiles(xs):
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not C.ETHANOL.exists():
        pytest.skip(f"no {C.ETHANOL}")
    out = tmp_path_factory.mktemp("conflicts")
    # --quick: 1 epoch (16 steps), every step measured; a small model and 2 seeds, so that
    # pooling over seeds is exercised
    cmd = [sys.executable, "-m", "benchmarks.conflicts", "--quick", "--dataset", "ethanol", "--seeds", "0", "1",
           "--num-features", "8", "--radial-width", "8", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "conflicts_ethanol.json").read_text())
    return out, data, (out / "conflicts_ethanol.md").read_text()


def test_files_and_meta(quick):
    out, data, md = quick
    for name in ("conflicts_ethanol_cosines.png", "conflicts_ethanol_evolution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = data["meta"]
    assert "--quick" in meta["command"] and meta["command"] in md
    assert meta["machine"]["torch"] and meta["args"]["dataset"] == "ethanol"
    assert meta["units"] == {"energy": "kcal/mol", "length": "Å"}
    # units are stated for the losses, the norms and the validation errors
    for unit in ("(kcal/mol/atom)²", "(kcal/mol/Å)²", "forces_mae (kcal/mol/Å)"):
        assert unit in md
    assert "unweighted" in md


def test_measurements_are_valid(quick):
    _, data, _ = quick
    runs = data["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in VARIANTS for s in (0, 1)
    )
    tasks = ["per_atom_energy_mse", "forces_mse"]
    for r in runs:
        recs = r["records"]
        assert r["steps"] == 16 and [x["step"] for x in recs] == list(range(16))
        # nequip's weighted sum: extra per-task backward passes; ours: the module's Gram
        source = "autograd" if r["variant"].startswith("ws") else "module"
        assert {x["source"] for x in recs} == {source}
        for x in recs:
            assert list(x["norms"]) == tasks
            assert all(n > 0 for n in x["norms"].values())
            assert list(x["cos"]) == ["per_atom_energy_mse~forces_mse"]
            assert all(-1 <= c <= 1 for c in [*x["cos"].values(), *x["cos_update"].values()])
            if source == "module":  # UPGrad and ConFIG never oppose a task gradient
                assert min(x["cos_update"].values()) > -1e-6
    # every variant starts from the same model (seed): the first step's gradients agree
    for seed in (0, 1):
        first = [r["records"][0]["cos"] for r in runs if r["seed"] == seed]
        for c in first[1:]:
            assert c == pytest.approx(first[0], abs=1e-5)


def test_tables_equal_the_raw_measurements(quick):
    _, data, md = quick
    pair = "per_atom_energy_mse~forces_mse"
    labels = {}
    for v in VARIANTS:
        runs = [r for r in data["runs"] if r["variant"] == v]
        cos = [x["cos"][pair] for r in runs for x in r["records"]]
        rows = [c for c in _rows(md) if len(c) == 14 and _label_map().get(c[0]) == v]
        assert len(rows) == 1, v
        (row,) = rows
        assert row[1] == "E-F"
        labels[v] = row[0]
        q1, med, q3 = _quartiles(cos)
        neg = sum(c < 0 for c in cos) / len(cos)
        per_seed = [sum(x["cos"][pair] < 0 for x in r["records"]) / 16 for r in runs]
        assert int(row[2]) == len(cos) == 32
        assert float(row[3]) == pytest.approx(neg, abs=5.01e-4)
        assert [float(x) for x in row[4].strip("()").split(", ")] == pytest.approx(
            per_seed, abs=5.01e-4
        )
        strong = sum(c < -0.5 for c in cos) / len(cos)
        for cell, value in zip(row[5:10], (strong, med, q1, q3, min(cos))):
            assert float(cell) == pytest.approx(value, abs=5.01e-4)
        # one epoch: the early and the late window are that epoch
        assert row[10] == row[11] == row[3] and row[12] == row[13] == row[6]
        # the overview row: fraction negative (median)
        (over,) = [c for c in _rows(md, row[0]) if len(c) == 4]
        assert over[1] == f"{row[3]} ({row[6]})"
        # the figures: the violin annotations and the binned medians of the evolution plot
        shown = data["figures"]["violin"][pair][v]
        assert shown["n"] == len(cos)
        assert shown["frac_neg"] == pytest.approx(neg, abs=1e-12)
        assert shown["median"] == pytest.approx(med, abs=1e-12)
        evo = data["figures"]["evolution"]["cos(E-F)"][v]
        b = data["figures"]["evolution"]["bin_steps"]
        for epoch, median, n in zip(evo["epoch"], evo["median"], evo["n"]):
            in_bin = [
                x["cos"][pair]
                for r in runs
                for x in r["records"]
                if x["step"] // b == round(epoch * 16 / b - 0.5)
            ]
            assert n == len(in_bin) and median == pytest.approx(statistics.median(in_bin))
        assert sum(evo["n"]) == len(cos)

        # norm ratios |g_F| / |g_E|: median, quartiles, first and last epoch (1 epoch here)
        ratio = [x["norms"]["forces_mse"] / x["norms"]["per_atom_energy_mse"]
                 for r in runs for x in r["records"]]  # fmt: skip
        (rrow,) = [c for c in _rows(md, labels[v]) if len(c) == 7]
        assert rrow[1] == "‖g_F‖/‖g_E‖"
        q1, med, q3 = _quartiles(ratio)
        assert float(rrow[2]) == float(f"{med:.3g}")
        assert rrow[3] == f"{q1:.3g}-{q3:.3g}"
        assert float(rrow[4]) == float(rrow[5]) == float(f"{med:.3g}")
        assert over[2] == f"{rrow[4]} → {rrow[5]}"


def _label_map():
    return {variant_label(v, 2): v for v in VARIANTS}


def test_committed_results_match_their_json():
    """The committed tables and the json's derived summary are what ``--from-json`` makes
    of the committed raw runs."""
    found = 0
    for ds in ("alloy", "ethanol"):
        path = C.RESULTS / f"conflicts_{ds}.json"
        if not path.exists():
            continue
        found += 1
        data = json.loads(path.read_text())
        variants = list(data["meta"]["args"]["variants"])
        summary = conflicts.summarize(data["runs"], variants)
        assert json.loads(json.dumps(summary)) == data["summary"]
        md = conflicts.markdown(data)
        assert md == path.with_suffix(".md").read_text()
        for fig in ("cosines", "evolution"):
            assert (C.RESULTS / f"conflicts_{ds}_{fig}.png").exists()
    if not found:
        pytest.skip("no committed conflict results")


def test_docs_page_links_the_tables_and_its_claims_agree_with_the_json():
    """docs/conflicts.md copies no table (they are rendered on docs/benchmarks.md), names the
    commands of the committed results, shows both data sets' figures, and what it says of
    the methods is what the committed json's summary says: UPGrad and ConFIG never applied
    an update opposing a task, the 1:1 weighted sum did; on ethanol the E-F cosine is
    negative more often under UPGrad than under the 1:1 weighted sum, and on the alloy
    UPGrad's fraction is above the 1:1:1 sum's for every pair. Mutation: a table row pasted
    back into the page, or a summary whose update fractions are flipped, fails here."""
    page = (REPO / "docs" / "conflicts.md").read_text()
    assert not re.findall(r"^\| (weighted sum|UPGrad|ConFIG)", page, flags=re.M)
    results = {ds: C.RESULTS / f"conflicts_{ds}.json" for ds in ("alloy", "ethanol")}
    if not all(p.exists() for p in results.values()):
        pytest.skip("no committed conflict results")
    summary = {}
    for ds, path in results.items():
        data = json.loads(path.read_text())
        assert data["meta"]["command"] in page, ds
        assert f"(benchmarks.md#conflicts_{ds})" in page
        for fig in ("cosines", "evolution"):
            assert f"../benchmarks/results/conflicts_{ds}_{fig}.png" in page
        summary[ds] = conflicts.summarize(data["runs"], data["meta"]["args"]["variants"])
        for v in ("upgrad", "config"):
            assert set(summary[ds][v]["cos_update_frac_neg"].values()) == {0.0}, (ds, v)
        assert max(summary[ds]["ws_1"]["cos_update_frac_neg"].values()) > 0.1, ds
    ef = "per_atom_energy_mse~forces_mse"
    eth = summary["ethanol"]
    assert eth["upgrad"]["cos"][ef]["all"]["frac_neg"] > eth["ws_1"]["cos"][ef]["all"]["frac_neg"]
    alloy = summary["alloy"]
    for pair, c in alloy["upgrad"]["cos"].items():
        assert c["all"]["frac_neg"] > alloy["ws_1"]["cos"][pair]["all"]["frac_neg"], pair

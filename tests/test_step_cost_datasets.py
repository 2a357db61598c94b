"""``python -m benchmarks.step_cost --datasets 2 --quick`` (the study
``benchmarks.step_cost_datasets``): a real interleaved run of the dataset-task methods on two
training datasets; every cell of its table is recomputed here from the raw per-step times in
its json, and ``--from-json`` rewrites the same table."""

from __future__ import annotations

import statistics

import pytest

from benchmarks import report as R
from benchmarks import step_cost as S

METHODS = ["ws", "upgrad_datasets", "upgrad_datasets_masked", "upgrad_components"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sc") / "step_cost_datasets_quick"
    S.main(["--datasets", "2", "--quick", "--out", str(out)])
    return out, R.read_json(out.with_suffix(".json")), out.with_suffix(".md").read_text()


def _table(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| dtype | frames per dataset | atoms per sub-batch | method |")
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[1:]]


def _ci(r, key) -> str:
    lo, hi = r[f"{key}_ci95"]
    assert lo <= hi
    return f"[{lo:.2f}, {hi:.2f}]"


def test_every_cell_is_the_raw_measurements(quick):
    _, data, md = quick
    results = data["results"]
    assert [(r["frames_per_dataset"], r["method"]) for r in results] == [
        (k, m) for k in (2, 4) for m in METHODS
    ]
    cells = _table(md)
    assert len(cells) == len(results)
    ratios = {}  # (k, method) -> the ratio of medians from the raw step times
    medians = {}  # (k, method) -> the run's own median CPU step (before rounding)
    for r, row in zip(results, cells):
        ref = next(
            x
            for x in results
            if x["method"] == "ws" and x["frames_per_dataset"] == r["frames_per_dataset"]
        )
        cpu, ref_cpu = r["raw_cpu_s"], ref["raw_cpu_s"]
        assert len(cpu) == len(ref_cpu) == 6 and all(t > 0 for t in cpu)
        ratio = statistics.median(cpu) / statistics.median(ref_cpu)
        ratios[r["frames_per_dataset"], r["method"]] = ratio
        medians[r["frames_per_dataset"], r["method"]] = r["cpu_median_s"]
        paired = [a / b for a, b in zip(cpu, ref_cpu)]
        q1, _, q3 = statistics.quantiles(paired, n=4)
        mean = statistics.fmean(cpu) / statistics.fmean(ref_cpu)
        wall = statistics.median(r["raw_wall_s"]) / statistics.median(ref["raw_wall_s"])
        k = r["frames_per_dataset"]
        atoms = [float(a) for a in row[2].split(" / ")]
        assert len(atoms) == 2 and all(8 * k <= a <= 32 * k for a in atoms)  # 8-32 atoms a frame
        assert row[:2] == ["float32", str(k)]
        assert row[3] == r["label"]
        assert row[4] == f"{1e3 * statistics.median(cpu):.0f}"
        assert row[5] == f"{ratio:.2f} " + _ci(r, "cpu_vs_weighted_sum")
        assert row[6] == f"{statistics.median(paired):.2f} [{q1:.2f}, {q3:.2f}]"
        assert row[7] == f"{mean:.2f} " + _ci(r, "cpu_mean_vs_weighted_sum")
        assert row[8] == f"{wall:.2f}"
        if r["method"] == "ws":
            assert row[5:8] == ["1.00 [1.00, 1.00]"] * 3
    # the stored ratio is the one of the raw times (stored rounded to 10 us, which moves each
    # median by at most 5 us, so the ratio by at most 5 us / m1 + 5 us / m2 relative, to
    # first order; shorter steps, a faster CPU, mean a larger relative change)
    half = 0.5e-5
    for r in results:
        k, m = r["frames_per_dataset"], r["method"]
        m1, m2 = medians[k, m], medians[k, "ws"]
        bound = (half / m1 + half / m2) / (1 - half / m2)
        assert abs(ratios[k, m] / r["cpu_vs_weighted_sum"] - 1) <= bound


def test_the_run_records_its_command_and_load_and_regenerates(quick, tmp_path):
    out, data, md = quick
    assert data["meta"]["command"] == (
        f"OMP_NUM_THREADS=1 python -m benchmarks.step_cost_datasets --datasets 2 --quick --out {out}"
    )
    assert f"Command: `{data['meta']['command']}`" in md
    load = [x for r in data["results"] for x in r["loadavg"]]
    assert load and f"{min(load):.2f}-{max(load):.2f}" in md
    assert out.with_suffix(".png").stat().st_size > 0
    S.main(["--from-json", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text() == md
    assert S.markdown(R.read_json(tmp_path / "again.json")) == md

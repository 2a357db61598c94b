"""``python -m benchmarks.finetune --quick`` end to end: every table cell equals the raw runs
(recomputed here), the changes against the pretrained model too, the places against the
replay front follow the dominance rule, each fine-tune starts from the cached pretrained
model, the epoch view is the epoch asked for, and ``--from-json`` rewrites the same report.
On ``ethanol_levels`` (B at another level of theory) each test set is scored at its own
energy references (recomputed from the saved models and nequip's ``select_fidelity``), and
pseudolabel replay trains on the pretrained model's own predictions (an independent forward
pass)."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import finetune as F
from benchmarks import methods as M
from benchmarks import protocol as P

REPO = Path(__file__).resolve().parents[1]
METHODS = ["ft_naive", "ft_replay_0.3", "ft_replay_1", "ft_upgrad", "ft_budget_0.05",
           "ft_budget_0.05_sweep"]  # fmt: skip
LABELS = {
    "ft_budget_0.05": "replay with a forgetting budget (+5%)",
    "ft_budget_0.05_sweep": "replay with a forgetting budget (+5%), the sweep's total time",
    "ft_naive": "naive: new data only (weighted sum)",
    "ft_replay_0.3": "**replay, weighted sum 0.3:1**",
    "ft_replay_1": "**replay, weighted sum 1:1**",
    "ft_upgrad": "replay, dataset tasks, UPGrad",
}
#: metric -> table column, for the alloy pair (eV data, reported in meV)
COLUMNS = {"B/forces_mae": 1, "B/per_atom_energy_mae": 2, "A/forces_mae": 3,
           "A/per_atom_energy_mae": 4}  # fmt: skip
#: metric -> the column of its change against the pretrained model (%)
CHANGE_COLUMNS = {"B/forces_mae": 5, "B/per_atom_energy_mae": 6}
STEPS, FORCE_PLACE, ENERGY_PLACE = 7, 9, 10
LEVEL_METHODS = ["ft_naive", "ft_replay_1", "ft_pseudo_1"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "ft"
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--quick", "--pair", "alloy",
           "--pretrain-s", "1.5", "--budget-s", "1", "--methods", *METHODS, "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    return out, json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def levels(tmp_path_factory):
    """The quick run of ``ethanol_levels`` (naive, replay and pseudolabel replay at 1:1), its
    final models saved."""
    root = tmp_path_factory.mktemp("finetune_levels")
    out, states = root / "ft", root / "states"
    states.mkdir()
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--quick", "--pair", "ethanol_levels",
           "--pretrain-s", "1.5", "--budget-s", "1", "--methods", *LEVEL_METHODS,
           "--out", str(out), "--save-states", str(states)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    return states, json.loads(out.with_suffix(".json").read_text())


def _tables(md: str) -> dict[str, dict[str, list[str]]]:
    """``{"budget"|"epochs"|"total": {strategy cell: row cells}}`` of the Markdown report."""
    out, view = {}, None
    for line in md.splitlines():
        if line.startswith("**Equal training time"):
            view = "budget"
        elif line.startswith("**Equal epochs"):
            view = "epochs"
        elif line.startswith("**Equal total compute"):
            view = "total"
        elif line.startswith("**Forgetting budgets"):
            view = None
        elif view and line.startswith("| ") and not line.startswith("| strategy"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(view, {})[cells[0]] = cells
    return out


def _pm(values) -> str:
    """mean ± sample sd in meV of raw eV values (0 for one value)."""
    values = [1000.0 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def _pct(values) -> str:
    """mean ± sample sd of percentages (0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def _change(data, method, view, metric) -> list[float]:
    """Each run's change of ``metric`` against the pretrained model of its seed (%)."""
    before = {r["seed"]: r["budget"][metric] for r in data["pretrain"]}
    return [100.0 * (r[view][metric] - before[r["seed"]]) / before[r["seed"]]
            for r in data["runs"] if r["method"] == method]  # fmt: skip


def test_table_cells_equal_the_raw_runs(quick):
    out, data = quick
    tables = _tables(out.with_suffix(".md").read_text())
    assert set(tables) == {"budget", "epochs", "total"}
    for view in ("budget", "epochs"):
        rows = tables[view]
        assert set(rows) == set(LABELS.values()) | {"*pretrained on A (before)*"}
        for method, label in LABELS.items():
            runs = [r for r in data["runs"] if r["method"] == method]
            assert len(runs) == 1  # one seed
            for metric, col in COLUMNS.items():
                assert rows[label][col] == _pm([r[view][metric] for r in runs]), (view, metric)
            assert rows[label][STEPS] == f"{statistics.fmean(r[view]['step'] for r in runs):.0f}"
        pre = rows["*pretrained on A (before)*"]
        for metric, col in COLUMNS.items():
            assert pre[col] == _pm([r["budget"][metric] for r in data["pretrain"]])


def test_changes_against_the_pretrained_model_equal_the_raw_runs(quick):
    """Every strategy's change of B's force and energy MAE against the pretrained model, in
    both views, and the line naming the best of them, recomputed from the raw runs.
    Mutation: the change's sign flipped (``1 - after / before``) fails it."""
    out, data = quick
    md = out.with_suffix(".md").read_text()
    tables = _tables(md)
    best = []
    for view in ("budget", "epochs"):
        for metric, col in CHANGE_COLUMNS.items():
            for method, label in LABELS.items():
                assert tables[view][label][col] == _pct(_change(data, method, view, metric))
            assert tables[view]["*pretrained on A (before)*"][col] == ""
            means = {m: statistics.fmean(_change(data, m, view, metric)) for m in LABELS}
            m = min(means, key=means.get)
            best.append(f"{_pct(_change(data, m, view, metric))} % ({LABELS[m].strip('*')})")
    (line,) = [ln for ln in md.splitlines() if ln.startswith("**Best B improvement")]
    assert all(b in line for b in best), (best, line)


def test_changes_pair_each_run_with_its_own_seeds_pretrained_model():
    """Two seeds whose pretrained models differ tenfold: each run's change is against its own
    seed's (against the first pretrained model the first run would read -95 %).
    Mutation: every run against the first seed's pretrained model fails it."""
    pre = [{"seed": 5, "budget": {"m": 10.0}}, {"seed": 2, "budget": {"m": 1.0}}]
    runs = [{"seed": 2, "budget": {"m": 0.5}}, {"seed": 5, "budget": {"m": 12.0}}]
    assert F.changes(runs, pre, "budget", "m") == pytest.approx([-50.0, 20.0])


def test_the_equal_compute_table_sets_the_budget_beside_the_sweeps_best(quick):
    """The budget given the sweep's time beside the sweep's run with the lowest mean B force
    MAE and the one with the lowest mean B energy MAE, their cells the raw runs'.
    Mutation: the sweep's worst instead of its best (``max``) fails it."""
    out, data = quick
    rows = _tables(out.with_suffix(".md").read_text())["total"]
    sweep = ["ft_replay_0.3", "ft_replay_1"]
    for metric, what in (("B/forces_mae", "B force"), ("B/per_atom_energy_mae", "B energy")):
        best = min(sweep, key=lambda m: _mean(data, m, "budget", metric))
        label = f"the sweep's best by {what} MAE: {LABELS[best].strip('*')}"
        assert rows[label][1] == f"{len(sweep)} runs of 1 s"
        for k, col in COLUMNS.items():
            runs = [r for r in data["runs"] if r["method"] == best]
            assert rows[label][col + 1] == _pm([r["budget"][k] for r in runs])
    budget = rows[LABELS["ft_budget_0.05_sweep"]]
    assert budget[1] == "one run of 4 × 1 s"
    runs = [r for r in data["runs"] if r["method"] == "ft_budget_0.05_sweep"]
    assert budget[2] == _pm([r["budget"]["B/forces_mae"] for r in runs])
    assert set(rows) == {LABELS["ft_budget_0.05_sweep"]} | {
        f"the sweep's best by {w} MAE: {LABELS[m].strip('*')}"
        for w, k in (("B force", "B/forces_mae"), ("B energy", "B/per_atom_energy_mae"))
        for m in [min(sweep, key=lambda m: _mean(data, m, "budget", k))]
    }


def _mean(data, method, view, metric) -> float:
    return statistics.fmean(r[view][metric] for r in data["runs"] if r["method"] == method)


def test_places_follow_dominance_on_the_means(quick):
    """A strategy is dominated exactly when a sweep point has lower mean B and A MAEs."""
    out, data = quick
    tables = _tables(out.with_suffix(".md").read_text())
    sweep = ["ft_replay_0.3", "ft_replay_1"]
    for view in ("budget", "epochs"):
        rows = tables[view]
        for objectives, col in ((("B/forces_mae", "A/forces_mae"), FORCE_PLACE),
                                (("B/per_atom_energy_mae", "A/per_atom_energy_mae"), ENERGY_PLACE)):  # fmt: skip
            for m in ("ft_naive", "ft_upgrad"):
                by = [
                    w
                    for w in sweep
                    if all(_mean(data, w, view, k) < _mean(data, m, view, k) for k in objectives)
                ]
                assert rows[LABELS[m]][col].startswith("dominated") == bool(by), (view, m)


def test_fine_tunes_start_from_the_cached_pretrained_model(quick):
    """Re-evaluating the cached pretrained weights gives the pretrained row; the fine-tunes
    ran the steps asked for, and the epoch view is the end of epoch ``--epochs``."""
    _, data = quick
    a = data["meta"]["args"]
    pre = data["pretrain"][0]
    cache = F.pretrained_path(a, data["meta"]["data"]["statistics"], 0)
    assert cache.exists()
    P.init_torch()
    model = P.run_model(a, data["meta"]["data"]["statistics"], 123, a["type_names"])
    module = P.build_module(M.finetune_methods()["ft_naive"], model, 2, lr=1e-3, num_val=2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    module.model.load_state_dict(torch.load(cache, weights_only=False)["model"])
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    dm = F.datamodule(data["meta"]["data"]["files"], a, 0, train="B")
    got = P.validate(module, dm, F.LOADERS)
    for k in COLUMNS:
        assert math.isclose(got[k], pre["budget"][k], rel_tol=1e-4), k
    per_epoch = math.ceil(a["n_b_train"] / a["batch_size"])
    for r in data["runs"]:
        assert r["epochs"]["step"] == a["epochs"] * per_epoch
        assert r["steps"] >= r["epochs"]["step"]
        # fine-tuning moved the model: B error differs from the pretrained model's
        assert r["budget"]["B/forces_mae"] != pre["budget"]["B/forces_mae"]


def test_the_learning_rate_is_constant_or_annealed_to_zero_over_the_clock(quick, tmp_path):
    """At the default schedule every fine-tune's last step ran at ``--lr``; with
    ``--lr-schedule cosine`` near zero (the last step starts after at least 86 % of the
    clock: lr x (1 + cos(0.86 pi)) / 2 < 0.05 lr), the pretraining at its constant lr all
    the same, and the report says which; ``--pretrain-lr-schedule cosine`` anneals the
    pretraining instead (cached apart). Mutations: the schedule not passed to the
    fine-tunes, or passed to the pretraining, each fail."""
    _, data = quick
    a = data["meta"]["args"]
    assert a["lr_schedule"] == "constant"
    assert all(r["lr_end"] == a["lr"] for r in data["runs"])
    out = tmp_path / "cos"
    # another pretraining clock than the quick study's: its own (cached) pretraining
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--quick", "--pair", "alloy",
           "--pretrain-s", "1.6", "--budget-s", "1", "--methods", "ft_naive",
           "--lr-schedule", "cosine", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    cos = json.loads(out.with_suffix(".json").read_text())
    c = cos["meta"]["args"]
    assert [r["lr_end"] for r in cos["pretrain"]] == [c["pretrain_lr"]]
    (run,) = cos["runs"]
    assert 0.0 <= run["lr_end"] < 0.05 * c["lr"]
    md = out.with_suffix(".md").read_text()
    assert f"lr {c['lr']} annealed to 0 (cosine)" in md and "still annealing" in md
    assert f"constant lr {a['lr']}" in quick[0].with_suffix(".md").read_text()
    # the pretraining annealed (its own cache), the fine-tunes at their constant rate
    cmd = [*cmd[: cmd.index("--lr-schedule")], "--pretrain-lr-schedule", "cosine",
           "--out", str(tmp_path / "pre")]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    pre = json.loads((tmp_path / "pre.json").read_text())
    ((pretrain,), (run,)) = pre["pretrain"], pre["runs"]
    assert 0.0 <= pretrain["lr_end"] < 0.05 * c["pretrain_lr"] and run["lr_end"] == c["lr"]
    p = pre["meta"]["args"]
    assert F.pretrained_path(p, {}, 0) != F.pretrained_path(c, {}, 0)
    assert f"lr {c['pretrain_lr']} annealed to 0 (cosine)" in (tmp_path / "pre.md").read_text()


def test_from_json_rewrites_the_same_report(quick, tmp_path):
    out, _ = quick
    F.main(["--from-json", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text() == out.with_suffix(".md").read_text()
    assert (tmp_path / "again.png").stat().st_size > 0


def test_the_budget_table_reports_each_budgets_runs(quick):
    """The forgetting budget's rows: the bound it was given (1 + tolerance) and the mean of
    the ratios and multipliers its runs recorded; the sweep-time run trained on a clock of
    ``len(REPLAY_WEIGHTS)`` times the others'."""
    from benchmarks.methods import REPLAY_WEIGHTS

    out, data = quick
    md = out.with_suffix(".md").read_text()
    states = [r for r in data["runs"] if r["method"] == "ft_budget_0.05"]
    assert states and all(r["budget_state"]["bound"] == 1.05 for r in states)
    ratio = statistics.fmean(r["budget_state"]["ratio"] for r in states)
    budgets = md.split("**Forgetting budgets")[1].splitlines()
    row = next(ln for ln in budgets if ln.startswith("| replay with a forgetting budget (+5%) |"))
    assert f"| 1.05 | {ratio:.3g} ± " in row
    (one,) = [r for r in data["runs"] if r["method"] == "ft_budget_0.05"]
    (sweep,) = [r for r in data["runs"] if r["method"] == "ft_budget_0.05_sweep"]
    assert sweep["steps"] > (len(REPLAY_WEIGHTS) - 1) * one["steps"]


def test_the_budget_reading_in_the_docs_agrees_with_its_results():
    """What ``docs/benchmarks.md`` says of the forgetting budgets beyond the guide's claims
    (those: ``tests/test_choosing.py``), from the committed jsons: on ``ethanol_levels`` the
    lowest B force MAE at one run's time is naive fine-tuning's (no budget's, not even given
    the sweep's time); the budget on 32 fixed frames is beyond the force front at 5 %, on all
    64 dominated; on 32 frames the 25 % budget missed its bound in every seed, on all 64 the
    budgets missed in three of six runs, and a final ratio differs from its last update's by
    tens of percent; on the two other pairs the sweep's best run has a lower B force MAE
    than every one-run budget (equal total compute); on the alloy naive fine-tuning's A
    energy MAE is about three times the pretrained model's."""
    results = REPO / "benchmarks" / "results"
    data = {p: json.loads((results / f"finetune_budget_{p}.json").read_text())
            for p in ("alloy", "ethanol", "ethanol_levels")}  # fmt: skip

    def held(runs, method):
        return [r["budget_state"]["final_ratio"] <= r["budget_state"]["bound"] + 0.02
                for r in runs if r["method"] == method]  # fmt: skip

    levels = data["ethanol_levels"]
    view = levels["views"]["budget"]
    assert min(view["rows"], key=lambda r: r["B/forces_mae"][0])["method"] == "ft_naive"
    force = view["status"]["force"]
    assert force["ft_budget_frames_0.05"]["status"] == "beyond"
    assert force["ft_budget_ref_0.05"]["status"] == "dominated"
    assert held(levels["runs"], "ft_budget_frames_0.25") == [False] * 3
    ref = held(levels["runs"], "ft_budget_ref_0.05") + held(levels["runs"], "ft_budget_ref_0.25")
    assert len(ref) == 6 and ref.count(False) == 3
    jumps = [abs(r["budget_state"]["final_ratio"] / r["budget_state"]["ratio"] - 1)
             for r in levels["runs"] if r["method"].startswith("ft_budget_ref_")]  # fmt: skip
    assert max(jumps) >= 0.2, jumps
    alloy = data["alloy"]  # naive fine-tuning's A energy MAE "about threefold" the pretrained
    naive = statistics.mean(r["budget"][F.AE] for r in alloy["runs"] if r["method"] == "ft_naive")
    assert 2.5 <= naive / statistics.mean(r["budget"][F.AE] for r in alloy["pretrain"]) <= 3.5
    for pair in ("alloy", "ethanol"):
        rows = {r["method"]: r["B/forces_mae"][0] for r in data[pair]["views"]["budget"]["rows"]}
        best = min(rows[m] for m in M.FT_SWEEP)
        assert all(best < v for m, v in rows.items() if m.startswith("ft_budget_")), pair


def test_the_annealed_budget_reading_agrees_with_its_results():
    """``docs/benchmarks.md``'s reading of the annealed fine-tunes, from the committed jsons:
    naive fine-tuning lowers B's force MAE by at least 30 % on every pair; every budget on
    the reference's frames ends with its last update's ratio within 0.001 of the final one;
    updated every 10 steps each run ends at most 2 points over its bound, within 4 points of
    it where the multiplier is off its floor, and on the xTB ethanol pair the multiplier
    sits at its floor in every run; updated every 5 steps one alloy run overshoots; from
    batches the 5 % budget ends under its bound by more than 10 points in every seed;
    the measurement costs the stated share of the replay runs' mean steps; at equal time
    the 5 % budgets on the reference's frames are on the force front on ``ethanol_levels``
    and dominated on its energy front, the 25 % ones dominated; on the two other pairs
    every budget is dominated on both fronts."""
    results = REPO / "benchmarks" / "results"
    data = {p: json.loads((results / f"finetune_budget_cosine_{p}.json").read_text())
            for p in ("alloy", "ethanol", "ethanol_levels")}  # fmt: skip
    floor = 1e-3  # the multiplier's lower bound (ForgettingBudget's default bounds)
    overshoots = []
    for pair, d in data.items():
        assert d["meta"]["args"]["lr_schedule"] == "cosine"
        pre = {r["seed"]: r["budget"][F.BF] for r in d["pretrain"]}
        naive = [
            r["budget"][F.BF] / pre[r["seed"]] - 1 for r in d["runs"] if r["method"] == "ft_naive"
        ]
        assert len(naive) == 3 and statistics.mean(naive) <= -0.30, (pair, naive)
        states = {}
        for r in d["runs"]:
            if r["method"].startswith(("ft_budget_ref_", "ft_budget_ref10_")):
                states.setdefault(r["method"], []).append(r["budget_state"])
        assert len(states) == 4 and all(len(v) == 3 for v in states.values()), pair
        for method, ss in states.items():
            for x in ss:
                assert abs(x["final_ratio"] - x["ratio"]) < 1e-3, (pair, method)
                over = x["final_ratio"] - x["bound"]
                if method.startswith("ft_budget_ref10_"):
                    assert over <= 0.02, (pair, method)
                    if x["multiplier"] > floor * 1.01:
                        assert abs(over) <= 0.04, (pair, method)
                    else:
                        assert pair == "ethanol"
                elif over > 0.02:
                    overshoots.append((pair, method))
                if pair == "ethanol":
                    assert x["multiplier"] <= floor * 1.01
        steps = {}
        for r in d["runs"]:
            steps.setdefault(r["method"], []).append(r["steps"])
        replay = statistics.mean(statistics.mean(steps[m]) for m in M.FT_SWEEP)
        for tol in ("0.05", "0.25"):
            assert 0.25 <= 1 - statistics.mean(steps[f"ft_budget_ref_{tol}"]) / replay <= 0.45
            assert 0.1 <= 1 - statistics.mean(steps[f"ft_budget_ref10_{tol}"]) / replay <= 0.25
        status = d["views"]["budget"]["status"]
        for method in states:
            for front in ("force", "energy"):
                got = status[front][method]["status"]
                if pair == "ethanol_levels" and front == "force" and "0.05" in method:
                    assert got == "on", (method, got)
                else:
                    assert got == "dominated", (pair, front, method, got)
    assert overshoots == [("alloy", "ft_budget_ref_0.05")], overshoots
    batch = [r["budget_state"] for r in data["ethanol_levels"]["runs"]
             if r["method"] == "ft_budget_0.05"]  # fmt: skip
    assert len(batch) == 3 and all(x["final_ratio"] < x["bound"] - 0.1 for x in batch)


def test_the_converged_budget_reading_agrees_with_its_results():
    """``docs/benchmarks.md``'s reading of the budgets from a converged pretrained model
    (120 s, annealed), from the committed jsons: naive fine-tuning's B improvement is at
    least 30 % on ``ethanol_levels`` (forces) and on the alloy (energies only), under 30 % on
    the xTB ethanol pair; every budget ends at most 2 points over its bound; at 5 % on the
    alloy and ``ethanol_levels`` more than 5 points under it, the multiplier above 10 and
    100; the 5 % budgets on the force front there with A's force MAE at or under the
    pretrained model's and B's within 5 % of it; dominated on the alloy's energy front, on
    ``ethanol_levels``' too; on ethanol on the energy front, dominated on forces; every
    25 % budget dominated on both fronts."""
    results = REPO / "benchmarks" / "results"
    data = {p: json.loads((results / f"finetune_budget_converged_{p}.json").read_text())
            for p in ("alloy", "ethanol", "ethanol_levels")}  # fmt: skip

    def change(d, method, metric):
        pre = {r["seed"]: r["budget"][metric] for r in d["pretrain"]}
        return statistics.mean(r["budget"][metric] / pre[r["seed"]] - 1
                               for r in d["runs"] if r["method"] == method)  # fmt: skip

    naive = {p: (change(d, "ft_naive", F.BF), change(d, "ft_naive", F.BE)) for p, d in data.items()}
    assert naive["ethanol_levels"][0] <= -0.30
    assert naive["alloy"][0] > -0.30 and naive["alloy"][1] <= -0.30
    assert naive["ethanol"][0] > -0.30 and naive["ethanol"][1] > -0.30
    places = {}
    for pair, d in data.items():
        a = d["meta"]["args"]
        assert a["pretrain_lr_schedule"] == a["lr_schedule"] == "cosine" and a["pretrain_s"] == 120
        for r in d["runs"]:
            if r["method"].startswith("ft_budget_"):
                x = r["budget_state"]
                assert x["final_ratio"] <= x["bound"] + 0.02, (pair, r["method"])
                if r["method"] == "ft_budget_ref10_0.05" and pair != "ethanol":
                    assert x["final_ratio"] < x["bound"] - 0.05, pair
                    assert x["multiplier"] > (100 if pair == "ethanol_levels" else 10), pair
        status = d["views"]["budget"]["status"]
        places[pair] = {(m, front): status[front][m]["status"] for front in ("force", "energy")
                        for m in ("ft_budget_ref10_0.05", "ft_budget_ref10_0.25")}  # fmt: skip
        for front in ("force", "energy"):
            assert places[pair][("ft_budget_ref10_0.25", front)] == "dominated", pair
    five = "ft_budget_ref10_0.05"
    for pair in ("alloy", "ethanol_levels"):
        assert places[pair][(five, "force")] == "on", pair
        assert change(data[pair], five, F.AF) <= 0 and abs(change(data[pair], five, F.BF)) < 0.05
    assert places["alloy"][(five, "energy")] == "dominated"
    assert places["ethanol_levels"][(five, "energy")] == "on"
    assert places["ethanol"][(five, "energy")] == "on"
    assert places["ethanol"][(five, "force")] == "dominated"


# ----------------------------------------------------------------------------- ethanol_levels


def _frames(files: dict, a: dict, key: str) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The frames of the split file ``key`` as nequip reads them (its ``ASEDataset``
    config), their true total energies and atom counts (ASE)."""
    import ase.io
    from hydra.utils import instantiate

    dataset = instantiate(P.file_dataset(files, a, key))
    atoms = ase.io.read(files[key], index=":")
    true = np.array([x.get_potential_energy() for x in atoms])
    return [dataset[i] for i in range(len(dataset))], true, np.array([len(x) for x in atoms])


def _predict(model, frames: list[dict]) -> list[dict]:
    """``model``'s output on each frame alone."""
    from nequip.data import AtomicDataDict

    return [model(AtomicDataDict.batched_from_list([f])) for f in frames]


def _energy_mae(model, frames, true, atoms) -> float:
    """Per-atom energy MAE of ``model`` on ``frames``, against ``true`` (float64)."""
    pred = np.array(
        [float(o["total_energy"].detach().reshape(())) for o in _predict(model, frames)]
    )
    return float(np.mean(np.abs(pred - true) / atoms))


def _module(data: dict, references: dict | None = None):
    """A training module of the run's model (``references``: wrapped with them)."""
    a = data["meta"]["args"]
    model = P.run_model(a, data["meta"]["data"]["statistics"], 0, a["type_names"])
    if references is not None:
        model = P.with_references(model, references)
    return P.build_module(M.finetune_methods()["ft_naive"], model, 2, lr=1e-3, num_val=2)


def _pretrained(data: dict):
    """The plain pretrained model of seed 0, from its cache (not the checkpoint)."""
    module = _module(data)
    cache = F.pretrained_path(data["meta"]["args"], data["meta"]["data"]["statistics"], 0)
    module.model.load_state_dict(torch.load(cache, weights_only=False)["model"])
    return module.model["sole_model"]


def _deployed(model, dataset: str):
    """A copy of the wrapped ``model`` at ``dataset``'s level (nequip's ``modify`` with
    ``select_fidelity``): a plain nequip model."""
    from nequip.model import modify

    return modify(copy.deepcopy(model), [{"modifier": "select_fidelity", "dataset": dataset}])


def test_levels_score_each_test_set_at_its_own_references(levels):
    """On ``ethanol_levels`` every run's final A energy MAE is its saved model deployed at A's
    level (``select_fidelity``, dataset ``pretrain``) on A's test frames against their true
    energies, computed here, and its B energy MAE the same at B's level on B's; at B's level
    the A MAE would be over a thousand times larger. The naive fine-tune's data module trains
    on B's frames alone. Tolerance: a few float32 ulps (1.2e-7) relative, the network's
    rounding (the run's metric and this sum see the same predictions).
    Mutation: A's test frames tagged with B's index (``tagged(..., "B")``) fails it."""
    states, data = levels
    P.init_torch()
    a, files = data["meta"]["args"], data["meta"]["data"]["files"]
    test = {side: _frames(files, a, f"{side}_test") for side in "AB"}
    for method in LEVEL_METHODS:
        (run,) = [r for r in data["runs"] if r["method"] == method]
        module = _module(data, run["references"])
        module.model.load_state_dict(torch.load(states / f"{method}_seed0.pt"))
        model, final = module.model["sole_model"], run["curve"][-1]
        for side, name in F.DATASET_NAMES.items():
            mae = _energy_mae(_deployed(model, name), *test[side])
            got = final[f"{side}/per_atom_energy_mae"]
            assert math.isclose(got, mae, rel_tol=1e-6), (method, side)
        wrong = _energy_mae(_deployed(model, "new"), *test["A"])
        assert wrong > 1000 * final["A/per_atom_energy_mae"], method
    dm = F.datamodule(files, a, 0, train="B")
    dm.setup("fit")
    (train,) = dm.train_dataset
    assert len(train) == a["n_b_train"]
    assert {int(train[i]["dataset_index"]) for i in range(len(train))} == {1}
    assert [int(d[0]["dataset_index"]) for d in dm.val_dataset] == [0, 1]


def test_levels_pretrained_row_is_the_pretrained_model_at_each_level(levels):
    """The pretrained row of ``ethanol_levels`` (where every fine-tune starts): A's errors and
    B's force MAE are the plain pretrained model's (A's references are its own per-type shift;
    references move energies only), and B's energy MAE is the plain model's B energies moved
    from that shift to B's references, recomputed here from the cached weights; the plain
    model's own B energy MAE, at A's energy zero, is kept apart and far larger. Tolerance: as
    above, a few float32 ulps relative.
    Mutation: the pretrained row left at the plain model's errors fails it."""
    _, data = levels
    P.init_torch()
    a, files = data["meta"]["args"], data["meta"]["data"]["files"]
    pre, refs = data["pretrain"][0], data["runs"][0]["references"]
    for k in ("A/forces_mae", "A/per_atom_energy_mae", "B/forces_mae"):
        assert math.isclose(pre["budget"][k], pre["plain"][k], rel_tol=1e-6), k
    model = _pretrained(data)
    frames, true, atoms = _frames(files, a, "B_test")
    types = a["type_names"]
    counts = np.array([[int((f["atom_types"] == j).sum()) for j in range(len(types))]
                       for f in frames])  # fmt: skip
    move = counts @ np.array([refs["new"][t] - refs["pretrain"][t] for t in types])
    plain = np.array(
        [float(o["total_energy"].detach().reshape(())) for o in _predict(model, frames)]
    )
    mae = float(np.mean(np.abs(plain + move - true) / atoms))
    assert math.isclose(pre["budget"]["B/per_atom_energy_mae"], mae, rel_tol=1e-6)
    assert pre["plain"]["B/per_atom_energy_mae"] > 1000 * mae


def test_pseudolabel_replay_trains_on_the_pretrained_models_predictions(levels):
    """The replayed A training frames of pseudolabel replay's data module carry the pretrained
    model's own energies and forces (an independent forward pass of the cached weights, frame
    by frame, not the checkpoint the labeller loaded), not A's true labels; A's test frames keep
    their true labels. Tolerance: the labeller's batches of 16 against single frames through a
    float32 network: a few ulps of forces up to ~100 kcal/mol/Å (ulp 8e-6) and of the total
    energies (summed in float64 from float32 atoms).
    Mutation: the data module given A's own labels (``pseudo`` ignored) fails it."""
    _, data = levels
    P.init_torch()
    a, files = data["meta"]["args"], data["meta"]["data"]["files"]
    cache = F.pretrained_path(a, data["meta"]["data"]["statistics"], 0)
    dm = F.datamodule(files, a, 0, train="B", replay=True, pseudo=F.pseudolabel_files(cache))
    dm.setup("fit")
    (replayed,) = [d for d in dm.train_dataset if d.index == 0]
    frames, true, _ = _frames(files, a, "A_train")
    picked = range(0, len(frames), 30)
    outputs = _predict(_pretrained(data), [frames[i] for i in picked])
    for i, out in zip(picked, outputs):
        got = replayed[i]
        torch.testing.assert_close(got["pos"], frames[i]["pos"], rtol=0, atol=0)
        for key in ("total_energy", "forces"):
            want = out[key].detach().to(got[key].dtype)
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-4)
        assert abs(float(got["total_energy"].reshape(())) - true[i]) > 1e-3
        assert not torch.allclose(got["forces"], frames[i]["forces"], atol=1e-2)
    (a_test,) = [d for d in dm.val_dataset if d.index == 0]
    _, a_true, _ = _frames(files, a, "A_test")
    got = np.array([float(a_test[i]["total_energy"].reshape(())) for i in range(len(a_test))])
    np.testing.assert_array_equal(got, a_true)


# ----------------------------------------------------------------------------- --resume


def test_resume_runs_only_the_missing_runs_and_refuses_other_settings(quick, tmp_path):
    """A study resumed with another method keeps every earlier record as it was and runs
    only the new (seed, method); another budget or an absent json is refused; a study from
    before ``--lr-schedule`` resumes as the constant schedule it ran. Mutations: dropping the
    ``finished`` filter reruns every earlier method, dropping ``ARG_DEFAULTS`` refuses the
    old study; each fails."""
    out, before = quick
    copy_ = tmp_path / "ft"
    earlier = json.loads(out.with_suffix(".json").read_text())
    del earlier["meta"]["args"]["lr_schedule"]  # as studies before the option recorded it
    copy_.with_suffix(".json").write_text(json.dumps(earlier))
    common = ["--quick", "--pair", "alloy", "--pretrain-s", "1.5", "--methods", "ft_replay_10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(*extra):
        cmd = [sys.executable, "-m", "benchmarks.finetune", *common, *extra, "--resume"]
        return subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, env=env)

    with pytest.raises(subprocess.CalledProcessError) as absent:
        run("--budget-s", "1", "--out", str(tmp_path / "none"))
    assert "no earlier results" in absent.value.stderr
    with pytest.raises(subprocess.CalledProcessError) as other:
        run("--budget-s", "2", "--out", str(copy_))
    assert "budget_s 1.0 -> 2.0" in other.value.stderr
    run("--budget-s", "1", "--out", str(copy_))
    after = json.loads(copy_.with_suffix(".json").read_text())
    assert after["runs"][: len(before["runs"])] == before["runs"]
    assert [r["method"] for r in after["runs"][len(before["runs"]) :]] == ["ft_replay_10"]
    assert after["pretrain"] == before["pretrain"]  # the cached pretraining, not re-recorded
    a = after["meta"]["args"]
    assert (
        a["methods"] == [*METHODS, "ft_replay_10"] and a["argv"] == before["meta"]["args"]["argv"]
    )
    assert a["resumed_argv"][0][-1] == "--resume"
    md = copy_.with_suffix(".md").read_text()
    assert "resumed with" in md and "Incomplete" not in md


def test_the_budget_variants_reading_agrees_with_its_results():
    """``docs/benchmarks.md``'s reading of the budget variants, from the committed jsons:
    naive fine-tuning lowers B's force MAE by at least 30 % on every pair; on the
    reference's frames, every 10 or 20 steps, every run ends at most 2 points over its
    bound; the paired batch estimate's last update misses the final ratio by more than 2
    points in most runs, and on the alloy exactly one seed ends more than 10 points over
    its bound at each tolerance; a bound on each component leaves the alloy's force
    multiplier near its floor and the energy one above 1 in every run, has the highest B
    force MAE of the alloy's budgets, is on the energy front and dominated on forces there,
    and one alloy seed ends over its 5 % bound; every budget takes fewer steps than every
    swept weight, every 20 steps and paired more than every 10 on the alloy and the xTB
    ethanol pair; and the fronts: every alloy budget dominated on forces, every xTB ethanol
    budget dominated on both, on ``ethanol_levels`` the 5 % budgets but each component's
    on the force front and dominated on energies, the 25 % ones dominated on forces; given
    the sweep's total time the default budget holds its bound and is beyond the force front
    on every pair (on it at 25 % on ``ethanol_levels``), its multiplier at its floor on the
    alloy and the xTB ethanol pair; replay 1:1 given the same time is beyond the front too,
    dominating the long budget on forces on the alloy, neither dominating on
    ``ethanol_levels``."""
    results = REPO / "benchmarks" / "results"
    data = {p: json.loads((results / f"finetune_budget_variants_{p}.json").read_text())
            for p in ("alloy", "ethanol", "ethanol_levels")}  # fmt: skip
    gaps = []
    for pair, d in data.items():
        assert d["meta"]["args"]["lr_schedule"] == "cosine"
        pre = {r["seed"]: r["budget"][F.BF] for r in d["pretrain"]}
        runs: dict[str, list[dict]] = {}
        for r in d["runs"]:
            runs.setdefault(r["method"], []).append(r)
        assert all(len(v) == 3 for v in runs.values()), pair
        naive = [r["budget"][F.BF] / pre[r["seed"]] - 1 for r in runs["ft_naive"]]
        assert statistics.mean(naive) <= -0.30, (pair, naive)
        steps = {m: statistics.mean(r["steps"] for r in rs) for m, rs in runs.items()}
        budgets = [m for m in runs if m.startswith("ft_budget_") and not m.endswith("_sweep")]
        assert len(budgets) == 8
        assert max(steps[m] for m in budgets) < min(steps[m] for m in M.FT_SWEEP), pair
        status = d["views"]["budget"]["status"]
        for m in budgets:
            states = [r["budget_state"] for r in runs[m]]
            over = [x["final_ratio"] - x["bound"] for x in states]
            tol = m.rsplit("_", 1)[1]
            if m.startswith(("ft_budget_ref10_", "ft_budget_ref20_")):
                assert max(over) <= 0.02, (pair, m, over)
            if m.startswith("ft_budget_paired_"):
                gaps += [abs(x["final_ratio"] - x["ratio"]) > 0.02 for x in states]
                if pair == "alloy":
                    assert sorted(o > 0.10 for o in over) == [False, False, True], over
            if m.startswith("ft_budget_each_") and pair == "alloy":
                parts = [x["constraints"] for x in states]
                assert all(c["forces_mse"]["multiplier"] <= 0.05 for c in parts)
                assert all(c["per_atom_energy_mse"]["multiplier"] > 1 for c in parts)
                assert (status["force"][m]["status"], status["energy"][m]["status"]) == (
                    "dominated", "on")  # fmt: skip
                if tol == "0.05":
                    assert sum(o > 0.02 for o in over) == 1, over
            force, energy = status["force"][m]["status"], status["energy"][m]["status"]
            if pair == "ethanol":
                assert (force, energy) == ("dominated", "dominated"), m
            elif pair == "alloy":
                assert force == "dominated", m
            elif tol == "0.05" and not m.startswith("ft_budget_each_"):
                assert (force, energy) == ("on", "dominated"), m
            elif tol == "0.25":
                assert force == "dominated", m
        if pair != "ethanol_levels":
            for tol in ("0.05", "0.25"):
                ref10 = steps[f"ft_budget_ref10_{tol}"]
                assert steps[f"ft_budget_ref20_{tol}"] > ref10, pair
                assert steps[f"ft_budget_paired_{tol}"] > ref10, pair
        if pair == "alloy":
            mean_b = {m: statistics.mean(r["budget"][F.BF] for r in runs[m]) for m in budgets}
            assert max(mean_b, key=mean_b.get).startswith("ft_budget_each_")
        # equal total compute: the default budget given the sweep's time (4 runs' worth)
        for tol in ("0.05", "0.25"):
            m = f"ft_budget_ref10_{tol}_sweep"
            assert M.finetune_methods()[m].budget_factor == len(M.FT_SWEEP)
            states = [r["budget_state"] for r in runs[m]]
            assert max(x["final_ratio"] - x["bound"] for x in states) <= 0.02, (pair, m)
            expected = "on" if (pair, tol) == ("ethanol_levels", "0.25") else "beyond"
            assert status["force"][m]["status"] == expected, (pair, m)
            if pair != "ethanol_levels":  # the long runs learned A: the constraint never bound
                assert all(x["multiplier"] <= 1.01e-3 for x in states), (pair, m)
        if "ft_long_replay_1" in runs:  # a guessed weight given the same long run
            assert pair != "ethanol"
            assert status["force"]["ft_long_replay_1"]["status"] == "beyond", pair
            means = {m: [statistics.mean(r["budget"][k] for r in runs[m]) for k in (F.BF, F.AF)]
                     for m in ("ft_long_replay_1", "ft_budget_ref10_0.05_sweep",
                               "ft_budget_ref10_0.25_sweep")}  # fmt: skip
            for m in ("ft_budget_ref10_0.05_sweep", "ft_budget_ref10_0.25_sweep"):
                one, other = means["ft_long_replay_1"], means[m]
                dominates = all(x < y for x, y in zip(one, other))
                assert dominates == (pair == "alloy"), (pair, m)
                assert not all(y <= x for x, y in zip(one, other)), (pair, m)
    assert sum(gaps) > len(gaps) / 2, gaps


def test_the_sampled_budget_reading_agrees_with_its_results():
    """``docs/benchmarks.md``'s reading of the budgets with replay sampled, from the
    committed jsons: naive fine-tuning lowers B's force MAE by at least 30 % on every pair;
    where every run's multiplier ended below 1 (the alloy, the xTB ethanol pair) the
    sampled budget takes more steps than the same unsampled budget of the variants study,
    every 20 steps at least 95 % of the sweep's mean; on ``ethanol_levels`` every
    multiplier ends above 1; every sampled budget is dominated on both fronts on the alloy
    and the xTB ethanol pair, on ``ethanol_levels`` the 5 % ones on the force front and
    dominated on energies, the 25 % ones dominated on both; on the alloy, every 20 steps,
    B and A force MAE both above replay 0.3:1's; on the xTB ethanol pair dominated by
    naive fine-tuning on forces; three alloy budgets of four end more than 2 points over
    their bound in some seed, and two ``ethanol_levels`` runs do. Where the multiplier
    starts: from 0.3 every run within its bound, dominated on forces but at 5 % on
    ``ethanol_levels`` (on the front); from 0.01, sampled, on the alloy dominated on forces
    and two seeds of three over their bound at each tolerance, on the xTB ethanol pair on
    the force front within its bound, the multiplier at its floor, naive fine-tuning lower
    on both force errors, on ``ethanol_levels`` at 5 % on both fronts within its bound."""
    results = REPO / "benchmarks" / "results"
    overs = {}
    for pair in ("alloy", "ethanol", "ethanol_levels"):
        d = json.loads((results / f"finetune_budget_sampled_{pair}.json").read_text())
        v = json.loads((results / f"finetune_budget_variants_{pair}.json").read_text())
        assert d["meta"]["args"]["lr_schedule"] == "cosine"
        pre = {r["seed"]: r["budget"][F.BF] for r in d["pretrain"]}
        runs, before = {}, {}
        for r in d["runs"]:
            runs.setdefault(r["method"], []).append(r)
        for r in v["runs"]:
            before.setdefault(r["method"], []).append(r)
        assert all(len(rs) == 3 for rs in runs.values()), pair
        naive = [r["budget"][F.BF] / pre[r["seed"]] - 1 for r in runs["ft_naive"]]
        assert statistics.mean(naive) <= -0.30, (pair, naive)

        def mean(rs, key):
            return statistics.mean(key(r) for r in rs)

        sweep_steps = mean([r for m in M.FT_SWEEP for r in runs[m]], lambda r: r["steps"])
        status = d["views"]["budget"]["status"]
        budgets = [m for m in runs if m.startswith("ft_budget_sampled")]
        assert len(budgets) == 4
        for m in budgets:
            every, tol = m.removeprefix("ft_budget_sampled").split("_")
            states = [r["budget_state"] for r in runs[m]]
            overs[(pair, m)] = [x["final_ratio"] - x["bound"] for x in states]
            below = all(x["multiplier"] < 1 for x in states)
            assert below == (pair != "ethanol_levels"), (pair, m)
            steps = mean(runs[m], lambda r: r["steps"])
            if below:
                assert steps > mean(before[f"ft_budget_ref{every}_{tol}"], lambda r: r["steps"])
                if every == "20":
                    assert steps >= 0.95 * sweep_steps, (pair, m)
            force, energy = status["force"][m]["status"], status["energy"][m]["status"]
            if pair != "ethanol_levels" or tol == "0.25":
                assert (force, energy) == ("dominated", "dominated"), (pair, m)
            else:
                assert (force, energy) == ("on", "dominated"), (pair, m)
            errors = [mean(runs[m], lambda r, k=k: r["budget"][k]) for k in (F.BF, F.AF)]
            if pair == "alloy" and every == "20":
                low = [mean(runs["ft_replay_0.3"], lambda r, k=k: r["budget"][k])
                       for k in (F.BF, F.AF)]  # fmt: skip
                assert all(x > y for x, y in zip(errors, low)), m
            if pair == "ethanol":
                naive_errors = [mean(runs["ft_naive"], lambda r, k=k: r["budget"][k])
                                for k in (F.BF, F.AF)]  # fmt: skip
                assert all(x > y for x, y in zip(errors, naive_errors)), m
        # where the multiplier starts: from 0.3 (unsampled), from 0.01 (sampled)
        for tol in ("0.05", "0.25"):
            low, zero = f"ft_budget_from0.3_{tol}", f"ft_budget_from0.01_{tol}"
            assert M.finetune_methods()[low].callbacks[0]["initial"] == 0.3
            assert M.finetune_methods()[zero].callbacks[0]["initial"] == 0.01
            low_over = [r["budget_state"]["final_ratio"] - r["budget_state"]["bound"]
                        for r in runs[low]]  # fmt: skip
            assert max(low_over) <= 0.02, (pair, low)
            expected = "on" if (pair, tol) == ("ethanol_levels", "0.05") else "dominated"
            assert status["force"][low]["status"] == expected, (pair, low)
            states = [r["budget_state"] for r in runs[zero]]
            zero_over = [x["final_ratio"] - x["bound"] for x in states]
            force, energy = status["force"][zero]["status"], status["energy"][zero]["status"]
            if pair == "alloy":
                assert force == "dominated" and sum(o > 0.02 for o in zero_over) == 2, zero_over
            elif pair == "ethanol":
                assert force == "on" and max(zero_over) <= 0.02, (pair, zero)
                assert all(x["multiplier"] <= 1.01e-3 for x in states)
                for k in (F.BF, F.AF):
                    assert mean(runs["ft_naive"], lambda r, k=k: r["budget"][k]) < mean(
                        runs[zero], lambda r, k=k: r["budget"][k]
                    ), (zero, k)
            elif tol == "0.05":
                assert (force, energy) == ("on", "on") and max(zero_over) <= 0.02, zero
    missed = {k: sum(o > 0.02 for o in v) for k, v in overs.items()}
    assert sum(bool(n) for (pair, _), n in missed.items() if pair == "alloy") == 3
    assert sum(n for (pair, _), n in missed.items() if pair == "ethanol_levels") == 2
    assert sum(n for (pair, _), n in missed.items() if pair == "ethanol") == 0


def test_the_replication_reading_agrees_with_its_results():
    """``docs/benchmarks.md``'s reading of the budget from near zero on new seeds, from the
    committed jsons: seeds 3-5; naive fine-tuning lowers B's force MAE by at least 30 %;
    every budget run within its bound; on ``ethanol_levels`` the 5 % budget on the force
    front and dominated on energies, the 25 % one dominated on forces; on the xTB ethanol
    pair the multiplier at its floor in every run, the 25 % budget on the force front by a
    mean B force MAE below the lowest swept one's by less than the seeds' spread, the 5 %
    one dominated, naive fine-tuning lower on both force errors than either."""
    results = REPO / "benchmarks" / "results"
    for pair in ("ethanol", "ethanol_levels"):
        d = json.loads((results / f"finetune_budget_replicate_{pair}.json").read_text())
        assert d["meta"]["args"]["seeds"] == [3, 4, 5]
        pre = {r["seed"]: r["budget"][F.BF] for r in d["pretrain"]}
        runs = {}
        for r in d["runs"]:
            runs.setdefault(r["method"], []).append(r)
        assert all(len(rs) == 3 for rs in runs.values()), pair
        naive = [r["budget"][F.BF] / pre[r["seed"]] - 1 for r in runs["ft_naive"]]
        assert statistics.mean(naive) <= -0.30, (pair, naive)

        def mean(m, k, runs=runs):
            return statistics.mean(r["budget"][k] for r in runs[m])

        status = d["views"]["budget"]["status"]
        for tol in ("0.05", "0.25"):
            m = f"ft_budget_from0.01_{tol}"
            states = [r["budget_state"] for r in runs[m]]
            assert max(x["final_ratio"] - x["bound"] for x in states) <= 0.02, (pair, m)
            force, energy = status["force"][m]["status"], status["energy"][m]["status"]
            if pair == "ethanol_levels":
                expected = ("on", "dominated") if tol == "0.05" else ("dominated", "dominated")
                assert (force, energy) == expected, (pair, m)
                continue
            assert all(x["multiplier"] <= 1.01e-3 for x in states)
            assert force == ("on" if tol == "0.25" else "dominated"), m
            assert all(mean("ft_naive", k) < mean(m, k) for k in (F.BF, F.AF)), m
            if tol == "0.25":
                lowest = min(mean(w, F.BF) for w in M.FT_SWEEP)
                spread = statistics.stdev(r["budget"][F.BF] for r in runs[m])
                assert 0 < lowest - mean(m, F.BF) < spread, (lowest, mean(m, F.BF), spread)

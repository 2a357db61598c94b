"""``python -m benchmarks.multifidelity --quick`` end to end on every pair, and its parts
against independent computations: the pairs' splits (energy order, the seeded permutation, a
test file) recomputed with numpy; every table cell equals the raw runs (recomputed here);
the deployed high-fidelity model predicts what the training model predicts for
high-fidelity frames; the deployed model's and the untrained model's reported errors are
their MAEs computed by hand (stress too); equal total compute is pretraining free minus the
pretraining: the counted state is the fine-tune's after exactly its step count (a plain
trainer stopped there gives the same errors) and the snapshot rule is checked on a clock
stepped by hand; the gradient cosines are the cosines of autograd gradients of the two
datasets' losses; the fine-tune starts from the cached pretrained weights with the high
fidelity's energy zero; ``--from-json`` rewrites the same report.

``si_xtb`` runs on a stand-in while its files are not in ``benchmarks/data/``: EMT Cu bulk
cells as the expensive pool, bulk and vacancy cells relabelled (energy shifted per atom,
forces and stress scaled) as the cheap set, vacancy cells to test, under the pair's file
names (``--data-dir``).
"""

from __future__ import annotations

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

from benchmarks import fidelity_pairs as FP
from benchmarks import multifidelity as MF
from benchmarks import protocol as P

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not P.ETHANOL.exists(), reason=f"no DFT ethanol at {P.ETHANOL}")


def _methods(*keys: str) -> list[str]:
    """``keys`` and, where this checkout has the fidelity embedding, ``mf_trunk_1``."""
    return [*keys, "mf_trunk_1"] if MF.embedding_supported() else list(keys)


METHODS = _methods("mf_dft_only", "mf_pretrain_ft", "mf_joint_1", "mf_heads_1")
SI_METHODS = _methods("mf_dft_only", "mf_pretrain_ft", "mf_heads_1")


def _run(*args):
    cmd = [sys.executable, "-m", "benchmarks.multifidelity", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, env=env)


def _relabelled(frames, per_atom: float, scale: float):
    """Another "level of theory": energy + per_atom x atoms, forces and stress x scale."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for a in frames:
        r, b = a.calc.results, a.copy()
        b.calc = SinglePointCalculator(b, energy=r["energy"] + per_atom * len(a),
                                       forces=scale * r["forces"], stress=scale * r["stress"])  # fmt: skip
        out.append(b)
    return out


def si_data_dir(tmp_path: Path) -> Path:
    """``benchmarks/data`` if it holds the ``si_xtb`` files, else an EMT stand-in."""
    if all(f.exists() for f in FP.PAIRS["si_xtb"].files().values()):
        return FP.DATA
    from nequip_mtl.tools.emt_alloy import generate_frames, write_frames

    kw = {"elements": ["Cu"], "rattle_amplitudes": [0.05]}
    names = FP.PAIRS["si_xtb"]
    low = (generate_frames(num_frames=40, seed=1, kind="bulk", **kw)
           + generate_frames(num_frames=40, seed=2, kind="vacancy", **kw))  # fmt: skip
    write_frames(generate_frames(num_frames=24, seed=0, kind="bulk", **kw),
                 tmp_path / names.high_file)  # fmt: skip
    write_frames(_relabelled(low, -0.5, 1.1), tmp_path / names.low_file)
    write_frames(generate_frames(num_frames=10, seed=3, kind="vacancy", **kw),
                 tmp_path / names.test_file)  # fmt: skip
    return tmp_path


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The realistic ethanol pair: every check runs on it."""
    out = tmp_path_factory.mktemp("mf") / "mf"
    _run("--quick", "--pair", "ethanol_low", "--budget-s", "1", "--pretrain-s", "0.5",
         "--cosine-steps", "2", "--methods", *METHODS, "--out", str(out))  # fmt: skip
    return out, json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def si(tmp_path_factory):
    """The periodic pair (or its stand-in): stress trained and reported; one size."""
    data = si_data_dir(tmp_path_factory.mktemp("si_data"))
    out = tmp_path_factory.mktemp("mf_si") / "mf"
    _run("--quick", "--pair", "si_xtb", "--data-dir", str(data), "--budget-s", "1",
         "--pretrain-s", "0.5", "--cosine-steps", "1", "--dft-train", "8",
         "--methods", *SI_METHODS, "--out", str(out))  # fmt: skip
    return out, json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(params=["quick", "si"])
def result(request):
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------- the pairs


def _ethanol_frames():
    import ase.io

    return {k: ase.io.read(v, index=":") for k, v in FP.PAIRS["ethanol_low"].files().items()}


def _energies(frames):
    return [a.get_potential_energy() / len(a) for a in frames]


def test_ethanol_low_trains_on_the_lowest_energies_and_tests_on_the_highest():
    """Mutation: sorting the expensive frames highest first (``np.argsort(-energy)``) makes
    the test set the lowest 20 and fails here."""
    frames = _ethanol_frames()
    out = FP.split(FP.PAIRS["ethanol_low"], frames, [40, 10])
    e = sorted(_energies(frames["high"]))
    assert sorted(_energies(out["high_test"])) == e[-20:]
    assert _energies(out["high_train_40"]) == e[:40]  # the N_H lowest, lowest first
    assert out["high_train_10"] == out["high_train_40"][:10]  # nested


def test_ethanol_random_is_the_seeded_permutation_and_the_cheap_split():
    frames = _ethanol_frames()
    out = FP.split(FP.PAIRS["ethanol_random"], frames, [80])
    rng = np.random.default_rng(0)
    high = [frames["high"][i] for i in rng.permutation(100)]
    low = [frames["low"][i] for i in rng.permutation(1200)]
    assert out["high_test"] == high[:20] and out["high_train_80"] == high[20:]
    assert out["low_train"] == low[:1000] and out["low_test"] == low[1000:1100]


def test_a_test_file_is_the_test_set_and_the_sizes_are_refused_beyond_the_pool(tmp_path):
    import ase.io

    pair = FP.PAIRS["si_xtb"]
    src = pair.files(si_data_dir(tmp_path))
    frames = {k: ase.io.read(v, index=":") for k, v in src.items()}
    out = FP.split(pair, frames, [8])
    assert out["high_test"] == frames["test"]
    pool = {id(a) for a in frames["high"]}
    assert all(id(a) in pool for a in out["high_train_8"])
    assert len(out["low_test"]) == pair.low_test
    assert len(out["low_train"]) == len(frames["low"]) - pair.low_test
    assert FP.properties(frames) == {"type_names": sorted({s for fs in frames.values() for a in fs
                                                          for s in a.get_chemical_symbols()}),
                                     "stress": True}  # fmt: skip
    with pytest.raises(SystemExit, match="--dft-train 1000: must be 1 to"):
        FP.split(pair, frames, [1000])


def test_low_config_types_keep_only_those_cheap_frames(tmp_path):
    """``si_bulk``: the cheap frames are the bulk ones only (counted here from the files'
    ``config_type``), the test set the first 20 of the seeded permutation of the expensive
    file. Mutation: dropping the filter keeps every cheap frame and fails."""
    import ase.io

    pair = FP.PAIRS["si_bulk"]
    src = pair.files(si_data_dir(tmp_path))
    frames = {k: ase.io.read(v, index=":") for k, v in src.items()}
    bulk = [a for a in frames["low"] if a.info.get("config_type") == "bulk"]
    out = FP.split(pair, frames, [40])
    low = out["low_train"] + out["low_test"]
    assert len(low) == len(bulk) and all(a.info["config_type"] == "bulk" for a in low)
    assert len(out["low_test"]) == pair.low_test
    order = np.random.default_rng(0).permutation(len(frames["high"]))
    assert out["high_test"] == [frames["high"][i] for i in order[: pair.n_test]]


# ----------------------------------------------------------------------------- the tables


def _tables(md: str) -> dict[tuple[int, str], dict[str, list[str]]]:
    """``{(n, view): {strategy cell: row cells}}`` of the per-size tables."""
    views = {"equal total compute": "counted", "pretraining free": "budget",
             "equal epochs": "epochs"}  # fmt: skip
    out, key = {}, None
    for line in md.splitlines():
        if line.startswith("**N_H = "):
            n = int(line.split()[2])
            key = (n, next(v for k, v in views.items() if f"frames, {k}:" in line))
        elif line.startswith("**"):
            key = None
        elif key and line.startswith("| ") and not line.startswith("| strategy"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(key, {})[cells[0].strip("*")] = cells
    return out


def _pm(values, factor) -> str:
    """mean ± sample sd in meV of raw values in the data's units (0 for one value)."""
    values = [factor * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def _at(run, view):
    """A run's result in a view, from the json alone: without pretraining, equal total
    compute is the equal-time result."""
    return run.get("counted", run["budget"]) if view == "counted" else run[view]


def test_table_cells_equal_the_raw_runs(result):
    out, data = result
    a = data["meta"]["args"]
    tables = _tables(out.with_suffix(".md").read_text())
    labels = MF.labels_of(a)
    keys = ["per_atom_energy_mae", "forces_mae", *(["stress_mae"] if a["stress"] else [])]
    factor = FP.PAIRS[a["pair"]].to_mev
    assert set(tables) == {(n, v) for n in a["dft_train"] for v in ("counted", "budget", "epochs")}
    for (n, view), rows in tables.items():
        runs = [r for r in data["runs"] if r["n_dft"] == n]
        assert {labels[r["method"]] for r in runs} == set(rows)
        base = [_at(r, view) for r in runs if r["method"] == "mf_dft_only"]
        for label, cells in rows.items():
            mine = [_at(r, view) for r in runs if labels[r["method"]] == label]
            for j, k in enumerate(keys):
                assert cells[1 + j] == _pm([r[k] for r in mine], factor), (n, view, k)
                gap = 100 * (statistics.fmean(r[k] for r in mine) / base[0][k] - 1)
                assert cells[1 + len(keys) + j] == f"{gap:+.0f} %", (n, view, k)


def test_every_strategy_ran(quick, si):
    assert {r["method"] for r in quick[1]["runs"]} == set(METHODS)
    assert {r["method"] for r in si[1]["runs"]} == set(SI_METHODS)
    assert si[1]["meta"]["args"]["stress"] and not quick[1]["meta"]["args"]["stress"]


def test_joint_runs_report_the_deployed_model(result):
    """A joint run's equal-time errors are the deployed model's, equal to the training
    model's validation to float tolerance; other strategies have no deployment."""
    _, data = result
    keys = MF.metrics_of(data["meta"]["args"])
    for r in data["runs"]:
        if MF.M.multifidelity_methods()[r["method"]].fidelity["mode"] != "joint":
            assert "deployed" not in r
            continue
        assert set(r["deployed"]) == set(keys)
        for k in keys:
            if "note" not in r["budget"]:  # the equal-time state is the final one
                assert r["budget"][k] == r["deployed"][k]
            assert math.isclose(r["deployed"][k], r["training_model"][k], rel_tol=1e-5)
        assert set(r["references"]) == {"high", "low"}


# ----------------------------------------------------------------------------- equal compute


def test_equal_total_compute_is_pretraining_free_minus_the_pretraining(result):
    """The sequential runs' counted state: an earlier state of the same fine-tune, reached
    when its clock plus the seed's pretraining clock reach the budget; every other run is
    the same in both views. Mutation: snapshotting at ``budget_s`` (the pretraining not
    subtracted) fails the step and clock checks."""
    _, data = result
    a = data["meta"]["args"]
    pre = {r["seed"]: r["clock_s"] for r in data["pretrain"]}
    seq = [r for r in data["runs"] if r["method"] == "mf_pretrain_ft"]
    assert seq
    for r in seq:
        c, free = r["counted"], r["budget"]
        assert c["pretrain_clock_s"] == pre[r["seed"]] >= a["pretrain_s"]
        assert c["clock_s"] + c["pretrain_clock_s"] >= a["budget_s"] > c["clock_s"]
        assert free["clock_s"] >= a["budget_s"] and c["step"] < free["step"]
    for r in data["runs"]:
        if r["method"] != "mf_pretrain_ft":
            assert "counted" not in r
    for n in a["dft_train"]:
        rows = MF.summaries(data, n)
        counted = {x["method"]: x for x in rows["counted"]}
        for x in rows["budget"]:
            if x["method"] != "mf_pretrain_ft":
                assert counted[x["method"]] == x


def test_counted_errors_are_the_fine_tune_stopped_at_its_step(quick):
    """A plain trainer (no clock) fine-tuning the same seeded run for the counted step count
    gives the counted errors: the snapshot is the state after exactly that step."""
    _, data = quick
    a, files, stats = _files_and_stats(data)
    (r,) = [r for r in data["runs"] if r["method"] == "mf_pretrain_ft" and r["n_dft"] == 8]
    task = {"args": a, "stats": stats, "files": files, "seed": 0, "n": 8,
            "method": "mf_pretrain_ft", "cache": str(MF.pretrained_path(a, stats, 0))}  # fmt: skip
    module, dm, _, _ = MF.build_run(task)
    fit = P.trainer(max_steps=r["counted"]["step"], max_epochs=10_000, num_sanity_val_steps=0,
                    check_val_every_n_epoch=a["val_every"])  # fmt: skip
    fit.fit(module, datamodule=dm)
    got = P.validate(module, dm, MF.LOADERS)
    for k in MF.metrics_of(a):
        assert math.isclose(got[k], r["counted"][k], rel_tol=1e-5), k


def test_snapshot_is_the_state_after_the_first_step_reaching_the_clock(tmp_path):
    """On a clock advanced by hand (0.25 s a step), ``snapshot_on_clock(at_s=1.0)`` keeps
    the state after step 4 (not 3, not 5): the model of a trainer stopped after 4 steps.
    Mutation: ``>`` for ``>=`` in the callback keeps step 5 and fails."""
    import lightning

    from tests._harness import datamodule, module_kwargs

    class Clock(lightning.Callback):
        elapsed, steps = 0.0, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.elapsed += 0.25
            self.steps += 1

    def run(steps, callbacks):
        from nequip.train import NequIPLightningModule

        lightning.seed_everything(3)
        module = NequIPLightningModule(**module_kwargs())
        P.trainer(callbacks, max_steps=steps, max_epochs=100).fit(module, datamodule=datamodule())
        return module

    clock, store = Clock(), {}
    run(7, [clock, P.snapshot_on_clock(clock, 1.0, store)])
    assert store["step"] == 4 and store["clock_s"] == 1.0
    want = run(4, []).model.state_dict()
    assert all(torch.equal(store["state"][k], v) for k, v in want.items())


def test_pretraining_at_or_above_the_budget_is_refused():
    with pytest.raises(SystemExit):
        MF.parse(["--budget-s", "10", "--pretrain-s", "10"])


def test_trunk_methods_are_refused_where_the_embedding_is_missing(monkeypatch):
    monkeypatch.setattr(MF, "embedding_supported", lambda: False)
    with pytest.raises(SystemExit, match="mf_trunk_3: .*`fidelity_embedding`"):
        MF.check_methods(["mf_dft_only", "mf_trunk_3"])


# ----------------------------------------------------------------------------- the models


def _files_and_stats(data):
    a = data["meta"]["args"]
    return a, data["meta"]["data"]["files"], data["meta"]["data"]["statistics"]


def _joint_module(a, files, stats, n, seed=0):
    dm = MF.datamodule(files, a, seed, n, "joint")
    types = a["type_names"]
    model = P.with_references(P.run_model(a, stats[f"high_{n}"], seed, types),
                              dm.energy_references(types))  # fmt: skip
    method = MF.M.multifidelity_methods()["mf_joint_1"]
    module = P.build_module(method, model, MF.num_tasks(a), lr=1e-3, loss=MF.joint_loss(a),
                            num_val=1)  # fmt: skip
    return module, dm


def _frames(a, path, with_index=None):
    from hydra.utils import instantiate
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset

    cfg = P.ase_dataset(Path(path), a["r_max"], a["type_names"])
    ds = ASEDataset(file_path=cfg["file_path"], ase_args=cfg["ase_args"],
                    transforms=[instantiate(t) for t in cfg["transforms"]])  # fmt: skip
    frames = [ds[i] for i in range(len(ds))]
    batch = AtomicDataDict.batched_from_list(frames)
    if with_index is not None:
        batch["dataset_index"] = torch.full((len(frames),), with_index, dtype=torch.long)
    return batch


def test_deployed_high_model_predicts_what_the_training_model_predicts_on_its_frames(quick):
    _, data = quick
    a, files, stats = _files_and_stats(data)
    P.init_torch()
    module, _ = _joint_module(a, files, stats, 20)
    (key,) = module.model.keys()
    train_model = module.model[key]
    dep = MF.deployed(module)
    assert "dataset_index" not in dep.model_input_fields
    high = _frames(a, files["high_test"], with_index=0)
    low_level = _frames(a, files["high_test"], with_index=1)
    plain = _frames(a, files["high_test"])
    want, other, got = train_model(dict(high)), train_model(dict(low_level)), dep(dict(plain))
    torch.testing.assert_close(got["total_energy"], want["total_energy"], rtol=1e-12, atol=1e-6)
    torch.testing.assert_close(got["forces"], want["forces"], rtol=1e-6, atol=1e-6)
    # the xTB fidelity is ~10^4 kcal/mol away: the deployed model is DFT's
    assert (got["total_energy"] - other["total_energy"]).abs().min() > 1e3
    # the training model itself is left unchanged (select_fidelity works on a copy)
    assert "dataset_index" in train_model.model_input_fields


def _maes(model, frames) -> dict[str, float]:
    """Per-atom energy, force and (if the frames hold it) stress MAE, by hand."""
    pred = model(dict(frames))
    n_atoms = torch.bincount(frames["batch"]).to(torch.float64)
    e = (pred["total_energy"].reshape(-1) - frames["total_energy"].reshape(-1)) / n_atoms
    out = {"per_atom_energy_mae": e.abs().mean(),
           "forces_mae": (pred["forces"] - frames["forces"]).abs().mean()}  # fmt: skip
    if "stress" in frames:
        out["stress_mae"] = (
            (pred["stress"] - frames["stress"].reshape(pred["stress"].shape)).abs().mean()
        )
    return {k: float(v.detach()) for k, v in out.items()}


def test_deployed_errors_are_the_maes_of_the_deployed_model(result):
    _, data = result
    a, files, stats = _files_and_stats(data)
    n = min(a["dft_train"])
    P.init_torch()
    module, _ = _joint_module(a, files, stats, n)
    dep = MF.deployed(module)
    got = MF.evaluate_plain(dep, files, a, 0, n)
    want = _maes(dep, _frames(a, files["high_test"]))
    assert set(got) == set(want) == set(MF.metrics_of(a))
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-5), k


def test_the_untrained_errors_are_the_maes_of_the_model_as_initialised(result):
    """Mutation: recording the learning check after training fails here."""
    _, data = result
    a, files, stats = _files_and_stats(data)
    P.init_torch()
    for r in [r for r in data["runs"] if r["method"] == "mf_dft_only"]:
        task = {"args": a, "stats": stats, "files": files, "seed": r["seed"], "n": r["n_dft"],
                "method": "mf_dft_only", "cache": ""}  # fmt: skip
        module, *_ = MF.build_run(task)
        (key,) = module.model.keys()
        want = _maes(module.model[key], _frames(a, files["high_test"]))
        for k in MF.metrics_of(a):
            assert math.isclose(r["untrained"][k], want[k], rel_tol=1e-5), k
    assert "Learning check" in _md(result)


def _md(result) -> str:
    return result[0].with_suffix(".md").read_text()


def test_transfer_check_readings_are_the_split_files_least_squares_residuals(result):
    """Each dataset's energy residual RMS per atom after a least-squares per-type fit and its
    force RMS, recomputed with numpy from the split files the record names (N_H frames of
    the high fidelity, the cheap training frames); the report shows them in meV.
    Mutation: checking the smallest training set instead of the largest fails here."""
    import ase.io

    out, data = result
    a, files, _ = _files_and_stats(data)
    md = out.with_suffix(".md").read_text()
    factor = FP.PAIRS[a["pair"]].to_mev
    for t in data["transfer"]:
        assert t["n_dft"] == max(a["dft_train"])
        for name, key in (("high", f"high_train_{t['n_dft']}"), ("low", "low_train")):
            frames = ase.io.read(files[key], index=":")
            counts = np.array([[f.get_chemical_symbols().count(s) for s in a["type_names"]]
                               for f in frames], dtype=float)  # fmt: skip
            energy = np.array([f.get_potential_energy() for f in frames])
            # the minimum-norm fit; rank-deficient for one molecule: cut off round-off modes
            resid = energy - counts @ (np.linalg.pinv(counts, rcond=1e-10) @ energy)
            rms = float(np.sqrt(np.mean((resid / counts.sum(1)) ** 2)))
            force = float(
                np.sqrt(np.mean(np.concatenate([f.get_forces().ravel() for f in frames]) ** 2))
            )
            got = t["datasets"][name]
            assert got["frames"] == len(frames)
            assert math.isclose(got["energy_residual_rms"], rms, rel_tol=1e-3, abs_tol=1e-6)
            assert math.isclose(got["force_rms"], force, rel_tol=1e-5)
            if t["seed"] == data["transfer"][0]["seed"]:
                assert f"| {len(frames)} | {rms * factor:.1f} | {force * factor:.0f} |" in md
        assert -1.0 <= t["cosine"] <= 1.0

        # shared structures, counted independently: the same species and positions (the
        # silicon pair's cheap bulk frames are the expensive pool's geometries; ethanol's none)
        def keys(name):
            return {(tuple(f.numbers), tuple(np.round(f.positions, 3).ravel()))
                    for f in ase.io.read(files[name], index=":")}  # fmt: skip

        shared = keys(f"high_train_{t['n_dft']}") & keys("low_train")
        assert t["shared_frames"] == len(shared)


# ----------------------------------------------------------------------------- cosines, pretraining


def _task_gradients(model, batch, stress: bool):
    """The gradients of each dataset's 1:1 per-atom energy + force (+ stress) MSE."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(dict(batch))
    n_atoms = torch.bincount(batch["batch"]).to(out["total_energy"].dtype)
    frame_ds = batch["dataset_index"].reshape(-1)
    atom_ds = frame_ds[batch["batch"]]
    grads = []
    for d in (0, 1):
        e = ((out["total_energy"].reshape(-1) - batch["total_energy"].reshape(-1)) / n_atoms)[
            frame_ds == d
        ]
        f = (out["forces"] - batch["forces"])[atom_ds == d]
        loss = e.pow(2).mean() + f.pow(2).mean()
        if stress:
            s = out["stress"] - batch["stress"].reshape(out["stress"].shape)
            loss = loss + s[frame_ds == d].pow(2).mean()
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                for x, p in zip(g, params)]).double())  # fmt: skip
    return grads


def test_first_cosine_is_the_cosine_of_the_datasets_autograd_gradients(result):
    """The recorded cosine of the first batch at initialisation, with references and with
    one shared shift, from the same model and the data module's first batch."""
    import lightning

    _, data = result
    a, files, stats = _files_and_stats(data)
    (c,) = data["cosines"]
    n = c["n_dft"]
    P.init_torch()
    for variant in MF.COSINE_VARIANTS:
        lightning.seed_everything(0, workers=True, verbose=False)
        dm = MF.datamodule(files, a, 0, n, "joint")
        model = P.run_model(a, stats[f"high_{n}"], 0, a["type_names"])
        if variant == "references":
            model = P.with_references(model, dm.energy_references(a["type_names"]))
        method = MF.M.multifidelity_methods()["mf_upgrad"]
        module = P.build_module(method, model, MF.num_tasks(a), lr=0.0, loss=MF.joint_loss(a),
                                num_val=0)  # fmt: skip
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        (key,) = module.model.keys()
        g_high, g_low = _task_gradients(module.model[key], batch, a["stress"])
        cos = float(g_high @ g_low / (g_high.norm() * g_low.norm()))
        assert math.isclose(c[f"init/{variant}"][0], cos, abs_tol=1e-4), variant
    assert len(c["pretrained/references"]) == a["cosine_steps"]


def test_fine_tune_starts_from_the_cached_pretrained_model_with_the_high_energy_zero(quick):
    _, data = quick
    a, files, stats = _files_and_stats(data)
    cache = MF.pretrained_path(a, stats, 0)
    assert cache.exists()
    P.init_torch()
    pre = torch.load(cache, weights_only=False)["model"]
    shift = MF._shift_key(pre)
    method = MF.M.multifidelity_methods()["mf_pretrain_ft"]
    high_shift = stats["high_20"]["per_type_energy_shifts"]
    types = a["type_names"]
    model = P.run_model(a, {**stats["low"], "per_type_energy_shifts": high_shift}, 5, types)
    module = P.build_module(method, model, 2, lr=1e-3, num_val=1)
    MF.load_pretrained(module, str(cache), keep_shift=True)
    got = module.model.state_dict()
    for k, v in pre.items():
        if k == shift:
            want = torch.tensor([high_shift[t] for t in types], dtype=v.dtype)
            torch.testing.assert_close(got[k].reshape(-1), want)
            assert not torch.allclose(got[k], v)
        else:
            assert torch.equal(got[k], v), k


def test_from_json_rewrites_the_same_report(quick, tmp_path):
    out, _ = quick
    MF.main(["--from-json", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text() == out.with_suffix(".md").read_text()
    assert (tmp_path / "again.png").stat().st_size > 0


# ----------------------------------------------------------------------------- --resume


def test_resume_runs_only_the_missing_runs_and_refuses_other_settings(tmp_path):
    """A study resumed with a new size keeps every earlier record as it was and adds the
    missing (N_H, seed, method) runs only; another budget or an absent json is refused.
    Mutation: dropping the ``finished`` filter reruns the earlier run (3 runs) and fails."""
    data = si_data_dir(tmp_path / "data")
    out = tmp_path / "mf"
    common = ["--quick", "--pair", "si_xtb", "--data-dir", str(data), "--budget-s", "1",
              "--pretrain-s", "0.5", "--cosine-steps", "1", "--transfer-batches", "1",
              "--methods", "mf_dft_only", "--out", str(out)]  # fmt: skip
    with pytest.raises(subprocess.CalledProcessError) as absent:
        _run(*common, "--dft-train", "8", "--resume")
    assert "no earlier results" in absent.value.stderr
    _run(*common, "--dft-train", "8")
    before = json.loads(out.with_suffix(".json").read_text())
    with pytest.raises(subprocess.CalledProcessError) as other:
        _run(*common[:-2], "--budget-s", "2", "--out", str(out), "--dft-train", "12", "--resume")
    assert "budget_s 1.0 -> 2.0" in other.value.stderr
    _run(*common, "--dft-train", "12", "--resume")
    after = json.loads(out.with_suffix(".json").read_text())
    assert [(r["n_dft"], r["method"]) for r in after["runs"]] == [(8, "mf_dft_only"),
                                                                 (12, "mf_dft_only")]  # fmt: skip
    assert after["runs"][0] == before["runs"][0]
    for key in ("pretrain", "cosines", "transfer"):
        assert after[key] == before[key]
    a = after["meta"]["args"]
    assert a["dft_train"] == [12, 8] and a["argv"] == before["meta"]["args"]["argv"]
    assert a["resumed_argv"][0][-2:] == ["12", "--resume"]
    assert (
        after["meta"]["data"]["statistics"]["high_8"]
        == before["meta"]["data"]["statistics"]["high_8"]
    )
    assert "resumed with" in out.with_suffix(".md").read_text()


def test_resume_refuses_changed_data(tmp_path):
    """The statistics of a size both parts ran must agree (the same frames)."""
    earlier = {"meta": {"args": {"pair": "si_xtb", "argv": []},
                        "data": {"statistics": {"high_8": {"forces_rms": 1.0}}}}}  # fmt: skip
    a = {"pair": "si_xtb", "argv": []}
    with pytest.raises(SystemExit, match="the data changed"):
        MF.merge_earlier(earlier, a, {"high_8": {"forces_rms": 1.1}}, tmp_path / "mf")
    merged, stats, lists = MF.merge_earlier(earlier, a, {"high_8": {"forces_rms": 1.0}},
                                            tmp_path / "mf")  # fmt: skip
    assert stats == {"high_8": {"forces_rms": 1.0}} and lists["runs"] == []

"""``python -m benchmarks.multifidelity --quick`` end to end, and its parts against independent
computations: every table cell equals the raw runs (recomputed here); the deployed DFT model
predicts what the training model predicts for DFT frames; the deployed model's reported
errors are its MAEs computed by hand; the gradient cosines are the cosines of autograd
gradients of the two datasets' losses; the fine-tune starts from the cached pretrained
weights with DFT's energy zero; ``--from-json`` rewrites the same report."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import multifidelity as MF
from benchmarks import protocol as P

REPO = Path(__file__).resolve().parents[1]
METHODS = ["mf_dft_only", "mf_pretrain_ft", "mf_joint_1", "mf_upgrad", "mf_joint_heads"]
pytestmark = pytest.mark.skipif(not P.ETHANOL.exists(), reason=f"no DFT ethanol at {P.ETHANOL}")


def _run(*args):
    cmd = [sys.executable, "-m", "benchmarks.multifidelity", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("mf") / "mf"
    _run("--quick", "--budget-s", "1", "--pretrain-s", "1.5", "--cosine-steps", "2",
         "--methods", *METHODS, "--out", str(out))  # fmt: skip
    return out, json.loads(out.with_suffix(".json").read_text())


def _tables(md: str) -> dict[tuple[int, str], dict[str, list[str]]]:
    """``{(n_dft, "budget"|"epochs"): {strategy cell: row cells}}`` of the per-size tables."""
    out, key = {}, None
    for line in md.splitlines():
        if line.startswith("**") and " DFT training frames, equal " in line:
            n = int(line[2:].split()[0])
            key = (n, "budget" if "equal training time" in line else "epochs")
        elif line.startswith("**"):
            key = None
        elif key and line.startswith("| ") and not line.startswith("| strategy"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(key, {})[cells[0].strip("*")] = cells
    return out


def _pm(values) -> str:
    """mean ± sample sd in meV of raw kcal/mol values (0 for one value)."""
    values = [43.364 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def test_table_cells_equal_the_raw_runs(quick):
    out, data = quick
    tables = _tables(out.with_suffix(".md").read_text())
    labels = {m: v.label for m, v in MF.M.multifidelity_methods().items()}
    sizes = data["meta"]["args"]["dft_train"]
    assert set(tables) == {(n, v) for n in sizes for v in ("budget", "epochs")}
    for (n, view), rows in tables.items():
        runs = [r for r in data["runs"] if r["n_dft"] == n]
        assert {labels[r["method"]] for r in runs} == set(rows)
        for label, cells in rows.items():
            mine = [r for r in runs if labels[r["method"]] == label]
            assert cells[1] == _pm([r[view]["per_atom_energy_mae"] for r in mine]), (n, view)
            assert cells[2] == _pm([r[view]["forces_mae"] for r in mine]), (n, view)
            base = [r[view]["forces_mae"] for r in runs if r["method"] == "mf_dft_only"]
            gap = 100 * (statistics.fmean(r[view]["forces_mae"] for r in mine) / base[0] - 1)
            assert cells[4] == f"{gap:+.0f} %"


def test_every_strategy_ran(quick):
    _, data = quick
    assert {r["method"] for r in data["runs"]} == set(METHODS)


def test_joint_runs_report_the_deployed_model(quick):
    """A joint run's equal-time errors are the deployed model's, equal to the training
    model's validation to float tolerance; other strategies have no deployment."""
    _, data = quick
    for r in data["runs"]:
        if MF.M.multifidelity_methods()[r["method"]].fidelity["mode"] != "joint":
            assert "deployed" not in r
            continue
        for k in ("forces_mae", "per_atom_energy_mae"):
            if "note" not in r["budget"]:  # the equal-time state is the final one
                assert r["budget"][k] == r["deployed"][k]
            assert math.isclose(r["deployed"][k], r["training_model"][k], rel_tol=1e-5)
        assert set(r["references"]) == {"dft", "xtb"}


def _files_and_stats(data):
    a = data["meta"]["args"]
    return a, data["meta"]["data"]["files"], data["meta"]["data"]["statistics"]


def _joint_module(a, files, stats, n, seed=0):
    dm = MF.datamodule(files, a, seed, n, "joint")
    model = P.with_references(P.run_model(a, stats[f"dft_{n}"], seed, MF.TYPES),
                              dm.energy_references(MF.TYPES))  # fmt: skip
    method = MF.M.multifidelity_methods()["mf_joint_1"]
    return P.build_module(method, model, 2, lr=1e-3, loss=MF.joint_loss(), num_val=1), dm


def _frames(path, with_index=None):
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset

    cfg = P.ase_dataset(Path(path), 4.5, MF.TYPES)
    from hydra.utils import instantiate

    ds = ASEDataset(file_path=cfg["file_path"], ase_args=cfg["ase_args"],
                    transforms=[instantiate(t) for t in cfg["transforms"]])  # fmt: skip
    frames = [ds[i] for i in range(len(ds))]
    batch = AtomicDataDict.batched_from_list(frames)
    if with_index is not None:
        batch["dataset_index"] = torch.full((len(frames),), with_index, dtype=torch.long)
    return batch


def test_deployed_dft_model_predicts_what_the_training_model_predicts_on_dft_frames(quick):
    _, data = quick
    a, files, stats = _files_and_stats(data)
    P.init_torch()
    module, _ = _joint_module(a, files, stats, 20)
    (key,) = module.model.keys()
    train_model = module.model[key]
    dep = MF.deployed(module)
    assert "dataset_index" not in dep.model_input_fields
    dft = _frames(files["dft_test"], with_index=0)
    xtb_level = _frames(files["dft_test"], with_index=1)
    plain = _frames(files["dft_test"])
    want, other, got = train_model(dict(dft)), train_model(dict(xtb_level)), dep(dict(plain))
    torch.testing.assert_close(got["total_energy"], want["total_energy"], rtol=1e-12, atol=1e-6)
    torch.testing.assert_close(got["forces"], want["forces"], rtol=1e-6, atol=1e-6)
    # the xTB fidelity is ~10^4 kcal/mol away: the deployed model is DFT's
    assert (got["total_energy"] - other["total_energy"]).abs().min() > 1e3
    # the training model itself is left unchanged (select_fidelity works on a copy)
    assert "dataset_index" in train_model.model_input_fields


def test_deployed_errors_are_the_maes_of_the_deployed_model(quick):
    _, data = quick
    a, files, stats = _files_and_stats(data)
    P.init_torch()
    module, _ = _joint_module(a, files, stats, 20)
    dep = MF.deployed(module)
    got = MF.evaluate_plain(dep, files, a, 0, 20)
    frames = _frames(files["dft_test"])
    pred = dep(dict(frames))
    n_atoms = torch.bincount(frames["batch"]).to(torch.float64)
    e = (pred["total_energy"].reshape(-1) - frames["total_energy"].reshape(-1)) / n_atoms
    f = pred["forces"] - frames["forces"]
    assert math.isclose(got["per_atom_energy_mae"], float(e.abs().mean()), rel_tol=1e-5)
    assert math.isclose(got["forces_mae"], float(f.abs().mean()), rel_tol=1e-5)


def _task_gradients(model, batch):
    """The gradients of each dataset's 1:1 per-atom energy + force MSE (autograd)."""
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
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                for x, p in zip(g, params)]).double())  # fmt: skip
    return grads


def test_first_cosine_is_the_cosine_of_the_datasets_autograd_gradients(quick):
    """The recorded cosine of the first batch at initialisation, with references and with
    one shared shift, from the same model and the data module's first batch."""
    import lightning

    _, data = quick
    a, files, stats = _files_and_stats(data)
    (c,) = data["cosines"]
    n = c["n_dft"]
    P.init_torch()
    for variant in MF.COSINE_VARIANTS:
        lightning.seed_everything(0, workers=True, verbose=False)
        dm = MF.datamodule(files, a, 0, n, "joint")
        model = P.run_model(a, stats[f"dft_{n}"], 0, MF.TYPES)
        if variant == "references":
            model = P.with_references(model, dm.energy_references(MF.TYPES))
        method = MF.M.multifidelity_methods()["mf_upgrad"]
        module = P.build_module(method, model, 2, lr=0.0, loss=MF.joint_loss(), num_val=0)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        (key,) = module.model.keys()
        g_dft, g_xtb = _task_gradients(module.model[key], batch)
        cos = float(g_dft @ g_xtb / (g_dft.norm() * g_xtb.norm()))
        assert math.isclose(c[f"init/{variant}"][0], cos, abs_tol=1e-4), variant
    assert len(c["pretrained/references"]) == a["cosine_steps"]


def test_fine_tune_starts_from_the_cached_pretrained_model_with_dfts_energy_zero(quick):
    _, data = quick
    a, files, stats = _files_and_stats(data)
    cache = MF.pretrained_path(a, stats, 0)
    assert cache.exists()
    P.init_torch()
    pre = torch.load(cache, weights_only=False)["model"]
    shift = MF._shift_key(pre)
    method = MF.M.multifidelity_methods()["mf_pretrain_ft"]
    dft_shift = stats["dft_20"]["per_type_energy_shifts"]
    model = P.run_model(a, {**stats["xtb"], "per_type_energy_shifts": dft_shift}, 5, MF.TYPES)
    module = P.build_module(method, model, 2, lr=1e-3, num_val=1)
    MF.load_pretrained(module, str(cache), keep_shift=True)
    got = module.model.state_dict()
    for k, v in pre.items():
        if k == shift:
            want = torch.tensor([dft_shift[t] for t in MF.TYPES], dtype=v.dtype)
            torch.testing.assert_close(got[k].reshape(-1), want)
            assert not torch.allclose(got[k], v)
        else:
            assert torch.equal(got[k], v), k


def test_from_json_rewrites_the_same_report(quick, tmp_path):
    out, _ = quick
    MF.main(["--from-json", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text() == out.with_suffix(".md").read_text()
    assert (tmp_path / "again.png").stat().st_size > 0
